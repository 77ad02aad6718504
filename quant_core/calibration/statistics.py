"""What calibrated rounding knows about a model: the mean and second moment of each Linear layer's input.

A layer's output error for inputs x is E x with E = W - Q, so its mean square over the inputs is
tr(E H E^T) with H = E[x x^T]: the second moment is all calibrated rounding needs, plus the mean
E[x] for bias correction. An input of width n keeps either the full n x n moment or a rank-k eigen
summary plus the exact diagonal, H ~= V diag(lam) V^T + diag(residual).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
            self.input_sizes = {group: (stats.dim, stats.count) for group, stats in self.inputs.items()}

    def for_layer(self, layer: str) -> InputStatistics:
        return self.inputs[self.layers[layer]]

    @property
    def memory_bytes(self) -> int:
        return sum(stats.memory_bytes for stats in self.inputs.values())

    @property
    def tokens(self) -> int:
        """Tokens behind the statistics (the largest per-input count: inputs capped alike agree)."""
        return max((tokens for _, tokens in self.input_sizes.values()), default=0)

    def dim_of(self, layer: str) -> int:
        return self.input_sizes[self.layers[layer]][0]
