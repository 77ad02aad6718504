"""What calibrated rounding knows about a model: the mean and second moment of each Linear layer's input.

A layer's output error for inputs x is E x with E = W - Q, so its mean square over the inputs is
tr(E H E^T) with H = E[x x^T]: the second moment is all calibrated rounding needs, plus the mean
E[x] for bias correction. An input of width n keeps either the full n x n moment or a rank-k eigen
summary plus the exact diagonal, H ~= V diag(lam) V^T + diag(residual).

An input's statistics may come in *folds*: disjoint parts of the recorded data (e.g. one per prompt),
so that a rounding computed from some of them can be judged on another it never saw
(quant_core.held_out). What is kept is the folds; the whole is their merge, made when it is asked for
(`FoldedInputs`) and dropped after use, so holding folds costs no more than the folds themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

TENSOR_NAMES = ("mean", "second_moment", "eigenvectors", "eigenvalues", "residual")  # InputStatistics' tensors


@dataclass
class InputStatistics:
    """Mean and second moment of one distinct layer input (full, or eigen summary + diagonal)."""

    count: int
    mean: torch.Tensor  # [n] float64, E[x]
    second_moment: torch.Tensor | None = None  # [n, n] float64, E[x x^T]
    eigenvectors: torch.Tensor | None = None  # [n, k], orthonormal columns
    eigenvalues: torch.Tensor | None = None  # [k]
    residual: torch.Tensor | None = None  # [n], diag(H) - diag(V lam V^T), >= 0
    folds: tuple[InputStatistics, ...] = ()  # the disjoint parts of the data these statistics merge (or none)

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
        return {name: getattr(self, name) for name in TENSOR_NAMES if getattr(self, name) is not None}

    @property
    def rank(self) -> int | None:
        """The summary's rank (None for a full moment)."""
        return None if self.eigenvalues is None else self.eigenvalues.shape[0]

    @property
    def memory_bytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.tensors().values())
        return own + sum(fold.memory_bytes for fold in self.folds)

    def diagonal(self) -> torch.Tensor:
        """diag(H), float64."""
        if self.second_moment is not None:
            return self.second_moment.diagonal().to(torch.float64)
        v, lam = self.eigenvectors.to(torch.float64), self.eigenvalues.to(torch.float64)
        return self.residual.to(torch.float64) + (v * v) @ lam

    def shrunk(self, alpha: float) -> InputStatistics:
        """H moved toward its diagonal, (1 - alpha) H + alpha diag(H), in the same form (a summary stays a summary:
        (1 - alpha) V diag(lam) V^T + diag((1 - alpha) r + alpha diag(H))); mean and count kept, folds not.

        alpha = 1 leaves only the diagonal, with which error feedback has nothing to move: round-to-nearest.
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {alpha}")
        if alpha == 0.0:
            return replace(self, folds=())
        if self.second_moment is not None:
            h = self.second_moment.to(torch.float64, copy=True)
            diagonal = h.diagonal().clone()
            h.mul_(1.0 - alpha).diagonal().copy_(diagonal)
            return InputStatistics(self.count, self.mean, second_moment=h)
        residual = (1.0 - alpha) * self.residual.to(torch.float64) + alpha * self.diagonal()
        return InputStatistics(
            self.count,
            self.mean,
            eigenvectors=self.eigenvectors,
            eigenvalues=(1.0 - alpha) * self.eigenvalues.to(torch.float64),
            residual=residual,
        )

    def hessian(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """H = E[x x^T] as a dense float64 matrix on `device` (reconstructed from a summary)."""
        if self.second_moment is not None:
            return self.second_moment.to(device=device, dtype=torch.float64)
        v = self.eigenvectors.to(device=device, dtype=torch.float64)
        h = (v * self.eigenvalues.to(device=device, dtype=torch.float64)) @ v.T
        h.diagonal().add_(self.residual.to(device=device, dtype=torch.float64))
        return h


def merge_statistics(parts: Sequence[InputStatistics], rank: int | None = None) -> InputStatistics:
    """The statistics of all the parts' tokens together (token-weighted), with the parts as its folds.

    Full moments merge exactly; eigen summaries like one more step of the recorder's incremental PCA
    (the parts' factors stacked, truncated to `rank`, by default the widest part's), with the exact
    diagonal kept. A single part is returned as it is.
    """
    parts = [part for part in parts if part.count]
    if not parts:
        raise ValueError("no statistics to merge")
    if len(parts) == 1:
        return parts[0]
    count = sum(part.count for part in parts)
    weights = [part.count / count for part in parts]
    mean = sum(w * part.mean.to(torch.float64) for w, part in zip(weights, parts, strict=True))
    if all(part.is_full for part in parts):
        moment = sum(w * part.second_moment.to(torch.float64) for w, part in zip(weights, parts, strict=True))
        return InputStatistics(count, mean, second_moment=moment, folds=tuple(parts))
    if any(part.is_full for part in parts):
        raise ValueError("cannot merge full second moments with eigen summaries")
    rank = min(rank or max(part.rank for part in parts), parts[0].dim)
    factor = torch.cat(
        [
            part.eigenvectors.to(torch.float64) * (w * part.eigenvalues.to(torch.float64)).sqrt()
            for w, part in zip(weights, parts, strict=True)
        ],
        dim=1,
    )
    basis, r = torch.linalg.qr(factor)
    values, vectors = torch.linalg.eigh(r @ r.T)
    top = torch.argsort(values, descending=True)[:rank]
    values, vectors = values[top].clamp_min(0), basis @ vectors[:, top]
    diagonal = sum(w * part.diagonal() for w, part in zip(weights, parts, strict=True))
    residual = (diagonal - (vectors**2) @ values).clamp_min(0)
    return InputStatistics(count, mean, eigenvectors=vectors, eigenvalues=values, residual=residual, folds=tuple(parts))


class FoldedInputs(Mapping[str, InputStatistics]):
    """Each input held as what is stored of it, its folds (or its whole when it has none); the whole
    statistics of an input with folds are their merge, made on access and not kept."""

    def __init__(self, stored: Mapping[str, Sequence[InputStatistics]], rank: int | None = None):
        self._stored = {group: tuple(parts) for group, parts in stored.items()}
        self.rank = rank  # of merged summaries (the recorder's summary_rank)

    def stored(self, group: str) -> tuple[InputStatistics, ...]:
        return self._stored[group]

    def __getitem__(self, group: str) -> InputStatistics:
        return merge_statistics(self.stored(group), self.rank)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


@dataclass
class CalibrationStatistics:
    """Statistics of a model's Linear inputs: layer name -> input id -> InputStatistics.

    `inputs` may be read lazily (a statistics file is read one input at a time on access), so what
    is needed without the tensors, each input's width and token count, is kept in `input_sizes`.
    """

    layers: dict[str, str]  # layer name -> id of its (possibly shared) input
    inputs: Mapping[str, InputStatistics]
    model: str = ""
    forward_calls: int = 0
    settings: dict[str, object] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the file it was loaded from ("" when recorded in memory), for messages and metadata
    input_sizes: dict[str, tuple[int, int]] | None = None  # input id -> (width, tokens); from `inputs` if None

    def __post_init__(self) -> None:
        if self.input_sizes is None:
            self.input_sizes = {}
            for group in self.inputs:
                parts = self.stored(group)
                self.input_sizes[group] = (parts[0].dim, sum(part.count for part in parts))

    def for_layer(self, layer: str) -> InputStatistics:
        return self.inputs[self.layers[layer]]

    def stored(self, group: str) -> tuple[InputStatistics, ...]:
        """What is kept of an input: its folds, or its whole statistics when it has none (never a merge)."""
        if isinstance(self.inputs, FoldedInputs):
            return self.inputs.stored(group)
        stats = self.inputs[group]
        return stats.folds or (stats,)

    @property
    def memory_bytes(self) -> int:
        """Bytes of what is held (for `FoldedInputs`, the folds: their merges are made per use)."""
        if isinstance(self.inputs, FoldedInputs):
            return sum(part.memory_bytes for group in self.inputs for part in self.stored(group))
        return sum(stats.memory_bytes for stats in self.inputs.values())

    @property
    def tokens(self) -> int:
        """Tokens behind the statistics (the largest per-input count: inputs capped alike agree)."""
        return max((tokens for _, tokens in self.input_sizes.values()), default=0)

    def dim_of(self, layer: str) -> int:
        return self.input_sizes[self.layers[layer]][0]
