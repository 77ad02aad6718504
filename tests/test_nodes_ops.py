"""The custom operations on their own: dequantization, dtypes, files of the original script, weight patches.

Weight patches follow ModelPatcher's two paths (ComfyUI 0.3.64, comfy/model_patcher.py):
- full load: temp = weight.float(); convert_weight(temp, inplace=True); patched = temp + delta;
  set_weight(patched, inplace_update=..., seed=...) ; unpatch puts the backed-up weight Parameter back;
- lowvram: the layer's weight_function gets the cast weight and returns
  set_weight(convert_weight(w.float()) + delta, return_weight=True).to(w.dtype).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from comfy_standin import harness

harness.import_pack()

import comfy.ops  # noqa: E402

from learned_rounding_fp16_pack.nodes.ops import scaled_fp16_ops  # noqa: E402
from learned_rounding_fp16_pack.quant_core import QuantError  # noqa: E402

OPS = scaled_fp16_ops()
FIXTURE = Path(__file__).with_name("fixtures") / "seed_layout.safetensors"


def scaled_linear(weight: torch.Tensor, exponent: int, bias: torch.Tensor | None = None, dtype=torch.float32):
    """An OPS.Linear loaded from (weight / 2**exponent as float16, scale 2**exponent), built in `dtype`."""
    out_features, in_features = weight.shape
    layer = OPS.Linear(in_features, out_features, bias=bias is not None, dtype=dtype)
    sd = {"weight": (weight * 2.0**-exponent).half(), "scale_weight": torch.tensor([2.0**exponent])}
    if bias is not None:
        sd["bias"] = bias
    layer.load_state_dict(sd, strict=True)
    return layer


def real_weight(layer) -> torch.Tensor:
    return layer.weight.to(torch.float32) * layer.scale_weight


def patch_full_load(layer, delta: torch.Tensor, inplace_update: bool = False) -> None:
    temp = layer.weight.to(torch.float32, copy=True)
    temp = layer.convert_weight(temp, inplace=True)
    layer.set_weight(temp + delta, inplace_update=inplace_update, seed=123)


def lowvram_patch(layer, delta: torch.Tensor):
    def apply(weight: torch.Tensor) -> torch.Tensor:
        real = layer.convert_weight(weight.to(torch.float32, copy=True), inplace=True)
        return layer.set_weight(real + delta, seed=123, return_weight=True).to(dtype=weight.dtype)

    return apply


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(0)
    weight = 0.02 * torch.randn(24, 16, generator=g)
    bias = 0.1 * torch.randn(24, generator=g)
    return scaled_linear(weight, -16, bias), torch.randn(5, 16, generator=g)


def test_float16_storage_and_float32_compute(linear) -> None:
    layer, x = linear
    assert layer.weight.dtype == torch.float16 and layer.scale_weight.dtype == torch.float32
    assert layer.bias.dtype == torch.float32  # unscaled tensors follow the dtype the model was built in
    expected = F.linear(x, layer.weight.float() * 2.0**-16, layer.bias)
    assert torch.equal(layer(x), expected)


def test_float16_compute_rounds_once(linear) -> None:
    layer, x = linear
    x16 = x.half()
    expected = F.linear(x16, (layer.weight.float() * 2.0**-16).half(), layer.bias.half())
    assert torch.equal(layer(x16), expected)


def test_scale_beyond_float16_range_is_applied_in_float32() -> None:
    weight = 1e-9 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    layer = scaled_linear(weight, -45)  # 2**-45 is below float16's smallest subnormal
    x16 = torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).half() * 1e4
    expected = F.linear(x16, (layer.weight.float() * 2.0**-45).half())
    assert torch.equal(layer(x16), expected)
    assert (expected != 0).any(), "a float16 multiply by a flushed scale would give zeros"


def test_layers_without_scale_behave_like_manual_cast() -> None:
    plain = comfy.ops.manual_cast.Linear(4, 3)
    ours = OPS.Linear(4, 3)
    sd = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    plain.load_state_dict(sd)
    ours.load_state_dict(sd)
    x = torch.randn(2, 4)
    assert torch.equal(ours(x), plain(x)) and "scale_weight" not in dict(ours.named_parameters())


def test_original_script_layout_loads_with_real_weights() -> None:
    """Non-power-of-two scales, scale_weight 1 on a 1-D LayerNorm weight, float32 bias."""
    from tests.fixtures.make_seed_layout_fixture import seed_layout_tensors

    _, real = seed_layout_tensors()
    sd = load_file(str(FIXTURE))
    del sd["scaled_fp16"]
    net = torch.nn.Module()
    net.linear = OPS.Linear(4, 6)
    net.tiny = OPS.Linear(4, 3, bias=False)
    net.norm = OPS.LayerNorm(4, bias=False)
    net.load_state_dict({k.removeprefix("layers.0."): v for k, v in sd.items()}, strict=True)
    x = torch.randn(7, 4)
    pairs = [
        (net.linear(x), F.linear(x, real["layers.0.linear.weight"], real["layers.0.linear.bias"])),
        (net.tiny(x), F.linear(x, real["layers.0.tiny.weight"])),
        (net.norm(x), F.layer_norm(x, (4,), real["layers.0.norm.weight"])),
    ]
    for got, expected in pairs:  # float16 weights: outputs within float16 precision of the real ones
        assert (got - expected).abs().max() <= 2e-3 * expected.abs().max()
    assert net.norm.weight.dtype == torch.float32  # folded into the model's dtype (scale 1: a plain cast)


def test_scale_input_of_t5xxl_mode_is_accepted_and_ignored(linear) -> None:
    layer, x = linear
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["scale_input"] = torch.tensor([123.0])
    other = OPS.Linear(16, 24)
    result = other.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other(x), layer(x))


def test_folded_embedding_holds_real_weights() -> None:
    table = torch.randn(10, 6) * 300.0
    emb = OPS.Embedding(10, 6)
    emb.load_state_dict({"weight": (table / 8).half(), "scale_weight": torch.tensor([8.0])}, strict=True)
    torch.testing.assert_close(emb.weight, ((table / 8).half().float() * 8), rtol=0, atol=0)
    ids = torch.tensor([[0, 3, 9]])
    assert torch.equal(emb(ids), emb.weight[ids])
    assert emb.loaded_scale == ("scale_weight", 8.0)


@pytest.mark.parametrize(
    "bad", [torch.tensor([0.0]), torch.tensor([float("nan")]), torch.tensor([-2.0]), torch.ones(3)]
)
def test_bad_scales_are_refused_by_the_layer_too(bad) -> None:
    with pytest.raises(QuantError, match="scale_weight"):
        OPS.Linear(2, 2, bias=False).load_state_dict({"weight": torch.ones(2, 2).half(), "scale_weight": bad})


# --- weight patches (LoRA) -----------------------------------------------------------------------


@pytest.mark.parametrize("inplace_update", [False, True])
def test_full_load_patch_adds_in_real_units(linear, inplace_update: bool) -> None:
    layer, x = linear
    before = real_weight(layer)
    delta = 0.01 * torch.randn_like(before)
    param = layer.weight
    patch_full_load(layer, delta, inplace_update)
    assert layer.weight.dtype == torch.float16 and (layer.weight is param) == inplace_update
    # stored in float16 at the layer's scale: within half a float16 step of the patched value
    torch.testing.assert_close(real_weight(layer), before + delta, rtol=2.0**-11, atol=2.0**-16 * 2.0**-24)
    assert torch.equal(layer(x), F.linear(x, real_weight(layer), layer.bias))


def test_patch_beyond_float16_at_the_layer_scale_stays_finite_and_unpatches_exactly(linear) -> None:
    layer, x = linear
    backup = layer.weight  # what ModelPatcher keeps, and puts back on unpatch
    clean = layer(x)
    before = real_weight(layer)
    delta = torch.zeros_like(before)
    delta[2, 3] = 5.0  # 5 / 2**-16 = 327680: beyond float16's 65504 at this scale
    patch_full_load(layer, delta)
    assert layer.weight.dtype == torch.float32 and torch.isfinite(layer.weight).all()
    torch.testing.assert_close(layer(x), F.linear(x, before + delta, layer.bias), rtol=1e-4, atol=1e-5)
    layer.weight = backup
    assert torch.equal(layer(x), clean)


def test_lowvram_patch_matches_full_load(linear) -> None:
    layer, x = linear
    before = real_weight(layer)
    delta = 0.01 * torch.randn_like(before)
    delta[0, 0] = 4.0  # also beyond float16 at the layer's scale
    layer.weight_function = [lowvram_patch(layer, delta)]
    out = layer(x)
    assert layer.weight.dtype == torch.float16, "lowvram patches never change the stored weight"
    torch.testing.assert_close(out, F.linear(x, before + delta, layer.bias), rtol=1e-4, atol=1e-5)
    layer.weight_function = []
    torch.testing.assert_close(layer(x), F.linear(x, before, layer.bias), rtol=0, atol=0)


def test_patching_a_folded_layer_uses_plain_units() -> None:
    norm = OPS.LayerNorm(4)
    norm.load_state_dict({"weight": torch.ones(4).half(), "scale_weight": torch.tensor([1.0]), "bias": torch.zeros(4)})
    delta = torch.tensor([0.5, 0.0, 0.0, -0.5])
    patch_full_load(norm, delta)
    assert torch.equal(norm.weight, torch.ones(4) + delta)


def test_a_scale_no_layer_applies_is_reported_by_the_loader() -> None:
    from learned_rounding_fp16_pack.nodes.loader import check_scales_applied

    net = torch.nn.Module()
    net.ours = OPS.Linear(4, 4, bias=False)
    net.plain = torch.nn.Linear(4, 4, bias=False)  # a layer built without the pack's operations
    sd = {
        "ours.weight": torch.ones(4, 4).half(),
        "ours.scale_weight": torch.tensor([2.0]),
        "plain.weight": torch.ones(4, 4),
    }
    net.load_state_dict({**sd, "plain.scale_weight": torch.tensor([4.0])}, strict=False)
    check_scales_applied("f.safetensors", ["ours.scale_weight"], net)
    with pytest.raises(QuantError, match=r"f\.safetensors: 1 scaled weights .* 'plain\.scale_weight'"):
        check_scales_applied("f.safetensors", ["ours.scale_weight", "plain.scale_weight"], net)
