"""SaveScaledFP16: give a converted file its place in ComfyUI, atomically and never over another file."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path, PurePosixPath
from typing import Any

from ..quant_core import QuantError
from ..quant_core.report import report_path_for
from ..quant_core.staging import StagedFile
from .handles import CATEGORY, SCALED_TYPE, ScaledFP16File
from .paths import DESTINATIONS, destination_root, sanitize_prefix

log = logging.getLogger(__name__)

MAX_COUNTER = 99999


def publish(source: Path, folder: Path, stem: str) -> Path:
    """Place a copy of `source` at the first free `<stem>_NNNNN.safetensors` in `folder`; returns that path."""
    try:
        with StagedFile.copy_of(source, folder) as staged:
            target = staged.place_first_free(folder / f"{stem}_{n:05}.safetensors" for n in range(1, MAX_COUNTER + 1))
    except OSError as exc:
        raise QuantError(f"{folder}: cannot write the model ({exc.strerror or exc}); check free space") from None
    if target is None:
        raise QuantError(f"{folder}: every name {stem}_00001 .. _{MAX_COUNTER} is taken; choose another prefix")
    return target


def subfolder(root: Path, rel: PurePosixPath) -> Path:
    """root/rel, created as needed; refused if an existing part of it (a symlink) leads outside root."""
    root.mkdir(parents=True, exist_ok=True)
    real_root = root.resolve()
    folder = root
    for part in rel.parts:
        folder = folder / part
        if folder.exists() or folder.is_symlink():
            if not folder.resolve().is_relative_to(real_root) or not folder.is_dir():
                raise QuantError(f"{folder}: not a folder inside {root}; choose another filename_prefix")
        else:
            folder.mkdir(exist_ok=True)
    return folder


def save(handle: ScaledFP16File, filename_prefix: str, destination: str) -> tuple[Path, Path]:
    """Save the handle's file; returns (saved path, destination root)."""
    source = Path(handle.path)
    if not source.is_file():
        raise QuantError(
            f"{source}: the converted file is gone (ComfyUI empties its temp folder at start); run the conversion again"
        )
    root = destination_root(destination)
    rel = sanitize_prefix(filename_prefix)
    target = publish(source, subfolder(root, rel.parent), rel.name)
    dataclasses.replace(handle.report, output=str(target)).write_json(report_path_for(target))
    log.info("saved %s", target)
    return target, root


class SaveScaledFP16:
    """Saves where ScaledFP16Loader finds it (after a refresh), under a name no other file has."""

    DESCRIPTION = "Save a scaled FP16 model into diffusion_models, text_encoders or output (never overwrites)."
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
