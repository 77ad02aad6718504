"""ComfyUI's Dynamic VRAM path, emulated on the CPU (tests/emulated_dynamic_vram.py), on ComfyUI's own layers.

Runs tests/comfyui_dynamic_vram.py in its own ComfyUI process. Skipped unless COMFYUI_PATH points at a
ComfyUI checkout, and where that ComfyUI has no Dynamic VRAM (e.g. 0.3.64):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfyui_dynamic_vram.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
from real_comfyui import require_comfyui, run_script

require_comfyui()

SCRIPT = Path(__file__).resolve().parent / "comfyui_dynamic_vram.py"
LORA_LAYERS = sorted(f"diffusion_model.{name}" for name in tiny_models.LORA_TARGETS)
RUNS = ("fp16_converted", "bf16_built", "fp16_half_vram", "fp16_no_vram_no_pins")


@pytest.fixture(scope="module")
def result() -> dict:
    result = run_script(SCRIPT)
    if not result["available"]:
        pytest.skip(f"no Dynamic VRAM in this ComfyUI: {result['reason']}")
    return result


def test_every_replacement_is_in_place_inside_and_restored_on_exit(result: dict) -> None:
    assert result["not_replaced_inside"] == []
    assert result["restored_on_exit"] is True


@pytest.mark.parametrize("run", RUNS)
def test_outputs_match_comfyuis_full_load(result: dict, run: str) -> None:
    r = result[run]
    assert r["patcher"] == "ModelPatcherDynamic"
    assert r["plain_vs_full_load"] == 0.0
    # The first LoRA forward uses the unrounded merged weight, ComfyUI's full load a 16-bit rounded one.
    assert r["lora_first_vs_full_load"] <= 0.02 * r["lora_effect"]
    assert r["lora_second_vs_full_load"] <= 0.02 * r["lora_effect"]


@pytest.mark.parametrize("run", RUNS)
def test_lora_goes_through_the_lowvram_function_and_never_into_host_weights(result: dict, run: str) -> None:
    r = result[run]
    assert r["lowvram_function_layers"] == LORA_LAYERS
    assert r["lowvram_functions"] == ["LowVramPatch"]
    assert r["host_weights_changed"] == []
    assert r["switched_back_vs_plain"] == 0.0  # the base patcher after the LoRA clone: reloaded dirty
    assert r["restored_vs_plain"] == 0.0  # after detach
    assert r["detached"] == {"resident_bytes": 0, "host_buffer_bytes": 0, "registered_pin_bytes": 0}


@pytest.mark.parametrize("run", ["fp16_converted", "bf16_built"])
def test_patched_weight_is_committed_and_the_next_forward_is_resident(result: dict, run: str) -> None:
    r = result[run]
    assert r["committed_layers"] == LORA_LAYERS
    assert r["committed_equal_to_host"] == []
    assert r["committed_vs_full_load_merged_steps"] <= 1
    slots = r["stats_after_first_lora_forward"]["slots"]
    assert r["second_forward"] == {"faults": slots, "failed_faults": 0, "transfers": 0, "evictions": 0}
    assert r["stats_after_first_lora_forward"]["resident_bytes"] >= r["model_bytes"] * 0.99
    assert r["stats_after_first_lora_forward"]["registered_pin_bytes"] > 0


def test_half_the_vram_evicts_and_copies_again(result: dict) -> None:
    second = result["fp16_half_vram"]["second_forward"]
    assert second["evictions"] > 0 and second["transfers"] > 0 and second["failed_faults"] == 0


def test_no_vram_casts_every_forward_without_pins(result: dict) -> None:
    r = result["fp16_no_vram_no_pins"]
    assert r["stats_after_first_lora_forward"]["faults"] == 0
    assert r["second_forward"]["failed_faults"] == r["stats_after_first_lora_forward"]["slots"]
    assert r["stats_after_first_lora_forward"]["registered_pin_bytes"] == 0
    assert r["committed_layers"] == []
