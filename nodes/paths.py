"""Where the nodes read and write: ComfyUI's own folders, never outside them. All file placement is here.

File names arrive from the graph as strings (an API client can send anything), so every name is
checked here: relative, no `..`, and it must be one ComfyUI itself lists for that folder (which
includes symlinked files on shared model drives and `extra_model_paths.yaml` folders, as ComfyUI's
own loaders accept them). Save prefixes are cleaned to plain file-name characters, and every save is
published the same way: a complete hidden file in the destination folder, renamed to the first free
`<name>_NNNNN.safetensors`, so no file is ever replaced or seen half-written.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..quant_core import QuantError
from ..quant_core.staging import StagedFile

SOURCE_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders")
DESTINATIONS = ("diffusion_models", "text_encoders", "output")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
CALIBRATION_FOLDER = "calibration"  # models/calibration, registered with ComfyUI by this pack
TEMP_SUBFOLDER = "learned_rounding_fp16"  # converted files wait in ComfyUI's temp folder until saved
MAX_COUNTER = 99999
_UNSAFE_CHARS = re.compile(r"[^\w\-. ]+")  # \w keeps non-ASCII letters and digits
_MAX_COMPONENT = 120


def _folder_paths():
    import folder_paths

    return folder_paths


def relative_name(name: str) -> PurePosixPath:
    """A user-given name as a path relative to some folder; refused if it could leave that folder."""
    if not name or not name.strip() or "\x00" in name:
        raise QuantError(f"{name!r}: empty or invalid file name")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or Path(name).is_absolute():
        raise QuantError(f"'{name}': absolute paths are refused; give a name relative to the model folder")
    if ".." in parts:
        raise QuantError(f"'{name}': '..' is refused; give a name inside the model folder")
    kept = [p for p in parts if p not in ("", ".")]
    if not kept:
        raise QuantError(f"{name!r}: empty or invalid file name")
    return PurePosixPath(*kept)


def resolve_model_file(folder: str, name: str) -> Path:
    """The path of `name` as ComfyUI lists and finds it in its `folder` paths, or QuantError."""
    rel = relative_name(name).as_posix()
    fp = _folder_paths()
    found = fp.get_full_path(folder, rel) if rel in fp.get_filename_list(folder) else None
    if found is None:
        roots = ", ".join(fp.get_folder_paths(folder))
        raise QuantError(f"'{name}' not found in {folder} ({roots}); refresh the list")
    return Path(found)


def safetensors_names(folder: str) -> list[str]:
    return [n for n in _folder_paths().get_filename_list(folder) if n.lower().endswith(SAFETENSORS_SUFFIXES)]


def sanitize_prefix(prefix: str) -> PurePosixPath:
    """A save prefix ('sub/folder/name') with every component cut to plain file-name characters."""
    parts = []
    for part in relative_name(prefix.strip()).parts:
        clean = _UNSAFE_CHARS.sub("_", part).strip(" .")[:_MAX_COMPONENT]
        parts.append(clean or "_")
    return PurePosixPath(*parts)


def destination_root(destination: str) -> Path:
    """The folder a save goes to: the loader's folder of that name (e.g. models/diffusion_models) or output."""
    fp = _folder_paths()
    if destination not in DESTINATIONS:
        raise QuantError(f"destination '{destination}': choose one of {', '.join(DESTINATIONS)}")
    if destination == "output":
        return Path(fp.get_output_directory())
    paths = [Path(p) for p in fp.get_folder_paths(destination)]
    named = [p for p in paths if p.name == destination]
    return (named or paths)[0]


def calibration_folders() -> list[str]:
    """models/calibration, registered with ComfyUI on first use (so it lists in the loader)."""
    fp = _folder_paths()
    if CALIBRATION_FOLDER not in fp.folder_names_and_paths:
        fp.add_model_folder_path(CALIBRATION_FOLDER, str(Path(fp.models_dir, CALIBRATION_FOLDER)), True)
        fp.folder_names_and_paths[CALIBRATION_FOLDER][1].add(".safetensors")
    return fp.get_folder_paths(CALIBRATION_FOLDER)


def temp_output_path(source_name: str) -> Path:
    """A fresh file in ComfyUI's temp folder (emptied by ComfyUI at start-up) for a conversion of `source_name`."""
    stem = Path(source_name).stem
    return Path(_folder_paths().get_temp_directory(), TEMP_SUBFOLDER, f"{stem}-{uuid.uuid4().hex[:12]}.safetensors")


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


def save_location(root: Path, filename_prefix: str) -> tuple[Path, str]:
    """(folder, name stem) of a save under `root`: the prefix cleaned, its subfolders created inside root."""
    rel = sanitize_prefix(filename_prefix)
    return subfolder(root, rel.parent), rel.name


def staged_copy(source: Path, folder: Path) -> StagedFile:
    """A complete hidden copy of `source` in `folder`: a hard link when both are on one disk, else a synced copy."""
    try:
        return StagedFile.copy_of(source, folder)
    except OSError as exc:
        raise QuantError(f"{folder}: cannot write the model ({exc.strerror or exc}); check free space") from None


def publish(staged: StagedFile, folder: Path, stem: str) -> Path:
    """Give a complete staged file in `folder` the first free `<stem>_NNNNN.safetensors`; returns that path."""
    try:
        target = staged.place_first_free(folder / f"{stem}_{n:05}.safetensors" for n in range(1, MAX_COUNTER + 1))
    except OSError as exc:
        raise QuantError(f"{folder}: cannot write the file ({exc.strerror or exc}); check free space") from None
    if target is None:
        raise QuantError(f"{folder}: every name {stem}_00001 .. _{MAX_COUNTER} is taken; choose another prefix")
    return target
