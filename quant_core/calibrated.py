"""Calibrated rounding: float16 values chosen for a small *output* error on recorded inputs.

Objective (scaled units, E = W/s - Q, H = E[x x^T] of the layer's input):

    L(Q) = tr(E H E^T) = sum over output rows i of e_i^T H e_i

`calibrated_rounding` (the default with statistics):
1. error feedback (GPTQ): columns in act-order (largest diag(H) first) are rounded to the nearest
   float16 one at a time, each rounding error spread onto the columns not yet rounded through the
   upper Cholesky factor of the damped inverse of H, in column blocks (lazy batch updates);
2. coordinate descent: moves of one float16 step up or down wherever they lower L;
3. per output row (rows are independent under L), whichever of this and round-to-nearest has the
   lower L is kept, so the result is never worse than round-to-nearest on the objective.
`updown_rounding` is the AdaRound-style alternative: each value stays one of its two float16
neighbours, chosen by coordinate descent on L from round-to-nearest (measured weaker and slower).

Every value is rounded with `round_to_fp16` (one correct rounding) after clamping to +-65504, so
the output is finite whatever the feedback does. The weight error grows (~1.5x round-to-nearest
on real models) while the output error falls: judge by the output. Works in float64 on the
weight's device, a group of rows at a time.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable

import torch

from .fp16 import FP16_MAX, other_neighbour, round_to_fp16
from .rounding import ErrorStats, RoundingOutcome, RoundingSettings, ScaledWeight

if TYPE_CHECKING:
    from .calibration import InputStatistics

log = logging.getLogger(__name__)

SERIAL_ELEMENTS = 1 << 15  # torch's grain size: smaller element-wise ops run on one thread
GROUP_ELEMENTS = 1 << 22  # weight elements processed together (float64 working set ~100 MB)
DAMPING = 0.01  # added to diag(H), relative to its mean: regularizes the factorization (GPTQ's)
REFINE_SWEEPS = 2  # coordinate-descent sweeps after error feedback; later sweeps gain little
UPDOWN_SWEEPS = 8
MOVE_TOLERANCE = 1e-9  # a move must gain more than this fraction of its own curvature term (float noise)

# (column index, its current values, its G = E H entries) -> the one value worth trying per row
Candidate = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
# (act-ordered rows in float64, their round-to-nearest, H, inverse factor or None)
#   -> (float16 rows, loss before refinement or None for round-to-nearest's, sweeps run)
RowsMethod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, "float | None", int]]


def _ordered_hessian(weight: ScaledWeight, stats: InputStatistics | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H in act-order, float64 on the weight's device; the order) for a weight with statistics.

    Everything below works in this column order (largest diag(H) first) and only q goes back.
    """
    if stats is None:
        raise ValueError("calibrated rounding needs the layer's input statistics")
    if stats.dim != weight.shape[1]:
        raise ValueError(f"statistics of width {stats.dim} for a weight with {weight.shape[1]} input features")
    h = stats.hessian(weight.device)
    order = torch.argsort(h.diagonal(), descending=True)
    return h[order][:, order], order


def _inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor U of the damped inverse (U^T U = (H + damp I)^-1), None if H is unusable.

    Inputs that are always zero (diag 0) are decoupled with a unit diagonal: they get no feedback
    and give none, i.e. they are rounded to nearest. At most three n x n matrices are alive.
    """
    dead = h.diagonal() <= 0
    live = h.diagonal()[~dead]
    damp = DAMPING * float(live.mean()) if live.numel() else 1.0
    for attempt in range(4):  # more damping if rounding errors make H indefinite
        damped = h.clone()
        damped[dead, :] = 0
        damped[:, dead] = 0
        damped.diagonal()[dead] = 1
        damped.diagonal().add_(damp * 10**attempt)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
    return None


def _block_columns(rows: int) -> int:
    """Columns per lazy-batch block: per-column updates touch rows x block elements.

    Keeping that under torch's grain size runs them single-threaded: thousands of tiny parallel
    regions per layer cost more than they gain, and collapse when another process shares the cores
    (measured 5-10x slower at 1536 rows with 64 columns).
    """
    return max(8, min(64, SERIAL_ELEMENTS // max(1, rows)))


def _error_feedback(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """GPTQ onto the float16 grid: round column by column, spreading each error forward (w is consumed)."""
    m, n = w.shape
    q = torch.empty(m, n, dtype=torch.float16, device=w.device)
    block_columns = _block_columns(m)
    for b0 in range(0, n, block_columns):
        b1 = min(b0 + block_columns, n)
        block = w[:, b0:b1]
        u_block = u[b0:b1, b0:b1]
        errors = torch.empty_like(block)
        for i in range(b1 - b0):
            column = block[:, i]
            qc = round_to_fp16(column.clamp(-FP16_MAX, FP16_MAX))
            q[:, b0 + i] = qc
            error = (column - qc.to(column.dtype)) / u_block[i, i]
            block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            errors[:, i] = error
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return q


def _coordinate_descent(
    w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, g: torch.Tensor, candidate: Candidate, sweeps: int
) -> int:
    """Greedy per-column moves to a candidate float16 value that lowers L; returns sweeps run.

    q and g = (w - q) @ h are updated in place. Moving q_ij by d changes row i's loss by
    -2 d G_ij + d^2 H_jj, so only a move with the sign of G_ij can gain. G is kept exact inside a
    column block and refreshed for all columns by one product per block.
    """
    h_diag = h.diagonal()
    block_columns = _block_columns(w.shape[0])
    for sweep in range(1, sweeps + 1):
        moved = 0
        for b0 in range(0, w.shape[1], block_columns):
            b1 = min(b0 + block_columns, w.shape[1])
            g_block = g[:, b0:b1].clone()
            deltas = torch.zeros_like(g_block)
            for i in range(b1 - b0):
                j = b0 + i
                current = q[:, j]
                proposed = candidate(j, current, g_block[:, i])
                d = proposed.to(w.dtype) - current.to(w.dtype)
                # an infinite step (past +-65504) compares as inf > inf or NaN: never taken
                take = 2 * d * g_block[:, i] > (1 + MOVE_TOLERANCE) * d * d * h_diag[j]
                d = torch.where(take, d, 0.0)
                changed = int(take.sum())
                if changed:
                    q[:, j] = torch.where(take, proposed, current)
                    deltas[:, i] = d
                    g_block -= d[:, None] * h[j, b0:b1][None, :]
                    moved += changed
            g -= deltas @ h[b0:b1]
        if moved == 0:
            return sweep
    return sweeps


def _step_toward_gain(j: int, current: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One float16 step in the direction that can gain (up where G > 0); past +-65504 it is inf, never taken."""
    return torch.nextafter(current, torch.where(g > 0, math.inf, -math.inf).to(current.dtype))


def _row_losses(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    e = w - q.to(w.dtype)
    return ((e @ h) * e).sum(1)


def _calibrated_rows(w: torch.Tensor, nearest: torch.Tensor, h: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, float | None, int]:
    """Error feedback (from w itself, not from `nearest`) then refinement; a RowsMethod."""
    q = _error_feedback(w.clone(), u)
    e = w - q.to(w.dtype)
    g = e @ h
    feedback_loss = float((e * g).sum())
    return q, feedback_loss, _coordinate_descent(w, q, h, g, _step_toward_gain, REFINE_SWEEPS)


def _updown_rows(w: torch.Tensor, nearest: torch.Tensor, h: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, float | None, int]:
    """Two-neighbour choice by coordinate descent from round-to-nearest (no factor needed); a RowsMethod."""
    other = other_neighbour(w, nearest)
    q = nearest.clone()

    def toggle(j: int, current: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.where(current == nearest[:, j], other[:, j], nearest[:, j])

    g = (w - q.to(w.dtype)) @ h
    return q, None, _coordinate_descent(w, q, h, g, toggle, UPDOWN_SWEEPS)


def _round_with_statistics(
    weight: ScaledWeight, statistics: InputStatistics | None, rows_method: RowsMethod, needs_factor: bool
) -> RoundingOutcome:
    """Shared driver: act-order, row groups, per-row fallback to round-to-nearest, report."""
    h, order = _ordered_hessian(weight, statistics)
    u = _inverse_factor(h) if needs_factor else None
    unusable = needs_factor and u is None
    if unusable:
        log.warning("input statistics of a %dx%d weight are not positive definite even with damping; rounded to nearest", *weight.shape)
    restore = torch.argsort(order)
    q_all = torch.empty(weight.shape, dtype=torch.float16)
    stats = ErrorStats()
    totals = {"rtn": 0.0, "first": 0.0, "final": 0.0, "rtn_weight_sq": 0.0}
    fallback_rows = sweeps = 0
    for rows, x in weight.chunks(max(1, GROUP_ELEMENTS // max(1, weight.shape[1]))):
        nearest = round_to_fp16(x)
        w = x.to(torch.float64)[:, order]
        nearest_ordered = nearest[:, order]
        rtn_loss = _row_losses(w, nearest_ordered, h)
        totals["rtn"] += float(rtn_loss.sum())
        totals["rtn_weight_sq"] += float(((w - nearest_ordered.to(w.dtype)) ** 2).sum())
        if unusable or bool((nearest.to(x.dtype) == x).all()):
            q, first_loss, loss = nearest_ordered, None, rtn_loss  # nothing to gain, or H unusable
        else:
            q, first_loss, group_sweeps = rows_method(w, nearest_ordered, h, u)
            sweeps = max(sweeps, group_sweeps)
            loss = _row_losses(w, q, h)
        worse = loss > rtn_loss
        fallback_rows += int(worse.sum())
        q = torch.where(worse[:, None], nearest_ordered, q)[:, restore]
        totals["first"] += float(rtn_loss.sum()) if first_loss is None else first_loss
        totals["final"] += float(torch.minimum(loss, rtn_loss).sum())
        stats.add(x, q)
        q_all[rows] = q.cpu()

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else 1.0

    return RoundingOutcome(
        q_all,
        stats,
        sweeps,
        {
            "objective_ratio": ratio(totals["final"], totals["rtn"]),
            "start_objective_ratio": ratio(totals["first"], totals["rtn"]),
            "weight_error_ratio": math.sqrt(ratio(stats.error_sq, totals["rtn_weight_sq"])),
            "fallback_rows": fallback_rows,
            "calib_tokens": statistics.count,
        },
    )


def calibrated_rounding(
    weight: ScaledWeight, settings: RoundingSettings, statistics: InputStatistics | None
) -> RoundingOutcome:
    """Error feedback + coordinate descent on the calibration objective (needs the layer input's `statistics`)."""
    return _round_with_statistics(weight, statistics, _calibrated_rows, needs_factor=True)


def updown_rounding(
    weight: ScaledWeight, settings: RoundingSettings, statistics: InputStatistics | None
) -> RoundingOutcome:
    """AdaRound-style: each value one of its two float16 neighbours (needs the layer input's `statistics`)."""
    return _round_with_statistics(weight, statistics, _updown_rows, needs_factor=False)


def bias_shift(weight: ScaledWeight, q: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(W - s Q) E[x] in float64, real units: add it to the bias so E[y - y_q] = 0 on the calibration inputs.

    y - y_q = (W - W_q) x + b - b'  ->  mean zero for b' = b + (W - W_q) E[x].
    """
    mean = mean.to(device=weight.device, dtype=torch.float64)
    shift = torch.empty(weight.shape[0], dtype=torch.float64)
    for rows, x in weight.chunks():
        shift[rows] = ((x.to(torch.float64) - q[rows].to(weight.device, torch.float64)) @ mean).cpu()
    return shift * math.ldexp(1.0, weight.exponent)
