"""Where the nodes read and write: ComfyUI's own folders, never outside them.

File names arrive from the graph as strings (an API client can send anything), so every name is
checked here: relative, no `..`, and the file it reaches (symlinks followed) must lie inside one of
ComfyUI's model folders. Save prefixes are cleaned to plain file-name characters.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..quant_core import QuantError

SOURCE_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders")
DESTINATIONS = ("diffusion_models", "text_encoders", "output")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
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


def model_roots() -> list[Path]:
    """Real paths of every folder the pack may read from or write to (symlinked folders resolved)."""
    fp = _folder_paths()
    roots = [Path(fp.models_dir)]
    for folder in (*SOURCE_FOLDERS, *DESTINATIONS[:-1]):
        roots.extend(Path(p) for p in fp.get_folder_paths(folder))
    return [r.resolve() for r in roots]


def inside_model_folders(path: Path) -> bool:
    real = path.resolve()
    return any(real.is_relative_to(root) for root in model_roots())


def resolve_model_file(folder: str, name: str) -> Path:
    """The real path of `name` in one of ComfyUI's `folder` paths, or QuantError."""
    rel = relative_name(name)
    roots = _folder_paths().get_folder_paths(folder)
    for root in roots:
        candidate = Path(root, rel)
        if candidate.is_file():
            if not inside_model_folders(candidate):
                raise QuantError(
                    f"'{name}' in {folder} leads to {candidate.resolve()}, outside ComfyUI's model folders"
                )
            return candidate.resolve()
    raise QuantError(f"'{name}' not found in {folder} ({', '.join(str(r) for r in roots)}); refresh the list")


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
