"""How many calibration prompts and recorded steps are enough: calibrated vs RTN inside a real ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI PYTHONPATH=<stand-ins if needed> /path/to/comfy-venv/bin/python \\
        bench/bench_calibration_comfyui.py [--prompts 1 2 4 8] [--record-steps 1 4 0] [--steps 8]

Run with the Python ComfyUI runs in. Starts a headless CPU ComfyUI server on a temporary base
directory with the generated tiny SD1.x checkpoint (tests/tiny_models.py) and drives it through
its HTTP API with the graphs of tests/test_comfyui_calibration.py: for every (prompts, record_steps)
pair, CalibrateForQuantFP16 samples `prompts` calibration prompts (ConditioningCombine) x `--seeds`
noises for `--steps` steps recording `record_steps` of them (0 = all), LearnedRoundingFP16 (auto ->
calibrated) converts the diffusion model, and the held-out graph (3 prompts x 2 seeds that differ
from the calibration ones; single denoiser evaluations at the 4 noise levels of a 4-step schedule and
the 4-step sample) runs it next to the original and the RTN conversion (converted once). Reports the
relative output error against the original, the ratio calibrated/RTN (geometric mean over the 5
evaluations, and its range over the held-out prompts), the statistics' size and the times.
Writes bench/results/calibration_comfyui.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "calibration_comfyui.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--record-steps", type=int, nargs="+", default=[1, 4, 0], help="0 = all steps")
    parser.add_argument("--steps", type=int, default=8, help="calibration sampling steps")
    parser.add_argument("--seeds", type=int, default=2, help="calibration noises per prompt (latent batch)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

    import test_comfyui_calibration as graphs
    import torch
    from comfyui_server import running_server

    from quant_core.calibration import load_statistics

    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_calibration_comfyui_") as tmp, running_server(Path(tmp)) as server:
        print(f"server up in {time.monotonic() - started:.1f} s", flush=True)
        t0 = time.monotonic()
        baseline = server.run(graphs.calibration_graph(prompts=1, seeds=1, steps=1, tag="rtn_baseline"))
        rtn_file = graphs.saved_name(baseline, "13")
        rtn_seconds = baseline["12"]["quant_report"][0]["summary"]["seconds"]
        print(f"rtn conversion {rtn_seconds:.2f} s (graph {time.monotonic() - t0:.1f} s)", flush=True)
        for prompts in args.prompts:
            for record_steps in args.record_steps:
                tag = f"p{prompts}_r{record_steps}"
                t0 = time.monotonic()
                outputs = server.run(
                    graphs.calibration_graph(
                        prompts=prompts,
                        seeds=args.seeds,
                        steps=args.steps,
                        record_steps=record_steps,
                        tag=tag,
                        rtn=False,
                    )
                )
                graph_seconds = time.monotonic() - t0
                summary = outputs["10"]["quant_report"][0]["summary"]
                (saved,) = outputs["8"]["text"]
                stats_path = server.base / "models" / "calibration" / saved.removeprefix("saved ")
                stats = load_statistics(stats_path)
                unets = {"original": None, "calibrated": graphs.saved_name(outputs, "11"), "rtn": rtn_file}
                t0 = time.monotonic()
                held = server.run(graphs.evaluation_graph(unets, tag))
                eval_seconds = time.monotonic() - t0
                latents = graphs.held_out_latents(server, held, list(unets))
                errors = graphs.output_errors(latents)
                evals = range(len(graphs.EVALUATIONS))
                ratio = graphs.geometric_mean(errors["calibrated"][e] / errors["rtn"][e] for e in evals)
                per_prompt = []
                for p in range(len(graphs.HELD_OUT_PROMPTS)):
                    one = {n: {e: [latents[n][e][p]] for e in evals} for n in latents}
                    err = graphs.output_errors(one)
                    per_prompt.append(graphs.geometric_mean(err["calibrated"][e] / err["rtn"][e] for e in evals))
                recorded = args.steps if record_steps <= 0 else min(record_steps, args.steps)
                row = {
                    "prompts": prompts,
                    "record_steps": "all" if record_steps == 0 else record_steps,
                    "recorded": recorded,
                    "tokens": stats.tokens,
                    "forward_calls": stats.forward_calls,
                    "stats_mib": stats.memory_bytes / 2**20,
                    "file_mib": stats_path.stat().st_size / 2**20,
                    "cal_error": graphs.geometric_mean(errors["calibrated"].values()),
                    "rtn_error": graphs.geometric_mean(errors["rtn"].values()),
                    "ratio": ratio,
                    "ratio_min": min(per_prompt),
                    "ratio_max": max(per_prompt),
                    "ratios": [errors["calibrated"][e] / errors["rtn"][e] for e in evals],
                    "graph_s": graph_seconds,
                    "quant_s": summary["seconds"],
                    "eval_s": eval_seconds,
                    "methods": summary["methods"],
                }
                rows.append(row)
                print(
                    f"{tag}: ratio {ratio:.3f} (held-out prompts {row['ratio_min']:.3f}..{row['ratio_max']:.3f}), "
                    f"stats {row['stats_mib']:.2f} MiB, {stats.tokens:,} tokens, graph {graph_seconds:.1f} s",
                    flush=True,
                )
    total = time.monotonic() - started
    write_report(args, rows, rtn_seconds, total, torch.__version__)


def write_report(args, rows: list[dict], rtn_seconds: float, total: float, torch_version: str) -> None:
    import test_comfyui_calibration as graphs

    evals = ", ".join(
        f"steps {a}..{b} of {graphs.SCHEDULE_STEPS}" + (" (one denoiser evaluation)" if b == a + 1 else " (sample)")
        for a, b in graphs.EVALUATIONS
    )
    lines = [
        "# Calibration inside ComfyUI: how many prompts and steps",
        "",
        "`bench/bench_calibration_comfyui.py` (rerun it to reproduce): a real ComfyUI 0.3.64 server on the CPU, "
        "the generated tiny SD1.x checkpoint (random weights, 50 UNet Linear weights), 8x8 latents (64x64 px).",
        f"Calibration: CalibrateForQuantFP16, {args.steps} euler steps, cfg {graphs.CFG:g}, {args.seeds} noises "
        "(latent batch) per run, the prompts combined with ConditioningCombine (each step evaluates every prompt); "
        "LearnedRoundingFP16 method auto (-> calibrated, default settings).",
        f"Held-out: {len(graphs.HELD_OUT_PROMPTS)} other prompts x {graphs.HELD_OUT_BATCH} other noises, "
        f"evaluations: {evals}. Error = relative L2 of the output latents against the original UNet's; "
        "ratio = calibrated error / RTN error, geometric mean over the evaluations; "
        "the per-evaluation column lists them in that order "
        "(range: the same per held-out prompt).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch {torch_version}. "
        f"RTN conversion {rtn_seconds:.2f} s. Whole run {total:.0f} s.",
        "",
        "| prompts | recorded steps | tokens | statistics MiB (file MiB) | calibrated error | RTN error "
        "| ratio (held-out prompt range) | per evaluation | calibrate+quantize s | quantize s |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompts']} | {r['recorded']} of {args.steps} | {r['tokens']:,} | {r['stats_mib']:.2f} "
            f"({r['file_mib']:.2f}) | {r['cal_error']:.2e} | {r['rtn_error']:.2e} | **{r['ratio']:.3f}** "
            f"({r['ratio_min']:.3f}..{r['ratio_max']:.3f}) | {' / '.join(f'{x:.2f}' for x in r['ratios'])} "
            f"| {r['graph_s']:.1f} | {r['quant_s']:.1f} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
