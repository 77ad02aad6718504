"""A LoRA on a scaled model through ModelPatcher's full-load and lowvram paths, in real ComfyUI.

A CPU always loads models fully, so the lowvram path is reached by asking ModelPatcher for it
directly (`patch_model(lowvram_model_memory=1)`: every layer gets its patches as a per-forward
weight function). Run by tests/test_comfyui_integration.py in ComfyUI's Python with the current
directory set to ComfyUI; prints one JSON line of measurements.

    cd ComfyUI && python /path/to/repo/tests/comfyui_patch_paths.py WORKDIR
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.getcwd())

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.append(str(ROOT / "tests"))
import tiny_models  # noqa: E402

spec = importlib.util.spec_from_file_location("pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
from pack.nodes.loader import load_diffusion_model  # noqa: E402
from pack.quant_core import ConvertOptions, convert_file  # noqa: E402

CPU = torch.device("cpu")
LORA_LAYER = "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k"


def main(workdir: Path) -> None:
    weights = tiny_models.tiny_unet_state_dict()
    plain, scaled = workdir / "unet.safetensors", workdir / "unet_scaled.safetensors"
    save_file(weights, str(plain))
    convert_file(plain, scaled, ConvertOptions(method="rtn", overwrite=True))
    lora = tiny_models.tiny_lora_state_dict()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))

    def forward(patcher) -> torch.Tensor:
        with torch.no_grad():
            return patcher.model.apply_model(x, torch.tensor([1.0]), c_crossattn=context)

    def full_load(patcher) -> torch.Tensor:
        comfy.model_management.load_models_gpu([patcher])
        return forward(patcher)

    def with_lora(patcher):
        return comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0]

    reference = full_load(comfy.sd.load_diffusion_model(str(plain)))
    reference_lora = full_load(with_lora(comfy.sd.load_diffusion_model(str(plain))))
    ours = full_load(load_diffusion_model(scaled))
    ours_full = full_load(with_lora(load_diffusion_model(scaled)))
    comfy.model_management.unload_all_models()

    lowvram = with_lora(load_diffusion_model(scaled))
    lowvram.patch_model(device_to=CPU, lowvram_model_memory=1)
    layer = comfy.utils.get_attr(lowvram.model, LORA_LAYER)
    functions = [type(f).__name__ for f in layer.weight_function]
    ours_lowvram = forward(lowvram)
    lowvram.unpatch_model(CPU)
    ours_unpatched = forward(lowvram)

    def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    print(
        json.dumps(
            {
                "lora_effect": max_diff(reference_lora, reference),
                "full_load_effect_error": max_diff(ours_full - ours, reference_lora - reference),
                "lowvram_effect_error": max_diff(ours_lowvram - ours, reference_lora - reference),
                "lowvram_weight_functions": functions,
                "lowvram_weight_dtype": str(layer.weight.dtype),
                "unpatched_vs_unpatched": max_diff(ours_unpatched, ours),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
