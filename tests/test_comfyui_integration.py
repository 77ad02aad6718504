"""The pack inside a real ComfyUI: a headless CPU server driven through its HTTP API.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (`.ci/run` runs it on 0.3.64 and 0.30.0). Run
it with a Python that has ComfyUI's requirements installed, e.g.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfyui_integration.py

(where torchvision/torchaudio have no build for the installed torch, put empty stand-in packages for
them on PYTHONPATH: ComfyUI only imports them). The server gets a temporary --base-directory whose
custom_nodes/ holds a symlink to this repository and whose models/ holds generated models
(tests/tiny_models.py): an SD1.x checkpoint small enough for CPU (its UNet and a CLIP-L), a LoRA and
a tiny autoencoder. The example workflows' API twins are posted as they are, except for the latent
size and step count (64x64 pixels, 10 steps: a 512x512 image takes minutes per step on a CPU).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from comfyui_server import PACK_DIR_NAME, Server, load_workflow, ui_to_api
from real_comfyui import require_comfyui
from safetensors.torch import load_file

require_comfyui()

NODES = ("LoadCheckpointForQuant", "LearnedRoundingFP16", "SaveScaledFP16", "ScaledFP16Loader")


def test_nodes_extension_and_examples_are_registered(server: Server) -> None:
    info = server.get("/object_info")
    for name in NODES:
        assert info[name]["category"] == "quantization/scaled_fp16"
        assert info[name]["python_module"] == f"custom_nodes.{PACK_DIR_NAME}"
    assert info["SaveScaledFP16"]["output_node"] is True
    assert info["ScaledFP16Loader"]["output"] == ["MODEL", "CLIP"]
    assert f"/extensions/{PACK_DIR_NAME}/learned_rounding_fp16.js" in server.get("/extensions")
    templates = sorted(server.get("/workflow_templates")[PACK_DIR_NAME])
    assert templates == ["calibrate_and_quantize", "load_and_sample", "quantize_and_save"]


@pytest.mark.parametrize("name", ["quantize_and_save", "load_and_sample"])
def test_api_twins_are_the_ui_workflows(server: Server, name: str) -> None:
    ui, api = load_workflow(name)
    info = server.get("/object_info")
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui, info) == strip


@pytest.fixture(scope="module")
def saved(server: Server) -> dict:
    """Example workflow 1: the checkpoint's UNet and CLIP-L quantized and saved."""
    _, prompt = load_workflow("quantize_and_save")
    outputs = server.run(prompt)
    return outputs


def test_quantize_and_save_writes_loadable_files(server: Server, saved: dict) -> None:
    models = server.base / "models"
    unet = saved["3"]["saved"][0]
    clip = saved["6"]["saved"][0]
    assert unet == {"filename": "sd15_unet_scaled_00001.safetensors", "subfolder": "", "type": "diffusion_models"}
    assert clip == {"filename": "sd15_clip_l_scaled_00001.safetensors", "subfolder": "", "type": "text_encoders"}
    unet_file = load_file(str(models / "diffusion_models" / unet["filename"]))
    assert all(not k.startswith("model.diffusion_model.") for k in unet_file), "component prefix stripped"
    assert unet_file["input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"].dtype == torch.float16
    report = saved["2"]["quant_report"][0]
    assert report["summary"]["quantized"] == len(report["layers"]) == 50  # the tiny UNet's Linear weights
    assert 0 < report["summary"]["relative_error"] < 1e-3
    listed = server.get("/object_info/ScaledFP16Loader")["ScaledFP16Loader"]["input"]["required"]
    assert unet["filename"] in listed["unet_name"][0] and clip["filename"] in listed["clip_name"][0]
    leftovers = [p for p in server.base.rglob("*.partial")]
    assert leftovers == []


@pytest.fixture(scope="module")
def saved_plain(server: Server, saved: dict) -> dict:
    """Example workflow 1 with format plain: the same UNet and CLIP-L as ordinary float16 files."""
    _, prompt = load_workflow("quantize_and_save")
    for converter, saver, name in (("2", "3", "sd15_unet_plain"), ("5", "6", "sd15_clip_l_plain")):
        prompt[converter]["inputs"]["format"] = "plain"
        prompt[saver]["inputs"]["filename_prefix"] = name
    return server.run(prompt)


# variant -> (UNet, text encoder) loaded by ComfyUI's stock UNETLoader / CLIPLoader; "scaled": ScaledFP16Loader
STOCK_LOADED = {
    "original": ("tiny_sd15_fp32.safetensors", "clip_l_fp32.safetensors"),
    "fp16": ("tiny_sd15_fp16.safetensors", "clip_l_fp32.safetensors"),
    "plain": ("sd15_unet_plain_00001.safetensors", "sd15_clip_l_plain_00001.safetensors"),
}


def sampling_prompt(variant: str, lora_strength: float, tag: str) -> dict:
    """Example workflow 2 at CPU size, with our loader or ComfyUI's stock loaders (same weights)."""
    _, prompt = load_workflow("load_and_sample")
    prompt = copy.deepcopy(prompt)
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["6"]["inputs"]["steps"] = 10
    prompt["2"]["inputs"]["strength_model"] = lora_strength
    prompt["10"]["inputs"]["filename_prefix"] = f"latents/{tag}"
    if variant != "scaled":
        unet, clip = STOCK_LOADED[variant]
        prompt["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
        prompt["11"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "stable_diffusion"}}
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if value == ["1", 1]:
                    node["inputs"][name] = ["11", 0]
    return prompt


@pytest.fixture(scope="module")
def latents(server: Server, saved: dict, saved_plain: dict) -> dict[str, torch.Tensor]:
    """Final latents of example workflow 2 (same seed) per loader variant, without and with the LoRA."""
    result = {}
    for variant in ("original", "fp16", "scaled", "plain"):
        for strength in (0.0, 1.0):
            tag = f"{variant}_lora{strength:g}"
            outputs = server.run(sampling_prompt(variant, strength, tag))
            (entry,) = outputs["10"]["latents"]
            result[tag] = load_file(str(server.base / "output" / entry["subfolder"] / entry["filename"]))[
                "latent_tensor"
            ]
            assert outputs["9"]["images"], "the graph also decodes and saves the image"
    return result


def test_scaled_model_samples_like_the_original_and_takes_loras_the_same_way(latents: dict) -> None:
    def max_diff(a: str, b: str) -> float:
        return float((latents[a] - latents[b]).abs().max())

    scale = float(latents["original_lora0"].abs().max())
    scaled_error, fp16_error = max_diff("scaled_lora0", "original_lora0"), max_diff("fp16_lora0", "original_lora0")
    print(f"\nlatent range {scale:.3f}; max |diff| vs original: scaled_fp16 {scaled_error:.2e}, fp16 {fp16_error:.2e}")
    assert scaled_error <= 1e-2 * scale, "float16-level agreement with the original model"
    assert scaled_error <= 2 * fp16_error + 1e-5, "as close to the original as a plain float16 copy"

    lora_effect = latents["original_lora1"] - latents["original_lora0"]
    scaled_effect = latents["scaled_lora1"] - latents["scaled_lora0"]
    effect_error = float((scaled_effect - lora_effect).abs().max())
    print(f"LoRA effect: max {float(lora_effect.abs().max()):.3e}, scaled model's differs by {effect_error:.2e}")
    assert float(lora_effect.abs().max()) > 20 * scaled_error, "the LoRA's effect stands well above quantization noise"
    assert effect_error <= 0.05 * float(lora_effect.abs().max()), (
        "same effect (a LoRA added in stored units is ~scale x off)"
    )


def test_plain_files_sample_with_comfyuis_own_loaders_like_the_scaled_files(latents: dict, saved_plain: dict) -> None:
    """The plain format: ComfyUI's UNETLoader + CLIPLoader give the samples ScaledFP16Loader gives on the scaled
    files of the same source, within the float16 level (a plain float16 copy's distance from the original)."""

    def max_diff(a: str, b: str) -> float:
        return float((latents[a] - latents[b]).abs().max())

    fp16_level = max_diff("fp16_lora0", "original_lora0")
    plain_vs_scaled = max_diff("plain_lora0", "scaled_lora0")
    print(
        f"\nplain (stock loaders) vs scaled (ScaledFP16Loader): {plain_vs_scaled:.2e}; float16 level {fp16_level:.2e}"
    )
    assert plain_vs_scaled <= fp16_level
    assert max_diff("plain_lora0", "original_lora0") <= 2 * fp16_level + 1e-5
    lora_effect = latents["original_lora1"] - latents["original_lora0"]
    plain_effect = latents["plain_lora1"] - latents["plain_lora0"]
    assert float((plain_effect - lora_effect).abs().max()) <= 0.05 * float(lora_effect.abs().max())
    for node in ("2", "5"):
        assert saved_plain[node]["quant_report"][0]["summary"]["kept_in_source_precision"] == 0


def test_cancel_during_quantization_leaves_no_file(server: Server, saved: dict) -> None:
    _, workflow = load_workflow("quantize_and_save")
    prompt = {k: workflow[k] for k in ("4", "5", "6")}  # the text encoder branch: the larger model
    prompt["5"]["inputs"]["num_iter"] = 255  # not the cached run
    prompt["6"]["inputs"]["filename_prefix"] = "cancelled"
    temp = server.base / "temp" / "learned_rounding_fp16"
    before = sorted(temp.iterdir())
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 60
    while not list(temp.glob(".*.partial")):  # the converter's output exists only while it runs
        assert time.monotonic() < deadline, "the conversion never started"
        time.sleep(0.02)
    server.post("/interrupt")
    entry = server.wait(prompt_id, timeout=120)
    messages = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    assert sorted(temp.iterdir()) == before, "no converted or partial file left in the temp folder"
    assert not list((server.base / "models" / "text_encoders").glob("cancelled*"))
