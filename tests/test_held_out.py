"""The `calibrated` method keeps calibrated rounding only where it beat round-to-nearest on data its rounding never saw.

The check rounds each layer on one fold of the statistics and scores it on the other; a layer that
loses to round-to-nearest there is rounded to nearest. These tests build both situations from
recorded inputs: folds from one distribution (calibration generalizes: kept, beats RTN on new draws)
and folds that exercise different input directions (it does not: RTN, where the plain kernel loses
on new data), and check the score against one computed here from the statistics.
"""

import logging

import pytest
import torch
from anisotropic import Anisotropic
from torch import nn

from quant_core import ConvertOptions, convert_file
from quant_core.calibrated import calibrated_rounding
from quant_core.calibration import CalibrationStatistics, InputStatistics, StatisticsRecorder, merge_statistics
from quant_core.fp16 import choose_scale_exponent
from quant_core.held_out import CHECK_SWEEPS, checked_calibrated_rounding, held_out_ratio
from quant_core.methods import METHODS, rounding_settings
from quant_core.rounding import ScaledWeight, abs_max, round_nearest
from quant_core.safetensors_io import write_state_dict

SETTINGS = rounding_settings()


def record(layer: nn.Linear, batches: list[torch.Tensor], **kwargs) -> InputStatistics:
    """Forward calls alternate between the recorder's two folds."""
    with StatisticsRecorder(layer, **kwargs) as recorder, torch.no_grad():
        for batch in batches:
            layer(batch)
    return recorder.statistics().for_layer("")


def scaled(w: torch.Tensor) -> ScaledWeight:
    return ScaledWeight(w, choose_scale_exponent(abs_max(w)), torch.device("cpu"))


def output_error(weight: ScaledWeight, q: torch.Tensor, x: torch.Tensor) -> float:
    deq = q.double() * 2.0**weight.exponent
    return float(torch.linalg.norm(x.double() @ (weight.source.double() - deq).T))


def objective(weight: ScaledWeight, q: torch.Tensor, stats: InputStatistics) -> float:
    """tr(E H E^T) in scaled units, from the dense H: independent of the method's own bookkeeping."""
    e = weight.source.double() * 2.0**-weight.exponent - q.double()
    return float(((e @ stats.hessian()) * e).sum())


def subspace_data(n: int, rank: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs spanning a random `rank`-dimensional subspace, plus a faint isotropic floor."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, n, generator=g)
    return torch.randn(tokens, rank, generator=g) @ basis + 1e-3 * torch.randn(tokens, n, generator=g)


def test_the_calibrated_method_is_the_checked_one():
    assert METHODS["calibrated"].round is checked_calibrated_rounding


def recorded_layer(seed: int, width: int, outputs: int, folds: int, rows: int, summary: bool):
    """(weight, statistics in `folds` folds of `rows` rows) of a random Linear layer; `summary`: low-rank."""
    torch.manual_seed(seed)
    layer = nn.Linear(width, outputs)
    kwargs = {"max_full_dim": 16, "summary_rank": 12} if summary else {}
    stats = record(layer, [Anisotropic(width).draw(rows) for _ in range(folds)], **kwargs)
    return scaled(layer.weight.detach()), stats


@pytest.mark.parametrize("summary", [False, True])
def test_full_shrinkage_is_round_to_nearest(summary):
    weight, stats = recorded_layer(1, 48, 32, folds=2, rows=200, summary=summary)
    q = calibrated_rounding(weight, SETTINGS, stats.shrunk(1.0)).q
    assert torch.equal(q, round_nearest(weight, SETTINGS).q)


@pytest.mark.parametrize("summary", [False, True])
def test_the_held_out_score_is_the_objective_on_the_held_out_fold(summary):
    weight, stats = recorded_layer(5, 40, 24, folds=4, rows=100, summary=summary)
    q = calibrated_rounding(weight, SETTINGS, stats.folds[0]).q
    rtn = round_nearest(weight, SETTINGS).q
    expected = objective(weight, q, stats.folds[1]) / objective(weight, rtn, stats.folds[1])
    assert held_out_ratio(weight, q, stats.folds[1]) == pytest.approx(expected, rel=1e-4)


def test_calibration_that_generalizes_is_kept_and_beats_rtn_on_new_data():
    torch.manual_seed(2)
    data = Anisotropic(64)
    layer = nn.Linear(64, 48)
    stats = record(layer, [data.draw(256) for _ in range(4)])
    weight = scaled(layer.weight.detach())
    outcome = checked_calibrated_rounding(weight, SETTINGS, stats)
    assert outcome.details["shrinkage"] == 0.0 and outcome.details["held_out_ratio_0"] < 0.5
    assert torch.equal(outcome.q, calibrated_rounding(weight, SETTINGS, stats).q)  # the final rounding: all the data
    heldout = data.draw(4096)
    rtn = round_nearest(weight, SETTINGS).q
    assert output_error(weight, outcome.q, heldout) < 0.5 * output_error(weight, rtn, heldout)


def test_calibration_that_does_not_generalize_falls_back_to_rtn():
    """Each fold exercises its own few input directions: error feedback parks the rounding error in
    directions neither saw, which new inputs do exercise. The plain kernel loses to RTN there; the
    checked method sees it lose on the held-out fold and rounds to nearest."""
    n = 64
    torch.manual_seed(3)
    layer = nn.Linear(n, 48)
    stats = record(layer, [subspace_data(n, 6, 200, seed) for seed in (10, 11)])
    weight = scaled(layer.weight.detach())
    new_inputs = subspace_data(n, 6, 2000, seed=12)
    rtn = round_nearest(weight, SETTINGS).q
    plain = calibrated_rounding(weight, SETTINGS, stats).q
    assert output_error(weight, plain, new_inputs) > 1.3 * output_error(weight, rtn, new_inputs)
    outcome = checked_calibrated_rounding(weight, SETTINGS, stats, candidates=(0.0, 0.75))
    assert outcome.details["shrinkage"] == 1.0
    assert outcome.details["held_out_ratio_0"] >= 1.0 and outcome.details["held_out_ratio_0.75"] >= 1.0
    assert torch.equal(outcome.q, rtn)


@pytest.mark.parametrize("both_ways", [False, True])
def test_the_kept_rounding_beat_rtn_on_the_held_out_fold_and_never_loses_on_all_the_data(both_ways):
    n = 32
    layer = nn.Linear(n, 24)
    kept = 0
    for seed in range(4):
        torch.manual_seed(seed)
        mixed = [subspace_data(n, 3 + seed, 100, seed), Anisotropic(n, seed).draw(100)]
        stats = record(layer, mixed)
        weight = scaled(layer.weight.detach())
        outcome = checked_calibrated_rounding(weight, SETTINGS, stats, candidates=(0.0, 0.75), both_ways=both_ways)
        ratios = {alpha: outcome.details[f"held_out_ratio_{alpha:g}"] for alpha in (0.0, 0.75)}
        rtn = round_nearest(weight, SETTINGS).q
        if outcome.details["shrinkage"] < 1.0:
            kept += 1
            assert ratios[outcome.details["shrinkage"]] < 1.0
            expected = calibrated_rounding(weight, SETTINGS, stats.shrunk(outcome.details["shrinkage"])).q
            assert torch.equal(outcome.q, expected)
        else:
            assert min(ratios.values()) >= 1.0 and torch.equal(outcome.q, rtn)
        assert objective(weight, outcome.q, stats) <= objective(weight, rtn, stats) * (1 + 1e-9)
    assert 0 < kept < 4 or both_ways  # one direction: both outcomes occur on these mixes


def test_one_direction_rounds_on_the_smaller_fold_and_scores_on_the_larger():
    torch.manual_seed(6)
    layer = nn.Linear(24, 16)
    data = Anisotropic(24)
    stats = record(layer, [data.draw(40), data.draw(200)])
    assert [fold.count for fold in stats.folds] == [40, 200]
    weight = scaled(layer.weight.detach())
    outcome = checked_calibrated_rounding(weight, SETTINGS, stats)
    q = calibrated_rounding(weight, SETTINGS, stats.folds[0], sweeps=CHECK_SWEEPS).q  # the check's rounding
    assert outcome.details["held_out_ratio_0"] == pytest.approx(held_out_ratio(weight, q, stats.folds[1]))


def test_statistics_without_folds_are_rounded_without_the_check_and_counted_once(caplog, tmp_path):
    torch.manual_seed(4)
    layer = nn.Linear(24, 8)
    x = Anisotropic(24).draw(300).double()
    plain = InputStatistics(300, x.mean(0), second_moment=x.T @ x / 300)
    weight = scaled(layer.weight.detach())
    outcome = checked_calibrated_rounding(weight, SETTINGS, plain)
    assert torch.equal(outcome.q, calibrated_rounding(weight, SETTINGS, plain).q)
    assert "shrinkage" not in outcome.details

    # a whole conversion: one summary line, no warning per layer
    names = [f"blocks.{i}" for i in range(3)]
    source = write_state_dict({f"{n}.weight": torch.randn(8, 24) for n in names}, tmp_path / "m.safetensors")
    model_stats = CalibrationStatistics(dict.fromkeys(names, "x"), {"x": plain})
    with caplog.at_level(logging.WARNING):
        report = convert_file(
            source, tmp_path / "o.safetensors", ConvertOptions(method="calibrated"), statistics=model_stats
        )
    assert not [r for r in caplog.records if "held-out" in r.getMessage()]
    assert report.summary()["held_out_unchecked_layers"] == 3
    assert any(line.startswith("3 layers rounded without the held-out check") for line in report.summary_lines())


def test_merged_folds_are_the_statistics_the_final_rounding_uses():
    torch.manual_seed(7)
    layer = nn.Linear(20, 8)
    stats = record(layer, [Anisotropic(20).draw(64) for _ in range(3)])
    torch.testing.assert_close(merge_statistics(stats.folds).second_moment, stats.second_moment)


def test_a_weight_round_to_nearest_holds_exactly_is_reported_like_any_other(tmp_path):
    """A bfloat16 source lies on the scaled float16 grid: nothing to win, so the layer is rounded to nearest
    without the check, and its report says the objective is round-to-nearest's (the summary needs it)."""
    weight, stats = recorded_layer(8, 32, 16, folds=2, rows=100, summary=False)
    exact = scaled(weight.source.bfloat16().float())
    outcome = checked_calibrated_rounding(exact, SETTINGS, stats)
    assert torch.equal(outcome.q, round_nearest(exact, SETTINGS).q) and outcome.stats.exact_fraction == 1.0
    assert outcome.details["objective_ratio"] == 1.0 and "held_out_ratio_0" not in outcome.details

    source = write_state_dict({"layer.weight": exact.source.bfloat16()}, tmp_path / "bf16.safetensors")
    model_stats = CalibrationStatistics({"layer": "layer"}, {"layer": stats})
    report = convert_file(
        source, tmp_path / "out.safetensors", ConvertOptions(method="calibrated"), statistics=model_stats
    )
    assert report.objective_ratio == 1.0 and report.exact_fraction == 1.0
