"""End-to-end conversion: format, exactness, overflow, modes, selection, metadata, report."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quant_core import ConvertOptions, QuantError, convert_file
from quant_core.format import META_FORMAT, META_SETTINGS
from quant_core.reader import dequantize_state_dict
from quant_core.report import report_path_for


def convert(src, tmp_path, name="out.safetensors", **opts):
    out = tmp_path / name
    report = convert_file(src, out, ConvertOptions(**opts))
    return out, report


@pytest.mark.parametrize("method", ["rtn", "learned"])
def test_format_roundtrip(example_model, tmp_path, method):
    out, report = convert(example_model, tmp_path, method=method)
    original = load_file(str(example_model))
    converted = load_file(str(out))
    assert converted["scaled_fp16"].dtype == torch.float16 and converted["scaled_fp16"].shape == (2,)
    quantized = [k for k in original if k.endswith(".weight") and original[k].ndim == 2]
    assert len(report.layers) == len(quantized)
    for key in quantized:
        w, scale = converted[key], converted[key[: -len("weight")] + "scale_weight"]
        assert w.dtype == torch.float16 and scale.dtype == torch.float32 and scale.shape == (1,)
        mantissa, _ = math.frexp(scale.item())
        assert mantissa == 0.5, "scales are powers of two"
        assert torch.isfinite(w).all()
        ref = original[key].float()
        deq = w.float() * scale
        assert torch.linalg.norm(deq - ref) / torch.linalg.norm(ref) < 1e-3
    restored = dequantize_state_dict(converted)
    assert set(restored) == set(original)
    # 1-D norms and fp32 biases are not float16-exact: kept in their source precision, bit for bit
    assert torch.equal(converted["blocks.0.norm.weight"], original["blocks.0.norm.weight"])
    assert torch.equal(converted["embed.position_ids"], original["embed.position_ids"])


def test_bf16_weights_come_back_bit_exact(example_model, tmp_path):
    out, report = convert(example_model, tmp_path)
    original = load_file(str(example_model))
    restored = dequantize_state_dict(load_file(str(out)))
    for key in ("blocks.0.attn.out.weight", "blocks.1.attn.out.weight"):
        assert original[key].dtype == torch.bfloat16
        assert torch.equal(restored[key], original[key].float())
    layer = next(layer for layer in report.layers if layer.name == "blocks.0.attn.out.weight")
    assert layer.exact_fraction == 1.0 and layer.iterations == 0


def test_values_beyond_fp16_stay_finite_and_close(example_model, tmp_path):
    out, _ = convert(example_model, tmp_path)
    restored = dequantize_state_dict(load_file(str(out)))
    original = load_file(str(example_model))["head.weight"]
    assert original.abs().max() > 65504
    assert torch.isfinite(restored["head.weight"]).all()
    rel = (restored["head.weight"] - original).abs() / original.abs().clamp_min(1e-30)
    big = original.abs() > 1
    assert rel[big].max() < 2**-10


def test_zero_and_tiny_tensors(save, tmp_path):
    src = save(
        {
            "zero.weight": torch.zeros(4, 4),
            "tiny.weight": torch.full((3, 5), 1.5 * 2.0**-120),
            "tiny_inexact.weight": torch.full((3, 5), 1e-37),
            "denormal.weight": torch.tensor([[1e-44, -2e-45], [0.0, 3e-45]]),
            "empty.weight": torch.zeros(0, 4),
        }
    )
    out, report = convert(src, tmp_path)
    restored = dequantize_state_dict(load_file(str(out)))
    assert torch.equal(restored["zero.weight"], torch.zeros(4, 4))
    assert torch.equal(restored["tiny.weight"], torch.full((3, 5), 1.5 * 2.0**-120))
    assert torch.allclose(restored["tiny_inexact.weight"], torch.full((3, 5), 1e-37), rtol=2**-10, atol=0)
    assert torch.equal(restored["denormal.weight"], torch.tensor([[1e-44, -2e-45], [0.0, 3e-45]]))
    assert restored["empty.weight"].shape == (0, 4)
    assert {layer.name for layer in report.layers} == {
        "zero.weight",
        "tiny.weight",
        "tiny_inexact.weight",
        "denormal.weight",
    }


def test_non_finite_weight_is_a_clear_error(save, tmp_path):
    src = save({"a.weight": torch.tensor([[1.0, float("inf")]])})
    with pytest.raises(QuantError, match=r"'a\.weight'.*--exclude"):
        convert(src, tmp_path)
    assert list(tmp_path.iterdir()) == [src]  # no output, no temporary file


@pytest.mark.parametrize("prescan", [True, False])
def test_bad_value_in_the_last_weight_with_and_without_the_scan_up_front(prescan, save, tmp_path):
    """Up front: refused before any tensor is converted. Without (weights beyond available memory:
    the file is then read once): refused when that weight is reached. Never an output either way."""
    src = save(
        {"a.weight": torch.ones(8, 8), "b.weight": torch.ones(8, 8), "z.weight": torch.tensor([[1.0, float("nan")]])}
    )

    class Started:
        names: list[str] = []

        def checking_values(self, name, done_bytes, total_bytes):
            pass

        def tensor_started(self, name, index, total):
            self.names.append(name)

        def tensor_finished(self, name, index, total, layer):
            pass

    started = Started()
    with pytest.raises(QuantError, match=r"'z\.weight'.*nan.*--exclude"):
        convert_file(src, tmp_path / "out.safetensors", ConvertOptions(method="rtn", prescan=prescan), listener=started)
    assert started.names == ([] if prescan else ["a.weight", "b.weight", "z.weight"])
    assert list(tmp_path.iterdir()) == [src]


def test_fp64_sources_round_correctly(save, tmp_path):
    w = torch.tensor([[1 + 2**-11 + 2**-40, 3.0]], dtype=torch.float64)
    src = save({"a.weight": w})
    out, _ = convert(src, tmp_path, method="rtn")
    restored = dequantize_state_dict(load_file(str(out)), dtype=torch.float64)["a.weight"]
    scale = 2.0**-1  # 3.0 * 2**1 ... the exact grid is what matters: ratio to the max stays exact
    expected = torch.tensor([[1 + 2**-10, 3.0]], dtype=torch.float64)
    assert torch.equal(restored, expected), (restored, scale)


def test_cast_if_exact_rule(save, tmp_path):
    src = save(
        {
            "exact.bias": torch.tensor([0.5, 1.0, -2.0]),
            "inexact.bias": torch.tensor([0.1, 0.2]),
            "bf16.bias": torch.tensor([0.1, 0.2], dtype=torch.bfloat16),
            "huge.bias": torch.tensor([1e6]),
            "nan.bias": torch.tensor([float("nan")]),
            "mask": torch.tensor([True, False]),
            "linear.weight": torch.ones(2, 2),  # something to quantize, so there is an output at all
        }
    )
    out, report = convert(src, tmp_path)
    t = load_file(str(out))
    assert t["exact.bias"].dtype == torch.float16 and t["bf16.bias"].dtype == torch.float16
    assert t["inexact.bias"].dtype == torch.float32 and t["huge.bias"].dtype == torch.float32
    assert torch.isnan(t["nan.bias"]).all() and t["mask"].dtype == torch.bool
    assert set(report.cast_to_fp16) == {"exact.bias", "bf16.bias"}


def test_t5xxl_mode(save, tmp_path):
    g = torch.Generator().manual_seed(0)
    src = save(
        {
            "encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(8, 8, generator=g),
            "encoder.block.0.layer.0.layer_norm.weight": torch.rand(8, generator=g) + 0.5,
            "encoder.final_layer_norm.weight": torch.rand(8, generator=g),
            "shared.weight": torch.randn(16, 8, generator=g),
            "decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(8, 8, generator=g),
            "lm_head.weight": torch.randn(16, 8, generator=g),
        }
    )
    out, report = convert(src, tmp_path, t5xxl=True)
    t = load_file(str(out))
    q = "encoder.block.0.layer.0.SelfAttention.q"
    assert t["scaled_fp16"].shape == (0,)
    assert t[q + ".weight"].dtype == torch.float16
    assert torch.equal(t[q + ".scale_input"], t[q + ".scale_weight"])
    assert not any(k.startswith("decoder") or k.startswith("lm_head") for k in t)
    assert torch.equal(t["shared.weight"], load_file(str(src))["shared.weight"])  # kept, no scale
    assert "shared.scale_weight" not in t
    assert sorted(report.dropped) == ["decoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight"]


def test_keep_distillation_and_exclude(save, tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {
        k: torch.randn(8, 8, generator=g)
        for k in ("img_in.weight", "final_layer.linear.weight", "blocks.0.qkv.weight", "blocks.0.proj.weight")
    }
    w = {k: v.to(torch.bfloat16) if k == "img_in.weight" else v for k, v in w.items()}
    src = save(w)
    out, _ = convert(src, tmp_path, keep_distillation=True, exclude=(r"\.proj\.",))
    t = load_file(str(out))
    assert t["img_in.weight"].dtype == torch.bfloat16 and torch.equal(t["img_in.weight"], w["img_in.weight"])
    assert t["img_in.scale_weight"].item() == 1.0
    assert t["final_layer.linear.weight"].dtype == torch.float32
    assert t["blocks.0.qkv.weight"].dtype == torch.float16 and "blocks.0.qkv.scale_weight" in t
    assert t["blocks.0.proj.weight"].dtype == torch.float32 and "blocks.0.proj.scale_weight" not in t


def test_bad_exclude_pattern_is_reported(example_model, tmp_path):
    with pytest.raises(QuantError, match="not a valid regular expression"):
        convert(example_model, tmp_path, exclude=("([",))


def test_metadata_records_format_settings_and_source(example_model, tmp_path):
    out, _ = convert(example_model, tmp_path, rounding={"num_iter": 7, "top_k": 2})
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta[META_FORMAT] == "scaled_fp16" and meta["quant.format_version"] == "1"
    assert meta["quant.tool"].startswith("learned-rounding-fp16 ")
    settings = json.loads(meta[META_SETTINGS])
    assert settings["num_iter"] == 7 and settings["top_k"] == 2 and settings["method"] == "learned"
    assert meta["name"] == "example" and meta["format"] == "pt"  # the source's own metadata


def test_report_json_beside_output(example_model, tmp_path):
    out, report = convert(example_model, tmp_path)
    data = json.loads(report_path_for(out).read_text())
    assert data["summary"]["quantized"] == len(report.layers) == len(data["layers"])
    layer = data["layers"][0]
    for field in ("scale", "relative_error", "max_abs_error", "exact_fraction", "iterations", "seconds"):
        assert field in layer
    assert 0 < data["summary"]["relative_error"] < 1e-3


def test_already_scaled_input_is_refused(example_model, tmp_path):
    out, _ = convert(example_model, tmp_path)
    with pytest.raises(QuantError, match="already a scaled model"):
        convert(out, tmp_path, name="again.safetensors")


def test_input_file_is_never_modified(example_model, tmp_path):
    before = example_model.read_bytes()
    convert(example_model, tmp_path, method="learned")
    assert example_model.read_bytes() == before


class Heard:
    """A progress listener that keeps what it hears."""

    def __init__(self):
        self.events: list[tuple] = []

    def checking_values(self, name, done_bytes, total_bytes):
        self.events.append(("check", name, done_bytes, total_bytes))

    def tensor_started(self, name, index, total):
        self.events.append(("start", name))

    def tensor_finished(self, name, index, total, layer):
        self.events.append(("finish", name))


@pytest.mark.parametrize(
    "output_format,prescan,weights_checked", [("scaled", True, True), ("scaled", False, False), ("plain", None, True)]
)
def test_the_value_checks_before_writing_are_reported_in_bytes(output_format, prescan, weights_checked, save, tmp_path):
    tensors = {
        "a.weight": torch.randn(64, 32),
        "b.weight": torch.randn(16, 32, dtype=torch.bfloat16),
        "a.bias": torch.tensor([0.5, 0.25]),  # exact cast: checked
        "norm.weight": torch.rand(32),  # checked
        "half.bias": torch.ones(4, dtype=torch.float16),  # already float16: nothing to check
    }
    src = save(tensors)
    heard = Heard()
    options = ConvertOptions(method="rtn", format=output_format, prescan=prescan)
    convert_file(src, tmp_path / "o.safetensors", options, listener=heard)
    checks = [event for event in heard.events if event[0] == "check"]
    assert heard.events[: len(checks)] == checks, "all checks come before the first tensor"
    checked = {"a.bias", "norm.weight"} | ({"a.weight", "b.weight"} if weights_checked else set())
    assert {name for _, name, _, _ in checks} == checked and len(checks) == len(checked)
    nbytes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    total = sum(nbytes[name] for name in checked)
    done = 0
    for _, name, done_bytes, total_bytes in checks:
        assert (done_bytes, total_bytes) == (done, total)
        done += nbytes[name]


def test_summary_shows_what_the_method_bought_over_round_to_nearest(example_model, tmp_path):
    _, nearest = convert(example_model, tmp_path, name="rtn.safetensors", method="rtn")
    _, learned = convert(example_model, tmp_path, name="learned.safetensors", method="learned")
    # the learned run measures round-to-nearest on its way: the same figure an rtn run reports
    assert learned.nearest_relative_error == pytest.approx(nearest.relative_error, rel=1e-6)
    assert learned.relative_error != nearest.relative_error
    assert nearest.nearest_relative_error == nearest.relative_error
    learned_line = next(line for line in learned.summary_lines() if line.startswith("overall relative error"))
    assert f"(round-to-nearest: {nearest.relative_error:.3e})" in learned_line
    rtn_line = next(line for line in nearest.summary_lines() if line.startswith("overall relative error"))
    assert "round-to-nearest" not in rtn_line  # nothing to compare with
    assert learned.objective_ratio is None  # no layer was rounded on input statistics
