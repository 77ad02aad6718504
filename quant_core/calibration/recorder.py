"""Recording input statistics: forward hooks on every nn.Linear of a torch model.

The recorder accumulates, streaming and in float64, the token count, the mean and the second moment
of each *distinct* layer input: layers that read the same tensor object in one forward (q/k/v
projections) share one accumulator, and the result records who shares with whom. Convolutions are
not recorded.

Memory is bounded by `max_full_dim`: an input of width n <= max_full_dim keeps the full n x n
moment; a wider one keeps a rank-k eigen summary plus the exact diagonal, where the residual puts
the energy the truncation dropped back on the diagonal (so the approximation is exact on the
diagonal). The summary is updated per batch like incremental PCA: merge the batch into the current
top-k (thin QR + small eigenproblem) and truncate. That is exact while the inputs span at most k
dimensions; beyond, the dropped tail of earlier merges is lost from the off-diagonal part.

Tokens are the rows of the input reshaped to (-1, n): pad tokens count like any other, so record
without padding (a batch of one, or sequences of equal length).

Every input is recorded in `folds` (default 2) disjoint parts of the data, so that the converter can
judge a rounding on data it was not computed from (quant_core.held_out). Forward calls alternate
between folds unless the driver knows better and says so with `assign_folds` (the ComfyUI node puts
each conditioning, i.e. each prompt and the negative, in one fold: what must generalize is the text).
The folds are what is kept; an input's whole statistics are their merge, made when asked for.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import QuantError
from .statistics import CalibrationStatistics, FoldedInputs, InputStatistics

log = logging.getLogger(__name__)

DEFAULT_MAX_FULL_DIM = 2048
DEFAULT_SUMMARY_RANK = 256
DEFAULT_FOLDS = 2
_F64 = 8  # bytes per float64


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
        return InputStatistics(
            self.count, (self.sum / self.count).cpu(), second_moment=(self.moment / self.count).cpu()
        )


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
        save_statistics(recorder.statistics(model="my-model"), "stats.safetensors")

    `max_tokens` caps the tokens accumulated per input (the calibration sample budget);
    `share_inputs=False` gives every layer its own accumulator; `folds` is the number of disjoint parts
    the data is kept in (forward calls alternate between them unless `assign_folds` says otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        max_full_dim: int = DEFAULT_MAX_FULL_DIM,
        summary_rank: int = DEFAULT_SUMMARY_RANK,
        max_tokens: int | None = None,
        share_inputs: bool = True,
        folds: int = DEFAULT_FOLDS,
    ):
        if max_full_dim < 0 or summary_rank < 1 or folds < 1 or (max_tokens is not None and max_tokens < 1):
            raise ValueError("max_full_dim must be >= 0, summary_rank >= 1, folds >= 1 and max_tokens >= 1 (or None)")
        self.model = model
        self.max_full_dim = max_full_dim
        self.summary_rank = summary_rank
        self.max_tokens = max_tokens
        self.share_inputs = share_inputs
        self.folds = folds
        self.forward_calls = 0
        self._assigned: Sequence[int] | int | None = None
        self._accumulators: dict[str, list[_FullMoment | _LowRankMoment | None]] = {}  # input -> one per fold
        self._group_of: dict[str, str] = {}
        self._layer_tokens: dict[str, int] = defaultdict(int)
        self._group_tokens: dict[str, int] = defaultdict(int)
        self._seen: dict[int, _Seen] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> StatisticsRecorder:
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

    def __enter__(self) -> StatisticsRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the accumulators (what grows with the model, not with the data)."""
        return sum(acc.memory_bytes for accs in self._accumulators.values() for acc in accs if acc is not None)

    def assign_folds(self, folds: Sequence[int] | int | None) -> None:
        """The fold of the following forwards' data: one fold, one per row of the leading (batch) dimension,
        or None for the default (forward calls alternate). An input whose leading dimension does not match
        the per-row list goes whole to its first row's fold."""
        if folds is not None:
            values = [folds] if isinstance(folds, int) else list(folds)
            if not values or any(not 0 <= fold < self.folds for fold in values):
                raise ValueError(f"folds must be in 0..{self.folds - 1}, got {folds}")
        self._assigned = folds

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
                self._accumulators[group] = [None] * self.folds
        tokens = x.numel() // x.shape[-1]
        self._layer_tokens[layer] += tokens
        consumers = entry.consumers.setdefault(group, set())
        if consumers and layer not in consumers:
            consumers.add(layer)  # a sibling already accumulated this very tensor
            return
        consumers.add(layer)
        self._group_tokens[group] += tokens
        batch = x if x.ndim > 1 else x[None]
        for fold, rows in self._rows_per_fold(batch.shape[0]):
            part = batch[rows].detach().reshape(-1, x.shape[-1])
            recorded = sum(acc.count for acc in self._accumulators[group] if acc is not None)
            take = part.shape[0] if self.max_tokens is None else min(part.shape[0], self.max_tokens - recorded)
            if take > 0:
                self._accumulator(group, fold, x).add(part[:take].to(torch.float64, copy=True))

    def _rows_per_fold(self, leading: int) -> list[tuple[int, slice | list[int]]]:
        """(fold, rows of the leading dimension) of the current forward's input."""
        assigned = self._assigned
        if assigned is None:
            return [((self.forward_calls - 1) % self.folds, slice(None))]
        if isinstance(assigned, int):
            return [(assigned, slice(None))]
        if len(assigned) != leading:
            return [(assigned[0], slice(None))]
        rows: dict[int, list[int]] = defaultdict(list)
        for row, fold in enumerate(assigned):
            rows[fold].append(row)
        return [(fold, slice(None) if len(r) == leading else r) for fold, r in rows.items()]

    def _accumulator(self, group: str, fold: int, x: torch.Tensor) -> _FullMoment | _LowRankMoment:
        accs = self._accumulators[group]
        if accs[fold] is None:
            dim = x.shape[-1]
            accs[fold] = (
                _FullMoment(dim, x.device)
                if dim <= self.max_full_dim
                else _LowRankMoment(dim, min(self.summary_rank, dim), x.device)
            )
        return accs[fold]

    def statistics(self, model: str = "", extra: Mapping[str, str] | None = None) -> CalibrationStatistics:
        """The recorded statistics; raises if layers grouped as sharing an input saw different data."""
        for layer, group in self._group_of.items():
            if self._layer_tokens[layer] != self._group_tokens[group]:
                raise QuantError(
                    f"layer '{layer}' shared its input with '{group}' in one forward but not in another "
                    f"({self._layer_tokens[layer]} vs {self._group_tokens[group]} tokens); "
                    "record with StatisticsRecorder(..., share_inputs=False)"
                )
        folds = {}
        for group, accs in self._accumulators.items():
            parts = [acc.finish() for acc in accs if acc is not None and acc.count]
            if parts:
                folds[group] = parts
        layers = {layer: group for layer, group in self._group_of.items() if group in folds}
        settings = {
            "max_full_dim": self.max_full_dim,
            "summary_rank": self.summary_rank,
            "max_tokens": self.max_tokens,
            "folds": self.folds,
        }
        inputs = FoldedInputs(folds, self.summary_rank)
        return CalibrationStatistics(layers, inputs, model, self.forward_calls, settings, dict(extra or {}))
