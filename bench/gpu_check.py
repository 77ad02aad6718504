"""The conversion half of the GPU check (bench/gpu_check.sh): the same conversion on the CPU and on a GPU.

    python bench/gpu_check.py [--device cuda] [--hidden 3072] [--out results.md]

Generated layers with one Flux-dev double-block stream's shapes (hidden 3072: qkv 9216x3072, proj
3072x3072, mlp 12288x3072 and 3072x12288, modulation 18432x3072) and input statistics recorded from
generated activations of low effective rank, converted with each method on the CPU and on `--device`:
- rtn: the two files must be bit-identical (round-to-nearest has one answer);
- learned and calibrated: both devices compute in float32, whose sums differ between devices, so a
  value near a rounding tie may go the other way; at most 2% of values may differ, and each layer's
  objective ratio (the method's objective over RTN's) must agree within 0.02.
Times are per device, as ratios to the same device's RTN in the same run. Exit status 1 if a check fails.
A small `--hidden` runs the same code on any machine (tests/test_gpu_check.py does, CPU against CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant_core import ConvertOptions, convert_file  # noqa: E402
from quant_core.calibration import StatisticsRecorder  # noqa: E402

METHODS = ("rtn", "learned", "calibrated")
DIFFERING_LIMIT = 0.02
OBJECTIVE_LIMIT = 0.02


def flux_stream_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    return {
        "img_attn.qkv": (3 * hidden, hidden),
        "img_attn.proj": (hidden, hidden),
        "img_mlp.0": (4 * hidden, hidden),
        "img_mlp.2": (hidden, 4 * hidden),
        "img_mod.lin": (6 * hidden, hidden),
    }


def generated_model(hidden: int, tokens: int, seed: int = 0):
    """(state dict, statistics): Linear weights ~ N(0, 1/n), inputs of low effective rank with outlier channels."""
    g = torch.Generator().manual_seed(seed)
    layers = nn.ModuleDict()
    for name, (rows, cols) in flux_stream_shapes(hidden).items():
        layer = nn.Linear(cols, rows)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(rows, cols, generator=g) / cols**0.5)
            layer.bias.copy_(torch.randn(rows, generator=g) * 0.01)
        layers[name.replace(".", "_")] = layer  # a module name may hold no dot
    with StatisticsRecorder(layers) as recorder, torch.no_grad():
        for layer in layers.values():
            n = layer.in_features
            rank = max(4, n // 32)
            basis = torch.randn(rank, n, generator=g) * torch.logspace(0, -2, rank)[:, None]
            x = torch.randn(tokens, rank, generator=g) @ basis + 0.01 * torch.randn(tokens, n, generator=g)
            x[:, :4] *= 30  # outlier channels
            layer(x)
    state = {f"{name}.{param}": t.detach() for name, layer in layers.items() for param, t in layer.named_parameters()}
    return state, recorder.statistics(model="flux-shaped stream")


def convert(source: Path, out: Path, method: str, device: str, statistics) -> tuple[float, dict]:
    options = ConvertOptions(method=method, device=device, overwrite=True)
    started = time.perf_counter()
    report = convert_file(source, out, options, statistics=statistics if method == "calibrated" else None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, {layer.name: layer for layer in report.layers}


def compare(method: str, cpu_file: Path, gpu_file: Path, cpu_layers: dict, gpu_layers: dict) -> tuple[bool, str]:
    a, b = load_file(str(cpu_file)), load_file(str(gpu_file))
    differing = max(float((a[n] != b[n]).float().mean()) for n in cpu_layers)
    if method == "rtn":
        same = all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
        return same, "bit-identical" if same else f"{differing:.2%} of values differ (must be bit-identical)"
    gap = max(
        abs(cpu_layers[n].details.get("objective_ratio", 1.0) - gpu_layers[n].details.get("objective_ratio", 1.0))
        for n in cpu_layers
    )
    ok = differing <= DIFFERING_LIMIT and gap <= OBJECTIVE_LIMIT
    verdict = f"{differing:.3%} of values differ (<= {DIFFERING_LIMIT:.0%}), objective ratios within {gap:.4f}"
    return ok, f"{verdict} (<= {OBJECTIVE_LIMIT})"


def run(device: str, hidden: int, tokens: int, workdir: Path) -> tuple[bool, list[str]]:
    state, statistics = generated_model(hidden, tokens)
    source = workdir / "flux_stream.safetensors"
    save_file(state, str(source))
    params = sum(t.numel() for k, t in state.items() if k.endswith(".weight"))
    lines = [
        f"Generated Flux-shaped stream, hidden {hidden} ({params / 1e6:.0f}M weight parameters), statistics from "
        f"{tokens} tokens per layer; torch {torch.__version__}, CPU threads {torch.get_num_threads()}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""),
        "",
        f"| method | CPU s | vs CPU rtn | {device} s | vs {device} rtn | {device} time / CPU time | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    passed, times = True, {}
    for method in METHODS:
        runs = {}
        for where in ("cpu", device):
            out = workdir / f"{method}_{where.replace(':', '')}.safetensors"
            runs[where] = (out, *convert(source, out, method, where, statistics))
            times[(method, where)] = runs[where][1]
        ok, verdict = compare(method, runs["cpu"][0], runs[device][0], runs["cpu"][2], runs[device][2])
        passed &= ok
        cpu_s, dev_s = times[(method, "cpu")], times[(method, device)]
        lines.append(
            f"| {method} | {cpu_s:.1f} | {cpu_s / times[('rtn', 'cpu')]:.1f}x | {dev_s:.2f} | "
            f"{dev_s / times[('rtn', device)]:.1f}x | {dev_s / cpu_s:.3f}x | {'PASS' if ok else 'FAIL'}: {verdict} |"
        )
    return passed, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        passed, lines = run(args.device, args.hidden, args.tokens, Path(tmp))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
