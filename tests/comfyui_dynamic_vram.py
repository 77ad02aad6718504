"""ComfyUI's own layers through emulated Dynamic VRAM, against its plain full load on the CPU.

Run in ComfyUI's Python with the current directory set to ComfyUI; prints one JSON line of
measurements (or {"available": false, "reason": ...} where this ComfyUI has no Dynamic VRAM).
The tiny SD1.x UNet of tiny_models, stored in float16, with and without the tiny LoRA.

    cd ComfyUI && python /path/to/repo/tests/comfyui_dynamic_vram.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parent))

from comfy.cli_args import args

args.cpu = True

import comfy.model_management
import comfy.sd
import comfy.utils
import emulated_dynamic_vram as emulated
import tiny_models
import torch

X = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
CONTEXT = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
LORA_LAYERS = sorted(f"diffusion_model.{name}" for name in tiny_models.LORA_TARGETS)


def forward(patcher) -> torch.Tensor:
    with torch.no_grad():
        return patcher.model.apply_model(X, torch.tensor([1.0]), c_crossattn=CONTEXT)


def loaded_forward(patcher) -> torch.Tensor:
    comfy.model_management.load_models_gpu([patcher])
    return forward(patcher)


def with_lora(patcher):
    return comfy.sd.load_lora_for_models(patcher, None, tiny_models.tiny_lora_state_dict(), 1.0, 0)[0]


def build(weights: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    options = {} if dtype is None else {"dtype": dtype}
    return comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in weights.items()}, model_options=options)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def rounding_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most representable 16-bit float values between two tensors of one 16-bit dtype, elementwise."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((ordered(a) - ordered(b)).abs().max())


def merged_weights(patcher) -> dict[str, torch.Tensor]:
    """The LoRA layers' weights of a fully loaded plain patcher (ComfyUI merged the LoRA into them)."""
    return {n: comfy.utils.get_attr(patcher.model, n).weight.detach().clone() for n in LORA_LAYERS}


def references(weights: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
    plain = loaded_forward(build(weights, dtype))
    lora_patcher = with_lora(build(weights, dtype))
    lora = loaded_forward(lora_patcher)
    merged = merged_weights(lora_patcher)
    comfy.model_management.unload_all_models()
    return {"plain": plain, "lora": lora, "merged": merged}


def lora_run(emu: emulated.EmulatedDynamicVram, base, ref: dict) -> dict:
    """Plain output, LoRA output twice (copy + commit, then resident), back to plain (dirty reload), detach."""
    model = base.model
    host = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = loaded_forward(base)
    lora_patcher = with_lora(base)
    first = loaded_forward(lora_patcher)
    lowvram = sorted(n for n, m in model.named_modules() if getattr(m, "weight_lowvram_function", None) is not None)
    layers = {n: comfy.utils.get_attr(model, n) for n in lowvram}
    functions = sorted({type(m.weight_lowvram_function).__name__ for m in layers.values()})
    before = emu.stats()
    second = loaded_forward(lora_patcher)
    after = emu.stats()
    resident = {n: m for n, m in layers.items() if emu.slot(m).memory is not None and hasattr(m, "_v_weight")}
    committed = {n: m._v_weight.detach().clone() for n, m in resident.items()}
    switched_back = loaded_forward(base)  # load_models_gpu detaches the LoRA clone, reloads base marked dirty
    loaded_forward(lora_patcher)
    lora_patcher.detach()  # unpatch_model(unpatch_weights=True): pins released, slots evicted
    detached = emu.stats()
    restored = loaded_forward(base)
    return {
        "patcher": type(base).__name__,
        "weight_dtype": str(next(iter(layers.values())).weight.dtype) if layers else None,
        "model_bytes": base.model_size(),
        "plain_vs_full_load": max_diff(plain, ref["plain"]),
        "lora_effect": max_diff(ref["lora"], ref["plain"]),
        "lora_first_vs_full_load": max_diff(first, ref["lora"]),
        "lora_second_vs_full_load": max_diff(second, ref["lora"]),
        "lora_second_vs_first": max_diff(second, first),
        "lowvram_function_layers": lowvram,
        "lowvram_functions": functions,
        "committed_layers": sorted(committed),
        "committed_equal_to_host": sorted(n for n, w in committed.items() if torch.equal(w, layers[n].weight)),
        "committed_vs_full_load_merged_steps": max(
            (rounding_steps(w, ref["merged"][n]) for n, w in committed.items()), default=None
        ),
        "stats_after_first_lora_forward": before,
        "second_forward": {k: after[k] - before[k] for k in ("faults", "failed_faults", "transfers", "evictions")},
        "switched_back_vs_plain": max_diff(switched_back, plain),
        "detached": {k: detached[k] for k in ("resident_bytes", "host_buffer_bytes", "registered_pin_bytes")},
        "restored_vs_plain": max_diff(restored, plain),
        "host_weights_changed": [n for n, p in model.named_parameters() if not torch.equal(p, host[n])],
    }


def replaced_names() -> dict[str, object]:
    """What each name in emulated.REPLACED is bound to now."""
    return {dotted: emulated.bound(dotted) for dotted in emulated.REPLACED_NAMES}


def main() -> None:
    reason = emulated.unavailable_reason()
    if reason is not None:
        print(json.dumps({"available": False, "reason": reason}))
        return
    f16, bf16 = torch.float16, torch.bfloat16
    weights = {f16: {k: v.half() for k, v in tiny_models.tiny_unet_state_dict().items()}}
    weights[bf16] = {k: v.bfloat16() for k, v in tiny_models.tiny_unet_state_dict().items()}
    ref = {dtype: references(weights[dtype], dtype) for dtype in (f16, bf16)}
    model_bytes = sum(v.nbytes for v in weights[f16].values())
    originals = replaced_names()
    not_replaced = set()
    runs = {}
    # name: (dtype, built by ComfyUI's loader inside building() rather than converted, emulation options)
    cases = {
        "fp16_converted": (f16, False, {}),
        "bf16_built": (bf16, True, {}),
        "fp16_half_vram": (f16, False, {"vram": model_bytes // 2}),  # slots evicted while a forward runs
        "fp16_no_vram_no_pins": (f16, False, {"vram": 0, "pinned_memory": 0}),  # every cast via scratch
    }
    for name, (dtype, built, options) in cases.items():
        with emulated.emulated_dynamic_vram(**options) as emu:
            if built:
                with emu.building():
                    not_replaced |= {k for k, v in replaced_names().items() if v is originals[k]}
                    base = build(weights[dtype], dtype)
            else:
                base = emu.dynamic(build(weights[dtype], dtype))
            runs[name] = lora_run(emu, base, ref[dtype])
    restored = all(v is originals[k] for k, v in replaced_names().items())
    report = {"available": True, "not_replaced_inside": sorted(not_replaced), "restored_on_exit": restored}
    print(json.dumps({**report, **runs}))


if __name__ == "__main__":
    main()
