"""A LoRA on the pack's scaled layers through every way ComfyUI applies weight patches, in real ComfyUI.

A CPU always loads models fully with float32 LoRA math; GPU users get other paths by default. Each
path is reached here in-process, through ModelPatcher's own code: full load with float32 and with
float16 LoRA math (`lora_compute_dtype`, ComfyUI >= 0.30), `patch_model(lowvram_model_memory=1)`
(every layer patched per forward), `partially_load` and `partially_unload` (a mix of both), and
`ModelPatcherDynamic` (Dynamic VRAM, where the version has it; see tests/emulated_dynamic_vram.py
for what is emulated). For each path, at LoRA strength 1 and 16, it measures on every scaled Linear
the LoRA's effect (layer output with minus without the LoRA, same input) against the same LoRA on the
original float32 model loaded by ComfyUI's own loader (full load, float32 math), whether outputs stay
finite, whether unpatching restores the model's output bit for bit, and how the scaled weights are
stored. Run by tests/test_comfyui_patch_paths.py in ComfyUI's Python with ComfyUI's folder current:

    cd ComfyUI && python /path/to/repo/tests/comfyui_patch_paths.py WORKDIR {unet,unet_bf16,clip} [cuda]

and prints one JSON object. With `cuda` (bench/gpu_check.sh) the same paths run on the GPU, and
ModelPatcherDynamic is ComfyUI's real Dynamic VRAM instead of the emulation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.getcwd())

from comfy.cli_args import args  # noqa: E402

ON_GPU = sys.argv[3:4] == ["cuda"]
args.cpu = not ON_GPU

import comfy.hooks  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.append(str(ROOT / "tests"))
import emulated_dynamic_vram  # noqa: E402
import tiny_models  # noqa: E402

spec = importlib.util.spec_from_file_location("pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
from pack.nodes.loader import load_diffusion_model, load_text_encoders  # noqa: E402
from pack.quant_core import ConvertOptions, convert_file  # noqa: E402

OFFLOAD = torch.device("cpu")
DEVICE = comfy.model_management.get_torch_device()
STRENGTHS = (1.0, 16.0)


@dataclass
class Loaded:
    """A model as ComfyUI holds it: the patcher the paths act on (LoRA added), the loader's own patcher, a run."""

    patcher: object
    base: object
    run: Callable[[], torch.Tensor]


def unchanged(patcher):
    return patcher


class UNet:
    """The tiny SD1.x UNet of tests/tiny_models.py; output: one denoiser evaluation."""

    layer_prefix = "diffusion_model."
    targets = [name for name in tiny_models.LORA_TARGETS if not name.endswith("proj_in")]  # the Linear ones

    def __init__(self, workdir: Path, bf16_unet: bool = False):
        self.plain, self.scaled = workdir / "unet.safetensors", workdir / "unet_scaled.safetensors"
        save_file(tiny_models.tiny_unet_state_dict(), str(self.plain))
        self.lora = tiny_models.tiny_lora_state_dict()
        self.x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        self.context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        self.bf16_unet = bf16_unet  # ComfyUI's --bf16-unet: the model is built in bfloat16

    def _loaded(self, base, strength: float) -> Loaded:
        patcher = comfy.sd.load_lora_for_models(base, None, self.lora, strength, 0)[0] if strength else base

        def run() -> torch.Tensor:
            with torch.no_grad():
                sigma = torch.tensor([1.0], device=DEVICE)
                return patcher.model.apply_model(self.x, sigma, c_crossattn=self.context).to(OFFLOAD)

        return Loaded(patcher, base, run)

    def original(self, strength: float) -> Loaded:
        return self._loaded(comfy.sd.load_diffusion_model(str(self.plain)), strength)

    def ours(self, strength: float, convert: Callable = unchanged) -> Loaded:
        saved, args.bf16_unet = args.bf16_unet, self.bf16_unet
        try:
            base = load_diffusion_model(self.scaled)
        finally:
            args.bf16_unet = saved
        return self._loaded(convert(base), strength)


class CLIP:
    """A full-size CLIP-L text encoder (random weights); output: the prompt's conditioning."""

    layer_prefix = "clip_l.transformer."
    targets = list(tiny_models.CLIP_LORA_TARGETS)

    def __init__(self, workdir: Path):
        self.plain, self.scaled = workdir / "clip_l.safetensors", workdir / "clip_l_scaled.safetensors"
        save_file(tiny_models.clip_l_state_dict(), str(self.plain))
        self.lora = tiny_models.clip_lora_state_dict()

    def _loaded(self, clip, strength: float, convert: Callable = unchanged) -> Loaded:
        # On a CPU ComfyUI loads a new text encoder fully at creation (on a GPU it starts unloaded): undo that.
        comfy.model_management.unload_all_models()
        for module in clip.patcher.model.modules():
            comfy.model_patcher.wipe_lowvram_weight(module)
        clip.patcher = convert(clip.patcher)
        base = clip.patcher
        if strength:
            clip = comfy.sd.load_lora_for_models(None, clip, self.lora, 0, strength)[1]
        tokens = clip.tokenize("a photograph of an astronaut riding a horse")

        def run() -> torch.Tensor:
            with torch.no_grad():
                return clip.cond_stage_model.encode_token_weights(tokens)[0].to(OFFLOAD)

        return Loaded(clip.patcher, base, run)

    def original(self, strength: float) -> Loaded:
        clip = comfy.sd.load_clip([str(self.plain)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        return self._loaded(clip, strength)

    def ours(self, strength: float, convert: Callable = unchanged) -> Loaded:
        return self._loaded(load_text_encoders([self.scaled], "stable_diffusion"), strength, convert)


# --- the paths: each builds the model (`make(convert)`), puts it in its state and yields (loaded, unpatch) ---


@contextlib.contextmanager
def lora_math(dtype: torch.dtype):
    """ComfyUI's LoRA compute dtype on the device (>= 0.30; float16 is its choice on GPUs with fast float16)."""
    table = getattr(comfy.model_management, "LORA_COMPUTE_DTYPES", None)
    if table is None:
        yield  # older ComfyUI: always float32
        return
    saved = table.get(DEVICE)
    table[DEVICE] = dtype
    try:
        yield
    finally:
        table.pop(DEVICE) if saved is None else table.__setitem__(DEVICE, saved)


def back_to_base(loaded: Loaded) -> Callable[[], None]:
    """Unpatch as ComfyUI does when the LoRA is removed, then load the model without it (runnable on the device)."""

    def unpatch() -> None:
        loaded.patcher.unpatch_model(OFFLOAD)
        loaded.base.patch_model(device_to=DEVICE)

    return unpatch


@contextlib.contextmanager
def full_load(make, lora_dtype: torch.dtype = torch.float32):
    loaded = make(unchanged)
    with lora_math(lora_dtype):
        loaded.patcher.patch_model(device_to=DEVICE)
    yield loaded, back_to_base(loaded)


@contextlib.contextmanager
def lowvram(make):
    loaded = make(unchanged)
    loaded.patcher.patch_model(device_to=DEVICE, lowvram_model_memory=1)
    yield loaded, back_to_base(loaded)


@contextlib.contextmanager
def cached_weight_hook(make):
    """The LoRA as a weight hook (ComfyUI's hook LoRAs) on a fully loaded model, applied a second time from
    ComfyUI's cache of the patched weights, which it copies into each weight directly (`MaxSpeed` mode)."""
    loaded = make(unchanged)
    patcher = loaded.patcher
    hook = comfy.hooks.WeightHook()
    hooks = comfy.hooks.HookGroup()
    hooks.add(hook)
    patcher.hook_patches[hook.hook_ref], patcher.patches = patcher.patches, {}  # the LoRA, moved into the hook
    patcher.patch_model(device_to=DEVICE)
    patcher.patch_hooks(hooks)  # computed through the layer's convert/set, then cached
    patcher.patch_hooks(None)
    patcher.patch_hooks(hooks)  # from the cache

    def unpatch() -> None:
        patcher.patch_hooks(None)
        back_to_base(loaded)()

    yield loaded, unpatch


FRACTIONS = [i / 20 for i in range(1, 20)]


def mixed(loaded: Loaded, kind) -> bool:
    """Some LoRA-targeted layers patched in their stored weight and some per forward (at strength 0: any)."""
    return loaded.patcher is loaded.base or len(set(how_patched(loaded.patcher, kind).values())) == 2


@contextlib.contextmanager
def partially_loaded_or_unloaded(make, kind, start: Callable, adjust: Callable):
    """`start`, then `adjust` with the first share of the model's memory that leaves some patched layers each way."""
    loaded = make(unchanged)
    patcher = loaded.patcher
    for fraction in FRACTIONS:
        start(patcher)
        adjust(patcher, int(patcher.model_size() * fraction))
        if mixed(loaded, kind):
            break
        patcher.unpatch_model(OFFLOAD)
    yield loaded, back_to_base(loaded)


def everything_lowvram(patcher) -> None:
    patcher.patch_model(device_to=DEVICE, lowvram_model_memory=1)


def everything_loaded(patcher) -> None:
    with lora_math(torch.float32):
        patcher.patch_model(device_to=DEVICE)


def partially_loaded(make, kind):
    """Everything lowvram, then `partially_load` loads some patched layers."""
    return partially_loaded_or_unloaded(
        make, kind, everything_lowvram, lambda patcher, memory: patcher.partially_load(DEVICE, extra_memory=memory)
    )


def partially_unloaded(make, kind):
    """Full load, then `partially_unload` unloads some patched layers."""
    return partially_loaded_or_unloaded(
        make, kind, everything_loaded, lambda patcher, memory: patcher.partially_unload(OFFLOAD, memory_to_free=memory)
    )


@contextlib.contextmanager
def emulated_dynamic_vram_path(make):
    """ModelPatcherDynamic as ComfyUI loads it on an NVIDIA GPU, emulated on the CPU
    (tests/emulated_dynamic_vram.py)."""
    with emulated_dynamic_vram.emulated_dynamic_vram() as emulated:
        loaded = make(emulated.dynamic)
        comfy.model_management.load_models_gpu([loaded.patcher])
        yield loaded, lambda: comfy.model_management.load_models_gpu([loaded.base])  # detaches the LoRA clone


def start_gpu_dynamic_vram() -> str | None:
    """Initialise comfy_aimdo as ComfyUI's main.py does on NVIDIA GPUs; the reason where it cannot."""
    import comfy_aimdo.control

    try:
        comfy_aimdo.control.init()
        started = comfy_aimdo.control.init_devices(d.index for d in comfy.model_management.get_all_torch_devices())
    except Exception as exc:  # a missing or mismatched native library, or an older protocol
        return f"comfy_aimdo did not start: {exc}"
    return None if started else "comfy_aimdo found no device"


@contextlib.contextmanager
def gpu_dynamic_vram_path(make):
    """ModelPatcherDynamic on the GPU, built by ComfyUI's loaders as with Dynamic VRAM enabled."""
    import comfy.memory_management

    saved = comfy.model_patcher.CoreModelPatcher, comfy.memory_management.aimdo_enabled
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    try:
        loaded = make(unchanged)
        comfy.model_management.load_models_gpu([loaded.patcher])
        yield loaded, lambda: comfy.model_management.load_models_gpu([loaded.base])  # detaches the LoRA clone
    finally:
        comfy.model_management.unload_all_models()
        comfy.model_patcher.CoreModelPatcher, comfy.memory_management.aimdo_enabled = saved


def dynamic_vram_path() -> Callable | str:
    """The ModelPatcherDynamic path for this device, or why it is not available."""
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "comfy.model_patcher has no ModelPatcherDynamic (this ComfyUI has no Dynamic VRAM)"
    if ON_GPU:
        return start_gpu_dynamic_vram() or gpu_dynamic_vram_path
    return emulated_dynamic_vram.unavailable_reason() or emulated_dynamic_vram_path


def paths(kind) -> dict[str, Callable | str]:
    """Path name -> context manager over `make`, or the reason this ComfyUI version does not have the path."""
    have_float16_math = hasattr(comfy.model_management, "LORA_COMPUTE_DTYPES")
    dynamic = dynamic_vram_path()
    return {
        "full load, float32 LoRA math": full_load,
        "full load, float16 LoRA math": (lambda make: full_load(make, torch.float16))
        if have_float16_math
        else "no lora_compute_dtype",
        "patch_model(lowvram_model_memory=1)": lowvram,
        "partially_load": lambda make: partially_loaded(make, kind),
        "partially_unload": lambda make: partially_unloaded(make, kind),
        "ModelPatcherDynamic": dynamic,
        "weight hook, from ComfyUI's cache": cached_weight_hook,
    }


# --- measurements --------------------------------------------------------------------------------


def probe(loaded: Loaded, kind) -> dict[str, torch.Tensor]:
    """Each LoRA-targeted layer's output on a fixed input, called as the model calls it."""
    outputs = {}
    for index, name in enumerate(kind.targets):
        layer = comfy.utils.get_attr(loaded.patcher.model, kind.layer_prefix + name)
        x = torch.randn(8, layer.in_features, generator=torch.Generator().manual_seed(100 + index)).to(DEVICE)
        with torch.no_grad():
            outputs[name] = layer(x).to(OFFLOAD)
    return outputs


def how_patched(patcher, kind) -> dict[str, str]:
    """Per LoRA-targeted layer: per forward ('function') or into the stored weight ('stored')."""
    result = {}
    for name in kind.targets:
        layer = comfy.utils.get_attr(patcher.model, kind.layer_prefix + name)
        per_forward = layer.__dict__.get("weight_function") or layer.__dict__.get("weight_lowvram_function")
        result[name] = "function" if per_forward else "stored"
    return result


def scaled_storage(loaded: Loaded) -> tuple[dict[str, int], list[str]]:
    """Bytes of the scaled Linear weights per storage dtype, and the dtypes ComfyUI would stage them in."""
    storage: dict[str, int] = {}
    staged = set()
    for module in loaded.patcher.model.modules():
        if "scale_weight" in getattr(module, "_parameters", {}):
            dtype = str(module.weight.dtype).removeprefix("torch.")
            storage[dtype] = storage.get(dtype, 0) + module.weight.numel() * module.weight.element_size()
            staged.add(str(getattr(module, "weight_comfy_model_dtype", module.weight.dtype)).removeprefix("torch."))
    return storage, sorted(staged)


def effect_agreement(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Projection of our LoRA effect on the reference's (1 = same size) and the relative residual."""
    dot = float((ours * reference).sum())
    norm_sq = float((reference * reference).sum())
    return {"ratio": dot / norm_sq, "residual": float((ours - reference).norm()) / norm_sq**0.5}


def measure(kind) -> dict:
    with full_load(lambda convert: kind.original(0)) as (reference_plain, unpatch):
        base_probe = probe(reference_plain, kind)
        unpatch()
    references = {}
    for strength in STRENGTHS:
        with full_load(lambda convert, s=strength: kind.original(s)) as (loaded, unpatch):
            references[strength] = {n: out - base_probe[n] for n, out in probe(loaded, kind).items()}
            unpatch()
    with full_load(lambda convert: kind.ours(0)) as (ours_plain, unpatch):
        our_base_probe, our_base_output = probe(ours_plain, kind), ours_plain.run()
        unpatch()

    results = {}
    for path_name, path in paths(kind).items():
        if isinstance(path, str):
            results[path_name] = {"skipped": path}
            continue
        with path(lambda convert: kind.ours(0, convert)) as (loaded, unpatch):
            plain_equal = bool(torch.equal(loaded.run(), our_base_output))
            unpatch()
        per_strength = {"plain_output_equal": plain_equal}
        for strength in STRENGTHS:
            with path(lambda convert, s=strength: kind.ours(s, convert)) as (loaded, unpatch):
                outputs, output = probe(loaded, kind), loaded.run()
                (storage, staged), mechanism = scaled_storage(loaded), how_patched(loaded.patcher, kind)
                unpatch()
                restored = loaded.run()
            per_strength[str(strength)] = {
                "layers": {
                    n: effect_agreement(outputs[n] - our_base_probe[n], references[strength][n]) for n in kind.targets
                },
                "finite": bool(torch.isfinite(output).all())
                and all(bool(torch.isfinite(o).all()) for o in outputs.values()),
                "unpatched_equal": bool(torch.equal(restored, our_base_output)),
                "storage_bytes": storage,
                "staged_dtypes": staged,
                "patched_how": mechanism,
            }
        results[path_name] = per_strength
    return {"model": type(kind).__name__, "paths": results}


MODELS = {"unet": UNet, "unet_bf16": lambda workdir: UNet(workdir, bf16_unet=True), "clip": CLIP}


def main(workdir: Path, model: str) -> None:
    kind = MODELS[model](workdir)
    convert_file(kind.plain, kind.scaled, ConvertOptions(method="rtn", overwrite=True))
    print(json.dumps(measure(kind)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
