"""Custom operations that run ComfyUI models on scaled_fp16 weights (`model_options["custom_operations"]`).

Linear layers keep the file's float16 weight and `scale_weight` and dequantize at every forward, in
the dtype ComfyUI computes in. Every other layer kind (embeddings, norms, convolutions) has its scale
folded into the weight at load, because model code reads those weights directly (CLIP's position
embedding, for one). `scale_input` (T5XXL-mode files) is accepted and ignored, as ComfyUI's scaled
loaders do when inputs are not quantized.

LoRA and other weight patches: ModelPatcher calls `convert_weight` (stored -> real units) before
patching and `set_weight` (real -> stored) after. A patch may push a weight past float16's range at the
layer's scale; such a layer then stores float32 (same scale) instead of overflowing to inf, and
ComfyUI's restore of its backed-up weight brings the float16 tensor back unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..quant_core.format import SCALE_INPUT as INPUT_SCALE
from ..quant_core.format import SCALE_WEIGHT as SCALE
from ..quant_core.reader import validated_scale


def storage_tensor(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`stored` in the layer's storage dtype, or kept float32 where float16 would overflow to inf."""
    candidate = stored.to(dtype)
    if dtype == torch.float16 and not torch.isfinite(candidate).all() and torch.isfinite(stored).all():
        return stored.to(torch.float32)
    return candidate


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

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        """Stored units -> real units (identity for layers without a scale)."""
        scale = self._parameters.get(SCALE)
        if scale is None:
            return weight
        scale = scale.to(device=weight.device, dtype=weight.dtype)
        return weight.mul_(scale) if inplace else weight * scale

    def set_weight(
        self,
        weight: torch.Tensor,
        inplace_update: bool = False,
        seed: int | None = None,
        return_weight: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """Real units -> stored units. With return_weight (lowvram patches) the result stays float32."""
        scale = self._parameters.get(SCALE)
        stored = weight if scale is None else weight / scale.to(device=weight.device, dtype=weight.dtype)
        if return_weight:
            return stored
        new = storage_tensor(stored, self.weight.dtype)
        if inplace_update and new.dtype == self.weight.dtype:
            self.weight.data.copy_(new)
        else:
            self.weight = torch.nn.Parameter(new, requires_grad=False)
        return None


class ScaledLinear(ScaleAware):
    """Mixin for Linear: keeps float16 storage and applies the scale at forward."""

    scale_fp16_exact = False

    def take_scale(self, state_dict: dict, prefix: str, scale: torch.Tensor) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != self.weight.dtype:
            # Built in ComfyUI's dtype (float32 on CPU) the layer would hold an upcast copy: keep the file's.
            empty = torch.empty(self.weight.shape, dtype=weight.dtype, device=self.weight.device)
            self.weight = torch.nn.Parameter(empty, requires_grad=False)
        self.scale_weight = torch.nn.Parameter(torch.ones(1, device=self.weight.device), requires_grad=False)
        state_dict[prefix + SCALE] = scale.reshape(1)  # loaded like any parameter: not reported missing
        self.scale_fp16_exact = bool(scale.to(torch.float16).to(torch.float32) == scale)

    def scaled_weight_bias(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight * scale_weight, bias) in the input's dtype and on its device."""
        from comfy.ops import cast_bias_weight

        compute = input.dtype
        patched = len(self.weight_function) > 0
        # Lowvram patches see float32 stored values and may hand back values beyond float16's range.
        fetch = torch.float32 if patched else self.weight.dtype
        weight, bias = cast_bias_weight(self, input, dtype=fetch, bias_dtype=compute)
        # Multiply in float16 only when the scale is exact there (one rounding); otherwise in float32.
        work = compute if compute == torch.float16 and self.scale_fp16_exact and not patched else torch.float32
        # A [1]-shaped scale takes part in type promotion: casting and scaling are one pass.
        weight = weight * self.scale_weight.to(device=weight.device, dtype=work)
        return weight.to(compute), bias

    def forward_comfy_cast_weights(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if SCALE not in self._parameters:
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        weight, bias = self.scaled_weight_bias(input)
        return torch.nn.functional.linear(input, weight, bias)


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
