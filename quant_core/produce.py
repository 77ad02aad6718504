"""Producers: what writes each tensor of the output file. The one place to add a kind of output tensor.

The plan (`quant_core.plan`) gives every source tensor a producer, which declares the output tensors
it writes (`outputs`, known before any work so the file's header is fixed up front) and makes them
(`produce`). The converter only runs the producers: a new output format or kind of tensor is a new
producer here, chosen by the plan.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .calibrated import bias_shift
from .calibration import CalibrationStatistics, InputStatistics
from .errors import QuantError
from .format import MARKER_KEY, SCALE_DTYPE, marker_shape, scale_input_key, scale_weight_key
from .fp16 import choose_scale_exponent
from .methods import Method, for_weight
from .report import LayerReport
from .rounding import RoundingSettings, ScaledWeight, abs_max
from .safetensors_io import DTYPE_NAMES, OutputTensor, SafetensorsFile, TensorEntry, tensor_nbytes

_SCALE = DTYPE_NAMES[SCALE_DTYPE]
_FLOAT16 = DTYPE_NAMES[torch.float16]


def scale_exponent(src: SafetensorsFile, name: str, check_cancelled: Callable[[], None] | None) -> int:
    """The power-of-two exponent that puts the weight's largest magnitude at <= 65504; QuantError if none can."""
    try:
        return choose_scale_exponent(abs_max(src.tensor(name), check_cancelled))
    except ValueError as exc:
        raise QuantError(
            f"{src.path}: tensor '{name}' cannot be scaled to float16 ({exc}); "
            f"fix the source or keep it unquantized with --exclude '^{re.escape(name)}$'"
        ) from None


def declared(name: str, dtype: str, shape: tuple[int, ...]) -> OutputTensor:
    return OutputTensor(name, dtype, shape, tensor_nbytes(dtype, shape))


def as_stored(entry: TensorEntry) -> OutputTensor:
    """An output tensor with the source tensor's own name, dtype and shape."""
    return OutputTensor(entry.name, entry.dtype, entry.shape, entry.nbytes)


@dataclass
class Job:
    """What producers share during one conversion."""

    src: SafetensorsFile
    device: torch.device
    method: Method
    settings: RoundingSettings
    statistics: CalibrationStatistics | None = None
    recorded_layers: Mapping[str, str] = field(default_factory=dict)  # weight -> recorded layer in `statistics`
    exponents: Mapping[str, int] = field(default_factory=dict)  # weight -> its scale's exponent
    check_cancelled: Callable[[], None] | None = None

    def exponent(self, weight: str) -> int:
        """The weight's scale exponent: found up front, or now (from the pages the rounding reads next)."""
        found = self.exponents.get(weight)
        return found if found is not None else scale_exponent(self.src, weight, self.check_cancelled)

    def input_statistics(self, weight: str) -> InputStatistics | None:
        layer = self.recorded_layers.get(weight)
        return None if layer is None or self.statistics is None else self.statistics.for_layer(layer)


@dataclass
class Produced:
    tensors: dict[str, torch.Tensor | memoryview]  # output name -> its data (a CPU tensor or raw bytes)
    layer: LayerReport | None = None  # for a rounded weight


class Producer(Protocol):
    def outputs(self, entry: TensorEntry | None) -> tuple[OutputTensor, ...]: ...

    def produce(self, job: Job, entry: TensorEntry | None) -> Produced: ...


class Copy:
    """The source bytes unchanged."""

    def outputs(self, entry: TensorEntry) -> tuple[OutputTensor, ...]:
        return (as_stored(entry),)

    def produce(self, job: Job, entry: TensorEntry) -> Produced:
        return Produced({entry.name: job.src.raw_bytes(entry.name)})


class CastToFloat16:
    """A float tensor as float16 (the plan chose it because that cast is exact and finite)."""

    def outputs(self, entry: TensorEntry) -> tuple[OutputTensor, ...]:
        return (declared(entry.name, _FLOAT16, entry.shape),)

    def produce(self, job: Job, entry: TensorEntry) -> Produced:
        return Produced({entry.name: job.src.tensor(entry.name).to(torch.float16)})


class CopyWithUnitScale:
    """A weight kept in its source precision that still carries `scale_weight` 1 (--keep_distillation)."""

    def outputs(self, entry: TensorEntry) -> tuple[OutputTensor, ...]:
        return as_stored(entry), declared(scale_weight_key(entry.name), _SCALE, (1,))

    def produce(self, job: Job, entry: TensorEntry) -> Produced:
        return Produced(
            {entry.name: job.src.raw_bytes(entry.name), scale_weight_key(entry.name): torch.ones(1, dtype=SCALE_DTYPE)}
        )


@dataclass(frozen=True)
class ScaledFloat16:
    """A weight rounded to float16 at its exact power-of-two scale, with `scale_weight` (and `scale_input`).

    `bias`: the layer's bias, corrected here with the statistics' mean (the correction needs this
    weight's rounding, whichever of the two comes first in the file).
    """

    scale_input: bool = False
    bias: TensorEntry | None = None

    def outputs(self, entry: TensorEntry) -> tuple[OutputTensor, ...]:
        declared_outputs = [*_rounded_outputs(entry, self.bias), declared(scale_weight_key(entry.name), _SCALE, (1,))]
        if self.scale_input:
            declared_outputs.append(declared(scale_input_key(entry.name), _SCALE, (1,)))
        return tuple(declared_outputs)

    def produce(self, job: Job, entry: TensorEntry) -> Produced:
        produced = _rounded(job, entry, job.exponent(entry.name), self.bias)
        scale = torch.tensor([produced.layer.scale], dtype=SCALE_DTYPE)
        produced.tensors[scale_weight_key(entry.name)] = scale
        if self.scale_input:
            produced.tensors[scale_input_key(entry.name)] = scale
        return produced


@dataclass(frozen=True)
class PlainFloat16:
    """A weight rounded to plain float16 in real units: the float16 grid itself (scale 1, subnormals included).

    The plan chooses it only for weights plain float16 holds faithfully (`quant_core.plan`). `bias`: as
    for ScaledFloat16.
    """

    bias: TensorEntry | None = None

    def outputs(self, entry: TensorEntry) -> tuple[OutputTensor, ...]:
        return _rounded_outputs(entry, self.bias)

    def produce(self, job: Job, entry: TensorEntry) -> Produced:
        return _rounded(job, entry, 0, self.bias)


@dataclass(frozen=True)
class Marker:
    """The `scaled_fp16` marker tensor that tells loaders what the file is."""

    t5xxl: bool = False

    def outputs(self, entry: None = None) -> tuple[OutputTensor, ...]:
        return (declared(MARKER_KEY, _FLOAT16, marker_shape(self.t5xxl)),)

    def produce(self, job: Job, entry: None = None) -> Produced:
        return Produced({MARKER_KEY: torch.zeros(marker_shape(self.t5xxl), dtype=torch.float16)})


def _rounded_outputs(entry: TensorEntry, bias: TensorEntry | None) -> tuple[OutputTensor, ...]:
    """The float16 weight, and its corrected bias in the bias's source dtype."""
    return (declared(entry.name, _FLOAT16, entry.shape), *([as_stored(bias)] if bias is not None else []))


def _rounded(job: Job, entry: TensorEntry, exponent: int, bias: TensorEntry | None) -> Produced:
    """The weight's float16 values at scale 2**exponent by the job's method (data-free where it has no
    statistics), its corrected bias, and its report."""
    started = time.perf_counter()
    statistics = job.input_statistics(entry.name)
    weight = ScaledWeight(job.src.tensor(entry.name), exponent, job.device, job.check_cancelled)
    method = for_weight(job.method, statistics is not None)
    outcome = method.round(weight, job.settings, statistics)
    scale = 2.0**exponent
    stats = outcome.stats
    nearest_error_sq = stats.error_sq if outcome.nearest_error_sq is None else outcome.nearest_error_sq
    tensors: dict[str, torch.Tensor | memoryview] = {entry.name: outcome.q}
    if bias is not None:
        tensors[bias.name] = _corrected_bias(job.src, bias.name, weight, outcome.q, statistics.mean)
    layer = LayerReport(
        name=entry.name,
        shape=list(weight.shape),
        source_dtype=entry.dtype,
        method=method.name,
        scale=scale,
        relative_error=stats.relative_error,
        max_abs_error=stats.max_abs_error * scale,
        exact_fraction=stats.exact_fraction,
        iterations=outcome.iterations,
        seconds=time.perf_counter() - started,
        error_sq=stats.error_sq * scale**2,
        reference_sq=stats.reference_sq * scale**2,
        nearest_error_sq=nearest_error_sq * scale**2,
        uses_statistics=method.needs_statistics,
        details=outcome.details,
    )
    return Produced(tensors, layer)


def _corrected_bias(
    src: SafetensorsFile, name: str, weight: ScaledWeight, q: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """b + (W - W_q) E[x], in the bias's own dtype: zero mean output error on the calibration inputs."""
    bias = src.tensor(name)
    return (bias.to(torch.float64) + bias_shift(weight, q, mean)).to(bias.dtype)
