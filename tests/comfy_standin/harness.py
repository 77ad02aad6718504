"""How the node tests see ComfyUI and the pack (not part of the stand-in's ComfyUI surface).

`import harness` puts the stand-in modules (`comfy`, `folder_paths`, `server`) on sys.path and
imports the repository root the way ComfyUI does: as a package, so the nodes' relative imports of
`quant_core` resolve inside it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().parent
ROOT = STANDIN.parents[1]
PACK_NAME = "learned_rounding_fp16_pack"

if str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))


def import_pack():
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def configure_folders(base: Path) -> dict[str, Path]:
    """ComfyUI's default layout under `base` (models/unet before models/diffusion_models, as ComfyUI lists them)."""
    import folder_paths

    folder_paths.folder_names_and_paths.clear()
    folder_paths.models_dir = str(base / "models")
    layout = {
        "checkpoints": ["checkpoints"],
        "diffusion_models": ["unet", "diffusion_models"],
        "text_encoders": ["text_encoders", "clip"],
        "loras": ["loras"],
        "embeddings": ["embeddings"],
    }
    for folder, subdirs in layout.items():
        for sub in subdirs:
            path = base / "models" / sub
            path.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(folder, str(path))
        folder_paths.folder_names_and_paths[folder][1].update(folder_paths.supported_pt_extensions)
    for name, setter in (("output", folder_paths.set_output_directory), ("temp", folder_paths.set_temp_directory)):
        (base / name).mkdir(exist_ok=True)
        setter(str(base / name))
    return {
        "checkpoints": base / "models" / "checkpoints",
        "diffusion_models": base / "models" / "diffusion_models",
        "unet": base / "models" / "unet",
        "text_encoders": base / "models" / "text_encoders",
        "output": base / "output",
        "temp": base / "temp",
    }
