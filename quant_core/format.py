"""The scaled_fp16 file format, shared by the converter and the loaders.

- `<layer>.weight`: float16, the weight divided by its scale;
- `<layer>.scale_weight`: float32 [1]; real weight = weight.float() * scale_weight;
- `<layer>.scale_input`: float32 [1], written in T5XXL mode (as the original script does);
- `scaled_fp16`: float16 marker, shape [2] ([0] in T5XXL mode);
- everything else keeps its name; `__metadata__` keeps the source's metadata and adds `quant.*` keys.

Files written by the original script also load: they carry `scale_weight` (value 1) on 1-D
weights such as LayerNorm scales, and non-power-of-two scales.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

import torch

from .errors import QuantError

FORMAT_NAME = "scaled_fp16"
FORMAT_VERSION = "1"
MARKER_KEY = "scaled_fp16"
WEIGHT_SUFFIX = ".weight"
SCALE_WEIGHT_SUFFIX = ".scale_weight"
SCALE_INPUT_SUFFIX = ".scale_input"
SCALE_DTYPE = torch.float32
STORAGE_DTYPE = torch.float16
FOREIGN_MARKERS = ("scaled_fp8",)

META_FORMAT = "quant.format"
META_FORMAT_VERSION = "quant.format_version"
META_TOOL = "quant.tool"
META_SETTINGS = "quant.settings"


def marker_shape(t5xxl: bool) -> tuple[int, ...]:
    return (0,) if t5xxl else (2,)


def layer_name(weight_key: str) -> str:
    return weight_key[: -len(WEIGHT_SUFFIX)] if weight_key.endswith(WEIGHT_SUFFIX) else weight_key


def scale_weight_key(weight_key: str) -> str:
    return layer_name(weight_key) + SCALE_WEIGHT_SUFFIX


def scale_input_key(weight_key: str) -> str:
    return layer_name(weight_key) + SCALE_INPUT_SUFFIX


def is_scale_key(key: str) -> bool:
    return key.endswith(SCALE_WEIGHT_SUFFIX) or key.endswith(SCALE_INPUT_SUFFIX)


def already_scaled_reason(keys: Iterable[str]) -> str | None:
    """Why a file already holds scaled weights (so it must not be quantized again), or None."""
    keys = list(keys)
    for marker in (MARKER_KEY, *FOREIGN_MARKERS):
        if marker in keys:
            return f"it carries the '{marker}' marker"
    scaled = [k for k in keys if k.endswith(SCALE_WEIGHT_SUFFIX)]
    if scaled:
        return f"it already has scale tensors such as '{scaled[0]}'"
    return None


def build_metadata(source_metadata: Mapping[str, str], tool: str, settings: Mapping[str, object]) -> dict[str, str]:
    """Source metadata kept as is (other tools read it), plus what this conversion was."""
    meta = {k: v for k, v in source_metadata.items() if not k.startswith("quant.")}
    meta[META_FORMAT] = FORMAT_NAME
    meta[META_FORMAT_VERSION] = FORMAT_VERSION
    meta[META_TOOL] = tool
    meta[META_SETTINGS] = json.dumps(dict(settings), sort_keys=True)
    return meta


def dequantize_state_dict(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Turn a scaled_fp16 state dict back into plain weights (marker and scale tensors removed).

    Accepts both this package's files and the original script's; raises QuantError on a scale that
    would silently produce a broken model.
    """
    if MARKER_KEY not in tensors:
        raise QuantError(f"not a scaled_fp16 state dict: no '{MARKER_KEY}' marker tensor")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key == MARKER_KEY or is_scale_key(key):
            continue
        scale_key = scale_weight_key(key) if key.endswith(WEIGHT_SUFFIX) else None
        if scale_key is not None and scale_key in tensors:
            scale = validated_scale(scale_key, tensors[scale_key])
            out[key] = (value.to(torch.float32) * scale).to(dtype)
        else:
            out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def validated_scale(key: str, scale: torch.Tensor) -> torch.Tensor:
    """A scale_weight as a float32 scalar tensor, or QuantError if it cannot be a real scale."""
    if scale.numel() != 1 or not scale.is_floating_point():
        raise QuantError(f"'{key}' must be one float, found shape {list(scale.shape)} dtype {scale.dtype}")
    value = scale.reshape(()).to(torch.float32)
    if not torch.isfinite(value) or value <= 0:
        raise QuantError(f"'{key}' is {value.item()}; a scale must be finite and positive")
    return value
