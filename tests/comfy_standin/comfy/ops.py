"""Stand-in for `comfy.ops`: `cast_bias_weight` and the `manual_cast` layer classes custom operations build on.

Behaviour that matters to the pack, as in ComfyUI 0.3.64: layers skip weight initialisation; with
`comfy_cast_weights` (always on in manual_cast) the forward casts weight and bias to the input's
dtype and device on every call and runs the `weight_function` / `bias_function` lists (where
ModelPatcher puts its lowvram LoRA patches) on the cast tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None):
    if input is not None:
        dtype = dtype if dtype is not None else input.dtype
        bias_dtype = bias_dtype if bias_dtype is not None else dtype
        device = device if device is not None else input.device
    bias = None
    if s.bias is not None:
        bias = s.bias.to(device=device, dtype=bias_dtype, copy=len(s.bias_function) > 0)
        for f in s.bias_function:
            bias = f(bias)
    weight = s.weight.to(device=device, dtype=dtype, copy=len(s.weight_function) > 0)
    for f in s.weight_function:
        weight = f(weight)
    return weight, bias


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class _ManualCast(CastWeightBiasOp):
    comfy_cast_weights = True

    def reset_parameters(self):
        return None

    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights or self.weight_function or self.bias_function:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)


class _Conv(_ManualCast):
    def forward_comfy_cast_weights(self, input):
        weight, bias = cast_bias_weight(self, input)
        return self._conv_forward(input, weight, bias)


class manual_cast:
    class Linear(_ManualCast, torch.nn.Linear):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return F.linear(input, weight, bias)

    class Conv1d(_Conv, torch.nn.Conv1d):
        pass

    class Conv2d(_Conv, torch.nn.Conv2d):
        pass

    class Conv3d(_Conv, torch.nn.Conv3d):
        pass

    class ConvTranspose1d(_ManualCast, torch.nn.ConvTranspose1d):
        def forward_comfy_cast_weights(self, input, output_size=None):
            weight, bias = cast_bias_weight(self, input)
            return F.conv_transpose1d(
                input, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )

    class ConvTranspose2d(_ManualCast, torch.nn.ConvTranspose2d):
        def forward_comfy_cast_weights(self, input, output_size=None):
            weight, bias = cast_bias_weight(self, input)
            return F.conv_transpose2d(
                input, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )

    class GroupNorm(_ManualCast, torch.nn.GroupNorm):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    class LayerNorm(_ManualCast, torch.nn.LayerNorm):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input) if self.weight is not None else (None, None)
            return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    class RMSNorm(_ManualCast, torch.nn.RMSNorm):
        def reset_parameters(self):
            self.bias = None

        def forward_comfy_cast_weights(self, input):
            weight = cast_bias_weight(self, input)[0] if self.weight is not None else None
            return F.rms_norm(input, self.normalized_shape, weight, self.eps)

    class Embedding(_ManualCast, torch.nn.Embedding):
        def reset_parameters(self):
            self.bias = None

        def forward_comfy_cast_weights(self, input, out_dtype=None):
            weight, _ = cast_bias_weight(self, device=input.device, dtype=out_dtype)
            return F.embedding(input, weight, self.padding_idx).to(dtype=out_dtype)

    @classmethod
    def conv_nd(cls, dims, *args, **kwargs):
        if dims == 2:
            return cls.Conv2d(*args, **kwargs)
        if dims == 3:
            return cls.Conv3d(*args, **kwargs)
        raise ValueError(f"unsupported dimensions: {dims}")
