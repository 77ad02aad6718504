"""The rounding-method interface, the streamed view of a weight it works on, and round-to-nearest.

A rounding method takes a `ScaledWeight` (a 2-D weight already divided by its exact power-of-two
scale, readable in row chunks on the compute device), the settings' values and, for methods that
use data, the statistics of the layer's input, and returns its float16 values. Methods only choose
among float16 values; scaling, I/O and error measurement are shared. `quant_core.methods` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .fp16 import round_to_fp16, work_dtype_for

if TYPE_CHECKING:
    from .calibration import InputStatistics

CHUNK_ELEMENTS = 1 << 20  # per-chunk working set stays in the tens of MB whatever the tensor size


def abs_max(source: torch.Tensor, on_chunk: Callable[[], None] | None = None) -> float:
    """Largest magnitude of a (possibly memory-mapped) tensor, NaN if any element is NaN."""
    flat = source.reshape(-1)
    result = 0.0
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        if on_chunk is not None:
            on_chunk()
        low, high = torch.aminmax(flat[start : start + CHUNK_ELEMENTS])
        chunk_max = max(-float(low), float(high))
        if math.isnan(float(low)) or math.isnan(float(high)):
            return math.nan
        result = max(result, chunk_max)
    return result


class ScaledWeight:
    """A 2-D weight divided by 2**exponent, read lazily in row chunks in its work dtype."""

    def __init__(
        self,
        source: torch.Tensor,
        exponent: int,
        device: torch.device,
        on_chunk: Callable[[], None] | None = None,
    ):
        if source.ndim != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(source.shape)}")
        self.source = source
        self.exponent = exponent
        self.device = device
        self.shape: tuple[int, int] = (source.shape[0], source.shape[1])
        self.work_dtype = work_dtype_for(source.dtype)
        self.rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, self.shape[1]))
        self._factor = math.ldexp(1.0, -exponent)
        self._on_chunk = on_chunk

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def chunks(self, rows_per_chunk: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (row slice, scaled rows) covering the whole weight; scaling by 2**-e is exact."""
        step = rows_per_chunk or self.rows_per_chunk
        for start in range(0, self.shape[0], step):
            if self._on_chunk is not None:
                self._on_chunk()
            rows = slice(start, min(start + step, self.shape[0]))
            x = self.source[rows].to(self.device).to(self.work_dtype)
            yield rows, x * self._factor  # out of place: never write into the mapped source

    def submatrix(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The scaled elements at the crossing of the given row and column indices."""
        x = self.source[rows.cpu()][:, cols.cpu()].to(self.device).to(self.work_dtype)
        return x * self._factor


@dataclass
class ErrorStats:
    """Streaming error statistics of a rounding, in scaled units (ratios are scale-free)."""

    numel: int = 0
    exact: int = 0
    error_sq: float = 0.0
    reference_sq: float = 0.0
    max_abs_error: float = 0.0

    def add(self, x: torch.Tensor, q: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        e = (x - q.to(x.dtype)).reshape(-1)  # exact: x and q are float16 neighbours
        flat_x = x.reshape(-1)
        self.numel += e.numel()
        self.exact += e.numel() - int(torch.count_nonzero(e))
        self.error_sq += float(torch.dot(e, e))  # per-chunk dot products, summed in float64
        self.reference_sq += float(torch.dot(flat_x, flat_x))
        low, high = torch.aminmax(e)
        self.max_abs_error = max(self.max_abs_error, -float(low), float(high))

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / self.reference_sq) if self.reference_sq > 0 else 0.0

    @property
    def exact_fraction(self) -> float:
        return self.exact / self.numel if self.numel else 1.0


# Setting name -> value, every setting declared in quant_core.methods (its `rounding_settings` fills defaults).
RoundingSettings = Mapping[str, int]


@dataclass
class RoundingOutcome:
    q: torch.Tensor  # float16, on the CPU, shape of the weight
    stats: ErrorStats
    iterations: int = 0
    details: dict[str, float] = field(default_factory=dict)
    # round-to-nearest's squared error (scaled units), which every method measures on its way (`nearest_pass`),
    # so the report shows what the method bought; None: these values are round-to-nearest's (`stats` says it)
    nearest_error_sq: float | None = None


# (weight, settings, statistics of the layer's input or None) -> float16 values; data-free methods ignore statistics.
RoundingMethod = Callable[[ScaledWeight, RoundingSettings, "InputStatistics | None"], RoundingOutcome]


def nearest_pass(
    weight: ScaledWeight, each_chunk: Callable[[slice, torch.Tensor, torch.Tensor], None] | None = None
) -> tuple[torch.Tensor, ErrorStats]:
    """Round-to-nearest (ties to even) in one streamed pass: (float16 values on the CPU, their error statistics).

    `each_chunk(rows, x, nearest)` sees every scaled chunk and its rounding on the weight's device too,
    so a method that needs a pass of its own over the weight (the learned search's sketch, calibrated
    rounding's choice of rows) shares this one instead of reading it twice.
    """
    q = torch.empty(weight.shape, dtype=torch.float16)
    stats = ErrorStats()
    for rows, x in weight.chunks():
        qc = round_to_fp16(x)
        stats.add(x, qc)
        q[rows] = qc.cpu()
        if each_chunk is not None:
            each_chunk(rows, x, qc)
    return q, stats


def round_nearest(
    weight: ScaledWeight, settings: RoundingSettings, statistics: InputStatistics | None = None
) -> RoundingOutcome:
    """Scaled round-to-nearest: the fast baseline, one pass."""
    return RoundingOutcome(*nearest_pass(weight))
