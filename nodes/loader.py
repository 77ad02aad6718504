"""ScaledFP16Loader: scaled_fp16 files as a MODEL (diffusion model) and/or a CLIP (text encoders).

The file is validated before ComfyUI builds anything (a broken scale would otherwise load fine and
produce garbage), the model is built with the pack's custom operations, and afterwards every
non-unit scale must have been taken by a layer (a scale on a weight the model reads some other way
would be silently ignored).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..quant_core import QuantError
from ..quant_core.reader import read_scaled_file
from .handles import CATEGORY
from .ops import applied_scales, scaled_fp16_ops
from .paths import resolve_model_file, safetensors_names

NONE = "None"


def check_scales_applied(source: str, expected: list[str], model: torch.nn.Module) -> None:
    """Every scale in `expected` (keys, one per scaled weight) must have been taken by one of the pack's layers."""
    # Counted per layer, not per key: two text encoders of one CLIP can share relative key names.
    taken = [key for key, value in applied_scales(model) if value != 1]
    if len(taken) < len(expected):
        missed = [k for k in expected if k not in set(taken)] or expected
        raise QuantError(
            f"{source}: {len(expected) - len(taken)} scaled weights are not used through a layer that applies "
            f"their scale (e.g. '{missed[0]}'); this model kind is not supported"
        )


def load_diffusion_model(path: Path):
    import comfy.sd

    scaled = read_scaled_file(path)
    patcher = comfy.sd.load_diffusion_model_state_dict(
        scaled.tensors, model_options={"custom_operations": scaled_fp16_ops()}
    )
    if patcher is None:
        raise QuantError(f"{path}: ComfyUI cannot detect the diffusion model type of this file")
    check_scales_applied(str(path), scaled.expected_scales, patcher.model.diffusion_model)
    return patcher


def clip_type_choices() -> list[str]:
    """CLIPLoader's names: ComfyUI's CLIPType members in lower case, plus "sdxl" (two files, the default type)."""
    import comfy.sd

    names = [t.name.lower() for t in comfy.sd.CLIPType]
    return [names[0], "sdxl", *names[1:]]


def load_text_encoders(paths: list[Path], clip_type: str):
    import comfy.sd
    import folder_paths

    files = [read_scaled_file(p) for p in paths]
    clip = comfy.sd.load_text_encoder_state_dicts(
        state_dicts=[scaled.tensors for scaled in files],
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=getattr(comfy.sd.CLIPType, clip_type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION),
        model_options={"custom_operations": scaled_fp16_ops()},
    )
    expected = [key for scaled in files for key in scaled.expected_scales]
    check_scales_applied(", ".join(str(p) for p in paths), expected, clip.cond_stage_model)
    return clip


class ScaledFP16Loader:
    """Loads scaled FP16 files (this pack's or the original script's) for normal diffusion graphs."""

    DESCRIPTION = (
        "Load a scaled FP16 diffusion model (MODEL) and/or text encoders (CLIP): weights stay float16 in memory "
        "and are dequantized when used; LoRAs apply as usual. Use it for scaled files: ComfyUI's UNETLoader and "
        "CLIPLoader drop the scales and give garbage without an error. Plain files load here or anywhere."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("None when no diffusion model is chosen.", "None when no text encoder is chosen.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        encoders = [NONE, *safetensors_names("text_encoders")]
        return {
            "required": {
                "unet_name": ([NONE, *safetensors_names("diffusion_models")],),
                "clip_name": (encoders,),
                "clip_name2": (encoders, {"tooltip": "Second text encoder for dual types (flux, sd3, sdxl, ...)"}),
                "type": (clip_type_choices(), {"tooltip": "Text encoder type, as in CLIPLoader / DualCLIPLoader"}),
            }
        }

    def load(self, unet_name: str, clip_name: str, clip_name2: str, type: str) -> tuple:
        encoders = [resolve_model_file("text_encoders", n) for n in (clip_name, clip_name2) if n != NONE]
        if unet_name == NONE and not encoders:
            raise QuantError("choose a diffusion model (unet_name) and/or a text encoder (clip_name)")
        model = load_diffusion_model(resolve_model_file("diffusion_models", unet_name)) if unet_name != NONE else None
        clip = load_text_encoders(encoders, type) if encoders else None
        return (model, clip)
