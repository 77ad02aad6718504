"""How many calibration prompts are enough: calibrated vs RTN inside a real ComfyUI, on held-out settings.

    COMFYUI_PATH=/path/to/ComfyUI PYTHONPATH=<stand-ins if needed> /path/to/comfy-venv/bin/python \\
        bench/bench_calibration_comfyui.py [--prompts 1 2 4 8] [--record-steps 0] [--steps 8] [--seeds 2]

Run with the Python ComfyUI runs in. Starts a headless CPU ComfyUI server on a temporary base
directory with the generated tiny SD1.x checkpoint (tests/tiny_models.py) and drives it through its
HTTP API with the graphs of tests/test_comfyui_calibration.py. For every number of calibration
prompts: CalibrateForQuantFP16 samples that many prompts (ConditioningCombine) x `--seeds` noises
for `--steps` steps recording `--record-steps` of them (0 = all; statistics in folds, one per
conditioning), and LearnedRoundingFP16 converts the diffusion model twice in the same graph, auto
(-> calibrated, the held-out check per layer) and RTN, so each calibrated conversion time has an RTN
time measured next to it. Then one held-out graph runs the original, the RTN conversion and every
calibrated one on the test's 20 evaluations: 3 prompts x 2 seeds the calibration never saw, in
the settings HELD_OUT_SETTINGS (cfg 1, cfg 7 with two unseen negatives, cfg 7 with an empty
negative), each as 4 single denoiser evaluations and the 4-step sample.

Reports, per number of prompts: the ratio calibrated/RTN of the output error against the original
(geometric mean and worst of the 20 evaluations, geometric mean per setting), the layers the check
kept calibrated (report details "shrinkage" < 1), the statistics' size, the calibrate+quantize
graph's seconds and the calibrated conversion time over RTN's. Writes bench/results/calibration_comfyui.md.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--record-steps", type=int, nargs="+", default=[0], help="0 = all steps")
    parser.add_argument("--steps", type=int, default=8, help="calibration sampling steps")
    parser.add_argument("--seeds", type=int, default=2, help="calibration noises per prompt (latent batch)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

    import test_comfyui_calibration as graphs
    import torch
    from comfyui_server import PROMPT_TIMEOUT, running_server

    from quant_core.calibration import load_statistics
    from quant_core.report import report_path_for

    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_calibration_comfyui_") as tmp, running_server(Path(tmp)) as server:
        print(f"server up in {time.monotonic() - started:.1f} s", flush=True)
        unets: dict[str, str | None] = {"original": None}
        for number, (prompts, record_steps) in enumerate((p, r) for p in args.prompts for r in args.record_steps):
            tag = f"p{prompts}_r{record_steps}"
            graph = graphs.calibration_graph(
                prompts=prompts, seeds=args.seeds, steps=args.steps, record_steps=record_steps, tag=tag
            )
            # an input RTN does not read, distinct per graph: ComfyUI's cache would otherwise skip the
            # conversion after the first graph, and each calibrated time needs an RTN time next to it
            graph["12"]["inputs"]["num_iter"] += number
            t0 = time.monotonic()
            outputs = server.run(graph)
            graph_seconds = time.monotonic() - t0
            summary = outputs["10"]["quant_report"][0]["summary"]
            rtn_seconds = outputs["12"]["quant_report"][0]["summary"]["seconds"]
            unets.setdefault("rtn", graphs.saved_name(outputs, "13"))
            unets[tag] = graphs.saved_name(outputs, "11")
            (saved,) = outputs["8"]["text"]
            stats_path = server.base / "models" / "calibration" / saved.removeprefix("saved ")
            stats = load_statistics(stats_path)
            saved_model = server.base / "models" / "diffusion_models" / unets[tag]
            layers = json.loads(report_path_for(saved_model).read_text())["layers"]
            row = {
                "tag": tag,
                "prompts": prompts,
                "recorded": args.steps if record_steps <= 0 else min(record_steps, args.steps),
                "tokens": stats.tokens,
                "stats_mib": stats.memory_bytes / 2**20,
                "file_mib": stats_path.stat().st_size / 2**20,
                "kept": sum(1 for layer in layers if layer["details"].get("shrinkage", 0.0) < 1.0),
                "layers": len(layers),
                "graph_s": graph_seconds,
                "conversion_ratio": summary["seconds"] / rtn_seconds,
            }
            rows.append(row)
            print(
                f"{tag}: kept {row['kept']} of {row['layers']}, stats {row['stats_mib']:.2f} MiB, "
                f"{stats.tokens:,} tokens, graph {graph_seconds:.1f} s, conversion {row['conversion_ratio']:.0f}x RTN",
                flush=True,
            )
        t0 = time.monotonic()
        held = server.run(graphs.evaluation_graph(unets, "bench"), timeout=len(unets) * PROMPT_TIMEOUT)
        print(f"held-out graph: {len(unets)} UNets in {time.monotonic() - t0:.1f} s", flush=True)
        errors = graphs.output_errors(graphs.held_out_latents(server, held, list(unets)))
    for row in rows:
        ratios = {key: errors[row["tag"]][key] / errors["rtn"][key] for key in errors["rtn"]}
        row["mean"], row["worst"] = graphs.geometric_mean(ratios.values()), max(ratios.values())
        row["per_setting"] = [
            graphs.geometric_mean(r for (s, _), r in ratios.items() if s == setting)
            for setting in range(len(graphs.HELD_OUT_SETTINGS))
        ]
        row["above"] = sum(r >= 1.0 for r in ratios.values())
        row["evaluations"] = len(ratios)
    write_report(args, rows, time.monotonic() - started, torch.__version__)


def write_report(args: argparse.Namespace, rows: list[dict], total: float, torch_version: str) -> None:
    import test_comfyui_calibration as graphs

    evals = ", ".join(
        f"steps {a}..{b} of {graphs.SCHEDULE_STEPS}" + (" (one denoiser evaluation)" if b == a + 1 else " (sample)")
        for a, b in graphs.EVALUATIONS
    )
    settings = "; ".join(
        f"{name}: cfg {cfg:g}, negative '{negative}'" for name, cfg, negative in graphs.HELD_OUT_SETTINGS
    )
    names = " / ".join(name for name, _, _ in graphs.HELD_OUT_SETTINGS)
    lines = [
        "# Calibration inside ComfyUI: how many prompts, judged on held-out prompts, seeds and negatives",
        "",
        (
            f"`bench/bench_calibration_comfyui.py` (rerun it to reproduce): a real ComfyUI server "
            f"({Path(os.environ['COMFYUI_PATH']).name}) on the CPU, the generated tiny SD1.x checkpoint (random "
            "weights, 50 UNet Linear weights), 8x8 latents (64x64 px)."
        ),
        (
            f"Calibration: CalibrateForQuantFP16, {args.steps} euler steps, cfg 7, negative '{graphs.NEGATIVE}', "
            f"{args.seeds} noises (latent batch), the prompts combined with ConditioningCombine (each step evaluates "
            "every prompt), statistics in 2 folds (conditionings alternately); LearnedRoundingFP16 method auto "
            "(-> calibrated: each layer kept calibrated only where its held-out fold says it beats RTN) and RTN, "
            "in the same graph."
        ),
        (
            f"Held-out (tests/test_comfyui_calibration.py): {len(graphs.HELD_OUT_PROMPTS)} other prompts x "
            f"{graphs.HELD_OUT_BATCH} other noises in the settings {settings}; evaluations in each: {evals}. "
            "Error = relative L2 of the output latents against the original UNet's (all prompts and noises of an "
            "evaluation together); ratio = calibrated error / RTN error."
        ),
        (
            "Times: calibrate+quantize is the whole graph (sampling with the recorder, saving the statistics, both "
            "conversions, saving both models), in seconds on a shared machine (noisy); the conversion ratio is the "
            "calibrated conversion's time over the RTN conversion's in the same graph. RTN's conversion of these 50 "
            "small weights takes a fraction of a second, mostly fixed costs, so the ratio varies from run to run: "
            "read its order of magnitude."
        ),
        "",
        (
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch_version}. "
            f"Whole run {total:.0f} s."
        ),
        "",
        (
            "| prompts | recorded steps | tokens | statistics MiB (file MiB) | layers kept calibrated "
            f"| ratio: geometric mean of {rows[0]['evaluations']} (worst) | evaluations >= RTN "
            f"| per setting: {names} | calibrate+quantize s | calibrated conversion / RTN conversion |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompts']} | {r['recorded']} of {args.steps} | {r['tokens']:,} | {r['stats_mib']:.2f} "
            f"({r['file_mib']:.2f}) | {r['kept']} of {r['layers']} | **{r['mean']:.3f}** ({r['worst']:.3f}) "
            f"| {r['above']} | {' / '.join(f'{x:.3f}' for x in r['per_setting'])} | {r['graph_s']:.1f} "
            f"| {r['conversion_ratio']:.0f}x |"
        )
    from bench.results_file import write_results

    write_results(args.output, lines)


if __name__ == "__main__":
    main()
