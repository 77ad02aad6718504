"""The statistics file: safetensors holding each input's tensors, with what describes them in the metadata.

Tensors are named `<input id>.<mean|second_moment|eigenvectors|eigenvalues|residual>`; the metadata
holds the format name and version, the model, the forward calls, each input's width and token count,
the layer -> shared input map and the recorder's settings. A loaded file is read lazily, one input at
a time, so converting with the statistics of a large model never holds them all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import QuantError
from ..safetensors_io import open_safetensors, write_state_dict
from .statistics import TENSOR_NAMES, CalibrationStatistics, InputStatistics

FORMAT_NAME = "quant_core.calibration"
FORMAT_VERSION = "1"
META_FORMAT = "calib.format"
META_FORMAT_VERSION = "calib.format_version"
META_MODEL = "calib.model"
META_FORWARD_CALLS = "calib.forward_calls"
META_LAYERS = "calib.layers"
META_INPUTS = "calib.inputs"
META_SETTINGS = "calib.settings"
_OWN_METADATA = (META_FORMAT, META_FORMAT_VERSION, META_MODEL, META_FORWARD_CALLS, META_LAYERS, META_INPUTS, META_SETTINGS)
_REMEDY = "record the statistics again"


def statistics_state_dict(stats: CalibrationStatistics) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a statistics file (for writing it where the caller chooses)."""
    tensors = {
        f"{group}.{name}": t.contiguous() for group, inputs in stats.inputs.items() for name, t in inputs.tensors().items()
    }
    described = {
        group: {"dim": inputs.dim, "tokens": inputs.count, "full": inputs.is_full} for group, inputs in stats.inputs.items()
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
    if meta.get(META_FORMAT_VERSION) != FORMAT_VERSION:
        raise QuantError(
            f"{path}: statistics format version {meta.get(META_FORMAT_VERSION)} is not supported "
            f"(expected {FORMAT_VERSION}); record it again"
        )
    try:
        layers = json.loads(meta[META_LAYERS])
        sizes = {group: (int(d["dim"]), int(d["tokens"])) for group, d in json.loads(meta[META_INPUTS]).items()}
        settings = json.loads(meta.get(META_SETTINGS, "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise QuantError(f"{path}: statistics metadata is damaged ({exc}); record it again") from None
    missing = [g for g in sizes if f"{g}.mean" not in keys] + [g for g in layers.values() if g not in sizes]
    if missing:
        raise QuantError(f"{path}: statistics for input '{missing[0]}' are missing; record it again")
    return CalibrationStatistics(
        layers,
        _StoredInputs(path, sizes, keys),
        meta.get(META_MODEL, ""),
        int(meta.get(META_FORWARD_CALLS, "0")),
        settings,
        {k: v for k, v in meta.items() if k not in _OWN_METADATA},
        str(path),
        sizes,
    )


class _StoredInputs(Mapping[str, InputStatistics]):
    """Input statistics read from a file on access, one input at a time."""

    def __init__(self, path: Path, sizes: Mapping[str, tuple[int, int]], keys: set[str]):
        self.path = path
        self.sizes = dict(sizes)
        self.keys = keys

    def __getitem__(self, group: str) -> InputStatistics:
        dim, tokens = self.sizes[group]
        with open_safetensors(self.path, remedy=_REMEDY) as f:
            tensors = {name: f.get_tensor(f"{group}.{name}") for name in TENSOR_NAMES if f"{group}.{name}" in self.keys}
        try:
            stats = InputStatistics(tokens, **tensors)
        except ValueError as exc:
            raise QuantError(f"{self.path}: statistics of input '{group}' are damaged ({exc}); record them again") from None
        if stats.dim != dim:
            raise QuantError(
                f"{self.path}: statistics of input '{group}' have width {stats.dim}, metadata says {dim}; record them again"
            )
        return stats

    def __iter__(self) -> Iterator[str]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)
