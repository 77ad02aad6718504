"""Calibrated rounding at Flux-dev's real widths: seconds per layer, memory, held-out error, projection.

    python bench/bench_flux_calibrated.py [--forwards 16] [--tokens 256] [--heldout 8] [--workdir DIR]
        [--full-moments] [--baseline-root DIR --baseline-exclude REGEX] [--threads N]

Layers with Flux-dev's real shapes, generated (seeded) and saved as fp32 and bf16 model files:
one stream of a double block (img_attn.qkv 9216x3072, img_attn.proj 3072x3072, img_mlp.0
12288x3072, img_mlp.2 3072x12288, img_mod.lin 18432x3072) and a single block (linear1 21504x3072,
linear2 3072x15360, modulation.lin 9216x3072), run forward as Flux runs them (layer norm, real
attention, tanh-GELU MLP, modulation of silu(vec)) on generated hidden states of realistic structure:
a low effective rank (a decaying spectrum over 96 directions), a few outlier channels 30x larger, a
non-zero mean, and one conditioning vector per forward (as a timestep/prompt embedding is).

Statistics are recorded through the real `StatisticsRecorder`, with the default `max_full_dim`
(every Flux input is wider: rank-256 summaries) and, with --full-moments, with full second moments;
in the default 2 folds (alternate forwards), so `calibrated` runs its held-out check
(quant_core/held_out.py). The same statistics merged and saved without folds give the kernel without
the check, the baseline of the check's cost.
Each conversion runs the real converter (`quant_core.convert_file`) in its own process, RSS sampled
from /proc (bench/memory.py); the report gives per-layer seconds. RTN runs in the same run, so
every time is also a ratio to it. Held-out error: ||X (W - Q)^T|| on hidden states from seeds the
statistics never saw, as a ratio to RTN's. --baseline-root runs the calibrated conversion again with
the quant_core of another checkout (e.g. an older commit) on the same files and statistics.

Writes bench/results/flux_calibrated.md and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_ROOT = Path(os.environ.get("BENCH_QUANT_CORE_ROOT", ROOT))  # whose quant_core a worker imports
sys.path.insert(0, str(CODE_ROOT))
if CODE_ROOT != ROOT:
    sys.path.insert(1, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from bench.workdir import work_folder  # noqa: E402

MiB = 2**20
HIDDEN = 3072
HEADS = 24
MLP = 4 * HIDDEN
BLOCKS = {
    "double": {
        "img_attn.qkv": (3 * HIDDEN, HIDDEN),
        "img_attn.proj": (HIDDEN, HIDDEN),
        "img_mlp.0": (MLP, HIDDEN),
        "img_mlp.2": (HIDDEN, MLP),
        "img_mod.lin": (6 * HIDDEN, HIDDEN),
    },
    "single": {
        "linear1": (3 * HIDDEN + MLP, HIDDEN),
        "linear2": (HIDDEN, HIDDEN + MLP),
        "modulation.lin": (3 * HIDDEN, HIDDEN),
    },
}
# Flux-dev: 19 double blocks (an img and a txt stream each), 38 single blocks. T5-XXL encoder: 24 layers
# of q, k, v, o (4096x4096), wi_0, wi_1 (10240x4096), wo (4096x10240).
FLUX_DEV = [(shape, 19 * 2) for shape in BLOCKS["double"].values()] + [
    (shape, 38) for shape in BLOCKS["single"].values()
]
T5_XXL = [((4096, 4096), 24 * 4), ((10240, 4096), 24 * 2), ((4096, 10240), 24)]


def attention(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)  # each [batch, heads, tokens, 128]
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Block(nn.Module):
    """One block's Linear layers under Flux's names, and the forward that feeds them."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        for name, (rows, cols) in BLOCKS[kind].items():
            parent, _, leaf = name.rpartition(".")
            if not parent:
                self.add_module(leaf, nn.Linear(cols, rows))
                continue
            if not hasattr(self, parent):
                self.add_module(parent, nn.ModuleDict())
            getattr(self, parent)[leaf] = nn.Linear(cols, rows)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        layer = self.get_submodule
        h = F.layer_norm(x, (HIDDEN,))
        if self.kind == "double":
            layer("img_mod.lin")(F.silu(vec))
            x = x + layer("img_attn.proj")(attention(layer("img_attn.qkv")(h)))
            mlp = F.gelu(layer("img_mlp.0")(F.layer_norm(x, (HIDDEN,))), approximate="tanh")
            return x + layer("img_mlp.2")(mlp)
        layer("modulation.lin")(F.silu(vec))
        qkv, mlp = layer("linear1")(h).split([3 * HIDDEN, MLP], dim=-1)
        return x + layer("linear2")(torch.cat([attention(qkv), F.gelu(mlp, approximate="tanh")], dim=-1))


def generated_block(kind: str, seed: int) -> Block:
    """Weights ~ N(0, 1/n) with a heavier tail (0.1% of them 8x larger), small biases."""
    g = torch.Generator().manual_seed(seed)
    block = Block(kind)
    with torch.no_grad():
        for layer in block.modules():
            if not isinstance(layer, nn.Linear):
                continue
            n = layer.in_features
            w = torch.randn(layer.weight.shape, generator=g) / math.sqrt(n)
            w *= torch.where(torch.rand(w.shape, generator=g) < 1e-3, 8.0, 1.0)
            layer.weight.copy_(w)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.01)
    return block


class Activations:
    """Hidden states of realistic structure; the structure is fixed by `structure_seed`, draws by `seed`."""

    def __init__(self, structure_seed: int = 1000):
        g = torch.Generator().manual_seed(structure_seed)
        self.basis = torch.linalg.qr(torch.randn(HIDDEN, 96, generator=g)).Q.T * 4  # [96, 3072]
        self.spectrum = torch.logspace(0, -2, 96)
        self.outliers = torch.randperm(HIDDEN, generator=g)[:8]
        self.mean = torch.randn(HIDDEN, generator=g) * 0.3
        self.vec_base = torch.randn(HIDDEN, generator=g)
        self.vec_basis = torch.randn(16, HIDDEN, generator=g)

    def draw(self, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(tokens, 96, generator=g) * self.spectrum) @ self.basis + 0.05 * torch.randn(
            tokens, HIDDEN, generator=g
        )
        x += self.mean
        x[:, self.outliers] *= 30
        vec = self.vec_base + torch.randn(16, generator=g) @ self.vec_basis * 0.5
        return x[None], vec[None, None]


def forwards(block: Block, count: int, tokens: int, first_seed: int):
    acts = Activations()
    with torch.no_grad():
        for i in range(count):
            block(*acts.draw(tokens, first_seed + i))


# ---- workers (each in its own process, so that its memory is measured alone) ----


def without_folds(stats):
    """The same statistics, merged, as a file from before folds holds them: the kernel then runs unchecked."""
    from quant_core.calibration import CalibrationStatistics

    inputs = {group: dataclasses.replace(stats.inputs[group], folds=()) for group in stats.inputs}
    return CalibrationStatistics(stats.layers, inputs, stats.model, stats.forward_calls, stats.settings)


def worker_record(args: argparse.Namespace) -> None:
    from quant_core.calibration import StatisticsRecorder, save_statistics

    block = Block(args.kind)
    block.load_state_dict(load_file(args.model))
    started = time.perf_counter()
    with StatisticsRecorder(block, max_full_dim=args.max_full_dim) as recorder:
        forwards(block, args.forwards, args.tokens, first_seed=0)
        memory = recorder.memory_bytes
        stats = recorder.statistics(model=f"flux-shaped {args.kind} block")
    seconds = time.perf_counter() - started
    save_statistics(stats, args.out)
    if args.unfolded:
        save_statistics(without_folds(stats), args.unfolded)
    print(json.dumps({"seconds": seconds, "recorder_bytes": memory, "file_bytes": Path(args.out).stat().st_size}))


def worker_convert(args: argparse.Namespace) -> None:
    from quant_core import ConvertOptions, convert_file

    exclude = (args.exclude,) if args.exclude else ()
    if "calib" in ConvertOptions.__dataclass_fields__:  # a --baseline-root checkout from before statistics objects
        options = ConvertOptions(
            method=args.method, calib=args.calib or None, overwrite=True, device="cpu", exclude=exclude
        )
        report = convert_file(args.model, args.out, options)
    else:
        from quant_core.calibration import load_statistics

        options = ConvertOptions(method=args.method, overwrite=True, device="cpu", exclude=exclude)
        report = convert_file(
            args.model, args.out, options, statistics=load_statistics(args.calib) if args.calib else None
        )
    layers = {
        layer.name: {"seconds": layer.seconds, "method": layer.method, "details": layer.details}
        for layer in report.layers
    }
    print(json.dumps({"seconds": report.seconds, "layers": layers}))


# ---- the benchmark ----


def run_worker(
    label: str, worker_args: list[str], code_root: Path = ROOT, threads: int | None = None
) -> tuple[dict, object]:
    from bench.memory import run_sampled

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BENCH_QUANT_CORE_ROOT": str(code_root)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    stats = run_sampled([sys.executable, str(Path(__file__).resolve()), "worker", *worker_args], env=env)
    if stats.returncode != 0:
        raise SystemExit(f"{label} failed:\n{stats.output}")
    result = json.loads(stats.output.strip().splitlines()[-1])
    print(f"{label}: {stats.seconds:.1f} s, peak RssAnon {stats.peak_rss_anon / MiB:.0f} MiB", flush=True)
    return result, stats


@dataclass(frozen=True)
class Run:
    label: str
    method: str
    stats: str | None  # "summary", "full" or None (data-free)
    source: str  # "fp32" or "bf16": which model file it converts
    code: Path  # whose quant_core runs it
    baseline: str  # the RTN run it is compared with (same source, same code)
    unchecked: str | None = None  # the run of the kernel without the held-out check on the same statistics


def planned_runs(args: argparse.Namespace, stats_kinds: list[str]) -> list[Run]:
    runs = [Run("rtn", "rtn", None, "fp32", ROOT, "rtn")]
    runs += [
        Run(f"calibrated, {s}", "calibrated", s, "fp32", ROOT, "rtn", f"calibrated, {s}, no check") for s in stats_kinds
    ]
    runs += [
        Run(f"calibrated, {s}, no check", "calibrated", f"{s}, no folds", "fp32", ROOT, "rtn") for s in stats_kinds
    ]
    runs += [
        Run("rtn, bf16 source", "rtn", None, "bf16", ROOT, "rtn, bf16 source"),
        Run("calibrated, summary, bf16 source", "calibrated", "summary", "bf16", ROOT, "rtn, bf16 source"),
    ]
    if args.baseline_root:
        runs += [
            Run("rtn, baseline code", "rtn", None, "fp32", args.baseline_root, "rtn, baseline code"),
            Run(
                "calibrated, summary, baseline code",
                "calibrated",
                "summary",
                "fp32",
                args.baseline_root,
                "rtn, baseline code",
            ),
        ]
    return runs


def heldout_errors(kind: str, models: dict[str, Path], outputs: dict[str, tuple[Path, str]], count: int, tokens: int):
    """Per output file and layer: ||X (W - Q)^T||^2 on held-out hidden states (seeds the statistics never saw),
    W the weights of the file it converted; and whether its float16 values equal another output's."""
    from quant_core.reader import dequantize_state_dict

    block = Block(kind)
    block.load_state_dict(load_file(str(models["fp32"])))
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in BLOCKS[kind]}
    hooks = [
        block.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: inputs[name].append(a[0].reshape(-1, a[0].shape[-1]).clone())
        )
        for name in BLOCKS[kind]
    ]
    forwards(block, count, tokens, first_seed=10_000)
    for hook in hooks:
        hook.remove()
    del block
    x = {name: torch.cat(chunks) for name, chunks in inputs.items()}
    errors: dict[str, dict[str, float]] = {}
    for label, (path, source) in outputs.items():
        reference = load_file(str(models[source]))
        restored = dequantize_state_dict(load_file(str(path)))
        errors[label] = {}
        for name in BLOCKS[kind]:
            e = reference[f"{name}.weight"].float() - restored[f"{name}.weight"].float()
            errors[label][name] = float(((x[name] @ e.T) ** 2).sum())
    return errors


def same_values(a: Path, b: Path) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return all(torch.equal(left[k], right[k]) for k in left if k.endswith(".weight"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        parser = argparse.ArgumentParser()
        parser.add_argument("_worker")
        parser.add_argument("job", choices=["record", "convert"])
        parser.add_argument("--kind")
        parser.add_argument("--model")
        parser.add_argument("--out")
        parser.add_argument("--unfolded", default="")
        parser.add_argument("--max_full_dim", type=int)
        parser.add_argument("--forwards", type=int)
        parser.add_argument("--tokens", type=int)
        parser.add_argument("--method")
        parser.add_argument("--calib", default="")
        parser.add_argument("--exclude", default="")
        args = parser.parse_args()
        (worker_record if args.job == "record" else worker_convert)(args)
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forwards", type=int, default=16, help="calibration forwards (one conditioning vector each)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per forward")
    parser.add_argument("--heldout", type=int, default=8, help="held-out forwards")
    parser.add_argument("--kinds", default="double,single")
    parser.add_argument("--full-moments", action="store_true", help="also record and convert with full second moments")
    parser.add_argument("--baseline-root", type=Path, default=None, help="another checkout to run the same conversions")
    parser.add_argument("--baseline-exclude", default="", help="regex of layers the baseline leaves unquantized")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the workers (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "results" / "flux_calibrated.md")
    args = parser.parse_args()
    with work_folder(args.workdir, "bench-flux-") as work:
        stats_kinds = ["summary"] + (["full"] if args.full_moments else [])
        runs = planned_runs(args, stats_kinds)

        results: dict[tuple[str, str], dict] = {}
        recordings: dict[tuple[str, str], dict] = {}
        for index, kind in enumerate(args.kinds.split(",")):
            models = {"fp32": work / f"{kind}.safetensors", "bf16": work / f"{kind}_bf16.safetensors"}
            state = {k: v.detach().contiguous() for k, v in generated_block(kind, seed=index).state_dict().items()}
            save_file(state, str(models["fp32"]))
            save_file({k: v.bfloat16() for k, v in state.items()}, str(models["bf16"]))
            del state
            for stats_kind in stats_kinds:
                path = work / f"{kind}_{stats_kind}.calib.safetensors"
                unfolded = work / f"{kind}_{stats_kind}_nofolds.calib.safetensors"
                max_full_dim = 2048 if stats_kind == "summary" else 16384
                result, sampled = run_worker(
                    f"{kind}: record {stats_kind}",
                    [
                        "record",
                        "--kind",
                        kind,
                        "--model",
                        str(models["fp32"]),
                        "--out",
                        str(path),
                        "--unfolded",
                        str(unfolded),
                        "--max_full_dim",
                        str(max_full_dim),
                        "--forwards",
                        str(args.forwards),
                        "--tokens",
                        str(args.tokens),
                    ],
                    threads=args.threads,
                )
                recordings[(kind, stats_kind)] = {**result, "peak": sampled.peak_rss_anon, "path": path}
                unfolded_file = {"file_bytes": unfolded.stat().st_size, "path": unfolded}
                recordings[(kind, f"{stats_kind}, no folds")] = {
                    **result,
                    **unfolded_file,
                    "peak": sampled.peak_rss_anon,
                }
            outputs = {}
            for number, run in enumerate(runs):
                out = work / f"{kind}_{number}.out.safetensors"
                calib = ["--calib", str(recordings[(kind, run.stats)]["path"])] if run.stats else []
                exclude = ["--exclude", args.baseline_exclude] if run.code != ROOT and args.baseline_exclude else []
                result, sampled = run_worker(
                    f"{kind}: {run.label}",
                    [
                        "convert",
                        "--model",
                        str(models[run.source]),
                        "--out",
                        str(out),
                        "--method",
                        run.method,
                        *calib,
                        *exclude,
                    ],
                    code_root=run.code,
                    threads=args.threads,
                )
                results[(kind, run.label)] = {**result, "peak": sampled.peak_rss_anon}
                outputs[run.label] = (out, run.source)
            errors = heldout_errors(kind, models, outputs, args.heldout, args.tokens)
            for run in runs:
                results[(kind, run.label)]["errors"] = errors[run.label]
                results[(kind, run.label)]["same_as_baseline"] = same_values(
                    outputs[run.label][0], outputs[run.baseline][0]
                )
            for path in work.glob(f"{kind}_*.out.*"):
                path.unlink()
        table = render(runs, results, recordings, args)
        print("\n" + table)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "-"


def _rates(results: dict, label: str, kinds: list[str]) -> dict[int, float]:
    """Seconds per weight element of one run, pooled per input width."""
    seconds: dict[int, float] = {}
    elements: dict[int, int] = {}
    for kind in kinds:
        for name, layer in results[(kind, label)]["layers"].items():
            rows, cols = BLOCKS[kind][name.removesuffix(".weight")]
            seconds[cols] = seconds.get(cols, 0.0) + layer["seconds"]
            elements[cols] = elements.get(cols, 0) + rows * cols
    return {cols: seconds[cols] / elements[cols] for cols in seconds}


def _projected(rates: dict[int, float], model: list[tuple[tuple[int, int], int]]) -> float:
    """Seconds for a model's Linear weights at the per-element rate measured at the nearest width."""
    return sum(rates[min(rates, key=lambda w: abs(w - cols))] * rows * cols * count for (rows, cols), count in model)


def _largest_input_bytes(path: Path) -> int:
    from quant_core.calibration import load_statistics

    stats = load_statistics(path)
    return max(stats.inputs[group].memory_bytes for group in stats.inputs)


def render(runs: list[Run], results: dict, recordings: dict, args: argparse.Namespace) -> str:
    kinds = args.kinds.split(",")
    shapes = [shape for kind in kinds for shape in BLOCKS[kind].values()]
    params = sum(r * c for r, c in shapes)
    largest = max(r * c for r, c in shapes) * 4
    lines = [
        f"Flux-dev-shaped layers (generated, seeded): {', '.join(kinds)} block, {params / 1e6:.0f}M params; statistics "
        f"from {args.forwards} forwards x {args.tokens} tokens, held-out error on {args.heldout} other forwards. "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} CPU thread(s) per worker, 1-minute load "
        f"average at the end {os.getloadavg()[0]:.1f} (a shared machine: compare ratios within one run).",
        "",
        "Statistics (recorded through `StatisticsRecorder`; `summary` = the default `max_full_dim` 2048, so every Flux "
        "input keeps a rank-256 eigen summary + diagonal; `full` = full second moments):",
        "",
        "| block | statistics | recording (s) | recorder memory (MiB) | file (MiB) "
        "| peak RssAnon while recording (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for (kind, stats_kind), rec in recordings.items():
        lines.append(
            f"| {kind} | {stats_kind} | {rec['seconds']:.1f} | {rec['recorder_bytes'] / MiB:.0f} | "
            f"{rec['file_bytes'] / MiB:.1f} | {rec['peak'] / MiB:.0f} |"
        )
    lines += [
        "",
        "Conversion of every layer, each run in its own process. Bound: 1.5 x the largest tensor as float32 + the "
        "largest input's statistics + 300 MiB. Each run is compared with round-to-nearest on the same source by the "
        "same code, in this run:",
        "",
        "| run | time (s) | vs RTN | vs the kernel without the check | peak RssAnon (MiB) | bound (MiB) | within "
        "| held-out output error vs RTN | identical to RTN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        mine = [results[(k, run.label)] for k in kinds]
        base = [results[(k, run.baseline)] for k in kinds]
        quantized = [(k, n.removesuffix(".weight")) for k in kinds for n in results[(k, run.label)]["layers"]]
        error = sum(results[(k, run.label)]["errors"][n] for k, n in quantized)
        base_error = sum(results[(k, run.baseline)]["errors"][n] for k, n in quantized)
        stats_bytes = max(_largest_input_bytes(recordings[(k, run.stats)]["path"]) for k in kinds) if run.stats else 0
        bound = 1.5 * largest + stats_bytes + 300 * MiB
        peak = max(r["peak"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)
        identical = "yes" if all(r["same_as_baseline"] for r in mine) else "no"
        unchecked = "-"
        if run.unchecked:
            unchecked = _ratio(seconds, sum(results[(k, run.unchecked)]["seconds"] for k in kinds))
        cells = [
            run.label,
            f"{seconds:.1f}",
            _ratio(seconds, sum(r["seconds"] for r in base)),
            unchecked,
            f"{peak / MiB:.0f}",
            f"{bound / MiB:.0f}",
            "yes" if peak <= bound else "no",
            _ratio(math.sqrt(error), math.sqrt(base_error)),
            identical,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    measured = [run for run in runs if run.method != "rtn"]
    lines += [
        "",
        "Per layer: seconds (the converter's time for the tensor) and held-out output error ||X(W-Q)^T|| vs its RTN:",
        "",
        "| layer | shape | "
        + " | ".join(f"{run.label} (s)" for run in runs)
        + " | "
        + " | ".join(f"{run.label}: error" for run in measured)
        + " |",
        "|---|---|" + "---|" * (len(runs) + len(measured)),
    ]
    for kind in kinds:
        for name, (rows, cols) in BLOCKS[kind].items():
            cells = []
            for run in runs:
                layer = results[(kind, run.label)]["layers"].get(name + ".weight")
                cells.append(f"{layer['seconds']:.2f}" if layer else "-")
            for run in measured:
                quantized = name + ".weight" in results[(kind, run.label)]["layers"]
                mine, base = results[(kind, run.label)]["errors"][name], results[(kind, run.baseline)]["errors"][name]
                cells.append(_ratio(math.sqrt(mine), math.sqrt(base)) if quantized else "-")
            lines.append(f"| {kind}.{name} | {rows}x{cols} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Projection to whole models from the seconds per weight element measured above at each input width (3072, "
        "12288, 15360; another width takes the nearest one's rate: the low-rank feedback costs O(k) per weight, "
        "nearly independent of the width). Flux-dev: 19 double blocks x 2 streams + 38 single blocks of these layers "
        "(11.9B params); T5-XXL encoder: 24 x (4 x 4096x4096 + 2 x 10240x4096 + 4096x10240) (4.6B params). Same "
        "threads and load as this run; reading the file from disk is not included:",
        "",
        "| run | Flux-dev (min) | T5-XXL encoder (min) |",
        "|---|---|---|",
    ]
    for run in runs:
        rates = _rates(results, run.label, kinds)
        if len(rates) == len({c for _, c in shapes}):
            lines.append(
                f"| {run.label} | {_projected(rates, FLUX_DEV) / 60:.1f} | {_projected(rates, T5_XXL) / 60:.1f} |"
            )
    per_model = {kind: (2 * 19 if kind == "double" else 38) for kind in kinds}
    for stats_kind in dict.fromkeys(s for _, s in recordings):
        total = sum(recordings[(k, stats_kind)]["file_bytes"] * per_model[k] for k in kinds)
        lines.append(
            f"\nStatistics for a whole Flux-dev ({stats_kind}): {total / 2**30:.1f} GiB (the files above x blocks)."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
