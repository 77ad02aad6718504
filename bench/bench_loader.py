"""ScaledFP16Loader against ComfyUI's own UNETLoader on the same weights, and the quantize node's memory.

    PYTHONPATH=<stand-ins if needed> /path/to/comfy-venv/bin/python bench/bench_loader.py --comfyui /path/to/ComfyUI

Run with the Python ComfyUI runs in (it imports ComfyUI in-process, CPU mode).

1. Loader: a generated SD1.x UNet (tests/tiny_models.py; `--unet wide`: three levels with attention,
   420M parameters) as a plain float16 file, and the same file converted to scaled_fp16 (a float16
   source converts bit-exactly, so both hold identical values). Load time (UNETLoader.load_unet vs
   ScaledFP16Loader.load, warm page cache) and time per sampling step (comfy.sample.sample, euler,
   cfg 7, batch 1) per latent size; the two loaders alternate within each repeat and the medians give
   the ratio, all in one run.
2. Quantize node: LoadCheckpointForQuant + LearnedRoundingFP16 on a generated multi-GB float32
   model (bench/bench_convert.py's generator) in a child process that imports ComfyUI like the
   server does; peak RssAnon and VmHWM sampled from /proc (bench/memory.py), with the same child's
   ComfyUI-import-only baseline.
Writes bench/results/loader.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
PACK = "learned_rounding_fp16_pack"


def import_comfyui(path: str) -> None:
    """ComfyUI's modules in this process, on the CPU (as `main.py --cpu`)."""
    os.chdir(path)
    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True


def import_pack():
    """The repository as ComfyUI imports a custom node: a package, so its relative imports resolve."""
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def use_models_dir(models: Path) -> None:
    import folder_paths

    for folder in ("checkpoints", "diffusion_models", "text_encoders"):
        (models / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    folder_paths.set_temp_directory(str(models.parent / "temp"))


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_loader(workdir: Path, unet: str, latents: list[int], steps: int, repeats: int) -> list[str]:
    import comfy.sample
    import torch
    from safetensors.torch import save_file

    import nodes

    sys.path.append(str(ROOT / "tests"))
    import tiny_models

    quant_core = sys.modules[f"{PACK}.quant_core"]
    from learned_rounding_fp16_pack.nodes.loader import ScaledFP16Loader

    models = workdir / "models"
    plain, scaled = "tiny_sd15_fp16.safetensors", "tiny_sd15_scaled.safetensors"
    levels = {"tiny": tiny_models.TINY_LEVELS, "wide": tiny_models.WIDE_LEVELS}[unet]
    weights = {k: v.half() for k, v in tiny_models.tiny_unet_state_dict(levels=levels).items()}
    save_file(weights, str(models / "diffusion_models" / plain))
    quant_core.convert_file(
        models / "diffusion_models" / plain,
        models / "diffusion_models" / scaled,
        quant_core.ConvertOptions(method="rtn", overwrite=True),
    )
    params = sum(v.numel() for v in weights.values())

    def stock():
        return nodes.UNETLoader().load_unet(plain, "default")[0]

    def ours():
        return ScaledFP16Loader().load(scaled, "None", "None", "stable_diffusion")[0]

    loaders = {"UNETLoader (plain fp16 file)": stock, "ScaledFP16Loader (scaled_fp16 file)": ours}
    for load in loaders.values():  # warm the page cache and ComfyUI's imports
        load()
    load_times = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, load in loaders.items():
            load_times[name].append(seconds(load))
    patchers = {name: load() for name, load in loaders.items()}

    positive = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    negative = [[torch.zeros(1, 77, 768), {}]]
    step_rows, diffs = [], []
    for size in latents:
        latent = torch.zeros(1, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, 42)
        results, per_step = {}, {name: [] for name in patchers}

        def sample(patcher, n: int, noise=noise, latent=latent):
            return comfy.sample.sample(
                patcher, noise, n, 7.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=42
            )

        for patcher in patchers.values():
            sample(patcher, 1)  # loads the weights onto the device, first-call allocations
        for _ in range(repeats):
            for name, patcher in patchers.items():
                started = time.perf_counter()
                results[name] = sample(patcher, steps)
                per_step[name].append((time.perf_counter() - started) / steps)
        stock_step, our_step = (statistics.median(per_step[name]) for name in patchers)
        outs = list(results.values())
        diffs.append(float((outs[0] - outs[1]).abs().max()))
        step_rows.append(
            f"| {size}x{size} ({8 * size}x{8 * size} px) | {stock_step:.3f} | {our_step:.3f} | "
            f"{our_step / stock_step:.2f}x |"
        )
        print(step_rows[-1], flush=True)

    stock_load, our_load = (statistics.median(t) for t in load_times.values())
    sizes = {name: p.model_size() / MiB for name, p in patchers.items()}
    return [
        f"Generated SD1.x UNet ('{unet}': levels {levels}), {params / 1e6:.1f}M parameters, float16 weights; "
        "the scaled file is the same weights "
        f"converted (`--method rtn`, bit-exact for a float16 source). {steps} euler steps, cfg 7, batch 1; "
        f"medians of {repeats} alternating repeats.",
        "",
        "| | UNETLoader (plain fp16 file) | ScaledFP16Loader | ratio |",
        "|---|---|---|---|",
        f"| load time (s, warm cache) | {stock_load:.3f} | {our_load:.3f} | {our_load / stock_load:.2f}x |",
        f"| weights in memory (MiB) | {list(sizes.values())[0]:.0f} | {list(sizes.values())[1]:.0f} | "
        f"{list(sizes.values())[1] / list(sizes.values())[0]:.2f}x |",
        "",
        "| latent | UNETLoader s/step | ScaledFP16Loader s/step | ratio |",
        "|---|---|---|---|",
        *step_rows,
        "",
        f"Largest difference between the two models' samples: {max(diffs):.1e}.",
    ]


def quantize_node_child(models: str, model_file: str, baseline: bool) -> None:
    """Child process: what the server process does when the quantize node runs (or only its imports)."""
    import comfy.model_management  # noqa: F401  (as loaded in the server)
    import comfy.sd  # noqa: F401

    pack = import_pack()
    use_models_dir(Path(models))
    if baseline:
        print(json.dumps({"baseline": True}))
        return
    from learned_rounding_fp16_pack.nodes.checkpoint import LoadCheckpointForQuant
    from learned_rounding_fp16_pack.nodes.quantize import LearnedRoundingFP16

    assert pack.NODE_CLASS_MAPPINGS
    (source,) = LoadCheckpointForQuant().load(model_file, "everything")
    out = LearnedRoundingFP16().quantize(source, "learned", 256, 1, False, False, "")
    print(json.dumps(out["ui"]["quant_report"][0]["summary"]))


def bench_quantize_node(workdir: Path, comfyui: str, blocks: int, hidden: int) -> list[str]:
    sys.path.append(str(ROOT))
    from bench.bench_convert import write_model
    from bench.memory import run_sampled

    models = workdir / "models"
    model = models / "checkpoints" / "generated.safetensors"
    shapes = write_model(model, blocks, hidden)
    params = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values()) * 4
    env = {**os.environ}
    rows = {}
    for label, extra in (("ComfyUI + pack imported (baseline)", ["--baseline"]), ("LearnedRoundingFP16 node", [])):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--comfyui",
            comfyui,
            "--node-child",
            str(models),
            "checkpoints/generated.safetensors",
            *extra,
        ]
        stats = run_sampled(cmd, env=env)
        if stats.returncode != 0:
            raise SystemExit(f"{label} failed:\n{stats.output}")
        rows[label] = stats
        print(f"{label}: {stats.seconds:.1f} s, RssAnon {stats.peak_rss_anon / MiB:.0f} MiB", flush=True)
    base = rows["ComfyUI + pack imported (baseline)"]
    node = rows["LearnedRoundingFP16 node"]
    model.unlink()
    for leftover in (workdir / "temp").rglob("*.safetensors"):
        leftover.unlink()
    return [
        f"Generated float32 model: {params / 1e6:.0f}M parameters ({params * 4 / MiB:.0f} MiB), largest tensor "
        f"{largest / MiB:.0f} MiB as float32; method learned, defaults; in a process that imports ComfyUI as the "
        "server does.",
        "",
        "| process | time (s) | peak RssAnon (MiB) | peak RSS incl. mapped file pages (MiB) |",
        "|---|---|---|---|",
        *(
            f"| {label} | {s.seconds:.1f} | {s.peak_rss_anon / MiB:.0f} | {s.peak_rss / MiB:.0f} |"
            for label, s in rows.items()
        ),
        "",
        f"The node adds {(node.peak_rss_anon - base.peak_rss_anon) / MiB:.0f} MiB of heap (RssAnon) to the process "
        f"for a {params * 4 / MiB:.0f} MiB model; the rest of its peak RSS is the memory-mapped input's page cache "
        "(file-backed, reclaimable).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (or COMFYUI_PATH)")
    parser.add_argument("--unet", choices=["tiny", "wide"], default="wide", help="tests' 37M UNet or a 420M one")
    parser.add_argument("--latents", default="8,32,64", help="latent sizes (pixels / 8)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=3, help="generated model for the quantize node")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "results" / "loader.md")
    parser.add_argument("--node-child", nargs=2, metavar=("MODELS", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("--comfyui (or COMFYUI_PATH) is required")
    import_comfyui(args.comfyui)
    if args.node_child:
        quantize_node_child(*args.node_child, baseline=args.baseline)
        return

    import torch

    import_pack()
    sys.path.append(str(ROOT))
    from bench.workdir import work_folder

    with work_folder(args.workdir, "bench-loader-") as workdir:
        use_models_dir(workdir / "models")
        loader = bench_loader(workdir, args.unet, [int(s) for s in args.latents.split(",")], args.steps, args.repeats)
        memory = bench_quantize_node(workdir, args.comfyui, args.blocks, args.hidden)
        import comfyui_version

        header = [
            f"ComfyUI {comfyui_version.__version__} (--cpu), torch {torch.__version__}, {torch.get_num_threads()} CPU "
            f"threads, {platform.processor() or platform.machine()}.",
            "",
            f"Command: `python bench/bench_loader.py --comfyui PATH --unet {args.unet} "
            f"--latents {args.latents} --steps {args.steps} --repeats {args.repeats} --blocks {args.blocks} "
            f"--hidden {args.hidden}` (ComfyUI's Python).",
            "",
            "## ScaledFP16Loader vs UNETLoader",
            "",
        ]
        text = "\n".join([*header, *loader, "", "## Quantize node memory", "", *memory]) + "\n"
        print("\n" + text)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
