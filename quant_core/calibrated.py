"""Calibrated rounding: float16 values chosen for a small *output* error on recorded inputs.

Objective (scaled units, E = W/s - Q, H = E[x x^T] of the layer's input):

    L(Q) = tr(E H E^T) = sum over output rows i of e_i^T H e_i

`calibrated_rounding` (the default with statistics):
1. nothing to gain: rows that round-to-nearest reproduces exactly keep its values (their loss is
   zero); a weight with no other row (e.g. a bfloat16 source whose scaled values all lie on the
   float16 grid) costs one RTN pass, before any statistics are read or factored;
2. error feedback (GPTQ, `feedback.py`): columns in act-order (largest diag(H) first) are rounded to
   the nearest float16 one at a time, each error spread onto the columns not yet rounded, every
   output row at once, from the dense factor of H or, for the recorder's eigen summary, its
   low-rank form without ever expanding it (O(m n k) instead of O(m n^2));
3. per output row (rows are independent under L), whichever of this and round-to-nearest has the
   lower L is kept (near ties decided in float64 from the statistics as stored), so the result is
   never worse than round-to-nearest on the objective.
Coordinate-descent refinement after the feedback was measured not to pay (see the README) and is
only the engine of `updown_rounding`, the AdaRound-style alternative: each value stays one of its
two float16 neighbours, chosen by coordinate descent on L from round-to-nearest (weaker, slower).

Every value is rounded with `round_to_fp16` (one correct rounding) after clamping to +-65504, so
the output is finite whatever the feedback does. The weight error grows (~1.5x round-to-nearest
on real models) while the output error falls: judge by the output. The feedback works in the
weight's work dtype (float32 for float32/bfloat16/float16 sources) on the weight's device; the
factorizations and the final comparison with round-to-nearest in float64.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from .calibration import InputStatistics
from .feedback import DenseFactor, Factor, LowRankFactor, error_feedback, exact_row_losses
from .fp16 import other_neighbour, round_to_fp16
from .rounding import ErrorStats, RoundingOutcome, RoundingSettings, ScaledWeight

log = logging.getLogger(__name__)

DAMPING = 0.01  # default damping: added to diag(H), relative to its mean (GPTQ's); regularizes the factorization
TIE_TOLERANCE = 1e-3  # rows whose float32 losses agree this closely are compared again in float64
SERIAL_ELEMENTS = 1 << 15  # torch's grain size: smaller element-wise ops run on one thread
GROUP_ELEMENTS = 1 << 22  # updown: weight elements processed together (float64 working set ~100 MB)
UPDOWN_SWEEPS = 8
MOVE_TOLERANCE = 1e-9  # a move must gain more than this fraction of its own curvature term (float noise)

# (column index, its current values, its G = E H entries) -> the one value worth trying per row
Candidate = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _statistics_of(weight: ScaledWeight) -> InputStatistics:
    stats = weight.statistics
    if stats is None:
        raise ValueError("calibrated rounding needs the layer's input statistics")
    if stats.dim != weight.shape[1]:
        raise ValueError(f"statistics of width {stats.dim} for a weight with {weight.shape[1]} input features")
    return stats


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0


def _outcome(q: torch.Tensor, stats: ErrorStats, rtn_weight_sq: float, totals: dict[str, float], fallback_rows: int, tokens: int) -> RoundingOutcome:
    return RoundingOutcome(
        q,
        stats,
        0,
        {
            "objective_ratio": _ratio(totals["final"], totals["rtn"]),
            "start_objective_ratio": _ratio(totals["first"], totals["rtn"]),
            "weight_error_ratio": math.sqrt(_ratio(stats.error_sq, rtn_weight_sq)),
            "fallback_rows": fallback_rows,
            "calib_tokens": tokens,
        },
    )


def build_factor(stats: InputStatistics, damping: float, device: torch.device, dtype: torch.dtype) -> Factor | None:
    """The feedback's factor of H + damping * mean(diag H) I; None if it cannot be made positive definite.

    A summary is used in its low-rank form unless it is so narrow that the dense matrix is cheaper
    (n <= 2k: the dense loop costs n multiply-adds per weight, the low-rank one about 2k + a block).
    """
    if not stats.is_full and stats.dim > 2 * stats.eigenvalues.shape[0]:
        return LowRankFactor.build(stats, damping, device, dtype)
    return DenseFactor.build(stats.hessian(device), damping, dtype)


def calibrated_rounding(weight: ScaledWeight, settings: RoundingSettings, damping: float = DAMPING) -> RoundingOutcome:
    """Error feedback on the calibration objective, never worse than round-to-nearest (needs `weight.statistics`).

    `damping` (relative to the mean of diag(H)) regularizes the factorization: larger values trust
    the recorded correlations less.
    """
    stats = _statistics_of(weight)
    q_all, rtn_stats, inexact = _nearest_pass(weight)
    totals = {"rtn": 0.0, "first": 0.0, "final": 0.0}
    selected = int(inexact.sum())
    if selected == 0:  # nothing to gain: every row's loss is zero
        return _outcome(q_all, rtn_stats, rtn_stats.error_sq, totals, 0, stats.count)
    factor = build_factor(stats, damping, weight.device, weight.work_dtype)
    if factor is None:
        log.warning("input statistics of a %dx%d weight are not positive definite even with damping; rounded to nearest", *weight.shape)
        return _outcome(q_all, rtn_stats, rtn_stats.error_sq, totals, 0, stats.count)
    del q_all  # rebuilt at the end: beside the working copy it would take the peak to 2x the weight

    w_t = torch.empty(weight.shape[1], selected, dtype=weight.work_dtype, device=weight.device)
    start = 0
    for rows, x in weight.chunks():  # transposed first: gathering whole rows is what memory does fast
        x = _selected_rows(x, inexact[rows])
        w_t[:, start : start + x.shape[0]] = torch.index_select(x.T.contiguous(), 0, factor.order)
        start += x.shape[0]
    q_t = torch.empty(w_t.shape, dtype=torch.float16, device=weight.device)
    losses = error_feedback(w_t, factor, q_t)
    del w_t
    q, error_stats, fallback_rows = _keep_better_rows(weight, stats, factor, inexact, q_t, losses, totals)
    return _outcome(q, error_stats, rtn_stats.error_sq, totals, fallback_rows, stats.count)


def _nearest_pass(weight: ScaledWeight) -> tuple[torch.Tensor, ErrorStats, torch.Tensor]:
    """Round-to-nearest in one pass: (its values, its errors, which rows it does not reproduce exactly).

    A row that round-to-nearest reproduces exactly has zero loss: no method can do better, so only
    the other rows are worked on (all of them for a float32 source, few or none for a bfloat16 one).
    """
    q_all = torch.empty(weight.shape, dtype=torch.float16)
    rtn_stats = ErrorStats()
    inexact = torch.empty(weight.shape[0], dtype=torch.bool, device=weight.device)
    for rows, x in weight.chunks():
        nearest = round_to_fp16(x)
        rtn_stats.add(x, nearest)
        inexact[rows] = (nearest.to(x.dtype) != x).any(1)
        q_all[rows] = nearest.cpu()
    return q_all, rtn_stats, inexact


def _selected_rows(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return x if bool(chosen.all()) else x[chosen]


def _keep_better_rows(
    weight: ScaledWeight,
    stats: InputStatistics,
    factor: Factor,
    inexact: torch.Tensor,
    q_t: torch.Tensor,
    losses: torch.Tensor,
    totals: dict[str, float],
) -> tuple[torch.Tensor, ErrorStats, int]:
    """Per output row, the feedback's values or round-to-nearest's, whichever has the lower L; in the weight's column order.

    q_t and losses hold the `inexact` rows only, in order; the other rows are round-to-nearest's.
    """
    restore = torch.argsort(factor.order)
    q_all = torch.empty(weight.shape, dtype=torch.float16)
    error_stats = ErrorStats()
    fallback = torch.zeros((), dtype=torch.int64, device=weight.device)
    start = 0
    for rows, x in weight.chunks():
        nearest = round_to_fp16(x)
        chosen = inexact[rows]
        xs, ns = _selected_rows(x, chosen), _selected_rows(nearest, chosen)
        end = start + xs.shape[0]
        q = torch.index_select(q_t[:, start:end], 0, restore).T
        ours = losses[start:end]
        rtn = factor.estimated_losses(xs - ns.to(x.dtype)).double()
        close = (ours - rtn).abs() <= TIE_TOLERANCE * torch.maximum(ours.abs(), rtn.abs())
        close |= ~torch.isfinite(ours)
        if bool(close.any()):
            x64 = xs[close].double()
            rtn[close] = exact_row_losses(stats, x64 - ns[close].double())
            ours[close] = exact_row_losses(stats, x64 - q[close].double())
        worse = ~(ours <= rtn)  # NaN counts as worse
        q = torch.where(worse[:, None], ns, q)
        if xs.shape[0] < x.shape[0]:
            q = nearest.index_put((chosen,), q)
        fallback += worse.sum()
        totals["rtn"] += float(rtn.sum())
        totals["first"] += float(ours.sum())
        totals["final"] += float(torch.minimum(ours, rtn).sum())
        error_stats.add(x, q)
        q_all[rows] = q.cpu()
        start = end
    return q_all, error_stats, int(fallback)


def _ordered_hessian(weight: ScaledWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense H in act-order, float64 on the weight's device; the order) for updown's coordinate descent."""
    h = _statistics_of(weight).hessian(weight.device)
    order = torch.argsort(h.diagonal(), descending=True)
    return h[order][:, order], order


def _block_columns(rows: int) -> int:
    """Columns per lazy-batch block: per-column updates touch rows x block elements.

    Keeping that under torch's grain size runs them single-threaded: thousands of tiny parallel
    regions per layer cost more than they gain, and collapse when another process shares the cores
    (measured 5-10x slower at 1536 rows with 64 columns).
    """
    return max(8, min(64, SERIAL_ELEMENTS // max(1, rows)))


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


def _row_losses(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    e = w - q.to(w.dtype)
    return ((e @ h) * e).sum(1)


def updown_rounding(weight: ScaledWeight, settings: RoundingSettings) -> RoundingOutcome:
    """AdaRound-style: each value one of its two float16 neighbours (needs `weight.statistics`)."""
    h, order = _ordered_hessian(weight)
    restore = torch.argsort(order)
    q_all = torch.empty(weight.shape, dtype=torch.float16)
    stats = ErrorStats()
    totals = {"rtn": 0.0, "first": 0.0, "final": 0.0}
    rtn_weight_sq = 0.0
    fallback_rows = sweeps = 0
    for rows, x in weight.chunks(max(1, GROUP_ELEMENTS // max(1, weight.shape[1]))):
        nearest = round_to_fp16(x)
        w = x.to(torch.float64)[:, order]
        nearest_ordered = nearest[:, order]
        rtn_loss = _row_losses(w, nearest_ordered, h)
        rtn_weight_sq += float(((w - nearest_ordered.to(w.dtype)) ** 2).sum())
        q = nearest_ordered.clone()
        if not bool((nearest.to(x.dtype) == x).all()):
            other = other_neighbour(w, nearest_ordered)

            def toggle(j: int, current: torch.Tensor, g: torch.Tensor, near=nearest_ordered, far=other) -> torch.Tensor:
                return torch.where(current == near[:, j], far[:, j], near[:, j])

            g = (w - q.to(w.dtype)) @ h
            sweeps = max(sweeps, _coordinate_descent(w, q, h, g, toggle, UPDOWN_SWEEPS))
        loss = _row_losses(w, q, h)
        worse = ~(loss <= rtn_loss)
        fallback_rows += int(worse.sum())
        q = torch.where(worse[:, None], nearest_ordered, q)[:, restore]
        totals["rtn"] += float(rtn_loss.sum())
        totals["first"] += float(rtn_loss.sum())
        totals["final"] += float(torch.minimum(loss, rtn_loss).sum())
        stats.add(x, q)
        q_all[rows] = q.cpu()
    outcome = _outcome(q_all, stats, rtn_weight_sq, totals, fallback_rows, weight.statistics.count)
    outcome.iterations = sweeps
    return outcome


def bias_shift(weight: ScaledWeight, q: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(W - s Q) E[x] in float64, real units: add it to the bias so E[y - y_q] = 0 on the calibration inputs.

    y - y_q = (W - W_q) x + b - b'  ->  mean zero for b' = b + (W - W_q) E[x].
    """
    mean = mean.to(device=weight.device, dtype=torch.float64)
    shift = torch.empty(weight.shape[0], dtype=torch.float64)
    for rows, x in weight.chunks():
        shift[rows] = ((x.to(torch.float64) - q[rows].to(weight.device, torch.float64)) @ mean).cpu()
    return shift * math.ldexp(1.0, weight.exponent)
