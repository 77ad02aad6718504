"""What flows between the pack's nodes: every socket type of the pack, and the small handles they carry.

A 24 GB model must not pass through a graph as tensors held in RAM; the nodes hand each other a
path (and the conversion report) and stream from it. A calibration (CALIBRATION) is the
`quant_core.calibration.CalibrationStatistics` itself: recorded in memory, or read lazily from a file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant_core.report import ConversionReport

CATEGORY = "quantization/scaled_fp16"
SOURCE_TYPE = "QUANT_SOURCE"
SCALED_TYPE = "SCALED_FP16"
CALIBRATION_TYPE = "CALIBRATION"


@dataclass(frozen=True)
class QuantSource:
    """A safetensors file (or one component of it) chosen for conversion."""

    path: str
    name: str  # as listed in the node, e.g. "checkpoints/sd15.safetensors"
    component: str
    prefix: str  # tensor-name prefix of the component, stripped in the output ("" = everything)
    tensors: int


@dataclass(frozen=True)
class ScaledFP16File:
    """A finished conversion in ComfyUI's temp folder, waiting to be saved."""

    path: str
    source: QuantSource
    report: ConversionReport
