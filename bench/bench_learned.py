"""What the data-free learned search buys over round-to-nearest, per weight, in one run.

    python bench/bench_learned.py [model.safetensors]   (default: the built-in example model)

For every quantized weight: the plain error ||E|| and the error along the top-k principal
directions ||U_k^T E V_k|| (U, V from an exact SVD computed here, independently of the converter),
as ratios learned / round-to-nearest. Writes bench/results/learned_<source name>.md.
A single layer's ratio is noisy (with k=1 its round-to-nearest error is one random number that can be
close to zero), so read the aggregate and the median.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workdir import work_folder  # noqa: E402
from quant_core import ConvertOptions, convert_file  # noqa: E402
from quant_core.example import write_example_model  # noqa: E402
from quant_core.reader import dequantize_state_dict  # noqa: E402


def errors(original: torch.Tensor, restored: torch.Tensor, k: int) -> tuple[float, float]:
    w = original.double()
    e = w - restored.double()
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return float(torch.linalg.norm(e)), float(torch.linalg.norm(u[:, :k].T @ e @ vh[:k].T))


def main() -> None:
    with work_folder(None, "bench-learned-") as work:
        source = Path(sys.argv[1]) if len(sys.argv) > 1 else write_example_model(work / "example.safetensors")
        k = 1
        outputs, seconds = {}, {}
        for method in ("rtn", "learned"):
            out = work / f"{method}.safetensors"
            started = time.perf_counter()
            convert_file(source, out, ConvertOptions(method=method, rounding={"top_k": k}, overwrite=True))
            seconds[method] = time.perf_counter() - started
            outputs[method] = dequantize_state_dict(load_file(str(out)), dtype=torch.float64)
        original = load_file(str(source))
        rows, proj_ratios = [], []
        totals = {"plain": [0.0, 0.0], "proj": [0.0, 0.0]}
        for name, rtn_w in outputs["rtn"].items():
            if not (name.endswith(".weight") and rtn_w.ndim == 2) or name not in outputs["learned"]:
                continue
            plain_r, proj_r = errors(original[name], rtn_w, k)
            plain_l, proj_l = errors(original[name], outputs["learned"][name], k)
            if plain_r == 0:
                continue  # exact under both
            totals["plain"][0] += plain_r**2
            totals["plain"][1] += plain_l**2
            totals["proj"][0] += proj_r**2
            totals["proj"][1] += proj_l**2
            proj_ratios.append(proj_l / proj_r if proj_r else 1.0)
            rows.append(f"| {name} | {tuple(rtn_w.shape)} | {plain_l / plain_r:.4f} | {proj_l / proj_r:.4f} |")
        plain_ratio = (totals["plain"][1] / totals["plain"][0]) ** 0.5
        proj_ratio = (totals["proj"][1] / totals["proj"][0]) ** 0.5
        table = "\n".join(
            [
                f"Source: {source.name}; top_k={k}; principal directions from an exact SVD. "
                f"Time: rtn {seconds['rtn']:.2f} s, learned {seconds['learned']:.2f} s "
                f"({seconds['learned'] / seconds['rtn']:.2f}x).",
                "",
                "| weight | shape | plain error, learned / rtn | principal-direction error, learned / rtn |",
                "|---|---|---|---|",
                *rows,
                f"| **all (root of summed squares)** | | **{plain_ratio:.4f}** | **{proj_ratio:.4f}** |",
                f"| **median layer** | | | **{float(torch.tensor(proj_ratios).median()):.4f}** |",
            ]
        )
        print(table)
        out = ROOT / "bench" / "results" / f"learned_{source.stem}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


if __name__ == "__main__":
    main()
