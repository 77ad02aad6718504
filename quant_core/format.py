"""The output formats' names, constants and metadata, shared by the converter and the reader.

Two formats. **scaled** (`scaled_fp16`, the original script's and the default):

- `<layer>.weight`: float16, the weight divided by its scale;
- `<layer>.scale_weight`: float32 [1]; real weight = weight.float() * scale_weight;
- `<layer>.scale_input`: float32 [1], written in T5XXL mode (as the original script does);
- `scaled_fp16`: float16 marker, shape [2] ([0] in T5XXL mode);
- everything else keeps its name; `__metadata__` keeps the source's metadata and adds `quant.*` keys.

Files written by the original script also load: they carry `scale_weight` (value 1) on 1-D
weights such as LayerNorm scales, and non-power-of-two scales.

**plain** (`plain_fp16`): ordinary float16 tensors in real units, no scale tensors and no marker, so
any loader reads it. A weight plain float16 cannot hold faithfully keeps its source dtype.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import torch

FORMAT_NAME = "scaled_fp16"
PLAIN_FORMAT_NAME = "plain_fp16"
FORMAT_VERSION = "1"
SCALED, PLAIN = "scaled", "plain"  # --format / the node's input
OUTPUT_FORMATS = {SCALED: FORMAT_NAME, PLAIN: PLAIN_FORMAT_NAME}  # -> the file's quant.format
MARKER_KEY = "scaled_fp16"
SCALE_WEIGHT = "scale_weight"  # a layer's parameter name, as ComfyUI's loaders see it
SCALE_INPUT = "scale_input"
WEIGHT_SUFFIX = ".weight"
SCALE_WEIGHT_SUFFIX = "." + SCALE_WEIGHT
SCALE_INPUT_SUFFIX = "." + SCALE_INPUT
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
    return weight_key.removesuffix(WEIGHT_SUFFIX)


def scale_weight_key(weight_key: str) -> str:
    return layer_name(weight_key) + SCALE_WEIGHT_SUFFIX


def scale_input_key(weight_key: str) -> str:
    return layer_name(weight_key) + SCALE_INPUT_SUFFIX


def is_scale_key(key: str) -> bool:
    return key.endswith((SCALE_WEIGHT_SUFFIX, SCALE_INPUT_SUFFIX))


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
    source_metadata: Mapping[str, str],
    tool: str,
    settings: Mapping[str, object],
    scaled_weights: Iterable[str],
    output_format: str = SCALED,
) -> dict[str, str]:
    """Source metadata kept as is (other tools read it), plus what this conversion was and which weights it scaled."""
    meta = {k: v for k, v in source_metadata.items() if not k.startswith("quant.")}
    meta[META_FORMAT] = OUTPUT_FORMATS[output_format]
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
