"""Loader-side validation of scaled_fp16 files: broken files fail with a message naming file and tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant_core import ConvertOptions, QuantError, convert_file
from quant_core.reader import dequantize_state_dict, read_scaled_file, validate_scaled_state_dict

FIXTURE = Path(__file__).with_name("fixtures") / "seed_layout.safetensors"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from quant_core.example import write_example_model

    folder = tmp_path_factory.mktemp("converted")
    out = folder / "out.safetensors"
    convert_file(
        write_example_model(folder / "in.safetensors", hidden=32),
        out,
        ConvertOptions(method="rtn", exclude=("^blocks\\.1\\.mlp\\.up\\.weight$",)),
    )
    with safe_open(str(out), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_a_converted_file_passes_and_yields_its_scales(converted) -> None:
    tensors, metadata = converted
    scales = validate_scaled_state_dict("out.safetensors", tensors, metadata)
    assert set(scales) == {k for k in tensors if k.endswith(".scale_weight")}
    assert "blocks.1.mlp.up.scale_weight" not in scales  # excluded: kept, no scale expected
    assert all(v > 0 and (v == 2.0 ** round(torch.tensor(v).log2().item())) for v in scales.values())


def test_the_original_scripts_layout_passes() -> None:
    scales = validate_scaled_state_dict("seed.safetensors", load_file(str(FIXTURE)))
    assert scales["layers.0.norm.scale_weight"] == 1.0 and scales["layers.0.tiny.scale_weight"] < 1e-5


CORRUPTIONS = {
    "zero scale": (lambda t: t.__setitem__("blocks.0.attn.qkv.scale_weight", torch.tensor([0.0])), "qkv.scale_weight"),
    "NaN scale": (
        lambda t: t.__setitem__("blocks.0.attn.qkv.scale_weight", torch.tensor([float("nan")])),
        "qkv.scale_weight",
    ),
    "negative scale": (
        lambda t: t.__setitem__("blocks.0.attn.qkv.scale_weight", torch.tensor([-0.5])),
        "qkv.scale_weight",
    ),
    "infinite scale": (lambda t: t.__setitem__("head.scale_weight", torch.tensor([float("inf")])), "head.scale_weight"),
    "scale of wrong shape": (lambda t: t.__setitem__("head.scale_weight", torch.ones(4)), "head.scale_weight"),
    "integer scale": (
        lambda t: t.__setitem__("head.scale_weight", torch.ones(1, dtype=torch.int32)),
        "head.scale_weight",
    ),
    "marker of wrong shape": (
        lambda t: t.__setitem__("scaled_fp16", torch.zeros(3, dtype=torch.float16)),
        "marker 'scaled_fp16'",
    ),
    "no marker": (lambda t: t.pop("scaled_fp16"), "no 'scaled_fp16' marker"),
    "bfloat16 scaled weight": (
        lambda t: t.__setitem__("head.weight", t["head.weight"].to(torch.bfloat16)),
        "'head.weight' is torch.bfloat16",
    ),
    "int8 scaled weight": (
        lambda t: t.__setitem__("head.weight", t["head.weight"].to(torch.int8)),
        "'head.weight' is torch.int8",
    ),
    "scale without weight": (lambda t: t.pop("blocks.0.mlp.down.weight"), "no weight 'blocks.0.mlp.down.weight'"),
    "missing scale": (lambda t: t.pop("blocks.1.attn.out.scale_weight"), "'blocks.1.attn.out.weight' has no"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_broken_files_are_refused_naming_file_and_tensor(case: str, converted) -> None:
    tensors, metadata = dict(converted[0]), converted[1]
    corrupt, message = CORRUPTIONS[case]
    corrupt(tensors)
    with pytest.raises(QuantError) as raised:
        validate_scaled_state_dict("/models/x.safetensors", tensors, metadata)
    assert str(raised.value).startswith("/models/x.safetensors: ") and message in str(raised.value)
    with pytest.raises(QuantError):
        dequantize_state_dict(tensors, source="x", metadata=metadata)


def test_missing_scale_is_only_judged_with_recorded_settings(converted) -> None:
    tensors = dict(converted[0])
    del tensors["blocks.1.attn.out.scale_weight"]
    validate_scaled_state_dict("x", tensors, metadata=None)  # another tool's file: a float16 weight may be plain


def test_unit_scale_on_a_weight_kept_in_source_precision_passes(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    save_file({"img_in.weight": torch.randn(8, 8, dtype=torch.bfloat16), "double.weight": torch.randn(8, 8)}, str(src))
    out = tmp_path / "out.safetensors"
    convert_file(src, out, ConvertOptions(method="rtn", keep_distillation=True))
    with safe_open(str(out), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert tensors["img_in.weight"].dtype == torch.bfloat16
    assert validate_scaled_state_dict("x", tensors, metadata)["img_in.scale_weight"] == 1.0


def test_a_file_written_before_the_scaled_weights_record_still_validates(converted) -> None:
    tensors, metadata = converted
    older = {k: v for k, v in metadata.items() if k != "quant.scaled_weights"}
    assert "quant.settings" in older
    assert validate_scaled_state_dict("old.safetensors", tensors, older) == validate_scaled_state_dict(
        "new.safetensors", tensors, metadata
    )


def test_the_reader_lists_the_scales_a_loader_must_apply_and_dequantizes(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    save_file(
        {"img_in.weight": torch.randn(8, 8, dtype=torch.bfloat16), "double.weight": torch.randn(8, 8) * 1e5}, str(src)
    )
    out = tmp_path / "out.safetensors"
    convert_file(src, out, ConvertOptions(method="rtn", keep_distillation=True))
    scaled = read_scaled_file(out)
    assert "scaled_fp16" not in scaled.tensors and scaled.scales["img_in.scale_weight"] == 1.0
    assert scaled.expected_scales == ["double.scale_weight"]  # a unit scale changes nothing wherever it ends up
    restored, reference = scaled.dequantized(), dequantize_state_dict(load_file(str(out)))
    assert restored.keys() == reference.keys() == {"img_in.weight", "double.weight"}
    assert all(torch.equal(restored[k], reference[k]) for k in reference)
    with pytest.raises(QuantError, match=r"x\.safetensors: not a valid safetensors file"):
        (tmp_path / "x.safetensors").write_bytes(b"\x00" * 16)
        read_scaled_file(tmp_path / "x.safetensors")
