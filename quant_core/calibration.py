"""Activation statistics for calibrated rounding: what each Linear layer's input looks like.

A layer's output error for inputs x is E x with E = W - Q, so its mean square over the inputs is
tr(E H E^T) with H = E[x x^T]: the second moment is all calibrated rounding needs, plus the mean
E[x] for bias correction. `StatisticsRecorder` accumulates both with forward hooks on every
`nn.Linear` (convolutions are not recorded), streaming and in float64, one accumulator per
*distinct* input: layers that read the same tensor object in one forward (q/k/v projections)
share it, and the file records who shares with whom.

Memory is bounded by `max_full_dim`: an input of width n <= max_full_dim keeps the full n x n
moment; a wider one keeps a rank-k eigen summary plus the exact diagonal,
H ~= V diag(lam) V^T + diag(residual), where the residual puts the energy the truncation dropped
back on the diagonal (so the approximation is exact on the diagonal). The summary is updated per
batch like incremental PCA: merge the batch into the current top-k (thin QR + small eigenproblem)
and truncate. That is exact while the inputs span at most k dimensions; beyond, the dropped tail
of earlier merges is lost from the off-diagonal part.

Tokens are the rows of the input reshaped to (-1, n): pad tokens count like any other, so record
without padding (a batch of one, or sequences of equal length).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import QuantError
from .format import WEIGHT_SUFFIX
from .safetensors_io import open_safetensors, write_state_dict

log = logging.getLogger(__name__)

FORMAT_NAME = "quant_core.calibration"
FORMAT_VERSION = "1"
META_FORMAT = "calib.format"
META_FORMAT_VERSION = "calib.format_version"
META_MODEL = "calib.model"
META_FORWARD_CALLS = "calib.forward_calls"
META_LAYERS = "calib.layers"
META_INPUTS = "calib.inputs"
META_SETTINGS = "calib.settings"

DEFAULT_MAX_FULL_DIM = 2048
DEFAULT_SUMMARY_RANK = 256
_F64 = 8  # bytes per float64
_TENSOR_NAMES = ("mean", "second_moment", "eigenvectors", "eigenvalues", "residual")


@dataclass
class InputStatistics:
    """Mean and second moment of one distinct layer input (full, or eigen summary + diagonal)."""

    count: int
    mean: torch.Tensor  # [n] float64, E[x]
    second_moment: torch.Tensor | None = None  # [n, n] float64, E[x x^T]
    eigenvectors: torch.Tensor | None = None  # [n, k], orthonormal columns
    eigenvalues: torch.Tensor | None = None  # [k]
    residual: torch.Tensor | None = None  # [n], diag(H) - diag(V lam V^T), >= 0

    def __post_init__(self) -> None:
        if (self.second_moment is None) == (self.eigenvectors is None):
            raise ValueError("InputStatistics needs either second_moment or an eigen summary")

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def is_full(self) -> bool:
        return self.second_moment is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_NAMES if getattr(self, name) is not None}

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def hessian(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """H = E[x x^T] as a dense float64 matrix on `device` (reconstructed from a summary)."""
        if self.second_moment is not None:
            return self.second_moment.to(device=device, dtype=torch.float64)
        v = self.eigenvectors.to(device=device, dtype=torch.float64)
        h = (v * self.eigenvalues.to(device=device, dtype=torch.float64)) @ v.T
        h.diagonal().add_(self.residual.to(device=device, dtype=torch.float64))
        return h


class _Buffered:
    """Collects tokens until a batch is worth a pass over the accumulator.

    Adding a few tokens at a time to an n x n moment is bound by memory traffic (the whole matrix
    is read and written per call); batching `flush_rows` tokens makes it one efficient product.
    The buffer is capped so it never holds more than about half the accumulator's own size.
    """

    def __init__(self, dim: int, flush_rows: int):
        self.count = 0
        self._dim = dim
        self.flush_rows = flush_rows
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [tokens, dim] float64, owned by the accumulator (a copy of the layer input)."""
        self.count += x.shape[0]
        self._pending.append(x)
        self._pending_rows += x.shape[0]
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            batch = torch.cat(self._pending)
            self._pending, self._pending_rows = [], 0
            self._absorb(batch)

    def _absorb(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def pending_bytes(self) -> int:
        return self.flush_rows * self._dim * _F64


class _FullMoment(_Buffered):
    """Running sums of x and x x^T."""

    def __init__(self, dim: int, device: torch.device):
        super().__init__(dim, max(256, dim // 2))
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.moment = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def _absorb(self, x: torch.Tensor) -> None:
        self.sum += x.sum(0)
        self.moment.addmm_(x.T, x)

    @property
    def memory_bytes(self) -> int:
        return (self.sum.numel() + self.moment.numel()) * _F64 + self.pending_bytes

    def finish(self) -> InputStatistics:
        self.flush()
        return InputStatistics(self.count, (self.sum / self.count).cpu(), second_moment=(self.moment / self.count).cpu())


class _LowRankMoment(_Buffered):
    """Running sum of x, exact diagonal of sum x x^T, and its streaming top-k eigen summary."""

    def __init__(self, dim: int, rank: int, device: torch.device):
        super().__init__(dim, rank)
        self.rank = rank
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.diagonal = torch.zeros(dim, dtype=torch.float64, device=device)
        self.vectors = torch.zeros(dim, 0, dtype=torch.float64, device=device)
        self.values = torch.zeros(0, dtype=torch.float64, device=device)

    def _absorb(self, x: torch.Tensor) -> None:
        self.sum += x.sum(0)
        self.diagonal += (x * x).sum(0)
        for start in range(0, x.shape[0], self.rank):  # merge k tokens at a time: O(n k^2) each
            factor = torch.cat([self.vectors * self.values.sqrt(), x[start : start + self.rank].T], dim=1)
            basis, r = torch.linalg.qr(factor)
            values, vectors = torch.linalg.eigh(r @ r.T)
            top = torch.argsort(values, descending=True)[: self.rank]
            self.values = values[top].clamp_min(0)
            self.vectors = basis @ vectors[:, top]

    @property
    def memory_bytes(self) -> int:
        held = self.sum.numel() + self.diagonal.numel() + self._dim * self.rank + self.rank
        return held * _F64 + self.pending_bytes

    def finish(self) -> InputStatistics:
        self.flush()
        values = self.values / self.count
        residual = (self.diagonal / self.count - (self.vectors**2) @ values).clamp_min(0)
        return InputStatistics(
            self.count,
            (self.sum / self.count).cpu(),
            eigenvectors=self.vectors.cpu(),
            eigenvalues=values.cpu(),
            residual=residual.cpu(),
        )


@dataclass
class _Seen:
    """One input tensor of the current forward, and which groups/layers consumed it."""

    ref: weakref.ref
    version: int
    consumers: dict[str, set[str]] = field(default_factory=dict)  # group -> layers


class StatisticsRecorder:
    """Records input statistics of every nn.Linear under `model` while it runs forward passes.

    Use as a context manager around the calibration forwards, then call `statistics()`:

        with StatisticsRecorder(model) as recorder:
            for batch in batches:
                model(batch)
        recorder.statistics(model="my-model").save("stats.safetensors")

    `max_tokens` caps the tokens accumulated per input (the calibration sample budget);
    `share_inputs=False` gives every layer its own accumulator.
    """

    def __init__(
        self,
        model: nn.Module,
        max_full_dim: int = DEFAULT_MAX_FULL_DIM,
        summary_rank: int = DEFAULT_SUMMARY_RANK,
        max_tokens: int | None = None,
        share_inputs: bool = True,
    ):
        if max_full_dim < 0 or summary_rank < 1 or (max_tokens is not None and max_tokens < 1):
            raise ValueError("max_full_dim must be >= 0, summary_rank >= 1 and max_tokens >= 1 (or None)")
        self.model = model
        self.max_full_dim = max_full_dim
        self.summary_rank = summary_rank
        self.max_tokens = max_tokens
        self.share_inputs = share_inputs
        self.forward_calls = 0
        self._accumulators: dict[str, _FullMoment | _LowRankMoment] = {}
        self._group_of: dict[str, str] = {}
        self._layer_tokens: dict[str, int] = defaultdict(int)
        self._group_tokens: dict[str, int] = defaultdict(int)
        self._seen: dict[int, _Seen] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> "StatisticsRecorder":
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._new_forward))
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        if len(self._handles) == 1:
            log.warning("no nn.Linear layer under %s: nothing will be recorded", type(self.model).__name__)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def __enter__(self) -> "StatisticsRecorder":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the accumulators (what grows with the model, not with the data)."""
        return sum(acc.memory_bytes for acc in self._accumulators.values())

    def _new_forward(self, module: nn.Module, args: tuple) -> None:
        self.forward_calls += 1
        self._seen.clear()  # sharing is judged within one forward

    def _hook(self, layer: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and x.numel():
                with torch.no_grad(), torch.inference_mode(False):  # accumulators stay normal tensors
                    self._record(layer, x)

        return hook

    def _seen_entry(self, x: torch.Tensor) -> _Seen:
        key = id(x)
        version = -1 if x.is_inference() else x._version  # inference tensors have no version counter
        entry = self._seen.get(key)
        if entry is None or entry.ref() is not x or entry.version != version:
            entry = _Seen(weakref.ref(x, lambda _, seen=self._seen, key=key: seen.pop(key, None)), version)
            self._seen[key] = entry
        return entry

    def _record(self, layer: str, x: torch.Tensor) -> None:
        entry = self._seen_entry(x)
        group = self._group_of.get(layer)
        if group is None:
            shared = next(iter(entry.consumers), None) if self.share_inputs else None
            group = shared if shared is not None else layer
            self._group_of[layer] = group
            if shared is None:
                dim = x.shape[-1]
                self._accumulators[group] = (
                    _FullMoment(dim, x.device)
                    if dim <= self.max_full_dim
                    else _LowRankMoment(dim, min(self.summary_rank, dim), x.device)
                )
        tokens = x.numel() // x.shape[-1]
        self._layer_tokens[layer] += tokens
        consumers = entry.consumers.setdefault(group, set())
        if consumers and layer not in consumers:
            consumers.add(layer)  # a sibling already accumulated this very tensor
            return
        consumers.add(layer)
        self._group_tokens[group] += tokens
        acc = self._accumulators[group]
        take = tokens if self.max_tokens is None else min(tokens, self.max_tokens - acc.count)
        if take > 0:
            acc.add(x.detach().reshape(-1, x.shape[-1])[:take].to(torch.float64, copy=True))

    def statistics(self, model: str = "", extra: Mapping[str, str] | None = None) -> "CalibrationStatistics":
        """The recorded statistics; raises if layers grouped as sharing an input saw different data."""
        for layer, group in self._group_of.items():
            if self._layer_tokens[layer] != self._group_tokens[group]:
                raise QuantError(
                    f"layer '{layer}' shared its input with '{group}' in one forward but not in another "
                    f"({self._layer_tokens[layer]} vs {self._group_tokens[group]} tokens); "
                    "record with StatisticsRecorder(..., share_inputs=False)"
                )
        inputs = {group: acc.finish() for group, acc in self._accumulators.items() if acc.count}
        layers = {layer: group for layer, group in self._group_of.items() if group in inputs}
        settings = {"max_full_dim": self.max_full_dim, "summary_rank": self.summary_rank, "max_tokens": self.max_tokens}
        return CalibrationStatistics(layers, inputs, model, self.forward_calls, settings, dict(extra or {}))


@dataclass
class CalibrationStatistics:
    """Statistics of a model's Linear inputs: layer name -> input id -> InputStatistics."""

    layers: dict[str, str]  # layer name -> id of its (possibly shared) input
    inputs: Mapping[str, InputStatistics]
    model: str = ""
    forward_calls: int = 0
    settings: dict[str, object] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the file it was loaded from, for messages

    def for_layer(self, layer: str) -> InputStatistics:
        return self.inputs[self.layers[layer]]

    @property
    def memory_bytes(self) -> int:
        return sum(stats.memory_bytes for stats in self.inputs.values())

    @property
    def tokens(self) -> int:
        """Tokens behind the statistics (the largest per-input count: inputs capped alike agree)."""
        return max((tokens for _, tokens in self.described().values()), default=0)

    def described(self) -> dict[str, tuple[int, int]]:
        """Input id -> (width, tokens), without reading a stored file's tensors."""
        if isinstance(self.inputs, _StoredInputs):
            return self.inputs.described
        return {group: (stats.dim, stats.count) for group, stats in self.inputs.items()}

    def dim_of(self, layer: str) -> int:
        return self.described()[self.layers[layer]][0]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"{group}.{name}": t.contiguous() for group, stats in self.inputs.items() for name, t in stats.tensors().items()}
        described = {group: {"dim": stats.dim, "tokens": stats.count, "full": stats.is_full} for group, stats in self.inputs.items()}
        metadata = {
            **self.extra,
            META_FORMAT: FORMAT_NAME,
            META_FORMAT_VERSION: FORMAT_VERSION,
            META_MODEL: self.model,
            META_FORWARD_CALLS: str(self.forward_calls),
            META_LAYERS: json.dumps(self.layers, sort_keys=True),
            META_INPUTS: json.dumps(described, sort_keys=True),
            META_SETTINGS: json.dumps(self.settings, sort_keys=True),
        }
        return write_state_dict(tensors, path, metadata)  # atomic: complete or absent

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStatistics":
        """Open a statistics file; tensors are read per input on first use, so memory stays small."""
        path = Path(path)
        if not path.is_file():
            raise QuantError(f"{path}: statistics file not found")
        with open_safetensors(path, remedy="record the statistics again") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
        if meta.get(META_FORMAT) != FORMAT_NAME:
            raise QuantError(
                f"{path}: not a calibration statistics file (no '{META_FORMAT}' metadata); "
                "record one with quant_core.calibration.StatisticsRecorder"
            )
        if meta.get(META_FORMAT_VERSION) != FORMAT_VERSION:
            raise QuantError(f"{path}: statistics format version {meta.get(META_FORMAT_VERSION)} is not supported (expected {FORMAT_VERSION}); record it again")
        try:
            layers = json.loads(meta[META_LAYERS])
            described = {group: (int(d["dim"]), int(d["tokens"])) for group, d in json.loads(meta[META_INPUTS]).items()}
            settings = json.loads(meta.get(META_SETTINGS, "{}"))
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantError(f"{path}: statistics metadata is damaged ({exc}); record it again") from None
        missing = [g for g in described if f"{g}.mean" not in keys] + [g for g in layers.values() if g not in described]
        if missing:
            raise QuantError(f"{path}: statistics for input '{missing[0]}' are missing; record it again")
        own = (META_FORMAT, META_FORMAT_VERSION, META_MODEL, META_FORWARD_CALLS, META_LAYERS, META_INPUTS, META_SETTINGS)
        return cls(
            layers,
            _StoredInputs(path, described, keys),
            meta.get(META_MODEL, ""),
            int(meta.get(META_FORWARD_CALLS, "0")),
            settings,
            {k: v for k, v in meta.items() if k not in own},
            str(path),
        )


class _StoredInputs(Mapping[str, InputStatistics]):
    """Input statistics read from a file on access, one input at a time."""

    def __init__(self, path: Path, described: Mapping[str, tuple[int, int]], keys: set[str]):
        self.path = path
        self.described = dict(described)
        self.keys = keys

    def __getitem__(self, group: str) -> InputStatistics:
        dim, tokens = self.described[group]
        with open_safetensors(self.path, remedy="record the statistics again") as f:
            tensors = {name: f.get_tensor(f"{group}.{name}") for name in _TENSOR_NAMES if f"{group}.{name}" in self.keys}
        try:
            stats = InputStatistics(tokens, **tensors)
        except ValueError as exc:
            raise QuantError(f"{self.path}: statistics of input '{group}' are damaged ({exc}); record them again") from None
        if stats.dim != dim:
            raise QuantError(f"{self.path}: statistics of input '{group}' have width {stats.dim}, metadata says {dim}; record them again")
        return stats

    def __iter__(self) -> Iterator[str]:
        return iter(self.described)

    def __len__(self) -> int:
        return len(self.described)


def match_weight_keys(layer_names: Iterable[str], weight_keys: Iterable[str]) -> dict[str, str]:
    """Map weight keys of a file ('<name>.weight') onto recorded layer names, by dotted suffix.

    The recorder may have run on a wrapper (layer '0.auto_model.encoder...', file 'encoder...') or
    the file may carry a prefix the module tree lacks ('model.diffusion_model.'): a key matches a
    layer when one name, split at dots, ends with the other. Among several matches the longest
    wins; ties, and layers claimed by more than one key, stay unmatched (logged, never guessed).
    """
    by_last: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for layer in layer_names:
        parts = layer.split(".")
        by_last[parts[-1]].append((layer, parts))
    chosen: dict[str, str] = {}
    for key in weight_keys:
        if not key.endswith(WEIGHT_SUFFIX):
            continue
        parts = key[: -len(WEIGHT_SUFFIX)].split(".")
        fits = [(min(len(parts), len(lp)), layer) for layer, lp in by_last[parts[-1]] if _suffix_match(parts, lp)]
        if not fits:
            continue
        fits.sort(reverse=True)
        if len(fits) > 1 and fits[0][0] == fits[1][0]:
            log.warning("weight '%s' fits recorded layers '%s' and '%s' equally; no statistics used", key, fits[0][1], fits[1][1])
            continue
        chosen[key] = fits[0][1]
    claims: dict[str, list[str]] = defaultdict(list)
    for key, layer in chosen.items():
        claims[layer].append(key)
    for layer, keys in claims.items():
        if len(keys) > 1:
            log.warning("recorded layer '%s' fits %d weights (e.g. '%s'); no statistics used for them", layer, len(keys), keys[0])
            for key in keys:
                del chosen[key]
    return chosen


def statistics_for_weights(stats: CalibrationStatistics, weights: Mapping[str, Sequence[int]], model: str) -> dict[str, str]:
    """Weight key -> recorded layer for the 2-D weights of `model` (name -> shape), checked.

    A statistics file that matches no weight, or whose input width differs from a matched
    weight's, was recorded on another model: that is an error, not a silent data-free fallback.
    Weights without a match (embeddings, convolutions) are simply absent from the result.
    """
    matched = match_weight_keys(stats.layers, weights)
    if not matched:
        example = next(iter(stats.layers), "")
        raise QuantError(
            f"{stats.source}: none of its {len(stats.layers)} recorded layers (e.g. '{example}') matches a weight "
            f"of {model}; record statistics on this model"
        )
    for key, layer in matched.items():
        width = weights[key][1]
        if stats.dim_of(layer) != width:
            raise QuantError(
                f"{stats.source}: layer '{layer}' was recorded with {stats.dim_of(layer)} input features but "
                f"'{key}' in {model} has {width}; record statistics on this model"
            )
    return matched


def _suffix_match(a: list[str], b: list[str]) -> bool:
    n = min(len(a), len(b))
    return a[len(a) - n :] == b[len(b) - n :]

