"""The one reader of converted files: open, validate, dequantize, and list the scales a loader must apply.

Used by ScaledFP16Loader, the converter's tests and the benchmarks. A broken scale or weight would
not fail later: the model would load and produce garbage, so everything is checked here first and
reported as one QuantError naming the file and tensor. Files without the marker are plain weights
and pass through unchanged; files of the original script (non-power-of-two scales, `scale_weight` 1
on 1-D weights) load too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import QuantError
from .format import (
    MARKER_KEY,
    MARKER_SHAPES,
    SCALE_WEIGHT_SUFFIX,
    STORAGE_DTYPE,
    UNIT_SCALE_DTYPES,
    WEIGHT_SUFFIX,
    is_scale_key,
    recorded_scaled_weights,
    scale_weight_key,
)
from .safetensors_io import open_safetensors

log = logging.getLogger(__name__)


@dataclass
class ScaledFile:
    """A safetensors file read whole, validated: its tensors as a loader takes them (marker removed) and its scales."""

    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    scales: dict[str, float]  # scale_weight key -> value; empty for a file of plain weights

    @property
    def expected_scales(self) -> list[str]:
        """The scale keys a loader must see applied (a scale of 1 is harmless wherever it ends up)."""
        return [key for key, value in self.scales.items() if value != 1.0]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Plain weights in real units (scale tensors removed)."""
        return _dequantize(self.tensors, self.scales, dtype)


def read_scaled_file(path: str | os.PathLike) -> ScaledFile:
    """Open and validate a scaled_fp16 file (or a plain one, returned as is with no scales)."""
    with open_safetensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (a safe_open handle, not a dict)
        metadata = dict(f.metadata() or {})
    if MARKER_KEY not in tensors:
        log.info("%s has no '%s' marker: loading it as plain weights", path, MARKER_KEY)
        return ScaledFile(str(path), tensors, metadata, {})
    scales = validate_scaled_state_dict(str(path), tensors, metadata)
    del tensors[MARKER_KEY]
    return ScaledFile(str(path), tensors, metadata, scales)


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
    return _dequantize(tensors, validate_scaled_state_dict(source, tensors, metadata), dtype)


def _dequantize(
    tensors: Mapping[str, torch.Tensor], scales: Mapping[str, float], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
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
