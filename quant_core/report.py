"""What a conversion did, per tensor and in total: written beside the output as JSON."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .staging import write_atomically

# A layer's detail set by the `calibrated` method when it rounded without its held-out check (statistics
# without folds): counted in one summary line rather than warned about once per layer.
UNCHECKED = "held_out_unchecked"


@dataclass
class LayerReport:
    """One quantized weight."""

    name: str
    shape: list[int]
    source_dtype: str
    method: str
    scale: float
    relative_error: float
    max_abs_error: float
    exact_fraction: float
    iterations: int
    seconds: float
    error_sq: float = 0.0
    reference_sq: float = 0.0
    nearest_error_sq: float = 0.0  # round-to-nearest's, for comparison (real units, like error_sq)
    uses_statistics: bool = False  # rounded on input statistics: details["objective_ratio"] is the calibration
    # objective (output error on the recorded inputs) relative to round-to-nearest's
    details: dict[str, float] = field(default_factory=dict)


@dataclass
class ConversionReport:
    input: str
    output: str
    settings: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # tensor -> why it was not quantized
    not_plain: dict[str, str] = field(default_factory=dict)  # weight -> why plain float16 cannot hold it (plain format)
    cast_to_fp16: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def record(self, name: str, fate: str, reason: str, layer: LayerReport | None = None) -> None:
        """One source tensor, by its fate (quant_core.plan.Fate: quantized, cast, kept, dropped)."""
        if fate == "quantized":
            self.layers.append(layer)
        elif fate == "cast":
            self.cast_to_fp16.append(name)
        elif fate == "dropped":
            self.dropped.append(name)
        elif fate == "kept_in_source_precision":
            self.not_plain[name] = reason
        else:
            self.kept[name] = reason

    @property
    def quantized_elements(self) -> int:
        return sum(math.prod(layer.shape) for layer in self.layers)

    @property
    def exact_fraction(self) -> float:
        total = self.quantized_elements
        exact = sum(layer.exact_fraction * math.prod(layer.shape) for layer in self.layers)
        return exact / total if total else 1.0

    @property
    def relative_error(self) -> float:
        """Overall ||W - deq(Q)|| / ||W|| over all quantized weights."""
        error = sum(layer.error_sq for layer in self.layers)
        reference = sum(layer.reference_sq for layer in self.layers)
        return math.sqrt(error / reference) if reference > 0 else 0.0

    @property
    def nearest_relative_error(self) -> float:
        """What round-to-nearest's overall relative error would have been on the same weights."""
        error = sum(layer.nearest_error_sq for layer in self.layers)
        reference = sum(layer.reference_sq for layer in self.layers)
        return math.sqrt(error / reference) if reference > 0 else 0.0

    @property
    def objective_ratios(self) -> list[float]:
        """Per layer rounded on input statistics: its calibration objective relative to round-to-nearest's."""
        return [layer.details["objective_ratio"] for layer in self.layers if layer.uses_statistics]

    @property
    def objective_ratio(self) -> float | None:
        """The geometric mean of `objective_ratios` (None without such layers): layers' objectives are on
        scales of their own, their ratios are not, and a mean of logarithms weighs a halving and a doubling alike."""
        ratios = self.objective_ratios
        if not ratios:
            return None
        if min(ratios) <= 0:
            return 0.0
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    @property
    def unchecked_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.details.get(UNCHECKED))

    @property
    def method_counts(self) -> dict[str, int]:
        """How many weights each rounding method handled (calibrated runs fall back per weight)."""
        return dict(sorted(Counter(layer.method for layer in self.layers).items()))

    def summary(self) -> dict[str, Any]:
        return {
            "quantized": len(self.layers),
            "cast_to_fp16": len(self.cast_to_fp16),
            "kept": len(self.kept),
            "kept_in_source_precision": len(self.not_plain),
            "dropped": len(self.dropped),
            "quantized_elements": self.quantized_elements,
            "exact_fraction": self.exact_fraction,
            "relative_error": self.relative_error,
            "relative_error_round_to_nearest": self.nearest_relative_error,
            "calibration_objective_ratio": self.objective_ratio,
            "held_out_unchecked_layers": self.unchecked_layers,
            "methods": self.method_counts,
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
        }

    def summary_lines(self) -> list[str]:
        s = self.summary()
        lines = [
            f"output: {self.output}",
            f"tensors: {s['quantized']} quantized, {s['cast_to_fp16']} cast to fp16 (exact), "
            f"{s['kept']} kept as is, {s['dropped']} dropped",
            f"quantized elements: {s['quantized_elements']:,} "
            f"({s['exact_fraction']:.2%} bit-exact after dequantization)",
            f"overall relative error: {s['relative_error']:.3e}"
            + (
                f" (round-to-nearest: {s['relative_error_round_to_nearest']:.3e})"
                if set(s["methods"]) - {"rtn"}
                else ""
            ),
            "rounding: " + (", ".join(f"{method} {count}" for method, count in s["methods"].items()) or "none"),
            f"time: {s['seconds']:.2f} s, peak RSS: {s['peak_rss_bytes'] / 2**20:.0f} MiB",
        ]
        ratios = self.objective_ratios
        if ratios:
            lines.insert(
                4,
                "calibration objective (output error on the recorded inputs): "
                f"{s['calibration_objective_ratio']:.3f}x round-to-nearest's "
                f"(geometric mean over {len(ratios)} layers, {min(ratios):.3f}x to {max(ratios):.3f}x)",
            )
        if s["held_out_unchecked_layers"]:
            lines.append(
                f"{s['held_out_unchecked_layers']} layers rounded without the held-out check: their statistics have "
                "no folds (a file from before folds, or one text recorded); record again to have them checked"
            )
        if self.not_plain:
            names = list(self.not_plain)
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(
                f"{len(names)} weights kept in source precision: plain float16 cannot hold them faithfully "
                f"(--format scaled keeps them in float16): {shown}"
            )
        return lines

    def to_json(self) -> str:
        data = {
            "input": self.input,
            "output": self.output,
            "settings": self.settings,
            "summary": self.summary(),
            "layers": [asdict(layer) for layer in self.layers],
            "kept": self.kept,
            "kept_in_source_precision": self.not_plain,
            "cast_to_fp16": self.cast_to_fp16,
            "dropped": self.dropped,
        }
        return json.dumps(data, indent=1, allow_nan=False)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Atomic write (hidden file + rename), like the model file itself."""
        return write_atomically(path, self.to_json().encode("utf-8"))


def report_path_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(stem + ".report.json")
