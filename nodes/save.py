"""SaveScaledFP16: give a converted file its place in ComfyUI, atomically and never over another file."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..quant_core import QuantError
from ..quant_core.report import report_path_for
from .handles import CATEGORY, SCALED_TYPE, ScaledFP16File
from .paths import DESTINATIONS, destination_root, publish, save_location, staged_copy

log = logging.getLogger(__name__)


def save(handle: ScaledFP16File, filename_prefix: str, destination: str) -> tuple[Path, Path]:
    """Save the handle's file, and its report beside it; returns (saved path, destination root)."""
    source = Path(handle.path)
    if not source.is_file():
        raise QuantError(
            f"{source}: the converted file is gone (ComfyUI empties its temp folder at start); run the conversion again"
        )
    root = destination_root(destination)
    folder, stem = save_location(root, filename_prefix)
    with staged_copy(source, folder) as staged:
        target = publish(staged, folder, stem)
    dataclasses.replace(handle.report, output=str(target)).write_json(report_path_for(target))
    log.info("saved %s", target)
    return target, root


class SaveScaledFP16:
    """Saves where ScaledFP16Loader finds it (after a refresh), under a name no other file has."""

    DESCRIPTION = (
        "Save a converted model into diffusion_models, text_encoders or output (never overwrites). A scaled file "
        "loads only with Scaled FP16 Loader (ComfyUI's UNETLoader/CLIPLoader ignore its scales: garbage); a plain "
        "one with any loader."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    OUTPUT_TOOLTIPS = ("The saved file's name relative to the destination folder.",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "scaled_model": (SCALED_TYPE,),
                "filename_prefix": (
                    "STRING",
                    {"default": "scaled_fp16/model", "tooltip": "sub/folder/name; _NNNNN is added"},
                ),
                "destination": (list(DESTINATIONS), {"default": DESTINATIONS[0]}),
            }
        }

    def save(self, scaled_model: ScaledFP16File, filename_prefix: str, destination: str) -> dict[str, Any]:
        target, root = save(scaled_model, filename_prefix, destination)
        name = target.relative_to(root).as_posix()
        folder = target.parent.relative_to(root).as_posix()
        saved = {"filename": target.name, "subfolder": "" if folder == "." else folder, "type": destination}
        return {"ui": {"saved": [saved]}, "result": (name,)}
