"""Calibration inside a real ComfyUI: calibrate -> quantize -> save -> load, judged on held-out prompts.

Skipped unless COMFYUI_PATH is set (see tests/test_comfyui_integration.py; the server fixture is in
conftest.py, its helpers in tests/comfyui_server.py). The example workflow `calibrate_and_quantize`
samples the generated tiny SD1.x checkpoint on calibration prompts (combined with ConditioningCombine, so every step
evaluates each of them; the latent batch gives one noise per seed) while CalibrateForQuantFP16
records the UNet's Linear inputs, then converts the checkpoint's diffusion model twice, calibrated
(method auto with the calibration connected) and RTN, and saves both. A second graph loads both files
with ScaledFP16Loader and runs the original and the two quantized UNets on held-out prompts, seeds and
negative prompts: without guidance (cfg 1), and at cfg 7 with two negatives the calibration never saw
and with an empty one; each as single denoiser evaluations (KSamplerAdvanced, one euler step to sigma 0
from each of the 4 noise levels of a 4-step schedule: the output is the model's denoised estimate) and
the 4-step sample. The error of each against the original is compared.

bench/bench_calibration_comfyui.py reuses these graph builders for its sweep over prompts/steps.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from comfyui_server import PROMPT_TIMEOUT, Server, load_workflow, ui_to_api
from real_comfyui import require_comfyui
from safetensors.torch import load_file

require_comfyui()

WORKFLOW = "calibrate_and_quantize"
CALIBRATION_PROMPTS = (
    "a photo of a red fox in the snow",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old man with a beard, studio lighting",
    "a bowl of ramen on a wooden table, top view",
    "a futuristic city skyline at night, neon lights",
    "a cat sleeping on a windowsill in the sun",
    "an oil painting of a stormy sea with a sailing ship",
    "a mountain lake reflecting pine trees, morning mist",
)
HELD_OUT_PROMPTS = (
    "a green parrot sitting on a branch in the rain forest",
    "an astronaut riding a horse on the moon",
    "a close-up of a pocket watch on old paper",
)
NEGATIVE = "blurry, low quality"  # the calibration's (the example workflow's)
# (name, cfg, negative) of the held-out evaluations: no negative the calibration saw
HELD_OUT_SETTINGS = (
    ("cfg1", 1.0, "ugly, deformed hands, watermark, text, jpeg artifacts"),
    ("cfg7-unseen", 7.0, "ugly, deformed hands, watermark, text, jpeg artifacts"),
    ("cfg7-unseen2", 7.0, "cartoon, 3d render, oversaturated"),
    ("cfg7-empty", 7.0, ""),
)
CALIBRATION_SEED = 1
HELD_OUT_SEED = 1234  # its batch's noises differ from the calibration seed's
LATENT = {"width": 64, "height": 64}  # 8x8 latents: CPU size
HELD_OUT_BATCH = 2
SCHEDULE_STEPS = 4
# (start_at_step, end_at_step) of a 4-step euler/normal schedule, ending fully denoised: (k, k + 1) is one
# (cfg-batched) denoiser evaluation at the schedule's k-th sigma (its output is the denoised estimate);
# (0, 4) the whole 4-step sample
EVALUATIONS = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4))


def calibration_graph(
    prompts: int = 2,
    seeds: int = 2,
    steps: int = 8,
    record_steps: int = 0,
    tag: str = "test",
    rtn: bool = True,
) -> dict:
    """The example workflow at CPU size with `prompts` calibration prompts, `seeds` noises, `steps` steps."""
    _, workflow = load_workflow(WORKFLOW)
    graph = copy.deepcopy(workflow)
    graph["6"]["inputs"].update(LATENT, batch_size=seeds)
    graph["7"]["inputs"].update(steps=steps, record_steps=record_steps, seed=CALIBRATION_SEED)
    graph["8"]["inputs"]["filename_prefix"] = f"calibration/{tag}"
    graph["11"]["inputs"]["filename_prefix"] = f"{tag}_calibrated"
    graph["13"]["inputs"]["filename_prefix"] = f"{tag}_rtn"
    if not rtn:
        del graph["12"], graph["13"]
    for node in ("2", "3", "4"):
        del graph[node]
    combined = None
    for i, text in enumerate(CALIBRATION_PROMPTS[:prompts]):
        graph[f"p{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
        if combined is None:
            combined = [f"p{i}", 0]
        else:
            graph[f"c{i}"] = {
                "class_type": "ConditioningCombine",
                "inputs": {"conditioning_1": combined, "conditioning_2": [f"p{i}", 0]},
            }
            combined = [f"c{i}", 0]
    graph["7"]["inputs"]["positive"] = combined
    return graph


def evaluation_graph(unets: dict[str, str | None], tag: str, settings=HELD_OUT_SETTINGS) -> dict:
    """Held-out sampling with each UNet (None: the checkpoint's own, i.e. the original); every result saved as a latent.

    Text encoding uses the checkpoint's CLIP for all of them, so only the UNet differs.
    """
    checkpoint = load_workflow(WORKFLOW)[1]["1"]["inputs"]["ckpt_name"]
    graph: dict = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {**LATENT, "batch_size": HELD_OUT_BATCH}},
    }
    for s, (_, _, negative) in enumerate(settings):
        graph[f"neg{s}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}}
    for p, text in enumerate(HELD_OUT_PROMPTS):
        graph[f"pos{p}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
    for name, unet in unets.items():
        if unet is None:
            model = ["ckpt", 0]
        else:
            graph[f"load_{name}"] = {
                "class_type": "ScaledFP16Loader",
                "inputs": {"unet_name": unet, "clip_name": "None", "clip_name2": "None", "type": "stable_diffusion"},
            }
            model = [f"load_{name}", 0]
        for (s, (_, cfg, _)), p, (e, (start, end)) in itertools.product(
            enumerate(settings), range(len(HELD_OUT_PROMPTS)), enumerate(EVALUATIONS)
        ):
            sampler = f"ks_{name}_{s}_{p}_{e}"
            graph[sampler] = {
                "class_type": "KSamplerAdvanced",
                "inputs": {
                    "model": model,
                    "add_noise": "enable",
                    "noise_seed": HELD_OUT_SEED + p,
                    "steps": SCHEDULE_STEPS,
                    "cfg": cfg,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "positive": [f"pos{p}", 0],
                    "negative": [f"neg{s}", 0],
                    "latent_image": ["latent", 0],
                    "start_at_step": start,
                    "end_at_step": end,
                    "return_with_leftover_noise": "disable",
                },
            }
            graph[f"save_{name}_{s}_{p}_{e}"] = {
                "class_type": "SaveLatent",
                "inputs": {"samples": [sampler, 0], "filename_prefix": f"heldout/{tag}/{name}_{s}_{p}_{e}"},
            }
    return graph


def saved_name(outputs: dict, node: str) -> str:
    return outputs[node]["saved"][0]["filename"]


Evaluation = tuple[int, int]  # (setting index, EVALUATIONS index)


def held_out_latents(
    server: Server, outputs: dict, names: list[str]
) -> dict[str, dict[Evaluation, list[torch.Tensor]]]:
    """name -> (setting, evaluation) -> the latents of every held-out prompt, in prompt order."""
    latents: dict[str, dict[Evaluation, list[torch.Tensor]]] = {n: {} for n in names}
    for node, out in sorted(outputs.items()):  # prompt order within each (setting, evaluation)
        if not node.startswith("save_"):
            continue
        name, s, _, e = node[len("save_") :].rsplit("_", 3)
        (entry,) = out["latents"]
        path = server.base / "output" / entry["subfolder"] / entry["filename"]
        latents[name].setdefault((int(s), int(e)), []).append(load_file(str(path))["latent_tensor"].float())
    return latents


def output_errors(latents: dict, reference: str = "original") -> dict[str, dict[Evaluation, float]]:
    """Relative L2 error against the original's outputs, per model and evaluation (all prompts and seeds together)."""
    errors: dict[str, dict[Evaluation, float]] = {}
    for name, per_eval in latents.items():
        if name == reference:
            continue
        errors[name] = {}
        for e, outs in per_eval.items():
            ref = torch.cat([t.flatten() for t in latents[reference][e]])
            got = torch.cat([t.flatten() for t in outs])
            errors[name][e] = float((got - ref).norm() / ref.norm())
    return errors


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def test_calibration_example_is_registered_with_its_ui_twin(server: Server) -> None:
    ui, api = load_workflow(WORKFLOW)
    info = server.get("/object_info")
    for name in ("CalibrateForQuantFP16", "SaveCalibrationFP16", "LoadCalibrationFP16"):
        assert info[name]["category"] == "quantization/scaled_fp16"
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui, info) == strip


@pytest.fixture(scope="module")
def calibrated(server: Server) -> dict:
    """The example graph (2 prompts x 2 seeds, 8 steps, all recorded) run once: calibration and both conversions."""
    return server.run(calibration_graph(tag="sd15_unet"), timeout=PROMPT_TIMEOUT)


def test_calibrate_quantize_save_writes_calibration_and_both_models(server: Server, calibrated: dict) -> None:
    models = server.base / "models"
    (saved_calibration,) = calibrated["8"]["text"]
    assert saved_calibration == "saved calibration/sd15_unet_00001.safetensors"
    assert (models / "calibration" / "calibration" / "sd15_unet_00001.safetensors").is_file()
    calibrated_report = calibrated["10"]["quant_report"][0]["summary"]
    rtn_report = calibrated["12"]["quant_report"][0]["summary"]
    assert calibrated_report["methods"] == {"calibrated": 50}, "every UNet Linear weight has statistics"
    assert rtn_report["methods"] == {"rtn": 50}
    for node in ("11", "13"):
        assert (models / "diffusion_models" / saved_name(calibrated, node)).is_file()
    listed = server.get("/object_info/LoadCalibrationFP16")["LoadCalibrationFP16"]["input"]["required"]
    assert "calibration/sd15_unet_00001.safetensors" in listed["calibration_name"][0]


def test_calibrated_model_is_closer_to_the_original_on_held_out_prompts_seeds_and_negatives(
    server: Server, calibrated: dict
) -> None:
    unets = {"original": None, "calibrated": saved_name(calibrated, "11"), "rtn": saved_name(calibrated, "13")}
    outputs = server.run(evaluation_graph(unets, "test"), timeout=PROMPT_TIMEOUT)
    errors = output_errors(held_out_latents(server, outputs, list(unets)))
    ratios = {key: errors["calibrated"][key] / errors["rtn"][key] for key in errors["rtn"]}
    assert len(ratios) == len(HELD_OUT_SETTINGS) * len(EVALUATIONS)
    print()
    for (s, e), ratio in sorted(ratios.items()):
        start, end = EVALUATIONS[e]
        print(
            f"{HELD_OUT_SETTINGS[s][0]}, held-out steps {start}..{end} of {SCHEDULE_STEPS}: relative error "
            f"calibrated {errors['calibrated'][s, e]:.3e}, rtn {errors['rtn'][s, e]:.3e}, ratio {ratio:.3f}"
        )
    overall = geometric_mean(ratios.values())
    print(f"geometric-mean ratio calibrated/rtn: {overall:.3f}")
    assert all(0 < errors["rtn"][key] < 1e-2 for key in ratios), "float16-level error for both"
    assert all(r < 1.0 for r in ratios.values()), ratios
    assert overall <= 0.85, ratios
