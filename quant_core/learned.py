"""Data-free learned rounding: choose, per element, the float16 value below or above the weight so
that the error along the weight's top-k principal directions cancels, at little plain-error cost.

Objective (scaled units, E = W/s - Q, U/V the top-k left/right singular vectors of W):

    L(Q) = ||E||_F^2 + lam * ||U^T E V||_F^2,   lam = m*n / k^2

lam weighs one projected entry like one plain entry on average, so neither term is negligible
(with lam = 1, as in the original script, the optimum is plain round-to-nearest). The search starts
from round-to-nearest, only ever toggles elements between their two float16 neighbours, and
accepts a batch of toggles only when the exact objective falls, so it never ends worse than
round-to-nearest on its objective.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .fp16 import other_neighbour
from .rounding import RoundingOutcome, RoundingSettings, ScaledWeight, nearest_pass

if TYPE_CHECKING:
    from .calibration import InputStatistics

OVERSAMPLING = 8
POWER_ITERATIONS = 2  # each costs two streamed passes; fewer leave the directions poor
CANDIDATE_SIDE = 256  # rows and columns of largest leverage searched, per direction
POOL_PER_DIRECTION = 1 << 14  # candidate toggles kept per principal direction
BATCH = 4096  # candidates ranked per iteration


def _principal_error(
    weight: ScaledWeight, q: torch.Tensor, sketch: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, U^T E V) from a randomized SVD whose last half-pass also projects the error.

    With Z an orthonormal basis of the sketched row space, W ~ (W Z) Z^T; the SVD of the thin
    W Z = U' S V'^T gives U = U'_k and V = Z V'_k, and U^T E V = U'_k^T (E Z) V'_k.
    """
    m, n = weight.shape
    width = sketch.shape[1]
    device = weight.device
    for iteration in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(sketch).Q
        co_basis = torch.zeros(n, width, device=device)
        for rows, x in weight.chunks():
            co_basis += x.float().T @ basis[rows]
        co_basis = torch.linalg.qr(co_basis).Q
        if iteration < POWER_ITERATIONS - 1:
            for rows, x in weight.chunks():
                sketch[rows] = x.float() @ co_basis
    w_z = torch.empty(m, width, device=device)
    e_z = torch.empty(m, width, device=device)
    for rows, x in weight.chunks():
        w_z[rows] = x.float() @ co_basis
        e_z[rows] = (x - q[rows].to(device).to(x.dtype)).float() @ co_basis
    u_full, _, vh = torch.linalg.svd(w_z.double(), full_matrices=False)
    u, v_small = u_full[:, :k], vh[:k].T
    return u, co_basis.double() @ v_small, u.T @ e_z.double() @ v_small


def _candidates(weight: ScaledWeight, q: torch.Tensor, u: torch.Tensor, v: torch.Tensor, p: torch.Tensor, lam: float):
    """Single-toggle gains on the rows and columns of largest leverage; the best are returned.

    An element's toggle moves U^T E V by step * u_i v_j^T: only elements with large ||u_i|| and
    ||v_j|| can cancel the projected error cheaply, so the search looks there.
    """
    k = u.shape[1]
    m, n = weight.shape
    rows = torch.topk((u**2).sum(1), min(m, CANDIDATE_SIDE * k)).indices.sort().values
    cols = torch.topk((v**2).sum(1), min(n, CANDIDATE_SIDE * k)).indices.sort().values
    x = weight.submatrix(rows, cols).double()
    qc = q[rows.cpu()][:, cols.cpu()].to(weight.device)
    other = other_neighbour(x, qc)
    error = x - qc.double()
    step = other.double() - qc.double()  # toggling changes the error by -step; same sign as error
    u_rows, v_cols = u[rows], v[cols]
    alignment = u_rows @ p @ v_cols.T  # <P, u_i v_j^T>
    leverage = (u_rows**2).sum(1, keepdim=True) * (v_cols**2).sum(1)
    gain = 2 * lam * step * alignment - step * (step - 2 * error) - lam * step * step * leverage
    gain.masked_fill_(step == 0, -math.inf)
    best = torch.topk(gain.reshape(-1), min(POOL_PER_DIRECTION * k, gain.numel())).indices
    r, c = best // len(cols), best % len(cols)
    flat_index = (rows[r] * n + cols[c]).cpu()
    effect = (-step.reshape(-1)[best])[:, None, None] * u_rows[r][:, :, None] * v_cols[c][:, None, :]
    plain_cost = (step * (step - 2 * error)).reshape(-1)[best]
    residual_after = (error - step).reshape(-1)[best]
    return (
        flat_index,
        other.reshape(-1)[best].cpu(),
        effect.reshape(len(best), k * k).cpu(),
        plain_cost.cpu(),
        residual_after.cpu(),
    )


def _search(effect: torch.Tensor, plain_cost: torch.Tensor, p: torch.Tensor, lam: float, max_iter: int):
    """Toggle the best prefix of ranked candidates while the exact objective falls."""
    toggled = torch.zeros(len(plain_cost), dtype=torch.bool)
    iterations = 0
    for _ in range(max_iter):
        sign = 1.0 - 2.0 * toggled.double()
        signed_effect, cost = sign[:, None] * effect, sign * plain_cost
        gain = -(cost + lam * (2 * signed_effect @ p + (signed_effect**2).sum(1)))
        top = torch.topk(gain, min(BATCH, gain.numel()))
        chosen = top.indices[top.values > 0]
        if chosen.numel() == 0:
            break
        p_after = p + torch.cumsum(signed_effect[chosen], 0)
        delta = torch.cumsum(cost[chosen], 0) + lam * ((p_after**2).sum(1) - (p**2).sum())
        best = int(torch.argmin(delta))
        if float(delta[best]) >= 0:
            break
        toggled[chosen[: best + 1]] ^= True
        p = p_after[best]
        iterations += 1
    return toggled, p, iterations


def learned_rounding(
    weight: ScaledWeight, settings: RoundingSettings, statistics: InputStatistics | None = None
) -> RoundingOutcome:
    """Streamed passes (round + sketch, then two per power iteration), then a small exact search; data-free."""
    m, n = weight.shape
    k = min(settings["top_k"], m, n)
    width = min(k + OVERSAMPLING, m, n)
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(settings["seed"])).to(weight.device)
    sketch = torch.empty(m, width, device=weight.device)

    def sketch_rows(rows: slice, x: torch.Tensor, nearest: torch.Tensor) -> None:
        sketch[rows] = x.float() @ omega

    q, stats = nearest_pass(weight, sketch_rows)
    if stats.exact == stats.numel or settings["num_iter"] <= 0 or k <= 0:
        return RoundingOutcome(q, stats)  # nothing to gain: round-to-nearest is already exact (or search off)
    nearest_error_sq = stats.error_sq  # `stats` becomes the search's below

    u, v, p_rtn = _principal_error(weight, q, sketch, k)
    lam = m * n / (k * k)
    flat_index, other, effect, plain_cost, residual_after = _candidates(weight, q, u, v, p_rtn, lam)
    toggled, p, iterations = _search(effect, plain_cost, p_rtn.cpu().reshape(-1), lam, settings["num_iter"])

    objective_rtn = stats.error_sq + lam * float((p_rtn**2).sum())
    q.view(-1)[flat_index[toggled]] = other[toggled]
    stats.error_sq += float(plain_cost[toggled].sum())
    if toggled.any():
        stats.max_abs_error = max(stats.max_abs_error, float(residual_after[toggled].abs().max()))
    objective = stats.error_sq + lam * float((p**2).sum())
    p_rtn_norm = float(torch.linalg.norm(p_rtn))
    return RoundingOutcome(
        q,
        stats,
        iterations,
        {
            "objective_ratio": objective / objective_rtn if objective_rtn else 1.0,
            "projected_error_ratio": float(torch.linalg.norm(p)) / p_rtn_norm if p_rtn_norm else 1.0,
            "toggled": int(toggled.sum()),
        },
        nearest_error_sq,
    )
