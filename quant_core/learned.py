"""Data-free learned rounding: choose, per element, the float16 value below or above the weight so
that the error along the weight's top-k principal directions cancels, at little plain-error cost.

Objective (scaled units, E = W/s - Q, U/V the top-k left/right singular vectors of W):

    L(Q) = ||E||_F^2 + lam * ||U^T E V||_F^2,   lam = m*n / k^2

lam weighs one projected entry like one plain entry on average, so neither term is negligible
(with lam = 1, as in the original script, the optimum is plain round-to-nearest). The search starts
from round-to-nearest, only ever toggles elements between their two float16 neighbours, accepts a
batch of toggles only when the exact objective falls, and is checked against round-to-nearest on
the recomputed objective at the end, so it can never return something worse.
"""

from __future__ import annotations

import math

import torch

from .fp16 import other_neighbour, round_to_fp16
from .rounding import ErrorStats, RoundingOutcome, RoundingSettings, ScaledWeight

OVERSAMPLING = 8
POWER_ITERATIONS = 2  # each costs two streamed passes; without them the directions are poor
POOL_PER_DIRECTION = 1 << 14  # candidate toggles kept per principal direction
BATCH = 4096  # candidates ranked per iteration


class _CandidatePool:
    """The best single-toggle candidates over the whole weight, kept to a fixed size."""

    FIELDS = ("gain", "index", "error", "step", "other")

    def __init__(self, size: int):
        self.size = size
        self.gain = torch.empty(0)
        self.index = torch.empty(0, dtype=torch.int64)
        self.error = torch.empty(0, dtype=torch.float64)
        self.step = torch.empty(0, dtype=torch.float64)
        self.other = torch.empty(0, dtype=torch.float16)

    def offer(self, gain: torch.Tensor, first_index: int, error: torch.Tensor, step: torch.Tensor, other: torch.Tensor) -> None:
        best = torch.topk(gain, min(self.size, gain.numel())).indices
        offered = (gain[best], best + first_index, error[best].double(), step[best].double(), other[best])
        for name, values in zip(self.FIELDS, offered):
            setattr(self, name, torch.cat([getattr(self, name), values.cpu()]))
        if self.gain.numel() > self.size:
            best = torch.topk(self.gain, self.size).indices
            for name in self.FIELDS:
                setattr(self, name, getattr(self, name)[best])


def learned_rounding(weight: ScaledWeight, settings: RoundingSettings) -> RoundingOutcome:
    """Streamed passes (round + sketch, power iterations, project, rank candidates), then an exact search."""
    m, n = weight.shape
    k = min(settings.top_k, m, n)
    width = min(k + OVERSAMPLING, m, n)
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(settings.seed)).to(weight.device)
    q = torch.empty(weight.shape, dtype=torch.float16)
    stats = ErrorStats()
    sketch = torch.empty(m, width, device=weight.device)
    for rows, x in weight.chunks():
        qc = round_to_fp16(x)
        stats.add(x, qc)
        q[rows] = qc.cpu()
        sketch[rows] = x.float() @ omega
    if stats.exact == stats.numel or settings.num_iter <= 0 or k <= 0:
        return RoundingOutcome(q, stats)  # nothing to gain: round-to-nearest is already exact (or search off)

    # Randomized SVD: power iterations sharpen the sketch's range onto the top singular directions.
    for _ in range(POWER_ITERATIONS):
        sketch = torch.linalg.qr(sketch).Q
        co_sketch = torch.zeros(n, width, device=weight.device)
        for rows, x in weight.chunks():
            co_sketch += x.float().T @ sketch[rows]
        co_sketch = torch.linalg.qr(co_sketch).Q
        for rows, x in weight.chunks():
            sketch[rows] = x.float() @ co_sketch
    basis = torch.linalg.qr(sketch).Q.double()
    projected_w = torch.zeros(width, n, dtype=torch.float64, device=weight.device)
    projected_e = torch.zeros(width, n, dtype=torch.float64, device=weight.device)
    for rows, x in weight.chunks():
        xd = x.double()
        projected_w += basis[rows].T @ xd
        projected_e += basis[rows].T @ (xd - q[rows].to(weight.device).double())
    ub, _, vt = torch.linalg.svd(projected_w, full_matrices=False)
    ub, v = ub[:, :k], vt[:k].T
    p_rtn = ub.T @ projected_e @ v  # U^T E V with U = basis @ ub
    lam = m * n / (k * k)

    pool = _CandidatePool(min(POOL_PER_DIRECTION * k, weight.numel))
    u32, p32, v32 = (basis @ ub).float(), p_rtn.float(), v.float()
    nv = (v32**2).sum(1)
    for rows, x in weight.chunks():
        qc = q[rows].to(weight.device)
        qx = qc.to(x.dtype)
        other = other_neighbour(x, qc)
        error = x - qx
        step = other.to(x.dtype) - qx  # toggling changes the error by -step; same sign as error
        u_rows = u32[rows]
        alignment = (u_rows @ p32) @ v32.T  # <P, u_i v_j^T>
        leverage = (u_rows**2).sum(1, keepdim=True) * nv
        gain = (2 * lam) * step * alignment - step * (step - 2 * error) - lam * step * step * leverage
        gain.masked_fill_(step == 0, -math.inf)
        pool.offer(gain.reshape(-1), rows.start * n, error.reshape(-1), step.reshape(-1), other.reshape(-1))

    # Exact search over the pool: toggle the best prefix of candidates while the objective falls.
    u_cpu, v_cpu = (basis @ ub).cpu(), v.cpu()
    rows_idx, cols_idx = pool.index // n, pool.index % n
    effect_on_p = (-pool.step)[:, None, None] * u_cpu[rows_idx][:, :, None] * v_cpu[cols_idx][:, None, :]
    effect_on_p = effect_on_p.reshape(-1, k * k)
    plain_cost = pool.step * (pool.step - 2 * pool.error)
    p = p_rtn.cpu().reshape(-1)
    toggled = torch.zeros(len(pool.index), dtype=torch.bool)
    iterations = 0
    for _ in range(settings.num_iter):
        sign = 1.0 - 2.0 * toggled.double()
        effect, cost = sign[:, None] * effect_on_p, sign * plain_cost
        gain = -(cost + lam * (2 * effect @ p + (effect**2).sum(1)))
        top = torch.topk(gain, min(BATCH, gain.numel()))
        candidates = top.indices[top.values > 0]
        if candidates.numel() == 0:
            break
        p_after = p + torch.cumsum(effect[candidates], 0)
        delta = torch.cumsum(cost[candidates], 0) + lam * ((p_after**2).sum(1) - (p**2).sum())
        best = int(torch.argmin(delta))
        if float(delta[best]) >= 0:
            break
        toggled[candidates[: best + 1]] ^= True
        p = p_after[best]
        iterations += 1

    objective_rtn = stats.error_sq + lam * float((p_rtn**2).sum())
    changed = pool.index[toggled]
    q.view(-1)[changed] = pool.other[toggled]
    stats.error_sq += float(plain_cost[toggled].sum())
    if changed.numel():
        stats.max_abs_error = max(stats.max_abs_error, float((pool.error - pool.step)[toggled].abs().max()))
    objective = stats.error_sq + lam * float((p**2).sum())
    p_rtn_norm = float(torch.linalg.norm(p_rtn))
    return RoundingOutcome(
        q,
        stats,
        iterations,
        {
            "objective_ratio": objective / objective_rtn if objective_rtn else 1.0,
            "projected_error_ratio": float(torch.linalg.norm(p)) / p_rtn_norm if p_rtn_norm else 1.0,
            "toggled": int(changed.numel()),
        },
    )
