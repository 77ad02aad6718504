"""A LoRA on the pack's scaled Linear layers, through every path ComfyUI applies weight patches by.

Runs tests/comfyui_patch_paths.py in real ComfyUI (one process per model) and checks, for each path
and LoRA strength: the LoRA's effect on every patched scaled Linear within 2% of the same LoRA on the
original float32 model, without a LoRA the same output as a full load, finite outputs, unpatching
restores the output bit for bit, and Linear weights stored and staged in float16 unless a patch pushes
a layer past float16's range at its scale on a path that stores patched weights (then that layer is
float32 while patched).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from real_comfyui import require_comfyui, run_script

require_comfyui()

SCRIPT = Path(__file__).with_name("comfyui_patch_paths.py")
ON_GPU = os.environ.get("COMFYUI_TEST_DEVICE") == "cuda"  # bench/gpu_check.sh: the same paths on CUDA
MODELS = ("unet", "unet_bf16", "clip")  # unet_bf16: built in bfloat16, as with --bf16-unet
PATHS = (
    "full load, float32 LoRA math",
    "full load, float16 LoRA math",
    "patch_model(lowvram_model_memory=1)",
    "partially_load",
    "partially_unload",
    "ModelPatcherDynamic",
    "weight hook, from ComfyUI's cache",
)
# patched weights are stored
STORING_PATHS = ("full load, float32 LoRA math", "full load, float16 LoRA math", "weight hook, from ComfyUI's cache")
MIXED_PATHS = ("partially_load", "partially_unload")  # some layers stored-patched, some per forward


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    device = ["cuda"] if ON_GPU else []
    return {model: run_script(SCRIPT, str(tmp_path_factory.mktemp(model)), model, *device)["paths"] for model in MODELS}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model", MODELS)
def test_lora_acts_in_real_units_on_every_path(measured: dict, model: str, path: str) -> None:
    result = measured[model][path]
    if "skipped" in result:
        pytest.skip(f"{path}: not in this ComfyUI ({result['skipped']})")
    print(f"\n{model}, {path}:")
    assert result.pop("plain_output_equal"), "without a LoRA the path must compute exactly what a full load does"
    for strength, outcome in result.items():
        ratios = [layer["ratio"] for layer in outcome["layers"].values()]
        residuals = [layer["residual"] for layer in outcome["layers"].values()]
        print(
            f"  strength {strength}: effect ratio {min(ratios):.5f}..{max(ratios):.5f}, "
            f"residual <= {max(residuals):.1e}, "
            f"storage {outcome['storage_bytes']}, patched {sorted(set(outcome['patched_how'].values()))}"
        )
        for name, layer in outcome["layers"].items():
            assert 0.98 <= layer["ratio"] <= 1.02 and layer["residual"] <= 0.02, f"strength {strength}, {name}: {layer}"
        assert outcome["finite"], f"strength {strength}: inf/NaN in the output"
        assert outcome["unpatched_equal"], f"strength {strength}: unpatching did not restore the output exactly"
        storage = outcome["storage_bytes"]
        assert outcome["staged_dtypes"] == ["float16"], "ComfyUI stages the layer in the dtype it stores"
        if path not in STORING_PATHS and not (path in MIXED_PATHS and "stored" in outcome["patched_how"].values()):
            assert set(storage) == {"float16"}, f"strength {strength}: {storage}"
        if strength == "1.0":
            assert set(storage) == {"float16"}, f"a strength-1 LoRA fits float16 at the layer's scale: {storage}"
        if path in MIXED_PATHS:
            assert set(outcome["patched_how"].values()) == {"function", "stored"}, outcome["patched_how"]
