"""LoadCheckpointForQuant: pick a file (and a component of a full checkpoint) without loading it."""

from __future__ import annotations

from ..quant_core import QuantError
from ..quant_core.safetensors_io import read_header
from .handles import CATEGORY, SOURCE_TYPE, QuantSource
from .paths import SOURCE_FOLDERS, resolve_model_file, safetensors_names

# Tensor-name prefixes of each component in the full-checkpoint layouts ComfyUI loads, in the order
# they are tried. Stripping them leaves the layout of a standalone file of that kind, which the
# loader (and ComfyUI's own loaders) detect.
EVERYTHING = "everything"
COMPONENTS: dict[str, tuple[str, ...]] = {
    EVERYTHING: ("",),
    "diffusion model": ("model.diffusion_model.", "model.model."),
    "text encoder: CLIP-L": (
        "cond_stage_model.transformer.",  # SD1.x
        "conditioner.embedders.0.transformer.",  # SDXL
        "text_encoders.clip_l.transformer.",  # SD3 / Flux all-in-one
    ),
    "text encoder: CLIP-G": ("text_encoders.clip_g.transformer.",),
    "text encoder: T5XXL": ("text_encoders.t5xxl.transformer.",),
}


def source_choices() -> list[str]:
    return [f"{folder}/{name}" for folder in SOURCE_FOLDERS for name in safetensors_names(folder)]


# A standalone file (diffusion_models/, text_encoders/) has no checkpoint prefix; its tensor names say
# what it is: Hugging Face CLIP layouts start with text_model., T5 encoders with encoder.block. / shared.
STANDALONE_TEXT_ENCODERS: dict[str, tuple[str, ...]] = {
    "text encoder: CLIP-L": ("text_model.",),
    "text encoder: CLIP-G": ("text_model.",),
    "text encoder: T5XXL": ("encoder.block.", "shared."),
}


def standalone_kind(names: list[str]) -> str | None:
    """What a file without checkpoint prefixes holds ("diffusion model" or a text encoder), None for a checkpoint."""
    prefixes = [p for ps in COMPONENTS.values() for p in ps if p]
    if not names or any(n.startswith(tuple(prefixes)) for n in names):
        return None
    for component, starts in STANDALONE_TEXT_ENCODERS.items():
        if any(n.startswith(starts) for n in names):
            return component
    return "diffusion model"


def component_prefix(names: list[str], component: str, source: str) -> str:
    """The prefix of `component` in a file with these tensor names ("" for a standalone file of that kind)."""
    if component not in COMPONENTS:
        raise QuantError(f"component '{component}': choose one of {', '.join(COMPONENTS)}")
    if component == EVERYTHING:
        return ""  # even a file with no tensors at all
    for prefix in COMPONENTS[component]:
        if any(n.startswith(prefix) for n in names):
            return prefix
    kind = standalone_kind(names)
    same_signature = kind in STANDALONE_TEXT_ENCODERS and STANDALONE_TEXT_ENCODERS[
        kind
    ] == STANDALONE_TEXT_ENCODERS.get(component)
    if kind == component or same_signature:  # CLIP-L and CLIP-G files look alike
        return ""  # the whole file is that component
    tried = ", ".join(f"'{p}'" for p in COMPONENTS[component])
    found = f"it is a standalone {kind} file" if kind else f"no tensor starts with {tried}"
    raise QuantError(f"{source}: no {component} in this file ({found}); choose '{kind or EVERYTHING}'")


class LoadCheckpointForQuant:
    """Chooses what to convert. Reads only the file's header: the weights stay on disk."""

    DESCRIPTION = (
        "Pick a safetensors file from checkpoints, diffusion_models or text_encoders to convert to scaled FP16."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (SOURCE_TYPE,)
    RETURN_NAMES = ("source",)
    OUTPUT_TOOLTIPS = ("A handle to the file; nothing is loaded until LearnedRoundingFP16 streams it.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model_file": (source_choices(), {"tooltip": "folder/file among ComfyUI's model folders"}),
                "component": (
                    list(COMPONENTS),
                    {
                        "default": "everything",
                        "tooltip": "For full checkpoints: the part to convert (its prefix is stripped). A standalone "
                        "diffusion model or text encoder file is converted whole.",
                    },
                ),
            }
        }

    def load(self, model_file: str, component: str) -> tuple[QuantSource]:
        folder, _, name = model_file.partition("/")
        if folder not in SOURCE_FOLDERS or not name:
            raise QuantError(
                f"'{model_file}': expected '<folder>/<file>' with folder one of {', '.join(SOURCE_FOLDERS)}"
            )
        path = resolve_model_file(folder, name)
        header, _ = read_header(path)
        names = [k for k in header if k != "__metadata__"]
        prefix = component_prefix(names, component, model_file)
        count = sum(1 for n in names if n.startswith(prefix))
        return (QuantSource(str(path), model_file, component, prefix, count),)
