"""Convert one safetensors file to scaled_fp16, streaming: one tensor in memory at a time."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Protocol

import torch

from . import __version__
from .calibrated import bias_shift, calibrated_rounding, updown_rounding
from .calibration import CalibrationStatistics, statistics_for_weights
from .errors import QuantError
from .format import (
    MARKER_KEY,
    SCALE_DTYPE,
    already_scaled_reason,
    build_metadata,
    layer_name,
    marker_shape,
    scale_input_key,
    scale_weight_key,
)
from .fp16 import choose_scale_exponent, exact_fp16_cast
from .learned import learned_rounding
from .plan import Action, Selection, TensorPlan, plan_tensors, select_prefix
from .report import ConversionReport, LayerReport, peak_rss_bytes, report_path_for
from .rounding import CHUNK_ELEMENTS, RoundingMethod, RoundingSettings, ScaledWeight, abs_max, round_nearest
from .safetensors_io import DTYPE_NAMES, OutputTensor, SafetensorsFile, StreamingWriter, tensor_nbytes

log = logging.getLogger(__name__)

TOOL_NAME = f"learned-rounding-fp16 {__version__}"
METHODS: dict[str, RoundingMethod] = {
    "learned": learned_rounding,
    "rtn": round_nearest,
    "calibrated": calibrated_rounding,
    "updown": updown_rounding,
}
DEFAULT_METHOD = "learned"
CALIBRATED_METHOD = "calibrated"  # the default when statistics are given
NEEDS_STATISTICS = frozenset({"calibrated", "updown"})  # weights without statistics use DEFAULT_METHOD


@dataclass(frozen=True)
class ConvertOptions:
    method: str = DEFAULT_METHOD
    num_iter: int = 256
    top_k: int = 1
    calib_samples: int = 3072
    t5xxl: bool = False
    keep_distillation: bool = False
    exclude: tuple[str, ...] = ()
    prefix: str = ""  # convert only tensors under this name prefix, and strip it (a checkpoint's component)
    calib: str | None = None  # statistics file (quant_core.calibration) for calibrated rounding and bias correction
    device: str = "auto"
    overwrite: bool = False
    seed: int = 0
    prescan: bool | None = None  # find every scale before writing; None: when the weights fit in available memory

    def settings(self) -> dict[str, object]:
        """What determines the output's values (recorded in the file's metadata)."""
        recorded = asdict(self)
        for not_recorded in ("device", "overwrite", "prescan"):
            recorded.pop(not_recorded)
        recorded["exclude"] = list(self.exclude)
        recorded["calib"] = Path(self.calib).name if self.calib else None
        return recorded


class ProgressListener(Protocol):
    def tensor_started(self, name: str, index: int, total: int) -> None: ...

    def tensor_finished(self, name: str, index: int, total: int, layer: LayerReport | None) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QuantError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise QuantError(f"--device {name}: not a device name; use auto, cpu or cuda") from None


def default_output_path(input_path: str | Path, keep_distillation: bool = False) -> Path:
    """The original script's naming: <base>_float16_scaled_learned[_nodistill]_svd.safetensors."""
    input_path = Path(input_path)
    base = input_path.with_suffix("") if input_path.suffix else input_path
    distill = "_nodistill" if keep_distillation else ""
    return base.with_name(f"{base.name}_float16_scaled_learned{distill}_svd.safetensors")


def _check_paths(input_path: Path, output_path: Path, overwrite: bool) -> None:
    if not input_path.is_file():
        raise QuantError(f"{input_path}: input file not found")
    if output_path.resolve() == input_path.resolve() or (output_path.exists() and output_path.samefile(input_path)):
        raise QuantError(f"{output_path}: the output would replace the input; choose another --output")
    if output_path.exists() and not overwrite:
        raise QuantError(f"{output_path}: output already exists; pass --overwrite to replace it")
    if output_path.is_dir():
        raise QuantError(f"{output_path}: output is a directory; give a file name")


def _casts_exactly(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    return all(exact_fp16_cast(flat[i : i + CHUNK_ELEMENTS]) for i in range(0, flat.numel(), CHUNK_ELEMENTS))


@dataclass
class _Layout:
    """The output file's declared tensors and what each source tensor becomes."""

    tensors: list[OutputTensor] = field(default_factory=list)
    cast: set[str] = field(default_factory=set)
    corrected_biases: dict[str, str] = field(default_factory=dict)  # bias -> its weight; keeps source dtype

    def declare(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.tensors.append(OutputTensor(name, dtype, shape, tensor_nbytes(dtype, shape)))


def _plan_layout(src: SafetensorsFile, plans: list[TensorPlan], t5xxl: bool, calibrated: Collection[str] = ()) -> _Layout:
    """`calibrated`: quantized weights with input statistics, whose biases get corrected."""
    layout = _Layout(corrected_biases=_biases_to_correct(src, plans, calibrated))
    scale = DTYPE_NAMES[SCALE_DTYPE]
    for plan in plans:
        entry = plan.entry
        if entry.name in layout.corrected_biases:
            layout.declare(entry.name, entry.dtype, entry.shape)
        elif plan.action is Action.QUANTIZE:
            layout.declare(entry.name, "F16", entry.shape)
            layout.declare(scale_weight_key(entry.name), scale, (1,))
            if t5xxl:
                layout.declare(scale_input_key(entry.name), scale, (1,))
        elif plan.action is Action.CAST_IF_EXACT and entry.dtype != "F16" and _casts_exactly(src.tensor(entry.name)):
            layout.cast.add(entry.name)
            layout.declare(entry.name, "F16", entry.shape)
        elif plan.action is not Action.DROP:
            layout.tensors.append(OutputTensor(entry.name, entry.dtype, entry.shape, entry.nbytes))
            if plan.unit_scale:
                layout.declare(scale_weight_key(entry.name), scale, (1,))
    layout.declare(MARKER_KEY, "F16", marker_shape(t5xxl))
    names = [t.name for t in layout.tensors]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise QuantError(f"{src.path}: the output would hold two tensors named '{clash}'; rename or --exclude it")
    return layout


def _biases_to_correct(src: SafetensorsFile, plans: list[TensorPlan], calibrated: Collection[str]) -> dict[str, str]:
    """Float biases (kept or cast, not dropped or excluded) of the weights in `calibrated`, with matching length."""
    planned = {plan.name: plan for plan in plans}
    biases = {}
    for weight in calibrated:
        plan = planned.get(layer_name(weight) + ".bias")
        if (
            plan is not None
            and plan.action is not Action.DROP
            and not plan.excluded
            and plan.entry.torch_dtype is not None
            and plan.entry.torch_dtype.is_floating_point
            and plan.entry.shape == (src.entries[weight].shape[0],)
        ):
            biases[plan.name] = weight
    return biases


def _corrected_bias(src: SafetensorsFile, name: str, weight: ScaledWeight, q: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """b + (W - W_q) E[x], in the bias's own dtype: zero mean output error on the calibration inputs."""
    bias = src.tensor(name)
    return (bias.to(torch.float64) + bias_shift(weight, q, mean)).to(bias.dtype)


def _load_statistics(path: str, src: SafetensorsFile, plans: list[TensorPlan]) -> tuple[CalibrationStatistics, dict[str, str]]:
    """The statistics file and weight -> recorded layer for the weights to quantize (QuantError if it does not fit)."""
    stats = CalibrationStatistics.load(path)
    weights = {plan.name: plan.entry.shape for plan in plans if plan.action is Action.QUANTIZE}
    matched = statistics_for_weights(stats, weights, str(src.path))
    if len(matched) < len(weights):
        log.info("%d of %d weights have no statistics (embeddings, convolutions ...)", len(weights) - len(matched), len(weights))
    return stats, matched


def _scale_exponent(src: SafetensorsFile, name: str, check_cancelled: Callable[[], None]) -> int:
    try:
        return choose_scale_exponent(abs_max(src.tensor(name), check_cancelled))
    except ValueError as exc:
        raise QuantError(
            f"{src.path}: tensor '{name}' cannot be scaled to float16 ({exc}); "
            f"fix the source or keep it unquantized with --exclude '^{re.escape(name)}$'"
        ) from None


def _scale_exponents(src: SafetensorsFile, plans: list[TensorPlan], check_cancelled: Callable[[], None], prescan: bool | None) -> dict[str, int]:
    """Each quantized weight's scale exponent, found before any output is written; {} to find each when it is reached.

    The pass up front reports a NaN, an infinity or an unscalable value before an hour of work, and
    costs little while the rounding pass that follows finds the weights in the page cache. When they
    do not fit in available memory it would read the file from disk twice, so by default each scale
    is then found right before its weight is rounded (from the same pages): a bad value stops the
    conversion when it is reached, and the output is still never written.
    """
    weights = [plan for plan in plans if plan.action is Action.QUANTIZE]
    if prescan is None:
        available = available_memory_bytes()
        prescan = available is None or sum(plan.entry.nbytes for plan in weights) <= available * 3 // 4
        if not prescan:
            log.info("the weights exceed available memory: each scale is checked when its weight is reached")
    return {plan.name: _scale_exponent(src, plan.name, check_cancelled) for plan in weights} if prescan else {}


def available_memory_bytes() -> int | None:
    """MemAvailable (what the page cache can hold without swapping), None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _quantize(
    src: SafetensorsFile, name: str, weight: ScaledWeight, method_name: str, settings: RoundingSettings
) -> tuple[torch.Tensor, torch.Tensor, LayerReport]:
    started = time.perf_counter()
    if weight.statistics is None and method_name in NEEDS_STATISTICS:
        method_name = DEFAULT_METHOD  # no recorded inputs for this weight: the data-free method
    outcome = METHODS[method_name](weight, settings)
    scale = torch.tensor([2.0**weight.exponent], dtype=SCALE_DTYPE)
    stats = outcome.stats
    layer = LayerReport(
        name=name,
        shape=list(weight.shape),
        source_dtype=src.entries[name].dtype,
        method=method_name,
        scale=float(scale),
        relative_error=stats.relative_error,
        max_abs_error=stats.max_abs_error * float(scale),
        exact_fraction=stats.exact_fraction,
        iterations=outcome.iterations,
        seconds=time.perf_counter() - started,
        error_sq=stats.error_sq * float(scale) ** 2,
        reference_sq=stats.reference_sq * float(scale) ** 2,
        details=outcome.details,
    )
    return outcome.q, scale, layer


def _kept_reason(plan: TensorPlan) -> str:
    if plan.action is not Action.CAST_IF_EXACT:
        return plan.reason
    if plan.entry.dtype == "F16":
        return f"{plan.reason}; already float16"
    return f"{plan.reason}; float16 would not be exact, source precision kept"


def _no_check() -> None:
    return None


def convert_file(
    input_path: str | Path,
    output_path: str | Path | None = None,
    options: ConvertOptions = ConvertOptions(),
    listener: ProgressListener | None = None,
    check_cancelled: Callable[[], None] = _no_check,
) -> ConversionReport:
    """Convert `input_path` to a scaled_fp16 file; returns the report (also written as JSON).

    `check_cancelled` is called between chunks of work and may raise to stop; the output is then
    never created. Raises QuantError for problems with the input, settings or output location.
    """
    started = time.perf_counter()
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path else default_output_path(input_path, options.keep_distillation)
    if options.method not in METHODS:
        raise QuantError(f"unknown method '{options.method}'; choose one of {', '.join(METHODS)}")
    if options.method in NEEDS_STATISTICS and not options.calib:
        raise QuantError(f"method '{options.method}' needs input statistics: pass --calib FILE (see quant_core.calibration)")
    _check_paths(input_path, output_path, options.overwrite)
    device = resolve_device(options.device)
    settings = RoundingSettings(num_iter=options.num_iter, top_k=options.top_k, seed=options.seed)
    report = ConversionReport(str(input_path), str(output_path), options.settings())

    with SafetensorsFile(input_path) as src:
        reason = already_scaled_reason(src.entries)
        if reason:
            raise QuantError(f"{input_path}: already a scaled model ({reason}); convert the original weights instead")
        src.entries = select_prefix(src.entries, options.prefix, str(input_path))  # reads go by these names
        selection = Selection(options.t5xxl, options.keep_distillation, options.exclude)
        plans = plan_tensors(src.entries.values(), selection)
        calib, calibrated = _load_statistics(options.calib, src, plans) if options.calib else (None, {})
        if calib is not None:
            report.settings.update(calib_model=calib.model, calib_tokens=calib.tokens, calib_layers=len(calibrated))
        layout = _plan_layout(src, plans, options.t5xxl, calibrated)
        exponents = _scale_exponents(src, plans, check_cancelled, options.prescan)
        metadata = build_metadata(src.metadata, TOOL_NAME, {**report.settings, "source": input_path.name})
        with StreamingWriter(output_path, layout.tensors, metadata, options.overwrite) as writer:
            for index, plan in enumerate(plans):
                check_cancelled()
                if listener is not None:
                    listener.tensor_started(plan.name, index, len(plans))
                layer = None
                if plan.name in layout.corrected_biases:
                    report.kept[plan.name] = "bias corrected with the calibration mean, source precision kept"
                elif plan.action is Action.QUANTIZE:
                    stats = calib.for_layer(calibrated[plan.name]) if plan.name in calibrated else None
                    exponent = exponents.get(plan.name)
                    if exponent is None:
                        exponent = _scale_exponent(src, plan.name, check_cancelled)
                    weight = ScaledWeight(src.tensor(plan.name), exponent, device, check_cancelled, stats)
                    q, scale, layer = _quantize(src, plan.name, weight, options.method, settings)
                    writer.write(plan.name, q)
                    bias = layer_name(plan.name) + ".bias"
                    if bias in layout.corrected_biases:  # written here, whichever comes first in the file
                        writer.write(bias, _corrected_bias(src, bias, weight, q, stats.mean))
                    writer.write(scale_weight_key(plan.name), scale)
                    if options.t5xxl:
                        writer.write(scale_input_key(plan.name), scale)
                    report.layers.append(layer)
                    del q
                elif plan.action is Action.DROP:
                    report.dropped.append(plan.name)
                elif plan.name in layout.cast:
                    writer.write(plan.name, src.tensor(plan.name).to(torch.float16))
                    report.cast_to_fp16.append(plan.name)
                else:
                    writer.write(plan.name, src.raw_bytes(plan.name))
                    if plan.unit_scale:
                        writer.write(scale_weight_key(plan.name), torch.ones(1, dtype=SCALE_DTYPE))
                    report.kept[plan.name] = _kept_reason(plan)
                if listener is not None:
                    listener.tensor_finished(plan.name, index, len(plans), layer)
            writer.write(MARKER_KEY, torch.zeros(marker_shape(options.t5xxl), dtype=torch.float16))
            writer.commit()

    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    report.write_json(report_path_for(output_path))
    log.info("converted %s -> %s in %.1f s", input_path, output_path, report.seconds)
    return report
