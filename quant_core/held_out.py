"""The `calibrated` method's policy: a layer keeps calibrated rounding only where it beat round-to-nearest
on data its rounding never saw.

Why: error feedback moves rounding error into input directions the calibration data barely
exercised. That is free on the calibration inputs and costly on inputs that do exercise them: new
prompts, and above all new negative prompts under classifier-free guidance, which multiplies the
difference of two branches' errors. How far that goes depends on the layer, so no fixed damping fits.

Policy, per layer, for statistics recorded in folds (disjoint parts of the data, e.g. one per
prompt; quant_core.calibration):
1. the check: each candidate shrinkage alpha of the second moment toward its diagonal,
   H_alpha = (1 - alpha) H + alpha diag(H) (alpha = 1 is round-to-nearest exactly: with a diagonal
   H error feedback has nothing to move), is rounded by the calibrated kernel (error feedback, without
   the final descent) on the training folds and scored on the held-out fold, as tr(E H E^T) over
   round-to-nearest's on that same fold;
2. the best candidate is used for the final rounding on all the data if it beat round-to-nearest
   on every held-out fold; otherwise the layer is rounded to nearest.
The training folds are the smaller part of the data (by default one direction only: rounded on the
fold with fewer tokens, scored on the other), so the rounding the check judges saw less than the
final one, and the check errs on the side of round-to-nearest. Statistics without folds (recorded in
one fold, or files from before folds) get the kernel without the check, logged per layer.
"""

from __future__ import annotations

import logging

import torch

from .calibrated import DAMPING, REFINE_SWEEPS, calibrated_rounding
from .calibration import InputStatistics, merge_statistics
from .fp16 import round_to_fp16
from .report import UNCHECKED
from .rounding import RoundingOutcome, RoundingSettings, ScaledWeight, nearest_pass

CANDIDATES = (0.0,)  # shrinkages tried by the check; 1.0 (round-to-nearest) is always the fallback
# coordinate-descent sweeps of the check's roundings: none. The check only decides whether the layer keeps
# calibrated rounding; with descent it cost 2.1x the unchecked kernel on Flux-shaped layers, without 1.46x,
# and made the same decisions there and on MiniLM (bench/results/held_out_check_*.md)
CHECK_SWEEPS = 0

log = logging.getLogger(__name__)


def checked_calibrated_rounding(
    weight: ScaledWeight,
    settings: RoundingSettings,
    statistics: InputStatistics | None,
    candidates: tuple[float, ...] = CANDIDATES,
    check_sweeps: int = CHECK_SWEEPS,
    both_ways: bool = False,
    damping: float = DAMPING,
    sweeps: int = REFINE_SWEEPS,
) -> RoundingOutcome:
    """Calibrated rounding where a held-out fold says it beats round-to-nearest, else round-to-nearest.

    `candidates`: shrinkages tried; `both_ways`: every fold held out in turn (each candidate then
    costs one rounding per fold) instead of only the largest; `check_sweeps`: descent sweeps of the
    check's roundings; `damping`, `sweeps`: the kernel's, for every rounding.
    """
    if statistics is None:
        raise ValueError("calibrated rounding needs the layer's input statistics")
    folds = tuple(fold for fold in statistics.folds if fold.count)
    if len(folds) < 2:
        log.info(
            "statistics of a %dx%d weight have no folds (one part of the data, or a file from before folds): "
            "calibrated rounding without the held-out check",
            *weight.shape,
        )
        outcome = calibrated_rounding(weight, settings, statistics, damping, sweeps)
        outcome.details[UNCHECKED] = 1.0  # the report counts these layers in one line, not one warning each
        return outcome
    ratios = {alpha: [] for alpha in candidates}
    for training, held_out in _splits(folds, both_ways):
        for alpha in candidates:
            checked = calibrated_rounding(weight, settings, training.shrunk(alpha), damping, check_sweeps)
            if checked.stats.error_sq == 0:  # round-to-nearest is exact (a bf16 source): nothing to win or check
                return checked
            ratios[alpha].append(held_out_ratio(weight, checked.q, held_out))
            del checked  # dropped once scored: the final rounding must not find it still held
    details = {f"held_out_ratio_{alpha:g}": max(r) for alpha, r in ratios.items()}
    winners = {alpha: sum(r) / len(r) for alpha, r in ratios.items() if max(r) < 1.0}
    if not winners:
        q, stats = nearest_pass(weight)
        # rounded to nearest: its objective is round-to-nearest's
        details.update(
            shrinkage=1.0,
            fallback_rows=weight.shape[0],
            calib_tokens=statistics.count,
            objective_ratio=1.0,
            weight_error_ratio=1.0,
        )
        return RoundingOutcome(q, stats, 0, details)
    alpha = min(winners, key=winners.get)
    outcome = calibrated_rounding(weight, settings, statistics.shrunk(alpha), damping, sweeps)
    outcome.details.update(details, shrinkage=alpha)
    return outcome


def _splits(folds: tuple[InputStatistics, ...], both_ways: bool) -> list[tuple[InputStatistics, InputStatistics]]:
    """(training statistics, held-out fold) pairs: the largest fold held out, or each in turn."""
    held = range(len(folds)) if both_ways else [max(range(len(folds)), key=lambda k: folds[k].count)]
    return [(merge_statistics([f for j, f in enumerate(folds) if j != k]), folds[k]) for k in held]


def held_out_ratio(weight: ScaledWeight, q: torch.Tensor, held_out: InputStatistics) -> float:
    """tr(E H E^T) of the values `q` over round-to-nearest's, H the held-out fold's (1.0 where both are 0).

    H is used in its stored form, never expanded: a summary costs O(m n k), a full moment O(m n^2).
    """
    dtype, device = weight.work_dtype, weight.device
    if held_out.is_full:
        h = held_out.second_moment.to(device=device, dtype=dtype)

        def loss(e: torch.Tensor) -> torch.Tensor:
            return ((e @ h) * e).sum(dtype=torch.float64)
    else:
        z = (held_out.eigenvectors * held_out.eigenvalues.clamp_min(0).sqrt()).to(device=device, dtype=dtype)
        r = held_out.residual.to(device=device, dtype=dtype)

        def loss(e: torch.Tensor) -> torch.Tensor:
            return (e @ z).square().sum(dtype=torch.float64) + ((e * e) @ r).sum(dtype=torch.float64)

    ours = torch.zeros((), dtype=torch.float64, device=device)
    nearest = torch.zeros((), dtype=torch.float64, device=device)
    for rows, x in weight.chunks():
        ours += loss(x - q[rows].to(device=device, dtype=dtype))
        nearest += loss(x - round_to_fp16(x).to(dtype))
    nearest_loss = float(nearest)
    return float(ours) / nearest_loss if nearest_loss > 0 else 1.0
