"""Where calibrated rounding's held-out gain goes under classifier-free guidance: per layer type and branch.

    COMFYUI_PATH=/path/to/ComfyUI PYTHONPATH=<stand-ins if needed> /path/to/comfy-venv/bin/python \\
        bench/bench_calibration_diagnosis.py [--prompts 2] [--sweep]

Runs ComfyUI in-process on the CPU with the generated tiny SD1.x checkpoint (tests/tiny_models.py).
Calibration is what CalibrateForQuantFP16 does in tests/test_comfyui_calibration.py (euler, 8 steps,
cfg 7, 2 noises, its prompts combined, negative 'blurry, low quality'), with every UNet Linear input
recorded per conditioning (each prompt, and the negative) and, for each conditioned row, its
difference from the unconditioned row of the same noise (what guidance multiplies by cfg).

Part 1: per layer type, the calibration objective tr(E H E^T) of two roundings over round-to-nearest's,
with H from: the conditioned rows, the unconditioned rows, the guidance differences, and a
conditioning the rounding did not see (rounded without it). The roundings: the kernel
(`calibrated_rounding` on all the data) and the converter's default (`checked_calibrated_rounding`,
the statistics in two folds of whole conditionings, alternately in order of appearance, as the node
records them: a layer is kept calibrated only where the held-out fold says it beats round-to-nearest).
Part 2 (--sweep): output error of whole models (both roundings, biases corrected as the converter
does) against the original on 6 held-out prompts x 2 noises, at cfg 1 and at cfg 7 with 8 negatives,
as ratios to RTN's, per (prompt, negative); every evaluation is 5 outputs (4 single denoiser
evaluations and a 4-step sample). Writes bench/results/calibration_diagnosis.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importable at run time once main() has put the repository on sys.path
    import torch

    from quant_core.calibration import InputStatistics
    from quant_core.rounding import ScaledWeight

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "calibration_diagnosis.md"
SWEEP_PROMPTS = (
    "a green parrot sitting on a branch in the rain forest",
    "an astronaut riding a horse on the moon",
    "a close-up of a pocket watch on old paper",
    "a red sports car on a mountain road",
    "a medieval knight in shining armor",
    "macro photo of a bee on a sunflower",
)
SWEEP_NEGATIVES = {
    "calibration's": "blurry, low quality",
    "empty": "",
    "ugly, deformed hands, ...": "ugly, deformed hands, watermark, text, jpeg artifacts",
    "cartoon, 3d render, ...": "cartoon, 3d render, oversaturated",
    "bad anatomy, ...": "bad anatomy, extra fingers, worst quality",
    "lowres, ... (53 tokens)": (
        "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
        "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry, "
        "artist name"
    ),
    "photo": "photo",
    "dark, night, shadows": "dark, night, shadows",
}
LAYER_TYPES = (
    "time_embed",
    "emb_layers",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out",
    "ff.net.0",
    "ff.net.2",
)
VIEWS = ("conditioned rows", "unconditioned rows", "guidance difference (cond - uncond)", "unseen conditioning")
KERNEL, DEFAULT = "calibrated kernel", "converter default (held-out check)"


def layer_type(name: str) -> str:
    return next((part for part in LAYER_TYPES if part in name), "other")


class Sampling:
    """The tiny checkpoint loaded by ComfyUI, with text encoding cached and Linear weights swappable."""

    def __init__(self, checkpoint: Path):
        import comfy.sd
        import torch

        self.torch = torch
        self.model, self.clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(checkpoint), output_vae=False, output_clip=True
        )
        self.linears = {
            n: m for n, m in self.model.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        self.original = {
            n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in self.linears.items()
        }
        self._encoded: dict[str, list] = {}

    def encode(self, text: str) -> list:
        if text not in self._encoded:
            self._encoded[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._encoded[text]

    def use(self, weights: dict[str, tuple]) -> None:
        """Layer -> (weight, bias or None: the original's); layers not given get the original back."""
        with self.torch.no_grad():
            for name, module in self.linears.items():
                weight, bias = weights.get(name, self.original[name])
                module.weight.copy_(weight)
                if module.bias is not None:
                    module.bias.copy_(self.original[name][1] if bias is None else bias)

    def sample(self, positive: list, negative: list, cfg: float, seed: int, batch: int, start=None, end=None, steps=4):
        import comfy.sample

        latent = self.torch.zeros(batch, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(
            self.model,
            noise,
            steps,
            cfg,
            "euler",
            "normal",
            positive,
            negative,
            latent,
            start_step=start,
            last_step=end,
            force_full_denoise=True,
            seed=seed,
            disable_pbar=True,
        ).float()


class BranchMoments:
    """Sums of every Linear input and its outer products per conditioning and of cond - uncond (same noise).

    The sampler's model function wrapper lists the batch's chunks (cond_or_uncond) and names each
    conditioning (transformer_options uuids); conditionings are labelled in order of first appearance.
    """

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.labels: list[str] | None = None
        self.appearance: dict[object, str] = {}  # conditioning key -> label, in order of first appearance
        self.sums: dict[str, dict[str, list]] = defaultdict(dict)  # layer -> label -> [tokens, sum x, sum x x^T]

    def wrapper(self, apply_model, args: dict):
        chunks, x = args["cond_or_uncond"], args["input"]
        uuids = args["c"].get("transformer_options", {}).get("uuids") or list(range(len(chunks)))
        rows = x.shape[0] // len(chunks)
        self.labels = []
        for kind, key in zip(chunks, uuids, strict=True):
            fresh = "uncond" if kind == 1 else f"cond{sum(lb != 'uncond' for lb in self.appearance.values())}"
            self.labels += [self.appearance.setdefault(key, fresh)] * rows
        try:
            return apply_model(x, args["timestep"], **args["c"])
        finally:
            self.labels = None

    def hook(self, name: str):
        torch = self.sampling.torch

        def record(module, inputs):
            if self.labels is None:
                return
            x = inputs[0].detach().double()
            rows = defaultdict(list)
            for i, label in enumerate(self.labels):
                rows[label].append(i)
            parts = {label: x[r] for label, r in rows.items()}
            if "uncond" in parts:
                parts.update({f"guidance:{lb}": parts[lb] - parts["uncond"] for lb in list(parts) if lb != "uncond"})
            for label, part in parts.items():
                flat = part.reshape(-1, x.shape[-1])
                entry = self.sums[name].setdefault(label, [0, torch.zeros(x.shape[-1], dtype=torch.float64), 0])
                entry[0] += flat.shape[0]
                entry[1] = entry[1] + flat.sum(0)
                entry[2] = entry[2] + flat.T @ flat

        return record

    def record(self, prompts: list[str], negative: str, seeds: int = 2, steps: int = 8) -> None:
        s = self.sampling
        s.model.set_model_unet_function_wrapper(self.wrapper)
        handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in s.linears.items()]
        try:
            positive = [c for p in prompts for c in s.encode(p)]
            s.sample(positive, s.encode(negative), 7.0, 1, seeds, steps=steps)
        finally:
            for h in handles:
                h.remove()
            s.model.model_options.pop("model_function_wrapper", None)

    @property
    def conditionings(self) -> list[str]:
        """Every conditioning's label in order of first appearance (the prompts and 'uncond')."""
        return list(self.appearance.values())

    def statistics(self, layer: str, labels: list[str]):
        """InputStatistics (full moment, no folds) of the given labels' tokens together."""
        from quant_core.calibration import InputStatistics

        entries = [self.sums[layer][lb] for lb in labels]
        count = sum(e[0] for e in entries)
        return InputStatistics(
            count, sum(e[1] for e in entries) / count, second_moment=sum(e[2] for e in entries) / count
        )

    def folded(self, layer: str, labels: list[str]):
        """The statistics of `labels` in two folds of whole conditionings, alternately in order of appearance."""
        from quant_core.calibration import merge_statistics

        ordered = [lb for lb in self.conditionings if lb in labels]
        return merge_statistics([self.statistics(layer, part) for part in (ordered[0::2], ordered[1::2]) if part])


def objective(weight: ScaledWeight, q: torch.Tensor, stats: InputStatistics) -> float:
    """tr(E H E^T) in scaled units, E = W / s - Q, H the statistics' second moment (dense: these widths are small)."""
    h = stats.hessian()
    total = 0.0
    for rows, x in weight.chunks():
        e = x.double() - q[rows].double()
        total += float(((e @ h) * e).sum())
    return total


def scaled_weight(weight: torch.Tensor) -> ScaledWeight:
    """The weight over its power-of-two scale, as the converter rounds it."""
    import torch

    from quant_core.fp16 import choose_scale_exponent
    from quant_core.rounding import ScaledWeight, abs_max

    return ScaledWeight(weight, choose_scale_exponent(abs_max(weight)), torch.device("cpu"))


def diagnosis(moments: BranchMoments, lines: list[str]) -> dict[str, dict]:
    """Part 1's tables; returns the whole models (layer -> (weight, bias)) of RTN and of both roundings."""
    from quant_core.calibrated import bias_shift, calibrated_rounding
    from quant_core.held_out import checked_calibrated_rounding
    from quant_core.methods import rounding_settings
    from quant_core.rounding import round_nearest

    settings = rounding_settings()
    roundings = {
        KERNEL: lambda w, layer, labels: calibrated_rounding(w, settings, moments.statistics(layer, labels)),
        DEFAULT: lambda w, layer, labels: checked_calibrated_rounding(w, settings, moments.folded(layer, labels)),
    }
    s = moments.sampling
    labels = moments.conditionings
    conds = [lb for lb in labels if lb != "uncond"]
    pooled = {r: defaultdict(lambda: defaultdict(lambda: [0.0, 0.0])) for r in roundings}  # type -> view -> sums
    kept: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # type -> [kept calibrated on all data, layers]
    widths, ranks = {}, defaultdict(list)
    models: dict[str, dict] = {"rtn": {}, KERNEL: {}, DEFAULT: {}}
    for name in s.linears:
        weight, bias = s.original[name]
        kind = layer_type(name)
        w = scaled_weight(weight)
        nearest = round_nearest(w, settings).q
        models["rtn"][name] = (nearest.float() * 2.0**w.exponent, None)
        widths[kind] = weight.shape[1]
        ranks[kind].append(
            int(s.torch.linalg.matrix_rank(moments.statistics(name, [conds[0]]).second_moment, rtol=1e-9))
        )
        views = {
            VIEWS[0]: moments.statistics(name, conds),
            VIEWS[1]: moments.statistics(name, ["uncond"]),
            VIEWS[2]: moments.statistics(name, [f"guidance:{c}" for c in conds]),
        }
        everything = moments.statistics(name, labels)
        for rounding_name, rounding in roundings.items():
            outcome = rounding(w, name, labels)
            shift = bias_shift(w, outcome.q, everything.mean)
            models[rounding_name][name] = (
                outcome.q.float() * 2.0**w.exponent,
                None if bias is None else (bias.double() + shift).to(bias.dtype),
            )
            if rounding_name == DEFAULT:
                kept[kind][0] += outcome.details.get("shrinkage", 0.0) < 1.0
                kept[kind][1] += 1
            for view, stats in views.items():
                pooled[rounding_name][kind][view][0] += objective(w, outcome.q, stats)
                pooled[rounding_name][kind][view][1] += objective(w, nearest, stats)
            for held in labels:  # a conditioning the rounding did not see
                q_rest = rounding(w, name, [lb for lb in labels if lb != held]).q
                stats = moments.statistics(name, [held])
                pooled[rounding_name][kind][VIEWS[3]][0] += objective(w, q_rest, stats)
                pooled[rounding_name][kind][VIEWS[3]][1] += objective(w, nearest, stats)
        print(f"{name}: done", flush=True)
    lines += [
        "## Part 1: calibration objective tr(E H E^T), rounding / round-to-nearest, per layer type",
        "",
        (
            "Summed over the layers of a type, then the ratio; each cell: the kernel / the converter's default. "
            "'unseen conditioning': each conditioning in turn (a prompt or the negative) left out of the rounding and "
            "used as H. 'guidance difference': H of the conditioned minus unconditioned input of the same noise and "
            "step (cfg multiplies the error along it); '-' where it is zero (inputs that do not see the text). Rank: "
            "of one prompt's conditioned-row second moment. Kept: layers the converter's default keeps calibrated on "
            "all the data (the others are round-to-nearest, ratio 1; where it keeps a layer its rounding is the "
            "kernel's on the merged folds, i.e. on all the data)."
        ),
        "",
        "| layer type | input width | rank (one prompt) | kept | " + " | ".join(VIEWS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(VIEWS),
    ]
    for kind in sorted(kept):
        cells = [
            " / ".join(
                f"{pooled[r][kind][v][0] / pooled[r][kind][v][1]:.3f}" if pooled[r][kind][v][1] > 0 else "-"
                for r in roundings
            )
            for v in VIEWS
        ]
        lines.append(
            f"| {kind} | {widths[kind]} | {min(ranks[kind])}..{max(ranks[kind])} "
            f"| {kept[kind][0]} of {kept[kind][1]} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    return models


def sweep(sampling: Sampling, models: dict[str, dict], lines: list[str]) -> None:
    """Part 2: whole models on held-out prompts and negatives, each output's error over RTN's."""
    import test_comfyui_calibration as graphs

    torch = sampling.torch
    settings = [("cfg 1", 1.0, "")] + [(f"cfg 7, negative {k}", 7.0, v) for k, v in SWEEP_NEGATIVES.items()]
    twins = {  # a model identical to an earlier one (the check kept every layer) is not sampled again
        name: next((other for other in list(models)[:i] if same_weights(models[other], weights)), None)
        for i, (name, weights) in enumerate(models.items())
    }
    outputs: dict[str, dict] = {}
    for name, weights in {"original": {}, **models}.items():
        if twins.get(name):
            outputs[name] = outputs[twins[name]]
            continue
        sampling.use(weights)
        outputs[name] = {}
        for (label, cfg, negative), (p, prompt) in [(st, pp) for st in settings for pp in enumerate(SWEEP_PROMPTS)]:
            for e, (start, end) in enumerate(graphs.EVALUATIONS):
                outputs[name][label, p, e] = sampling.sample(
                    sampling.encode(prompt), sampling.encode(negative), cfg, graphs.HELD_OUT_SEED + p, 2, start, end
                )
        print(f"sweep: {name} done", flush=True)
    sampling.use({})

    def error(name, key):
        ref = outputs["original"][key]
        return float(torch.linalg.norm(outputs[name][key] - ref) / torch.linalg.norm(ref))

    lines += [
        "## Part 2: output error of whole models vs the original, ratio to RTN",
        "",
        (
            f"{len(SWEEP_PROMPTS)} held-out prompts x 2 held-out noises; per (prompt, setting): geometric mean over "
            "its 5 outputs (4 single denoiser evaluations and the 4-step sample); 'worst' is the worst single output."
        ),
        "",
    ]
    for name in (KERNEL, DEFAULT):
        if twins[name]:
            lines += [
                f"### {name}",
                "",
                f"Every weight and bias identical to the {twins[name]}'s: the same outputs.",
                "",
            ]
            continue
        ratios_all = []
        lines += [
            f"### {name}",
            "",
            "| setting | per held-out prompt | geometric mean | worst output |",
            "|---|---|---:|---:|",
        ]
        for label, _, _ in settings:
            per_prompt, worst = [], 0.0
            for p in range(len(SWEEP_PROMPTS)):
                r = [error(name, (label, p, e)) / error("rtn", (label, p, e)) for e in range(len(graphs.EVALUATIONS))]
                per_prompt.append(graphs.geometric_mean(r))
                worst = max(worst, *r)
                ratios_all += r
            lines.append(
                f"| {label} | {' '.join(f'{x:.2f}' for x in per_prompt)} "
                f"| {graphs.geometric_mean(per_prompt):.3f} | {worst:.2f} |"
            )
        above = sum(r > 1 for r in ratios_all) / len(ratios_all)
        lines += [
            "",
            (
                f"All {len(ratios_all)} outputs: geometric mean {graphs.geometric_mean(ratios_all):.3f}, worst "
                f"{max(ratios_all):.2f}, {above:.0%} above RTN."
            ),
            "",
        ]


def same_weights(a: dict[str, tuple], b: dict[str, tuple]) -> bool:
    import torch

    def equal(x, y) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return a.keys() == b.keys() and all(equal(a[k][0], b[k][0]) and equal(a[k][1], b[k][1]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help="calibration prompts")
    parser.add_argument("--sweep", action="store_true", help="also compare whole models on held-out prompts/negatives")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path[:0] = [comfyui, str(ROOT), str(ROOT / "tests")]
    os.chdir(comfyui)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import test_comfyui_calibration as graphs
    import tiny_models
    from comfyui_server import CHECKPOINT, LORA

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_calibration_diagnosis_") as tmp:
        tiny_models.write_models(Path(tmp), CHECKPOINT, LORA)
        sampling = Sampling(Path(tmp) / "checkpoints" / CHECKPOINT)
    moments = BranchMoments(sampling)
    prompts = list(graphs.CALIBRATION_PROMPTS[: args.prompts])
    moments.record(prompts, graphs.NEGATIVE)
    lines = [
        "# Calibrated rounding under guidance: where the held-out gain goes",
        "",
        (
            f"`bench/bench_calibration_diagnosis.py{' --sweep' if args.sweep else ''}` (rerun it to reproduce), "
            f"the ComfyUI checkout {Path(comfyui).name} in-process on the CPU, the generated tiny SD1.x checkpoint. "
            f"Calibration: {args.prompts} prompts x 2 noises x 8 euler steps, cfg 7, negative '{graphs.NEGATIVE}' "
            "(tests/test_comfyui_calibration.py)."
        ),
        "",
    ]
    models = diagnosis(moments, lines)
    if args.sweep:
        sweep(sampling, models, lines)
    lines += [f"Whole run {time.monotonic() - started:.0f} s."]
    from bench.results_file import write_results

    write_results(args.output, lines)


if __name__ == "__main__":
    main()
