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
3. coordinate descent (`refine.py`): single float16 steps wherever they lower L, two sweeps;
4. per output row (rows are independent under L), whichever of this and round-to-nearest has the
   lower L is kept (near ties decided in float64 from the statistics as stored), so the result is
   never worse than round-to-nearest on the objective.
`updown_rounding` is the AdaRound-style alternative: each value stays one of its two float16
neighbours, chosen by coordinate descent on L from round-to-nearest (measured weaker).

Every value is rounded with `round_to_fp16` (one correct rounding) after clamping to +-65504, so
the output is finite whatever the feedback does. The weight error grows (~1.5x round-to-nearest
on real models) while the output error falls: judge by the output. Everything runs on the weight's
device in its work dtype (float32 for float32/bfloat16/float16 sources; measured to decide like
float64, see tests/test_feedback.py), except the small low-rank factorization and near ties (float64).
"""

from __future__ import annotations

import logging
import math

import torch

from .calibration import InputStatistics
from .feedback import DenseFactor, Factor, LowRankFactor, error_feedback
from .fp16 import round_to_fp16
from .refine import coordinate_descent
from .rounding import ErrorStats, RoundingOutcome, RoundingSettings, ScaledWeight, nearest_pass

DAMPING = 0.01  # default damping: added to diag(H), relative to its mean (GPTQ's); regularizes the factorization
TIE_TOLERANCE = 1e-3  # rows whose float32 losses agree this closely are compared again in float64
REFINE_SWEEPS = 2  # coordinate-descent sweeps after error feedback (measured: README)
UPDOWN_SWEEPS = 8
_ROUNDING_ROWS = 64  # updown: columns of the transposed weight rounded at a time (bounds the temporaries)

log = logging.getLogger(__name__)


def _checked(weight: ScaledWeight, stats: InputStatistics | None) -> InputStatistics:
    if stats is None:
        raise ValueError("calibrated rounding needs the layer's input statistics")
    if stats.dim != weight.shape[1]:
        raise ValueError(f"statistics of width {stats.dim} for a weight with {weight.shape[1]} input features")
    return stats


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0


def _outcome(
    q: torch.Tensor,
    stats: ErrorStats,
    rtn_weight_sq: float,
    totals: dict[str, float],
    fallback_rows: int,
    tokens: int,
    sweeps: int = 0,
) -> RoundingOutcome:
    return RoundingOutcome(
        q,
        stats,
        sweeps,
        {
            "objective_ratio": _ratio(totals["final"], totals["rtn"]),
            "start_objective_ratio": _ratio(totals["first"], totals["rtn"]),
            "weight_error_ratio": math.sqrt(_ratio(stats.error_sq, rtn_weight_sq)),
            "fallback_rows": fallback_rows,
            "calib_tokens": tokens,
        },
        rtn_weight_sq,
    )


def build_factor(stats: InputStatistics, damping: float, device: torch.device, dtype: torch.dtype) -> Factor | None:
    """The factor of H + damping * mean(diag H) I; None if it cannot be made positive definite.

    A summary is used in its low-rank form unless it is so narrow that the dense matrix is cheaper
    (n <= 2k: the dense loop costs n multiply-adds per weight, the low-rank one about 2k + a block).
    """
    if not stats.is_full and stats.dim > 2 * stats.eigenvalues.shape[0]:
        return LowRankFactor.build(stats, damping, device, dtype)
    return DenseFactor.build(stats.hessian(device), damping, dtype)


def calibrated_rounding(
    weight: ScaledWeight,
    settings: RoundingSettings,
    statistics: InputStatistics | None,
    damping: float = DAMPING,
    sweeps: int = REFINE_SWEEPS,
) -> RoundingOutcome:
    """Error feedback then coordinate descent on the calibration objective, never worse than round-to-nearest.

    Needs the layer input's `statistics`. `damping` (relative to the mean of diag(H)) regularizes the
    factorization: larger values trust the recorded correlations less.
    """
    return _round_with_statistics(weight, statistics, damping, sweeps, feedback=True)


def updown_rounding(
    weight: ScaledWeight, settings: RoundingSettings, statistics: InputStatistics | None, damping: float = DAMPING
) -> RoundingOutcome:
    """AdaRound-style: each value one of its two float16 neighbours (needs the layer input's `statistics`)."""
    return _round_with_statistics(weight, statistics, damping, UPDOWN_SWEEPS, feedback=False)


def _round_with_statistics(
    weight: ScaledWeight, statistics: InputStatistics | None, damping: float, sweeps: int, feedback: bool
) -> RoundingOutcome:
    """Shared driver: rows worth working on, factor, feedback and/or descent, per-row fallback, report."""
    stats = _checked(weight, statistics)
    inexact = torch.empty(weight.shape[0], dtype=torch.bool, device=weight.device)

    def mark_inexact(rows: slice, x: torch.Tensor, nearest: torch.Tensor) -> None:
        # A row round-to-nearest reproduces exactly has zero loss: no method does better, so only the
        # other rows are worked on (all of them for a float32 source, few or none for a bfloat16 one).
        inexact[rows] = (nearest.to(x.dtype) != x).any(1)

    q_all, rtn_stats = nearest_pass(weight, mark_inexact)
    totals = {"rtn": 0.0, "first": 0.0, "final": 0.0}
    selected = int(inexact.sum())
    if selected == 0:  # nothing to gain: every row's loss is zero
        return _outcome(q_all, rtn_stats, rtn_stats.error_sq, totals, 0, stats.count)
    factor = build_factor(stats, damping, weight.device, weight.work_dtype)
    if factor is None:
        log.warning(
            "input statistics of a %dx%d weight are not positive definite even with damping; rounded to nearest",
            *weight.shape,
        )
        return _outcome(q_all, rtn_stats, rtn_stats.error_sq, totals, 0, stats.count)
    del q_all  # rebuilt at the end: beside the working copy it would take the peak to 2x the weight

    w_t = torch.empty(weight.shape[1], selected, dtype=weight.work_dtype, device=weight.device)
    start = 0
    for rows, x in weight.chunks():  # transposed first: gathering whole rows is what memory does fast
        x = _selected_rows(x, inexact[rows])
        w_t[:, start : start + x.shape[0]] = torch.index_select(x.T.contiguous(), 0, factor.order)
        start += x.shape[0]
    q_t = torch.empty(w_t.shape, dtype=torch.float16, device=weight.device)
    if feedback:
        first = error_feedback(w_t, factor, q_t)  # w_t now holds the errors
    else:
        first = None  # round-to-nearest's losses, computed with the fallback
        for r0 in range(0, w_t.shape[0], _ROUNDING_ROWS):
            part = w_t[r0 : r0 + _ROUNDING_ROWS]
            q_t[r0 : r0 + _ROUNDING_ROWS] = round_to_fp16(part)
            part -= q_t[r0 : r0 + _ROUNDING_ROWS]
    change, sweeps_run = coordinate_descent(w_t, q_t, factor, sweeps, neighbours_only=not feedback)
    del w_t
    q, error_stats, fallback_rows = _keep_better_rows(weight, stats, factor, inexact, q_t, first, change, totals)
    return _outcome(q, error_stats, rtn_stats.error_sq, totals, fallback_rows, stats.count, sweeps_run)


def _selected_rows(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return x if bool(chosen.all()) else x[chosen]


def _keep_better_rows(
    weight: ScaledWeight,
    stats: InputStatistics,
    factor: Factor,
    inexact: torch.Tensor,
    q_t: torch.Tensor,
    first: torch.Tensor | None,
    change: torch.Tensor,
    totals: dict[str, float],
) -> tuple[torch.Tensor, ErrorStats, int]:
    """Per output row, the method's values or round-to-nearest's, whichever has the lower L; in the weight's
    column order.

    q_t, first (the losses before descent; None: round-to-nearest's) and change (descent's) hold the
    `inexact` rows only, in order; the other rows are round-to-nearest's.
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
        rtn = factor.estimated_losses(xs - ns.to(x.dtype)).double()
        before = rtn if first is None else first[start:end]
        ours = before + change[start:end]
        close = (ours - rtn).abs() <= TIE_TOLERANCE * torch.maximum(ours.abs(), rtn.abs())
        close |= ~torch.isfinite(ours)
        if bool(close.any()):
            x64 = xs[close].double()
            rtn[close] = factor.exact_losses(x64 - ns[close].double())
            ours[close] = factor.exact_losses(x64 - q[close].double())
        worse = ~(ours <= rtn)  # NaN counts as worse
        q = torch.where(worse[:, None], ns, q)
        if xs.shape[0] < x.shape[0]:
            q = nearest.index_put((chosen,), q)
        fallback += worse.sum()
        totals["rtn"] += float(rtn.sum())
        totals["first"] += float(before.sum())
        totals["final"] += float(torch.minimum(ours, rtn).sum())
        error_stats.add(x, q)
        q_all[rows] = q.cpu()
        start = end
    return q_all, error_stats, int(fallback)


def bias_shift(weight: ScaledWeight, q: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(W - s Q) E[x] in float64, real units: add it to the bias so E[y - y_q] = 0 on the calibration inputs.

    y - y_q = (W - W_q) x + b - b'  ->  mean zero for b' = b + (W - W_q) E[x].
    """
    mean = mean.to(device=weight.device, dtype=torch.float64)
    shift = torch.empty(weight.shape[0], dtype=torch.float64)
    for rows, x in weight.chunks():
        shift[rows] = ((x.to(torch.float64) - q[rows].to(weight.device, torch.float64)) @ mean).cpu()
    return shift * math.ldexp(1.0, weight.exponent)
