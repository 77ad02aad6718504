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
# A weight kept in its source precision may carry scale_weight 1 (--keep_distillation).
UNIT_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FOREIGN_MARKERS = ("scaled_fp8",)

META_FORMAT = "quant.format"
META_FORMAT_VERSION = "quant.format_version"
META_TOOL = "quant.tool"
META_SETTINGS = "quant.settings"
META_SCALED_WEIGHTS = "quant.scaled_weights"  # JSON list of the weights written with a scale_weight


def marker_shape(t5xxl: bool) -> tuple[int, ...]:
    return (0,) if t5xxl else (2,)


MARKER_SHAPES = (marker_shape(False), marker_shape(True))


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


def build_metadata(
    source_metadata: Mapping[str, str], tool: str, settings: Mapping[str, object], scaled_weights: Iterable[str]
) -> dict[str, str]:
    """Source metadata kept as is (other tools read it), plus what this conversion was and which weights it scaled."""
    meta = {k: v for k, v in source_metadata.items() if not k.startswith("quant.")}
    meta[META_FORMAT] = FORMAT_NAME
    meta[META_FORMAT_VERSION] = FORMAT_VERSION
    meta[META_TOOL] = tool
    meta[META_SETTINGS] = json.dumps(dict(settings), sort_keys=True)
    meta[META_SCALED_WEIGHTS] = json.dumps(list(scaled_weights))
    return meta


def recorded_scaled_weights(metadata: Mapping[str, str] | None) -> list[str]:
    """The weights a file of this package records as written with a scale_weight; empty for other files.

    Files of this package written before the record existed, and other tools' files, carry none:
    for them a missing scale cannot be told from a weight that was never scaled.
    """
    if not metadata or metadata.get(META_FORMAT) != FORMAT_NAME or META_SCALED_WEIGHTS not in metadata:
        return []
    try:
        weights = json.loads(metadata[META_SCALED_WEIGHTS])
    except ValueError:
        return []  # unreadable record: nothing to compare against
    return [w for w in weights if isinstance(w, str)] if isinstance(weights, list) else []


def dequantize_state_dict(
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    source: str = "state dict",
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Turn a scaled_fp16 state dict back into plain weights (marker and scale tensors removed).

    Accepts both this package's files and the original script's; raises QuantError (see
    `validate_scaled_state_dict`) on anything that would silently produce a broken model.
    """
    scales = validate_scaled_state_dict(source, tensors, metadata)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key == MARKER_KEY or is_scale_key(key):
            continue
        scale_key = scale_weight_key(key) if key.endswith(WEIGHT_SUFFIX) else None
        if scale_key is not None and scale_key in scales:
            out[key] = (value.to(torch.float32) * scales[scale_key]).to(dtype)
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


def validate_scaled_state_dict(
    source: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Check a scaled_fp16 state dict before anything is built from it; returns {scale key: scale}.

    A broken scale or weight would not fail later: the model would load and produce garbage. So
    every `scale_weight` must be one finite positive float beside a floating-point weight (float16
    unless the scale is 1, as for kept distillation layers), the marker must have a known shape,
    and every weight the file records as scaled (`quant.scaled_weights`) must have its scale.
    Raises QuantError naming `source` and the tensor.
    """
    marker = tensors.get(MARKER_KEY)
    if marker is None:
        raise QuantError(f"{source}: not a scaled_fp16 file (no '{MARKER_KEY}' marker tensor)")
    if tuple(marker.shape) not in MARKER_SHAPES:
        raise QuantError(
            f"{source}: marker '{MARKER_KEY}' has shape {list(marker.shape)}, expected one of "
            f"{[list(s) for s in MARKER_SHAPES]}; the file is damaged or not scaled_fp16"
        )
    scales: dict[str, float] = {}
    for key, scale in tensors.items():
        if not key.endswith(SCALE_WEIGHT_SUFFIX):
            continue
        weight_key = key[: -len(SCALE_WEIGHT_SUFFIX)] + WEIGHT_SUFFIX
        weight = tensors.get(weight_key)
        if weight is None:
            raise QuantError(f"{source}: '{key}' has no weight '{weight_key}' to scale; the file is damaged")
        try:
            value = float(validated_scale(key, scale))
        except QuantError as exc:
            raise QuantError(f"{source}: {exc}") from None
        if weight.dtype not in UNIT_SCALE_DTYPES or (value != 1.0 and weight.dtype != STORAGE_DTYPE):
            raise QuantError(
                f"{source}: '{weight_key}' is {weight.dtype} but has a scale_weight of {value:g}; "
                "scaled weights must be float16 (the file is damaged or another format)"
            )
        scales[key] = value
    for weight_key in recorded_scaled_weights(metadata):
        if scale_weight_key(weight_key) not in tensors:
            raise QuantError(
                f"{source}: '{weight_key}' has no '{scale_weight_key(weight_key)}' although the file records it as "
                "scaled; the file is damaged, convert it again"
            )
    return scales
