"""Custom operations that run ComfyUI models on scaled_fp16 weights (`model_options["custom_operations"]`).

Linear layers keep the file's float16 weight and `scale_weight` and dequantize at every forward, in
the dtype ComfyUI computes in. Every other layer kind (embeddings, norms, convolutions) has its scale
folded into the weight at load, because model code reads those weights directly (CLIP's position
embedding, for one); after that it is an ordinary ComfyUI layer. `scale_input` (T5XXL-mode files) is
accepted and ignored, as ComfyUI's scaled loaders do when inputs are not quantized.

Weight patches (LoRA and the like) must see real units. ComfyUI reaches a layer's weight two ways:
- the full-load path (`ModelPatcher.patch_weight_to_device`) calls the layer's `convert_weight`
  (stored -> real, float32 here, so float16 LoRA math cannot overflow) and `set_weight` (real ->
  stored at the layer's scale; float32 while patched if float16 would overflow there);
- every other path (lowvram, partial loads, Dynamic VRAM) hands the layer patch functions
  (`weight_function`, `weight_lowvram_function`) that ComfyUI's cast would apply to the stored
  float16 values. A scaled Linear withholds them from that cast and applies them itself to the
  dequantized float32 weight, so no path depends on ComfyUI calling the layer's hooks, and the
  stored (or device-resident) float16 copy is never rewritten by a patch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..quant_core.format import SCALE_INPUT as INPUT_SCALE
from ..quant_core.format import SCALE_WEIGHT as SCALE
from ..quant_core.reader import validated_scale

# Where ComfyUI puts weight patches it expects the layer's cast to apply (the second one: Dynamic VRAM).
PATCH_LISTS = ("weight_function",)
PATCH_SLOTS = ("weight_lowvram_function",)


def storage_tensor(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`stored` in the layer's storage dtype, or kept float32 where float16 would overflow to inf."""
    candidate = stored.to(dtype)
    if dtype == torch.float16 and not torch.isfinite(candidate).all() and torch.isfinite(stored).all():
        return stored.to(torch.float32)
    return candidate


@contextlib.contextmanager
def withheld_weight_patches(layer: torch.nn.Module) -> Iterator[list[Callable[[torch.Tensor], torch.Tensor]]]:
    """The layer's weight patches, in the order ComfyUI applies them, hidden from ComfyUI while inside.

    Only the layer's own attributes are swapped (never the class-level empty defaults), and they
    are put back on exit whatever happens.
    """
    own = layer.__dict__
    slots = {name: own[name] for name in PATCH_SLOTS if own.get(name) is not None}
    lists = {name: own[name] for name in PATCH_LISTS if own.get(name)}
    patches = [*slots.values(), *(f for functions in lists.values() for f in functions)]
    for name in slots:
        setattr(layer, name, None)
    for name in lists:
        setattr(layer, name, [])
    try:
        yield patches
    finally:
        for name, value in (*slots.items(), *lists.items()):
            setattr(layer, name, value)


@contextlib.contextmanager
def cast_stored(layer: torch.nn.Module, input: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(stored weight on the input's device in its storage dtype, bias in the input's dtype) via ComfyUI's cast.

    Where ComfyUI has the offloadable cast (offload streams, Dynamic VRAM's pinned and resident
    copies) the pair is used and released after the block; older versions have the plain cast.
    """
    import comfy.ops

    if hasattr(comfy.ops, "uncast_bias_weight"):
        weight, bias, stream = comfy.ops.cast_bias_weight(
            layer, input, dtype=layer.weight.dtype, bias_dtype=input.dtype, offloadable=True
        )
        try:
            yield weight, bias
        finally:
            comfy.ops.uncast_bias_weight(layer, weight, bias, stream)
    else:
        yield comfy.ops.cast_bias_weight(layer, input, dtype=layer.weight.dtype, bias_dtype=input.dtype)


class ScaleAware:
    """Mixin for every layer kind: reads `scale_weight` from the state dict and folds it into the weight."""

    loaded_scale: tuple[str, float] | None = None  # (state-dict key, value) of the scale taken; see applied_scales

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        own = {k: v for k, v in state_dict.items() if k not in (prefix + SCALE, prefix + INPUT_SCALE)}
        scale = state_dict.get(prefix + SCALE)
        if scale is not None:
            value = validated_scale(prefix + SCALE, scale)
            self.loaded_scale = (prefix + SCALE, float(value))
            self.take_scale(own, prefix, value)
        super()._load_from_state_dict(own, prefix, *args, **kwargs)

    def take_scale(self, state_dict: dict, prefix: str, scale: torch.Tensor) -> None:
        """Fold: the layer then holds real weights in the dtype ComfyUI chose, rounded once."""
        key = prefix + "weight"
        if key in state_dict and float(scale) != 1.0:
            state_dict[key] = state_dict[key].to(torch.float32) * scale


class ScaledLinear(ScaleAware):
    """Mixin for Linear: keeps float16 storage, applies the scale at forward, patches in real units."""

    scale_fp16_exact = False
    _patching = False  # True while this layer applies patch functions to its real-unit weight

    def take_scale(self, state_dict: dict, prefix: str, scale: torch.Tensor) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != self.weight.dtype:
            # Built in ComfyUI's dtype (float32 on CPU) the layer would hold an upcast copy: keep the file's.
            empty = torch.empty(self.weight.shape, dtype=weight.dtype, device=self.weight.device)
            self.weight = torch.nn.Parameter(empty, requires_grad=False)
        # ComfyUI stages weights (Dynamic VRAM) in the dtype recorded when the model was built.
        self.weight_comfy_model_dtype = self.weight.dtype
        self.scale_weight = torch.nn.Parameter(torch.ones(1, device=self.weight.device), requires_grad=False)
        state_dict[prefix + SCALE] = scale.reshape(1)  # loaded like any parameter: not reported missing
        self.scale_fp16_exact = bool(scale.to(torch.float16).to(torch.float32) == scale)

    def real_weight(self, stored: torch.Tensor, dtype: torch.dtype, patches: list[Callable]) -> torch.Tensor:
        """The weight in real units and `dtype`, with `patches` applied in float32."""
        scale = self.scale_weight.to(device=stored.device)
        if not patches:
            # One pass: a [1]-shaped scale takes part in type promotion. Multiply in float16 only when
            # the scale is exact there (a single rounding); otherwise in float32.
            work = dtype if dtype == torch.float16 and self.scale_fp16_exact else torch.float32
            return (stored * scale.to(work)).to(dtype)
        weight = stored.to(torch.float32) * scale
        self._patching = True  # a patch written for older ComfyUI calls convert/set itself: identity now
        try:
            for patch in patches:
                weight = patch(weight)
        finally:
            self._patching = False
        return weight.to(dtype)

    def forward_comfy_cast_weights(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if SCALE not in self._parameters:
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        with withheld_weight_patches(self) as patches, cast_stored(self, input) as (stored, bias):
            return torch.nn.functional.linear(input, self.real_weight(stored, input.dtype, patches), bias)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        """Stored units -> real units, float32 (ComfyUI may hand over float16 for its LoRA math)."""
        scale = self._parameters.get(SCALE)
        if scale is None or self._patching:
            return weight
        scale = scale.to(device=weight.device)
        if inplace and weight.dtype == torch.float32:
            return weight.mul_(scale)
        return weight.to(torch.float32) * scale

    def set_weight(
        self,
        weight: torch.Tensor,
        inplace_update: bool = False,
        seed: int | None = None,
        return_weight: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """Real units -> stored units at the layer's scale (with return_weight: float32, not stored).

        A float32 `weight` is converted in place: ComfyUI's weight-hook cache keeps the very tensor it handed
        over here and later copies it straight into the stored weight (`patch_cached_hook_weights`), so it
        must hold stored units too.
        """
        scale = self._parameters.get(SCALE)
        if self._patching:
            return weight
        if return_weight:
            stored = weight.to(torch.float32)
            return stored / scale.to(device=weight.device) if scale is not None else stored
        stored = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
        if scale is not None:
            stored = stored.div_(scale.to(device=weight.device))
        new = storage_tensor(stored, self.weight.dtype)
        if new.data_ptr() == weight.data_ptr():  # the caller's tensor (it may keep it): never the weight itself
            new = new.clone()
        if inplace_update and new.dtype == self.weight.dtype:
            self.weight.data.copy_(new)
        else:
            self.weight = torch.nn.Parameter(new, requires_grad=False)
        return None


def applied_scales(model: torch.nn.Module) -> list[tuple[str, float]]:
    """(state-dict key, value) of every `scale_weight` a layer of these operations took while the model loaded.

    The loader's contract with this module: it compares these with the scales the file holds, because
    a scale that reached no such layer would be silently ignored by the model.
    """
    return [m.loaded_scale for m in model.modules() if isinstance(m, ScaleAware) and m.loaded_scale is not None]


@functools.cache
def scaled_fp16_ops() -> type:
    """The operations class for `model_options["custom_operations"]`, built on ComfyUI's manual_cast."""
    from comfy.ops import manual_cast as base

    class ScaledFP16Ops(base):
        class Linear(ScaledLinear, base.Linear):
            pass

        class Conv1d(ScaleAware, base.Conv1d):
            pass

        class Conv2d(ScaleAware, base.Conv2d):
            pass

        class Conv3d(ScaleAware, base.Conv3d):
            pass

        class ConvTranspose1d(ScaleAware, base.ConvTranspose1d):
            pass

        class ConvTranspose2d(ScaleAware, base.ConvTranspose2d):
            pass

        class GroupNorm(ScaleAware, base.GroupNorm):
            pass

        class LayerNorm(ScaleAware, base.LayerNorm):
            pass

        class RMSNorm(ScaleAware, base.RMSNorm):
            pass

        class Embedding(ScaleAware, base.Embedding):
            pass

    return ScaledFP16Ops
