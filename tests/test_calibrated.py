"""Calibrated rounding: beats round-to-nearest on held-out outputs, never loses on the calibration
objective, stays finite; bias correction has the right sign; the CLI runs it end to end."""

import json
import math

import pytest
import torch
from anisotropic import Anisotropic, recorded
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quant_core import ConvertOptions, QuantError, convert_file
from quant_core.calibrated import bias_shift, calibrated_rounding, updown_rounding
from quant_core.calibration import InputStatistics, StatisticsRecorder, load_statistics, save_statistics
from quant_core.cli import main
from quant_core.fp16 import FP16_MAX, choose_scale_exponent
from quant_core.methods import rounding_settings
from quant_core.reader import dequantize_state_dict
from quant_core.report import report_path_for
from quant_core.rounding import ScaledWeight, abs_max, round_nearest

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def scaled(w: torch.Tensor, device: str = "cpu") -> ScaledWeight:
    return ScaledWeight(w, choose_scale_exponent(abs_max(w)), torch.device(device))


SETTINGS = rounding_settings()


def output_error(w: torch.Tensor, weight: ScaledWeight, q: torch.Tensor, x: torch.Tensor) -> float:
    deq = q.double() * 2.0**weight.exponent
    return float(torch.linalg.norm(x.double() @ (w.double() - deq).T))


def calibration_loss(weight: ScaledWeight, stats: InputStatistics, q: torch.Tensor) -> torch.Tensor:
    """Per-row tr(E H E^T), computed here from the statistics, independently of the method."""
    e = weight.source.double() * 2.0**-weight.exponent - q.double()
    return ((e @ stats.hessian()) * e).sum(1)


@pytest.mark.parametrize("device", DEVICES)
def test_calibrated_beats_round_to_nearest_on_heldout_inputs(device):
    torch.manual_seed(0)
    data = Anisotropic(96)
    layer = nn.Linear(96, 64)
    stats = recorded(layer, data)
    weight = scaled(layer.weight.detach(), device)
    heldout = data.draw(4096)
    rtn = round_nearest(weight, SETTINGS)
    calibrated = calibrated_rounding(weight, SETTINGS, stats)
    updown = updown_rounding(weight, SETTINGS, stats)
    w = layer.weight.detach()
    base = output_error(w, weight, rtn.q, heldout)
    assert output_error(w, weight, calibrated.q, heldout) < 0.35 * base
    assert output_error(w, weight, updown.q, heldout) < 0.5 * base
    assert calibrated.details["objective_ratio"] < 0.1 and calibrated.details["fallback_rows"] == 0
    # error feedback trades a larger weight error for a smaller output error
    assert calibrated.stats.relative_error > rtn.stats.relative_error
    assert calibrated.details["weight_error_ratio"] == pytest.approx(
        calibrated.stats.relative_error / rtn.stats.relative_error
    )
    assert calibrated.q.dtype == torch.float16 and calibrated.q.device.type == "cpu"


def test_eigen_summary_statistics_still_beat_round_to_nearest():
    torch.manual_seed(0)
    data = Anisotropic(64, seed=1)
    layer = nn.Linear(64, 32)
    stats = recorded(layer, data, max_full_dim=16, summary_rank=24)
    assert not stats.is_full
    weight = scaled(layer.weight.detach())
    heldout = data.draw(2048)
    w = layer.weight.detach()
    ratio = output_error(w, weight, calibrated_rounding(weight, SETTINGS, stats).q, heldout) / output_error(
        w, weight, round_nearest(weight, SETTINGS).q, heldout
    )
    assert ratio < 0.5


@pytest.mark.parametrize("method", [calibrated_rounding, updown_rounding])
def test_never_worse_than_round_to_nearest_on_the_objective(method):
    """Isotropic inputs leave nothing to gain; every row must still be no worse than round-to-nearest."""
    g = torch.Generator().manual_seed(4)
    n = 40
    x = torch.randn(500, n, generator=g, dtype=torch.float64)
    stats = InputStatistics(500, x.mean(0), second_moment=x.T @ x / 500)
    weight = scaled(torch.randn(30, n, generator=g))
    out = method(weight, SETTINGS, stats)
    rtn = round_nearest(weight, SETTINGS)
    assert (calibration_loss(weight, stats, out.q) <= calibration_loss(weight, stats, rtn.q) * (1 + 1e-12)).all()
    assert out.details["objective_ratio"] <= 1.0


def test_extreme_values_stay_finite():
    """Weights beyond float16's range (scaled to its top) with feedback pushing past +-65504."""
    g = torch.Generator().manual_seed(5)
    n = 32
    w = torch.randn(16, n, generator=g) * 3e5
    w[0] = 9.9e5  # a whole row at the top of the range once scaled: feedback pushes it outward
    w[0, 0] = 1e6
    x = torch.randn(300, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    stats = InputStatistics(300, x.mean(0), second_moment=x.T @ x / 300)
    weight = scaled(w)
    assert abs_max(w) > FP16_MAX
    for method in (calibrated_rounding, updown_rounding):
        q = method(weight, SETTINGS, stats).q
        assert torch.isfinite(q).all() and q.abs().max() <= FP16_MAX
        rtn_loss = calibration_loss(weight, stats, round_nearest(weight, SETTINGS).q)
        assert calibration_loss(weight, stats, q).sum() <= rtn_loss.sum()


def test_statistics_of_the_wrong_width_are_refused():
    stats = InputStatistics(1, torch.zeros(5), second_moment=torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="width 5 for a weight with 4"):
        calibrated_rounding(scaled(torch.ones(3, 4)), SETTINGS, stats)


@pytest.mark.parametrize("method,after_at_most", [(round_nearest, 0.01), (calibrated_rounding, 0.4)])
def test_bias_correction_sign_and_effect_on_heldout_data(method, after_at_most):
    """b' = b + (W - W_q) E[x] zeroes the mean output error; the reversed sign (the original
    script's) doubles it. Error feedback already shrinks the mean error, so less is left to remove."""
    torch.manual_seed(0)
    data = Anisotropic(96, seed=2)
    data.mean *= 8  # a strong mean makes the bias term matter
    layer = nn.Linear(96, 64)
    stats = recorded(layer, data, batches=16)
    weight = scaled(layer.weight.detach())
    q = method(weight, SETTINGS, stats).q
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    deq = q.double() * 2.0**weight.exponent
    shift = bias_shift(weight, q, stats.mean)

    def mean_output_error(x: torch.Tensor, bias: torch.Tensor) -> float:
        x = x.double()
        return float(torch.linalg.norm((x @ w.T + b - (x @ deq.T + bias)).mean(0)))

    calibration_mean = stats.mean[None, :]  # exact zero on the calibration inputs' mean
    assert mean_output_error(calibration_mean, b + shift) < 1e-9 * mean_output_error(calibration_mean, b)
    heldout = data.draw(16384)
    before = mean_output_error(heldout, b)
    assert mean_output_error(heldout, b + shift) < after_at_most * before
    assert mean_output_error(heldout, b - shift) > 1.8 * before


class TinyModel(nn.Module):
    """An embedding spread into correlated features, then two blocks of Linear layers (q/k/v share
    their input), with biases."""

    def __init__(self, d: int = 32, vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(d, d) for name in ("q", "k", "v", "out")}) for _ in range(2)
        )
        mix = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(9))).Q
        self.mix = nn.Parameter(mix * torch.logspace(0.5, -2.5, d)[:, None])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) @ self.mix + 0.3
        for blk in self.blocks:
            a = torch.softmax(blk["q"](x) @ blk["k"](x).transpose(-1, -2) / 4, -1) @ blk["v"](x)
            x = x + blk["out"](a)
        return x


def test_cli_calib_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    model = TinyModel()
    with torch.no_grad():
        model.blocks[0]["q"].bias.copy_(torch.arange(32) / 4)  # exactly representable: would be cast to float16
        model.embed.weight.copy_(model.embed.weight.half())  # exact in float16: the comparison is about Linear layers
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 50, (1, 24), generator=g) for _ in range(40)]
    heldout = [torch.randint(0, 50, (1, 24), generator=g) for _ in range(40)]
    with StatisticsRecorder(model) as recorder, torch.no_grad():
        for ids in calibration:
            model(ids)
    stats_path = save_statistics(recorder.statistics(model="tiny"), tmp_path / "stats.safetensors")
    source = tmp_path / "tiny.safetensors"  # stored under a prefix the module tree lacks
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(source))

    outputs = {}
    for method, extra in (("calibrated", []), ("rtn", ["--method", "rtn"])):
        out = tmp_path / f"{method}.safetensors"
        assert main(["--input", str(source), "--output", str(out), "--calib", str(stats_path), *extra]) == 0
        outputs[method] = out
    printed = capsys.readouterr().out
    assert "rounding: calibrated 8, learned 1" in printed
    assert "calibration objective (output error on the recorded inputs): " in printed
    assert "(geometric mean over 8 layers," in printed  # the learned embedding has no objective

    report = json.loads(report_path_for(outputs["calibrated"]).read_text())
    assert 0 < report["summary"]["calibration_objective_ratio"] < 1
    methods = {layer["name"]: layer["method"] for layer in report["layers"]}
    assert methods["model.diffusion_model.embed.weight"] == "learned"  # no statistics: data-free
    assert methods["model.diffusion_model.blocks.1.v.weight"] == "calibrated"
    with safe_open(str(outputs["calibrated"]), "pt") as f:
        settings = json.loads(f.metadata()["quant.settings"])
    assert settings["method"] == "calibrated" and settings["calib"] == "stats.safetensors"
    assert settings["calib_model"] == "tiny" and settings["calib_tokens"] == 40 * 24

    converted = load_file(str(outputs["calibrated"]))
    bias = "model.diffusion_model.blocks.0.q.bias"
    assert converted[bias].dtype == torch.float32  # corrected: source precision kept, never cast
    assert not torch.equal(converted[bias], model.blocks[0]["q"].bias.detach())

    kept = tmp_path / "kept.safetensors"  # a bias the user excluded is left exactly as it is
    assert (
        main(
            [
                "--input",
                str(source),
                "--output",
                str(kept),
                "--calib",
                str(stats_path),
                "-q",
                "--exclude",
                r"blocks\.0\.q\.bias$",
            ]
        )
        == 0
    )
    assert torch.equal(load_file(str(kept))[bias].float(), model.blocks[0]["q"].bias.detach())

    def heldout_error(path) -> float:
        restored = dequantize_state_dict(load_file(str(path)))
        quantized = TinyModel()
        quantized.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in restored.items()})
        with torch.no_grad():
            return math.sqrt(sum(float(((model(ids) - quantized(ids)) ** 2).sum()) for ids in heldout))

    assert heldout_error(outputs["calibrated"]) < 0.6 * heldout_error(outputs["rtn"])


def test_calibrated_needs_statistics(example_model, tmp_path):
    with pytest.raises(QuantError, match="needs input statistics"):
        convert_file(example_model, tmp_path / "o.safetensors", ConvertOptions(method="calibrated"))
    with pytest.raises(SystemExit):
        main(["--input", str(example_model), "--method", "calibrated"])


def test_statistics_from_another_model_are_an_error(example_model, tmp_path):
    layer = nn.Linear(7, 3)
    with StatisticsRecorder(nn.ModuleDict({"head": layer})) as recorder, torch.no_grad():
        layer(torch.randn(5, 7))
    stats = load_statistics(save_statistics(recorder.statistics(), tmp_path / "s.safetensors"))
    with pytest.raises(QuantError, match="'head' was recorded with 7 input features"):
        convert_file(example_model, tmp_path / "o.safetensors", ConvertOptions(method="calibrated"), statistics=stats)
    assert not (tmp_path / "o.safetensors").exists()


def test_rows_round_to_nearest_reproduces_are_not_worked_on(caplog):
    """A bfloat16 source lies on the scaled float16 grid: round-to-nearest is exact, returned without
    touching the statistics (here unusable: they would be refused with a warning); rows that are not
    exact are still calibrated."""
    torch.manual_seed(0)
    data = Anisotropic(64, seed=3)
    layer = nn.Linear(64, 48)
    good = recorded(layer, data)
    broken = InputStatistics(good.count, good.mean, second_moment=torch.full((64, 64), math.nan, dtype=torch.float64))
    w = layer.weight.detach().bfloat16().float()
    with caplog.at_level("WARNING"):
        out = calibrated_rounding(scaled(w), SETTINGS, broken)
    assert torch.equal(out.q, round_nearest(scaled(w), SETTINGS).q) and out.stats.exact_fraction == 1.0
    assert caplog.records == []

    mixed = w.clone()
    mixed[::2] = layer.weight.detach()[::2]  # even rows need rounding, odd rows are exact
    weight = scaled(mixed)
    out = calibrated_rounding(weight, SETTINGS, good)
    rtn = round_nearest(weight, SETTINGS).q
    assert torch.equal(out.q[1::2], rtn[1::2])
    assert (calibration_loss(weight, good, out.q)[::2] < 0.5 * calibration_loss(weight, good, rtn)[::2]).all()
    assert out.details["objective_ratio"] < 0.5


@pytest.mark.parametrize("summary", [False, True])
def test_unusable_statistics_round_to_nearest_with_a_warning(summary, caplog):
    n = 48
    nan = torch.full((n,), math.nan, dtype=torch.float64)
    if summary:  # wider than twice its rank: the low-rank factor
        stats = InputStatistics(
            10, nan, eigenvectors=torch.full((n, 4), math.nan, dtype=torch.float64), eigenvalues=nan[:4], residual=nan
        )
    else:
        stats = InputStatistics(10, nan, second_moment=torch.full((n, n), math.nan, dtype=torch.float64))
    weight = scaled(torch.randn(20, n, generator=torch.Generator().manual_seed(1)))
    with caplog.at_level("WARNING"):
        out = calibrated_rounding(weight, SETTINGS, stats)
    assert torch.equal(out.q, round_nearest(weight, SETTINGS).q)
    assert "not positive definite" in caplog.text


@pytest.mark.parametrize("device", DEVICES)
def test_float64_source_and_damping_parameter(device):
    """A float64 source is worked on in float64 (rounded once, correctly); more damping trusts the statistics less."""
    torch.manual_seed(0)
    data = Anisotropic(96, seed=6)
    layer = nn.Linear(96, 40)
    stats = recorded(layer, data)
    w64 = layer.weight.detach().double() * (1 + 1e-9)  # not float32-representable
    weight = scaled(w64, device)
    assert weight.work_dtype == torch.float64
    ratios = [calibrated_rounding(weight, SETTINGS, stats, damping=d).details["objective_ratio"] for d in (0.01, 10.0)]
    assert ratios[0] < 0.2 and ratios[0] < ratios[1] <= 1.0
    q = calibrated_rounding(weight, SETTINGS, stats).q
    assert torch.isfinite(q).all() and q.dtype == torch.float16
