"""LearnedRoundingFP16: run the converter inside a graph, streaming into ComfyUI's temp folder."""

from __future__ import annotations

import logging
from typing import Any

from ..quant_core import ConvertOptions, convert_file
from ..quant_core.calibration import CalibrationStatistics
from ..quant_core.convert import is_supported_device
from ..quant_core.format import OUTPUT_FORMATS, SCALED
from ..quant_core.methods import AUTO, DEFAULT, METHODS, SETTINGS, WITH_STATISTICS
from ..quant_core.report import ConversionReport
from .handles import CALIBRATION_TYPE, CATEGORY, SCALED_TYPE, SOURCE_TYPE, QuantSource, ScaledFP16File
from .paths import temp_output_path
from .progress import NodeProgress, layer_summary

log = logging.getLogger(__name__)


def exclude_patterns(text: str) -> tuple[str, ...]:
    """One regular expression per line; blank lines ignored."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def report_payload(report: ConversionReport) -> dict[str, Any]:
    """What the node's front end draws: totals, summary lines, and per-layer error / exactness."""
    return {
        "summary": report.summary(),
        "lines": report.summary_lines()[1:],  # without the temporary output path
        "layers": [layer_summary(layer) for layer in report.layers],
    }


def setting_inputs() -> dict[str, tuple[str, dict[str, Any]]]:
    """One INT widget per rounding setting offered in the node, as declared in quant_core.methods."""
    return {
        s.name: ("INT", {"default": s.default, "min": s.minimum, "max": s.maximum, "tooltip": s.help})
        for s in SETTINGS
        if s.is_widget
    }


def compute_device() -> str:
    """The device ComfyUI runs models on (honours --cpu and the selected GPU), or the CPU where the converter
    cannot run (mps, xpu, DirectML ...: its float64 parts need CUDA or the CPU)."""
    import comfy.model_management

    device = str(comfy.model_management.get_torch_device())
    if is_supported_device(device):
        return device
    log.info(
        "ComfyUI runs on %s; the conversion runs on the CPU (it needs CUDA or the CPU), the result loads on %s",
        device,
        device,
    )
    return "cpu"


class LearnedRoundingFP16:
    """Converts the source to scaled (or plain) FP16 with live progress; cancelling leaves no file behind."""

    DESCRIPTION = (
        "FP16 conversion with learned rounding, streamed tensor by tensor. format scaled (a power-of-two scale "
        "per weight) needs Scaled FP16 Loader: ComfyUI's UNETLoader/CLIPLoader ignore the scales and give "
        "garbage. format plain loads with any loader."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (SCALED_TYPE, "STRING")
    RETURN_NAMES = ("scaled_model", "report")
    OUTPUT_TOOLTIPS = ("The converted file (temporary until saved).", "The conversion summary.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "source": (SOURCE_TYPE,),
                "method": (
                    [AUTO, *METHODS],
                    {
                        "default": AUTO,
                        "tooltip": f"{AUTO}: {WITH_STATISTICS} with a calibration connected, else {DEFAULT}; "
                        + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()),
                    },
                ),
                **setting_inputs(),
                "t5xxl": ("BOOLEAN", {"default": False, "tooltip": "Drop the decoder, keep norms/biases/embeddings"}),
                "keep_distillation": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Keep Flux distillation layers as they are"},
                ),
                "exclude": (
                    "STRING",
                    {"default": "", "multiline": True, "tooltip": "Regexes, one per line: kept unquantized"},
                ),
                "format": (
                    list(OUTPUT_FORMATS),
                    {
                        "default": SCALED,
                        "tooltip": "scaled: float16 + a scale per weight, load with Scaled FP16 Loader; plain: "
                        "ordinary float16 that ComfyUI's own loaders read (weights it cannot hold stay as they are)",
                    },
                ),
            },
            "optional": {
                "calibration": (
                    CALIBRATION_TYPE,
                    {"tooltip": "Recorded activations (Calibrate nodes): calibrated rounding and bias correction"},
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def quantize(
        self,
        source: QuantSource,
        method: str,
        num_iter: int,
        top_k: int,
        t5xxl: bool,
        keep_distillation: bool,
        exclude: str,
        format: str = SCALED,
        calibration: CalibrationStatistics | None = None,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        import comfy.model_management

        options = ConvertOptions(
            method=method,
            rounding={"num_iter": num_iter, "top_k": top_k},
            t5xxl=t5xxl,
            keep_distillation=keep_distillation,
            exclude=exclude_patterns(exclude),
            prefix=source.prefix,
            device=compute_device(),
            format=format,
        )
        output = temp_output_path(source.name)
        report = convert_file(
            source.path,
            output,
            options,
            statistics=calibration,  # in memory, or read lazily from the file LoadCalibrationFP16 opened
            listener=NodeProgress(unique_id),
            check_cancelled=comfy.model_management.throw_exception_if_processing_interrupted,
            report_json=False,  # SaveScaledFP16 writes it beside the saved file
        )
        handle = ScaledFP16File(str(output), source, report)
        return {"ui": {"quant_report": [report_payload(report)]}, "result": (handle, "\n".join(report.summary_lines()))}
