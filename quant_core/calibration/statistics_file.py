"""The statistics file: safetensors holding each input's tensors, with what describes them in the metadata.

Tensors are named `<input id>.<mean|second_moment|eigenvectors|eigenvalues|residual>`, or, for an
input recorded in folds, `<input id>.fold<k>.<...>` for each fold and nothing for the whole (it is
their merge, made when read); the metadata holds the format name and version, the model, the forward
calls, each input's width, token count and fold token counts, the layer -> shared input map and the
recorder's settings. A loaded file is read lazily, one input at a time, so converting with the
statistics of a large model never holds them all. Version 1 files (before folds) are read too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import QuantError
from ..safetensors_io import open_safetensors, write_state_dict
from .statistics import TENSOR_NAMES, CalibrationStatistics, FoldedInputs, InputStatistics

FORMAT_NAME = "quant_core.calibration"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # 1: no folds
META_FORMAT = "calib.format"
META_FORMAT_VERSION = "calib.format_version"
META_MODEL = "calib.model"
META_FORWARD_CALLS = "calib.forward_calls"
META_LAYERS = "calib.layers"
META_INPUTS = "calib.inputs"
META_SETTINGS = "calib.settings"
_OWN_METADATA = (
    META_FORMAT,
    META_FORMAT_VERSION,
    META_MODEL,
    META_FORWARD_CALLS,
    META_LAYERS,
    META_INPUTS,
    META_SETTINGS,
)
_REMEDY = "record the statistics again"


def statistics_state_dict(stats: CalibrationStatistics) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a statistics file (for writing it where the caller chooses)."""
    tensors: dict[str, torch.Tensor] = {}
    described = {}
    for group in stats.inputs:
        parts = stats.stored(group)  # the folds, not their merge
        prefixes = [f"{group}.fold{k}" for k in range(len(parts))] if len(parts) > 1 else [group]
        for prefix, part in zip(prefixes, parts, strict=True):
            tensors.update({f"{prefix}.{name}": t.contiguous() for name, t in part.tensors().items()})
        described[group] = {
            "dim": parts[0].dim,
            "tokens": sum(part.count for part in parts),
            "full": parts[0].is_full,
            **({"folds": [part.count for part in parts]} if len(parts) > 1 else {}),
        }
    metadata = {
        **stats.extra,
        META_FORMAT: FORMAT_NAME,
        META_FORMAT_VERSION: FORMAT_VERSION,
        META_MODEL: stats.model,
        META_FORWARD_CALLS: str(stats.forward_calls),
        META_LAYERS: json.dumps(stats.layers, sort_keys=True),
        META_INPUTS: json.dumps(described, sort_keys=True),
        META_SETTINGS: json.dumps(stats.settings, sort_keys=True),
    }
    return tensors, metadata


def save_statistics(stats: CalibrationStatistics, path: str | Path) -> Path:
    """Write a statistics file atomically (complete or absent); replaces a file of that name."""
    tensors, metadata = statistics_state_dict(stats)
    return write_state_dict(tensors, path, metadata)


def load_statistics(path: str | Path) -> CalibrationStatistics:
    """Open a statistics file; tensors are read per input on first use, so memory stays small."""
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"{path}: statistics file not found")
    with open_safetensors(path, remedy=_REMEDY) as f:
        meta = dict(f.metadata() or {})
        keys = set(f.keys())
    if meta.get(META_FORMAT) != FORMAT_NAME:
        raise QuantError(
            f"{path}: not a calibration statistics file (no '{META_FORMAT}' metadata); "
            "record one with quant_core.calibration.StatisticsRecorder"
        )
    if meta.get(META_FORMAT_VERSION) not in READABLE_VERSIONS:
        raise QuantError(
            f"{path}: statistics format version {meta.get(META_FORMAT_VERSION)} is not supported "
            f"(expected {FORMAT_VERSION}); record it again"
        )
    try:
        layers = json.loads(meta[META_LAYERS])
        described = json.loads(meta[META_INPUTS])
        sizes = {group: (int(d["dim"]), int(d["tokens"])) for group, d in described.items()}
        fold_counts = {group: [int(c) for c in d.get("folds", [])] for group, d in described.items()}
        settings = json.loads(meta.get(META_SETTINGS, "{}"))
        rank = settings.get("summary_rank")
        rank = None if rank is None else int(rank)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QuantError(f"{path}: statistics metadata is damaged ({exc}); record it again") from None
    missing = [g for g in sizes for prefix in _prefixes(g, fold_counts[g]) if f"{prefix}.mean" not in keys]
    missing += [g for g in layers.values() if g not in sizes]
    if missing:
        raise QuantError(f"{path}: statistics for input '{missing[0]}' are missing; record it again")
    return CalibrationStatistics(
        layers,
        _StoredInputs(path, sizes, fold_counts, keys, rank),
        meta.get(META_MODEL, ""),
        int(meta.get(META_FORWARD_CALLS, "0")),
        settings,
        {k: v for k, v in meta.items() if k not in _OWN_METADATA},
        str(path),
        sizes,
    )


def _prefixes(group: str, fold_counts: list[int]) -> list[str]:
    """Where an input's tensors are: one prefix per fold, or the input's own for an input without folds."""
    return [f"{group}.fold{k}" for k in range(len(fold_counts))] if fold_counts else [group]


class _StoredInputs(FoldedInputs):
    """Input statistics read from a file on access, one input at a time (an input's folds merged when read)."""

    def __init__(
        self,
        path: Path,
        sizes: Mapping[str, tuple[int, int]],
        fold_counts: Mapping[str, list[int]],
        keys: set[str],
        rank: int | None,
    ):
        super().__init__({}, rank)
        self.path = path
        self.sizes = dict(sizes)
        self.fold_counts = dict(fold_counts)
        self.keys = keys

    def stored(self, group: str) -> tuple[InputStatistics, ...]:
        dim, tokens = self.sizes[group]
        counts = self.fold_counts[group] or [tokens]
        parts = []
        with open_safetensors(self.path, remedy=_REMEDY) as f:
            for prefix, count in zip(_prefixes(group, self.fold_counts[group]), counts, strict=True):
                names = [name for name in TENSOR_NAMES if f"{prefix}.{name}" in self.keys]
                tensors = {name: f.get_tensor(f"{prefix}.{name}") for name in names}
                try:
                    parts.append(InputStatistics(count, **tensors))
                except ValueError as exc:
                    raise QuantError(
                        f"{self.path}: statistics of input '{group}' are damaged ({exc}); record them again"
                    ) from None
        for part in parts:
            if part.dim != dim:
                raise QuantError(
                    f"{self.path}: statistics of input '{group}' have width {part.dim}, metadata says {dim}; "
                    "record them again"
                )
        return tuple(parts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)
