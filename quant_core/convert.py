"""Convert one safetensors file to scaled_fp16, streaming: one tensor in memory at a time."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import __version__
from .calibration import CalibrationStatistics, statistics_for_weights
from .errors import QuantError
from .format import OUTPUT_FORMATS, SCALED, already_scaled_reason, build_metadata
from .methods import DEFAULT, Method, resolve, rounding_settings
from .peak_memory import available_memory_bytes, peak_rss_bytes
from .plan import (
    Action,
    Choice,
    Fate,
    Selection,
    ValueScan,
    choose,
    nothing_to_quantize,
    plan_layout,
    select_prefix,
    unsupported_precision,
    values_read,
)
from .produce import Job, Produced, scale_exponent
from .report import ConversionReport, LayerReport, report_path_for
from .safetensors_io import SafetensorsFile, StreamingWriter, TensorEntry, file_size, require_input_file
from .staging import free_bytes, human_bytes

log = logging.getLogger(__name__)

TOOL_NAME = f"learned-rounding-fp16 {__version__}"


@dataclass(frozen=True)
class ConvertOptions:
    method: str = DEFAULT  # a name in quant_core.methods.METHODS, or "auto"
    rounding: Mapping[str, int] = field(default_factory=dict)  # setting -> value (quant_core.methods); defaults else
    t5xxl: bool = False
    keep_distillation: bool = False
    exclude: tuple[str, ...] = ()
    prefix: str = ""  # convert only tensors under this name prefix, and strip it (a checkpoint's component)
    device: str = "auto"
    overwrite: bool = False
    prescan: bool | None = None  # find every scale before writing; None: when the weights fit in available memory
    format: str = SCALED  # quant_core.format.OUTPUT_FORMATS: scaled_fp16, or plain float16 any loader reads

    def settings(self, method: Method, statistics: CalibrationStatistics | None) -> dict[str, object]:
        """What determines the output's values (recorded in the file's metadata); `method` as resolved."""
        return {
            "format": self.format,
            "method": method.name,
            **rounding_settings(**self.rounding),
            "t5xxl": self.t5xxl,
            "keep_distillation": self.keep_distillation,
            "exclude": list(self.exclude),
            "prefix": self.prefix,
            "calib": Path(statistics.source).name if statistics is not None and statistics.source else None,
        }


class ProgressListener(Protocol):
    """Hears of a conversion's two phases: the value checks before anything is written, then each tensor."""

    def checking_values(self, name: str, done_bytes: int, total_bytes: int) -> None:
        """Tensor `name`'s values are about to be checked (NaN, infinity, scale, exact casts): `done_bytes` of
        `total_bytes` checked so far. Not called when nothing needs checking; the phase ends at the first
        `tensor_started`."""

    def tensor_started(self, name: str, index: int, total: int) -> None: ...

    def tensor_finished(self, name: str, index: int, total: int, layer: LayerReport | None) -> None: ...


def is_supported_device(name: str) -> bool:
    """auto, cpu, cuda or cuda:N: the float64 parts of the work (exact scales, near ties) need CUDA or the CPU."""
    return name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name) is not None


def resolve_device(name: str) -> torch.device:
    """The compute device for `--device`; QuantError, before any work, for a device the converter cannot use."""
    if not is_supported_device(name):
        raise QuantError(
            f"--device {name}: not supported; the converter runs on CUDA or the CPU (its float64 parts need one of "
            "them): use auto, cpu, cuda or cuda:N. The converted file loads on any device."
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QuantError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 ..."
            )
    return device


def default_output_path(input_path: str | Path, keep_distillation: bool = False, output_format: str = SCALED) -> Path:
    """The original script's naming: <base>_float16_scaled_learned[_nodistill]_svd.safetensors (plain: no _scaled)."""
    input_path = Path(input_path)
    base = input_path.with_suffix("") if input_path.suffix else input_path
    distill = "_nodistill" if keep_distillation else ""
    scaled = "_scaled" if output_format == SCALED else ""
    return base.with_name(f"{base.name}_float16{scaled}_learned{distill}_svd.safetensors")


def output_path_for(
    input_path: str | Path, output: str | Path | None, keep_distillation: bool = False, output_format: str = SCALED
) -> Path:
    """Where the output goes: `output` as a file name; the default name inside it when it is an existing folder or
    (as a string) ends with a path separator; the default name beside the input when it is None."""
    default = default_output_path(input_path, keep_distillation, output_format)
    if not output:
        return default
    text = os.fspath(output)
    if text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)) or Path(text).is_dir():
        return Path(text) / default.name
    return Path(text)


def _check_paths(input_path: Path, output_path: Path, overwrite: bool) -> None:
    require_input_file(input_path)
    if output_path.resolve() == input_path.resolve() or (output_path.exists() and output_path.samefile(input_path)):
        raise QuantError(f"{output_path}: the output would replace the input; choose another --output")
    if output_path.exists() and not overwrite:
        raise QuantError(f"{output_path}: output already exists; pass --overwrite to replace it")
    if output_path.is_dir():
        raise QuantError(f"{output_path}: output is a directory; give a file name")


def _check_free_space(folder: Path, needed: int) -> None:
    """QuantError before the work if the output (its size is known once the layout is) cannot fit where it goes."""
    try:
        free = free_bytes(folder)
    except OSError:
        return  # cannot be told here; writing reports a full disk if it comes to that
    if free < needed:
        raise QuantError(
            f"{folder}: not enough free space for the output: {human_bytes(needed)} ({needed:,} bytes) needed, "
            f"{human_bytes(free)} ({free:,} bytes) free; free some space there or write the output elsewhere"
        )


def _match_statistics(stats: CalibrationStatistics, src: SafetensorsFile, choices: list[Choice]) -> dict[str, str]:
    """Weight -> recorded layer for the weights to quantize (QuantError if the statistics do not fit the file)."""
    weights = {choice.name: choice.entry.shape for choice in choices if choice.action is Action.QUANTIZE}
    matched = statistics_for_weights(stats, weights, str(src.path))
    if len(matched) < len(weights):
        log.info(
            "%d of %d weights have no statistics (embeddings, convolutions ...)",
            len(weights) - len(matched),
            len(weights),
        )
    return matched


def _scan_up_front(weights: list[TensorEntry], prescan: bool | None) -> bool:
    """Whether each weight's scale is found before any output is written.

    The pass up front reports a NaN, an infinity or an unscalable value before an hour of work, and
    costs little while the rounding pass that follows finds the weights in the page cache. When they
    do not fit in available memory it would read the file from disk twice, so by default each scale
    is then found right before its weight is rounded (from the same pages): a bad value stops the
    conversion when it is reached, and the output is still never written.
    """
    if prescan is not None:
        return prescan
    available = available_memory_bytes()
    if available is None or sum(entry.nbytes for entry in weights) <= available * 3 // 4:
        return True
    log.info("the weights exceed available memory: each scale is checked when its weight is reached")
    return False


def _scale_exponents(
    src: SafetensorsFile, weights: list[TensorEntry], scan: ValueScan, check_cancelled: Callable[[], None]
) -> dict[str, int]:
    """Each weight's scale exponent, found before any output is written (QuantError for a bad value)."""
    exponents = {}
    for entry in weights:
        scan.reading(entry.name)
        exponents[entry.name] = scale_exponent(src, entry.name, check_cancelled)
    return exponents


def _no_check() -> None:
    return None


def _write(writer: StreamingWriter, produced: Produced | None) -> LayerReport | None:
    """Write what a producer made (then let it go: one tensor's data in memory at a time)."""
    if produced is None:
        return None
    for name, data in produced.tensors.items():
        writer.write(name, data)
    return produced.layer


def convert_file(
    input_path: str | Path,
    output_path: str | Path | None = None,
    options: ConvertOptions = ConvertOptions(),
    *,
    statistics: CalibrationStatistics | None = None,
    listener: ProgressListener | None = None,
    check_cancelled: Callable[[], None] = _no_check,
    report_json: bool = True,
) -> ConversionReport:
    """Convert `input_path` to a scaled_fp16 (or, with `options.format` plain, a plain float16) file; returns
    the report.

    `output_path`: a file, or a folder for the default name (`output_path_for`); the report's `output`
    says where it went. `statistics` (quant_core.calibration: recorded in memory, or
    `load_statistics(path)`) enable calibrated rounding and bias correction for the weights they
    match. `listener` hears of the progress (`ProgressListener`). `check_cancelled` is called
    between chunks of work and may raise to stop; the output is then never created. The report is
    also written as JSON beside the output unless `report_json` is False (ComfyUI's save node writes
    it beside the saved file instead). Raises QuantError for problems with the input, settings or
    output location.
    """
    started = time.perf_counter()
    device = resolve_device(options.device)
    input_path = Path(input_path)
    if options.format not in OUTPUT_FORMATS:
        raise QuantError(f"format '{options.format}': choose one of {', '.join(OUTPUT_FORMATS)}")
    output_path = output_path_for(input_path, output_path, options.keep_distillation, options.format)
    method = resolve(options.method, statistics is not None)
    settings = rounding_settings(**options.rounding)
    _check_paths(input_path, output_path, options.overwrite)
    report = ConversionReport(str(input_path), str(output_path), options.settings(method, statistics))

    with SafetensorsFile(input_path) as src:
        reason = already_scaled_reason(src.entries)
        if reason:
            raise QuantError(f"{input_path}: already a scaled model ({reason}); convert the original weights instead")
        src.entries = select_prefix(src.entries, options.prefix, str(input_path))  # reads go by these names
        choices = choose(src.entries.values(), Selection(options.t5xxl, options.keep_distillation, options.exclude))
        quantized = [choice.entry for choice in choices if choice.action is Action.QUANTIZE]
        if not quantized:
            raise nothing_to_quantize(str(input_path), choices)
        unsupported = unsupported_precision(choices)
        if unsupported:
            log.warning(
                "%d tensors in a precision this converter does not read (float8) are copied unchanged, e.g. '%s'",
                len(unsupported),
                unsupported[0],
            )
        calibrated = _match_statistics(statistics, src, choices) if statistics is not None else {}
        if statistics is not None:
            report.settings.update(
                calib_model=statistics.model, calib_tokens=statistics.tokens, calib_layers=len(calibrated)
            )
        scaled = quantized if options.format == SCALED else []  # their scales: found up front, or each when reached
        prescan = _scan_up_front(scaled, options.prescan)
        scan = ValueScan(
            values_read(choices, options.format) + (scaled if prescan else []),
            listener.checking_values if listener is not None else None,
            check_cancelled,
        )
        layout = plan_layout(src, choices, options.t5xxl, calibrated, options.format, scan)
        if not any(plan.fate is Fate.QUANTIZED for plan in layout.plans):  # plain format: none it can hold
            not_plain = [plan.name for plan in layout.plans if plan.fate is Fate.NOT_PLAIN]
            raise nothing_to_quantize(str(input_path), choices, not_plain)
        settings_recorded = {**report.settings, "source": input_path.name}
        metadata = build_metadata(src.metadata, TOOL_NAME, settings_recorded, layout.scaled_weights, options.format)
        _check_free_space(output_path.parent, file_size(layout.tensors, metadata))
        exponents = _scale_exponents(src, scaled, scan, check_cancelled) if prescan else {}
        job = Job(src, device, method, settings, statistics, calibrated, exponents, check_cancelled)
        total = len(layout.plans)
        with StreamingWriter(output_path, layout.tensors, metadata, options.overwrite) as writer:
            for index, plan in enumerate(layout.plans):
                check_cancelled()
                if listener is not None:
                    listener.tensor_started(plan.name, index, total)
                # not kept in a variable: the previous tensor's data is freed before the next one is made
                layer = _write(writer, plan.producer.produce(job, plan.entry) if plan.producer is not None else None)
                report.record(plan.name, plan.fate, plan.reason, layer)
                if listener is not None:
                    listener.tensor_finished(plan.name, index, total, layer)
            for producer in layout.file_producers:
                _write(writer, producer.produce(job, None))
            writer.commit()

    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    if report_json:
        report.write_json(report_path_for(output_path))
    log.info("converted %s -> %s in %.1f s", input_path, output_path, report.seconds)
    return report
