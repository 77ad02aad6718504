"""Error feedback onto the float16 grid (GPTQ) from a factored second moment, all rows at once.

Notation: columns in act order j = 0..n-1, E = W - Q (scaled units), H_d = H + damp I = M M^T with
M upper triangular (a Cholesky factor taken from the last column backwards: M_jj^2 is what column
j costs once every later column has compensated for it). Then

    L_d(Q) = tr(E H_d E^T) = sum_j ((E M)_j)^2,   (E M)_j = M_jj (t_j - Q_j),
    t_j = W_j + sum_{i<j} E_i T_ij,   T_ij = M_ij / M_jj,

so rounding each column to the float16 nearest its target t_j, in order, is GPTQ's error feedback,
written with the errors themselves as what is propagated, and the loss comes out of the loop for
free. Two factors supply T:

* `DenseFactor` (full second moment): T from the Cholesky factor; the earlier columns reach a block
  through one product with their stored errors, O(m n^2) in all;
* `LowRankFactor` (the recorder's summary H = diag(r) + Z Z^T, Z = V lam^1/2, never expanded): with
  D = diag(r) + damp I, Woodbury gives T_ij = z_i^T c_j with c_j = C_j^-1 z_j / d_j and
  C_j = I + sum_{i>=j} z_i z_i^T / d_i, so the earlier columns reach a block through the m x k
  running sum S = sum_{i<j} E_i z_i^T: O(m n k).

The loop works on the transposed weight (one contiguous row per column) a block of columns at a
time, every output row at once, without a host synchronisation, on whatever device holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .calibration import InputStatistics
from .fp16 import FP16_MAX, round_to_fp16

BLOCK_COLUMNS = 64  # columns per block: earlier blocks reach it through one product (64-256 measured alike)
INNER_COLUMNS = 16  # columns updated one by one inside a block before a product spreads their errors
FACTOR_BLOCK = 256  # columns per step of the low-rank factorization
_DAMPING_RETRIES = 4  # more damping (x10 each) when float error makes H indefinite
_GATHER_ROWS = 256  # rows of H permuted at a time into the factor's matrix


class Factor(Protocol):
    """What the feedback loop needs from H_d, in act order."""

    order: torch.Tensor  # act order: column indices, largest diag(H) first
    curvature: torch.Tensor  # [n] M_jj^2, float64
    damp: float  # the damping actually added to diag(H)

    def start(self, rows: int) -> None: ...

    def targets(self, b0: int, b1: int, weights: torch.Tensor) -> torch.Tensor:
        """The targets of columns b0:b1: a new [b1-b0, rows] tensor, their weights plus what earlier errors add.

        `weights` is the whole transposed weight: rows b0: still hold weights, rows :b0 the final errors.
        """

    def coupling(self, b0: int, b1: int) -> torch.Tensor:
        """T restricted to columns b0:b1 (strictly upper triangular), work dtype."""

    def absorb(self, b0: int, b1: int, errors: torch.Tensor) -> None:
        """Take note of the final errors of columns b0:b1 ([b1-b0, rows])."""

    def estimated_losses(self, errors: torch.Tensor) -> torch.Tensor:
        """tr(e H e^T) per row of errors [rows, n] in the input's own column order (undamped), work dtype."""

    def exact_losses(self, errors: torch.Tensor) -> torch.Tensor:
        """The same in float64 from the statistics as given, for float64 errors (near ties)."""

    # the undamped H for coordinate descent (refine.py), in act order and the work dtype

    def start_gradient(self, errors: torch.Tensor) -> None:
        """Prepare `gradient` for the transposed errors [n, rows] (which `error_feedback` may have left)."""

    def gradient(self, b0: int, b1: int, errors: torch.Tensor) -> torch.Tensor:
        """(H E^T) rows b0:b1, [b1-b0, rows], from the current errors (and the moves `moved` was told of)."""

    def hessian_block(self, b0: int, b1: int) -> torch.Tensor:
        """H restricted to columns b0:b1."""

    def moved(self, b0: int, b1: int, changes: torch.Tensor) -> None:
        """The errors of columns b0:b1 changed by `changes` [b1-b0, rows]."""


def act_order(diagonal: torch.Tensor) -> torch.Tensor:
    return torch.argsort(diagonal, descending=True)


def live_damping(diagonal: torch.Tensor, damping: float) -> float:
    """damping x the mean of diag(H) over inputs that are ever non-zero (1.0 if none is)."""
    live = diagonal[diagonal > 0]
    return damping * float(live.mean()) if live.numel() else 1.0


@dataclass
class DenseFactor:
    """T from the backwards Cholesky factor of the dense damped H; earlier errors are kept by the caller."""

    order: torch.Tensor
    h: torch.Tensor  # the undamped H as given (float64, own order): rows are gathered from it for refinement
    lower: torch.Tensor  # Cholesky factor of H_d with rows and columns reversed: M = flip(lower)
    diag: torch.Tensor  # M_jj, work dtype
    curvature: torch.Tensor
    damp: float

    @classmethod
    def build(cls, h: torch.Tensor, damping: float, dtype: torch.dtype) -> DenseFactor | None:
        """From H (float64 [n, n] on the compute device); None if no damping makes it positive definite.

        Inputs that are always zero (diag 0) are decoupled: they get no feedback and give none.
        The factorization runs in the work dtype, in place: one n x n matrix beside H.
        """
        diagonal = h.diagonal()
        order = act_order(diagonal)
        reverse = order.flip(0)
        damp = live_damping(diagonal, damping)
        dead = diagonal[reverse] <= 0
        damped = torch.empty(h.shape, dtype=dtype, device=h.device)
        info = torch.empty((), dtype=torch.int32, device=h.device)
        for attempt in range(_DAMPING_RETRIES):
            for r0 in range(0, h.shape[0], _GATHER_ROWS):
                damped[r0 : r0 + _GATHER_ROWS] = h[reverse[r0 : r0 + _GATHER_ROWS, None], reverse]
            damped[dead, :] = 0
            damped[:, dead] = 0
            damped.diagonal().add_(damp * 10**attempt)
            torch.linalg.cholesky_ex(damped.mT, out=(damped.mT, info))  # column-major view: in place
            if int(info) == 0:
                lower = damped.mT
                diag = lower.diagonal().flip(0).clone()
                return cls(order, h, lower, diag, diag.double() ** 2, damp * 10**attempt)
        return None

    def _m(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        n = self.lower.shape[0]
        return self.lower[n - i1 : n - i0, n - j1 : n - j0].flip(0, 1)

    def start(self, rows: int) -> None:
        return None

    def targets(self, b0: int, b1: int, weights: torch.Tensor) -> torch.Tensor:
        if b0 == 0:
            return weights[b0:b1].clone()
        return torch.addmm(weights[b0:b1], (self._m(0, b0, b0, b1) / self.diag[b0:b1]).T, weights[:b0])

    def coupling(self, b0: int, b1: int) -> torch.Tensor:
        return torch.triu(self._m(b0, b1, b0, b1) / self.diag[b0:b1], diagonal=1)

    def absorb(self, b0: int, b1: int, errors: torch.Tensor) -> None:
        return None

    def estimated_losses(self, errors: torch.Tensor) -> torch.Tensor:
        """||e M||^2 - damp ||e||^2, M = flip(lower) in act order."""
        projected = torch.index_select(errors, 1, self.order.flip(0)) @ self.lower
        return (projected * projected).sum(1) - self.damp * (errors * errors).sum(1)

    def exact_losses(self, errors: torch.Tensor) -> torch.Tensor:
        return ((errors @ self.h) * errors).sum(1)

    def _rows(self, b0: int, b1: int) -> torch.Tensor:
        return self.h.index_select(0, self.order[b0:b1]).index_select(1, self.order).to(self.lower.dtype)

    def start_gradient(self, errors: torch.Tensor) -> None:
        return None

    def gradient(self, b0: int, b1: int, errors: torch.Tensor) -> torch.Tensor:
        return self._rows(b0, b1) @ errors

    def hessian_block(self, b0: int, b1: int) -> torch.Tensor:
        return self._rows(b0, b1)[:, b0:b1]

    def moved(self, b0: int, b1: int, changes: torch.Tensor) -> None:
        return None  # `gradient` reads the errors themselves


@dataclass
class LowRankFactor:
    """T = triu(Z C) from the eigen summary; earlier errors enter through S = E Z (m x k)."""

    order: torch.Tensor
    z: torch.Tensor  # [n, k] Z = V lam^1/2 in act order, work dtype
    c: torch.Tensor  # [k, n] c_j = C_j^-1 z_j / d_j, work dtype
    z_own: torch.Tensor  # [n, k] Z in the input's own column order, work dtype (for losses)
    residual_own: torch.Tensor  # [n] diag(H) - diag(Z Z^T), own order, work dtype
    residual: torch.Tensor  # [n] the same in act order
    exact: tuple[torch.Tensor, torch.Tensor]  # (Z, residual) in float64, own order
    curvature: torch.Tensor
    damp: float
    _s: torch.Tensor | None = None  # [k, rows] S^T (feedback), then Z^T E^T (refinement)

    @classmethod
    def build(
        cls, stats: InputStatistics, damping: float, device: torch.device, dtype: torch.dtype, block: int = FACTOR_BLOCK
    ) -> LowRankFactor | None:
        """O(n k^2) in float64, a block of columns at a time from the last one backwards; None for unusable statistics.

        Within a block [b0, b1) with G = C_b1 and Y = D^-1/2 Z of the block, Woodbury on
        C_j = G + Y_{j:}^T Y_{j:} and the backwards Cholesky factor U of K = I + Y G^-1 Y^T
        give all C_j^-1 y_j of the block at once: G^-1 Y^T U^-T diag(1/U_jj).
        """
        f64 = torch.float64
        v = stats.eigenvectors.to(device=device, dtype=f64)
        z = v * stats.eigenvalues.to(device=device, dtype=f64).clamp_min(0).sqrt()
        residual = stats.residual.to(device=device, dtype=f64)
        diagonal = residual + (z * z).sum(1)
        order = act_order(diagonal)
        damp = live_damping(diagonal, damping)
        exact = (z, residual)
        z_own, residual_own = z.to(dtype), residual.to(dtype)
        z, residual = z[order], residual[order]
        d = residual + damp
        n, k = z.shape
        c = torch.empty(k, n, dtype=f64, device=device)
        zc = torch.empty(n, dtype=f64, device=device)  # z_j^T c_j
        g = torch.eye(k, dtype=f64, device=device)
        failures = torch.zeros((), dtype=torch.int32, device=device)  # summed, checked once: no sync per block
        for b1 in range(n, 0, -block):
            b0 = max(0, b1 - block)
            root = d[b0:b1].sqrt()
            y = z[b0:b1] / root[:, None]
            lower, info = torch.linalg.cholesky_ex(g)
            failures += info
            a = torch.cholesky_solve(y.T, lower)  # G^-1 Y^T
            kk = y @ a
            kk.diagonal().add_(1.0)
            u, info = torch.linalg.cholesky_ex(kk.flip(0, 1))
            failures += info
            u = u.flip(0, 1)  # K = U U^T, U upper
            u_inv = torch.linalg.solve_triangular(u, torch.eye(b1 - b0, dtype=f64, device=device), upper=True)
            x = (a @ u_inv.T) / u.diagonal()  # columns C_j^-1 y_j
            c[:, b0:b1] = x / root
            zc[b0:b1] = (y * x.T).sum(1)
            g += y.T @ y
        curvature = d / (1 - zc)
        if int(failures) or not bool(torch.isfinite(c).all()):
            return None
        return cls(order, z.to(dtype), c.to(dtype), z_own, residual_own, residual.to(dtype), exact, curvature, damp)

    def start(self, rows: int) -> None:
        self._s = torch.zeros(self.z.shape[1], rows, dtype=self.z.dtype, device=self.z.device)

    def targets(self, b0: int, b1: int, weights: torch.Tensor) -> torch.Tensor:
        return torch.addmm(weights[b0:b1], self.c[:, b0:b1].T, self._s)

    def coupling(self, b0: int, b1: int) -> torch.Tensor:
        return torch.triu(self.z[b0:b1] @ self.c[:, b0:b1], diagonal=1)

    def absorb(self, b0: int, b1: int, errors: torch.Tensor) -> None:
        self._s.addmm_(self.z[b0:b1].T, errors)

    def estimated_losses(self, errors: torch.Tensor) -> torch.Tensor:
        projected = errors @ self.z_own
        return (projected * projected).sum(1) + (errors * errors) @ self.residual_own

    def exact_losses(self, errors: torch.Tensor) -> torch.Tensor:
        z, residual = self.exact
        projected = errors @ z
        return (projected * projected).sum(1) + (errors * errors) @ residual

    def start_gradient(self, errors: torch.Tensor) -> None:
        if self._s is None:  # after the feedback, its running sum S is already Z^T E^T of the final errors
            self._s = self.z.T @ errors

    def gradient(self, b0: int, b1: int, errors: torch.Tensor) -> torch.Tensor:
        return torch.addmm(errors[b0:b1] * self.residual[b0:b1, None], self.z[b0:b1], self._s)

    def hessian_block(self, b0: int, b1: int) -> torch.Tensor:
        return torch.diag(self.residual[b0:b1]) + self.z[b0:b1] @ self.z[b0:b1].T

    def moved(self, b0: int, b1: int, changes: torch.Tensor) -> None:
        self._s.addmm_(self.z[b0:b1].T, changes)


def error_feedback(
    w_t: torch.Tensor, factor: Factor, q_t: torch.Tensor, block: int = BLOCK_COLUMNS, inner: int = INNER_COLUMNS
) -> torch.Tensor:
    """Round w_t ([n, rows], act order, one row per column) into q_t (float16, same shape).

    w_t is consumed: it ends holding the errors W - Q. Returns each output row's loss
    tr(e H e^T) (undamped, float64), read off the loop: sum_j M_jj^2 (t_j - Q_j)^2 - damp ||e||^2.
    """
    n, rows = w_t.shape
    damped = torch.zeros(rows, dtype=torch.float64, device=w_t.device)
    error_sq = torch.zeros(rows, dtype=torch.float64, device=w_t.device)
    curvature = factor.curvature.to(w_t.dtype)
    factor.start(rows)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        errors = w_t[b0:b1]
        targets = factor.targets(b0, b1, w_t)
        _round_block(targets, errors, factor.coupling(b0, b1), q_t[b0:b1], inner)
        targets -= q_t[b0:b1]
        damped += (curvature[b0:b1] @ (targets * targets)).double()
        error_sq += (errors * errors).sum(0).double()
        factor.absorb(b0, b1, errors)
    return damped - factor.damp * error_sq


def _round_block(
    targets: torch.Tensor, weights: torch.Tensor, coupling: torch.Tensor, q: torch.Tensor, inner: int
) -> None:
    """Round a block column by column; each error reaches the block's later targets (weights become errors).

    Inside an inner block each target gathers its predecessors' errors (one matrix-vector product:
    BLAS sizes its own threads, where a rank-1 update of the remaining rows would start a parallel
    region per column, which collapses when another process holds a core); one product then spreads
    the inner block's errors over the rest of the block.
    """
    size = targets.shape[0]
    for c0 in range(0, size, inner):
        c1 = min(c0 + inner, size)
        for j in range(c0, c1):
            if j > c0:
                targets[j].addmv_(weights[c0:j].T, coupling[c0:j, j])
            q[j] = round_to_fp16(targets[j].clamp(-FP16_MAX, FP16_MAX))
            weights[j] -= q[j]
        if c1 < size:
            targets[c1:].addmm_(coupling[c0:c1, c1:].T, weights[c0:c1])
