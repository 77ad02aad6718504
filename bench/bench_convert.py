"""Speed and memory of the converter on a generated multi-GB model, against a plain copy.

    python bench/bench_convert.py [--blocks 3] [--hidden 4096] [--workdir DIR]

Baseline, measured in the same run on the same file: `safetensors load_file -> .half() -> save_file`
(what a plain FP16 cast costs; it holds the model in memory twice, like the original script).
Each candidate runs in its own process; RssAnon (heap, the memory that can run a machine out) is
sampled from /proc every 10 ms, and VmHWM (peak RSS, including reclaimable mapped file pages).
The memory bound checked: peak RssAnon <= 1.5 x largest tensor's float32 size + 300 MB.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import run_sampled  # noqa: E402
from bench.workdir import work_folder  # noqa: E402
from quant_core.safetensors_io import OutputTensor, StreamingWriter, tensor_nbytes  # noqa: E402

MiB = 2**20
COPY_SNIPPET = (
    "import sys, torch; from safetensors.torch import load_file, save_file; "
    "sd = load_file(sys.argv[1]); "
    "save_file({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, sys.argv[2])"
)


def generated_shapes(blocks: int, hidden: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for b in range(blocks):
        p = f"blocks.{b}."
        for name in ("q", "k", "v", "o"):
            shapes[p + f"attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.up.weight"] = (4 * hidden, hidden)
        shapes[p + "mlp.down.weight"] = (hidden, 4 * hidden)
        shapes[p + "norm.weight"] = (hidden,)
        shapes[p + "mlp.up.bias"] = (4 * hidden,)
    return shapes


def write_model(path: Path, blocks: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Stream a random fp32 model to disk without holding it in memory."""
    shapes = generated_shapes(blocks, hidden)
    declared = [OutputTensor(k, "F32", s, tensor_nbytes("F32", s)) for k, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    with StreamingWriter(path, declared, {}, overwrite=True) as writer:
        for name, shape in shapes.items():
            writer.write(name, torch.randn(shape, generator=g) * 0.02)
        writer.commit()
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--methods", default="rtn,learned")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "results" / "convert.md")
    args = parser.parse_args()

    with work_folder(args.workdir, "bench-convert-") as workdir:
        model = workdir / "model.safetensors"
        shapes = write_model(model, args.blocks, args.hidden)
        params = sum(math.prod(s) for s in shapes.values())
        largest_fp32 = max(math.prod(s) for s in shapes.values()) * 4
        bound = 1.5 * largest_fp32 + 300 * MiB
        print(
            f"model: {model.stat().st_size / MiB:.0f} MiB fp32, {params / 1e6:.0f}M params, "
            f"largest tensor {largest_fp32 / MiB:.0f} MiB fp32 -> RssAnon bound {bound / MiB:.0f} MiB"
        )

        runs = {
            "copy (load -> half -> save)": [
                sys.executable,
                "-c",
                COPY_SNIPPET,
                str(model),
                str(workdir / "copy.safetensors"),
            ]
        }
        for method in args.methods.split(","):
            runs[f"quant_core {method}"] = [
                sys.executable,
                "-m",
                "quant_core",
                "--input",
                str(model),
                "--output",
                str(workdir / f"{method}.safetensors"),
                "--method",
                method,
                "--overwrite",
                "-q",
                "--device",
                "cpu",
            ]
        results = {}
        for label, cmd in runs.items():
            stats = run_sampled(cmd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            if stats.returncode != 0:
                raise SystemExit(f"{label} failed:\n{stats.output}")
            results[label] = stats
            print(
                f"{label}: {stats.seconds:.1f} s, RssAnon {stats.peak_rss_anon / MiB:.0f} MiB, "
                f"VmHWM {stats.peak_rss / MiB:.0f} MiB"
            )

        baseline = results["copy (load -> half -> save)"].seconds
        lines = [
            f"Generated fp32 model: {params / 1e6:.0f}M params ({model.stat().st_size / MiB:.0f} MiB), "
            f"largest tensor {largest_fp32 / MiB:.0f} MiB as fp32; RssAnon bound {bound / MiB:.0f} MiB. "
            f"{torch.get_num_threads()} CPU threads.",
            "",
            "| run | time (s) | time vs copy | params/s | peak RssAnon (MiB) | within bound | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, s in results.items():
            within = "yes" if s.peak_rss_anon <= bound else "no"
            lines.append(
                f"| {label} | {s.seconds:.1f} | {s.seconds / baseline:.2f}x | {params / s.seconds / 1e6:.1f}M | "
                f"{s.peak_rss_anon / MiB:.0f} | {within} | {s.peak_rss / MiB:.0f} |"
            )
        table = "\n".join(lines)
        print("\n" + table)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
        for p in workdir.glob("*.safetensors"):
            p.unlink()


if __name__ == "__main__":
    main()
