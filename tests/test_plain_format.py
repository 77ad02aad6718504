"""The plain output format: ordinary float16 in real units that any loader reads, and what it refuses to break."""

import json
import math

import pytest
import torch
from anisotropic import Anisotropic
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from quant_core import ConvertOptions, QuantError, convert_file
from quant_core.calibration import StatisticsRecorder
from quant_core.cli import main
from quant_core.format import MARKER_KEY, PLAIN_FORMAT_NAME, is_scale_key
from quant_core.plan import PLAIN_ERROR_LIMIT, plain_float16_problem
from quant_core.reader import read_scaled_file
from quant_core.safetensors_io import SafetensorsFile

PLAIN = ConvertOptions(method="rtn", format="plain")


def test_plain_file_holds_float16_weights_in_real_units_and_nothing_else(example_model, tmp_path):
    out = tmp_path / "plain.safetensors"
    report = convert_file(example_model, out, PLAIN)
    source, converted = load_file(str(example_model)), load_file(str(out))
    assert MARKER_KEY not in converted and not any(is_scale_key(k) for k in converted)
    for layer in report.layers:
        expected = source[layer.name].float().half()  # float32 -> float16: one correct rounding, subnormals too
        assert converted[layer.name].dtype == torch.float16
        assert torch.equal(converted[layer.name], expected), layer.name
        assert layer.scale == 1.0
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["quant.format"] == PLAIN_FORMAT_NAME and json.loads(metadata["quant.settings"])["format"] == "plain"
    assert (
        read_scaled_file(out).expected_scales == [] and read_scaled_file(out).dequantized().keys() == converted.keys()
    )


def test_a_weight_beyond_float16_keeps_its_source_precision_and_is_named(example_model, tmp_path, capsys):
    out = tmp_path / "plain.safetensors"
    assert main(["--input", str(example_model), "--output", str(out), "--format", "plain", "--method", "rtn"]) == 0
    printed = capsys.readouterr().out
    assert "1 weights kept in source precision" in printed and "head.weight" in printed
    assert "--format scaled keeps them in float16" in printed
    source, converted = load_file(str(example_model)), load_file(str(out))
    assert converted["head.weight"].dtype == torch.float32 and torch.equal(
        converted["head.weight"], source["head.weight"]
    )
    report = json.loads(out.with_name("plain.report.json").read_text())
    assert "exceed float16's largest, 65504" in report["kept_in_source_precision"]["head.weight"]
    assert report["summary"]["kept_in_source_precision"] == 1 and "head.weight" not in report["kept"]


def test_default_output_name_of_the_plain_format(example_model, capsys):
    assert main(["--input", str(example_model), "--format", "plain", "--method", "rtn", "-q"]) == 0
    assert (example_model.parent / "model_float16_learned_svd.safetensors").is_file()


@pytest.mark.parametrize(
    ("scale", "kept"),
    [(1.0, False), (1e-4, False), (3e-6, True), (1e-7, True)],  # 2^-14 = 6.1e-5: below it float16 is subnormal
)
def test_weights_mostly_below_float16s_normal_range_are_kept(save, scale, kept):
    w = scale * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    with SafetensorsFile(save({"w.weight": w})) as src:
        problem = plain_float16_problem(src, "w.weight")
    error = float((w - w.half().float()).norm() / w.norm())
    assert (problem is not None) == kept == (error > PLAIN_ERROR_LIMIT)
    if kept:
        assert "subnormal" in problem


def test_the_limit_is_twice_float16s_unit_roundoff(save):
    """No tensor in float16's normal range reaches the limit: the worst case, every value half a step off."""
    steps = 1 + (2 * torch.arange(1024) + 1) * 2.0**-11  # float32 values exactly halfway between float16 neighbours
    with SafetensorsFile(save({"w.weight": steps.reshape(32, 32)})) as src:
        assert plain_float16_problem(src, "w.weight") is None
    assert PLAIN_ERROR_LIMIT == 2 * 2.0**-11


def test_nan_is_refused_in_the_plain_format_too(save, tmp_path):
    w = torch.randn(8, 8)
    w[3, 4] = math.nan
    with pytest.raises(QuantError, match=r"tensor 'bad\.weight' holds NaN or infinity.*--exclude"):
        convert_file(save({"bad.weight": w}), tmp_path / "o.safetensors", PLAIN)
    assert not (tmp_path / "o.safetensors").exists()


def test_data_free_and_calibrated_rounding_beat_round_to_nearest_on_the_plain_grid(save, tmp_path):
    torch.manual_seed(0)
    data = Anisotropic(96, seed=4)
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(96, 64))
    layer = model.layer
    with StatisticsRecorder(model) as recorder, torch.no_grad():
        for _ in range(4):
            model(data.draw(256))
    statistics = recorder.statistics()
    source = save({"layer.weight": layer.weight.detach(), "layer.bias": layer.bias.detach()})
    heldout = data.draw(2048).double()
    errors = {}
    for method in ("rtn", "calibrated"):
        out = tmp_path / f"{method}.safetensors"
        stats = statistics if method == "calibrated" else None
        report = convert_file(source, out, ConvertOptions(method=method, format="plain"), statistics=stats)
        converted = load_file(str(out))
        with torch.no_grad():
            y = heldout @ converted["layer.weight"].double().T + converted["layer.bias"].double()
            errors[method] = float((y - (heldout @ layer.weight.double().T + layer.bias.double())).norm())
        if method == "calibrated":
            assert report.layers[0].details["objective_ratio"] < 0.5
            assert not torch.equal(converted["layer.bias"], layer.bias.detach()), "bias corrected on the plain grid"
            assert converted["layer.bias"].dtype == torch.float32
    assert errors["calibrated"] < 0.6 * errors["rtn"]

    learned = convert_file(
        save({"big.weight": torch.randn(256, 64) @ torch.randn(64, 256)}, "big.safetensors"),
        tmp_path / "learned.safetensors",
        ConvertOptions(method="learned", format="plain"),
    )
    assert learned.layers[0].details["objective_ratio"] < 1.0


def test_distillation_layers_and_t5xxl_mode_write_no_scales(save, tmp_path):
    tensors = {"final_layer.linear.weight": torch.randn(4, 4), "encoder.block.weight": torch.randn(4, 4)}
    out = tmp_path / "o.safetensors"
    options = ConvertOptions(method="rtn", format="plain", keep_distillation=True, t5xxl=True)
    convert_file(save(tensors), out, options)
    converted = load_file(str(out))
    assert set(converted) == set(tensors)
    assert converted["final_layer.linear.weight"].dtype == torch.float32


def test_an_unknown_format_is_refused(example_model, tmp_path):
    with pytest.raises(QuantError, match="format 'fp8': choose one of scaled, plain"):
        convert_file(example_model, tmp_path / "o.safetensors", ConvertOptions(format="fp8"))
