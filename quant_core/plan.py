"""Which tensors are quantized, kept, cast or dropped: decided from names, dtypes and shapes alone.

The rules follow the original script: every 2-D `.weight` is quantized; `--t5xxl` drops the decoder
and keeps norms, biases and embeddings; `--keep_distillation` keeps Flux's distillation layers in
their original precision with `scale_weight` 1; `--exclude` keeps user-chosen tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .errors import QuantError
from .format import WEIGHT_SUFFIX
from .safetensors_io import TensorEntry

T5XXL_DROP_NAMES = ("decoder", "lm_head")
T5XXL_KEEP_NAMES = ("norm", "bias", "embed_tokens", "shared")
DISTILLATION_NAMES = ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")
QUANTIZABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

log = logging.getLogger(__name__)


class Action(enum.Enum):
    QUANTIZE = "quantize"  # scaled float16 + scale_weight
    KEEP = "keep"  # bytes copied unchanged
    CAST_IF_EXACT = "cast_if_exact"  # float16 when lossless and finite, else kept
    DROP = "drop"


@dataclass(frozen=True)
class TensorPlan:
    entry: TensorEntry
    action: Action
    reason: str
    unit_scale: bool = False  # kept weight that still gets scale_weight = 1 (distillation layers)
    excluded: bool = False  # the user asked to keep it as it is (--exclude)

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass(frozen=True)
class Selection:
    t5xxl: bool = False
    keep_distillation: bool = False
    exclude: Sequence[str] = ()


def compile_patterns(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise QuantError(f"--exclude pattern {p!r} is not a valid regular expression: {exc}") from None
    return compiled


def is_quantizable_weight(entry: TensorEntry) -> bool:
    return (
        entry.name.endswith(WEIGHT_SUFFIX)
        and len(entry.shape) == 2
        and entry.numel > 0
        and entry.torch_dtype in QUANTIZABLE_DTYPES
    )


def plan_tensor(entry: TensorEntry, selection: Selection, patterns: Sequence[re.Pattern[str]]) -> TensorPlan:
    name = entry.name
    if selection.t5xxl and any(s in name for s in T5XXL_DROP_NAMES):
        return TensorPlan(entry, Action.DROP, "T5XXL decoder/lm_head tensor (--t5xxl)")
    dtype = entry.torch_dtype
    if dtype is None or not dtype.is_floating_point:
        return TensorPlan(entry, Action.KEEP, f"{entry.dtype} tensor copied unchanged")
    if dtype not in QUANTIZABLE_DTYPES:
        reason = f"{entry.dtype} is not a supported source precision; copied unchanged"
        log.warning("tensor '%s': %s", name, reason)
        return TensorPlan(entry, Action.KEEP, reason)
    if selection.keep_distillation and any(s in name for s in DISTILLATION_NAMES):
        return TensorPlan(
            entry, Action.KEEP, "distillation layer (--keep_distillation)", unit_scale=is_quantizable_weight(entry)
        )
    if any(p.search(name) for p in patterns):
        return TensorPlan(entry, Action.CAST_IF_EXACT, "excluded by --exclude", excluded=True)
    if selection.t5xxl and any(s in name for s in T5XXL_KEEP_NAMES):
        return TensorPlan(entry, Action.CAST_IF_EXACT, "T5XXL norm/bias/embedding kept (--t5xxl)")
    if is_quantizable_weight(entry):
        return TensorPlan(entry, Action.QUANTIZE, "2-D weight")
    return TensorPlan(entry, Action.CAST_IF_EXACT, "not a 2-D weight")


def plan_tensors(entries: Iterable[TensorEntry], selection: Selection) -> list[TensorPlan]:
    patterns = compile_patterns(selection.exclude)
    return [plan_tensor(e, selection, patterns) for e in entries]


def select_prefix(entries: Mapping[str, TensorEntry], prefix: str, source: str) -> dict[str, TensorEntry]:
    """The tensors whose names start with `prefix`, renamed without it (one component of a checkpoint).

    Entries keep their file offsets, so a reader looking tensors up by the new names reads the right
    bytes. An empty prefix selects everything unchanged.
    """
    if not prefix:
        return dict(entries)
    selected = {
        name[len(prefix) :]: dataclasses.replace(entry, name=name[len(prefix) :])
        for name, entry in entries.items()
        if name.startswith(prefix) and len(name) > len(prefix)
    }
    if not selected:
        raise QuantError(f"{source}: no tensor name starts with '{prefix}'; this file does not hold that component")
    return selected
