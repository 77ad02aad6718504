"""The custom operations on their own: dequantization, dtypes, files of the original script, weight patches.

Weight patches reach a layer the ways ComfyUI's ModelPatcher hands them over (comfy/model_patcher.py):
- full load: temp = weight cast to the LoRA compute dtype (float32, or float16 on GPUs since 0.30);
  convert_weight(temp, inplace=True) where the layer has it; patched = temp + delta; set_weight(patched,
  inplace_update=..., seed=...) where the layer has it, else the patched tensor replaces the weight;
  unpatch puts the backed-up weight Parameter back;
- per forward (lowvram, partial loads): a function in the layer's `weight_function` list. Before 0.30 it
  calls convert_weight / set_weight(return_weight=True) itself; from 0.30 it only adds the patch to
  whatever weight it is given;
- Dynamic VRAM (0.30): the same kind of function in the `weight_lowvram_function` slot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfy_standin import harness
from safetensors.torch import load_file

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


def patch_full_load(layer, delta: torch.Tensor, inplace_update: bool = False, dtype=torch.float32) -> None:
    temp = layer.weight.to(dtype, copy=True)
    convert, store = getattr(layer, "convert_weight", None), getattr(layer, "set_weight", None)
    if convert is not None:
        temp = convert(temp, inplace=True)
    patched = temp + delta.to(temp.dtype)
    if store is not None:
        store(patched, inplace_update=inplace_update, seed=123)
    else:
        layer.weight = torch.nn.Parameter(patched.to(layer.weight.dtype), requires_grad=False)


def converting_patch(layer, delta: torch.Tensor):
    """A per-forward patch as ComfyUI before 0.30 builds it: it converts units itself."""

    def apply(weight: torch.Tensor) -> torch.Tensor:
        real = layer.convert_weight(weight.to(torch.float32, copy=True), inplace=True)
        return layer.set_weight(real + delta, seed=123, return_weight=True).to(dtype=weight.dtype)

    return apply


def adding_patch(delta: torch.Tensor):
    """A per-forward patch as ComfyUI 0.30 builds it: it adds to the weight it is given, in its dtype."""

    def apply(weight: torch.Tensor) -> torch.Tensor:
        return weight + delta.to(weight.dtype)

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


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inplace_update", [False, True])
def test_full_load_patch_adds_in_real_units(linear, inplace_update: bool, lora_dtype: torch.dtype) -> None:
    layer, x = linear
    before = real_weight(layer)
    delta = 0.01 * torch.randn_like(before)
    param = layer.weight
    patch_full_load(layer, delta, inplace_update, dtype=lora_dtype)
    assert layer.weight.dtype == torch.float16 and (layer.weight is param) == inplace_update
    # stored in float16 at the layer's scale: within half a float16 step of the patched value
    torch.testing.assert_close(real_weight(layer), before + delta, rtol=2.0**-11, atol=2.0**-16 * 2.0**-24)
    assert torch.equal(layer(x), F.linear(x, real_weight(layer), layer.bias))


def test_convert_weight_gives_float32_real_units_from_float16(linear) -> None:
    """Float16 LoRA math (ComfyUI 0.30 on GPUs): real values of a 2^-16-scaled weight overflow nothing in float32."""
    layer, _ = linear
    real = layer.convert_weight(layer.weight.to(torch.float16, copy=True), inplace=True)
    assert real.dtype == torch.float32 and torch.equal(real, real_weight(layer))


@pytest.mark.parametrize("strength", [1.0, 16.0])
def test_patch_beyond_float16_at_the_layer_scale_stays_finite_and_unpatches_exactly(linear, strength: float) -> None:
    layer, x = linear
    backup = layer.weight  # what ModelPatcher keeps, and puts back on unpatch
    clean = layer(x)
    before = real_weight(layer)
    delta = torch.zeros_like(before)
    delta[2, 3] = 5.0 * strength  # 5 / 2**-16 = 327680: beyond float16's 65504 at this scale
    patch_full_load(layer, delta, dtype=torch.float16)
    assert layer.weight.dtype == torch.float32 and torch.isfinite(layer.weight).all()
    torch.testing.assert_close(layer(x), F.linear(x, before + delta, layer.bias), rtol=1e-4, atol=1e-5)
    layer.weight = backup
    assert torch.equal(layer(x), clean)


@pytest.mark.parametrize("beyond_float16", [False, True])
def test_set_weight_leaves_its_float32_input_in_stored_units_and_never_keeps_it(linear, beyond_float16) -> None:
    """ComfyUI's weight-hook cache keeps the tensor it gave set_weight and later copies it straight into the
    stored weight: it must hold stored units, and must not be the layer's weight itself (an unpatch copies
    the backup into the weight, which would then rewrite the cache)."""
    layer, x = linear
    scale = float(layer.scale_weight)
    patched = real_weight(layer).clone()
    if beyond_float16:
        patched[2, 3] = 5.0  # 5 / 2**-16: beyond float16 at this scale, stored in float32
    handed_over = patched.clone()
    layer.set_weight(handed_over, inplace_update=True, seed=1)
    assert torch.equal(handed_over, patched / scale)  # what the cache now holds: stored units
    assert layer.weight.data_ptr() != handed_over.data_ptr()
    layer.weight.data.copy_(handed_over)  # ComfyUI's patch_cached_hook_weights
    torch.testing.assert_close(real_weight(layer), patched, rtol=2.0**-11, atol=0.0)


PER_FORWARD_PATCHES = {
    "weight_function, converting (before 0.30)": (
        "weight_function",
        lambda layer, delta: [converting_patch(layer, delta)],
    ),
    "weight_function, adding (0.30)": ("weight_function", lambda layer, delta: [adding_patch(delta)]),
    "weight_lowvram_function (Dynamic VRAM)": ("weight_lowvram_function", lambda layer, delta: adding_patch(delta)),
}


@pytest.mark.parametrize("way", list(PER_FORWARD_PATCHES))
def test_per_forward_patches_see_real_units_and_never_touch_the_stored_weight(linear, way: str) -> None:
    layer, x = linear
    attribute, make = PER_FORWARD_PATCHES[way]
    before, stored = real_weight(layer), layer.weight.detach().clone()
    delta = 0.01 * torch.randn_like(before)
    delta[0, 0] = 4.0 * 16  # a strength-16 patch, far beyond float16 at the layer's scale
    setattr(layer, attribute, make(layer, delta))
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.linear(x, before + delta, layer.bias), rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.weight, stored) and layer.weight.dtype == torch.float16
    patch = getattr(layer, attribute)
    assert patch is not None and patch != [], "the patch stays attached for the next forward"
    setattr(layer, attribute, [] if attribute == "weight_function" else None)
    torch.testing.assert_close(layer(x), F.linear(x, before, layer.bias), rtol=0, atol=0)


def test_patches_apply_in_comfyui_order_lowvram_slot_first(linear) -> None:
    layer, x = linear
    before = real_weight(layer)
    layer.weight_lowvram_function = lambda w: w * 2
    layer.weight_function = [lambda w: w + 1]
    torch.testing.assert_close(layer(x), F.linear(x, before * 2 + 1, layer.bias), rtol=1e-5, atol=1e-5)


def test_a_failing_patch_leaves_the_layer_as_it_was(linear) -> None:
    layer, x = linear

    def broken(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("patch failed")

    layer.weight_function = [broken]
    with pytest.raises(RuntimeError, match="patch failed"):
        layer(x)
    assert layer.weight_function == [broken] and not layer._patching
    assert layer.convert_weight(layer.weight.float()).equal(real_weight(layer)), "conversion works again"


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
