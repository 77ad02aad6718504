"""Calibration inside ComfyUI: run the user's own model on the user's own prompts and record what
its Linear layers actually see, for LearnedRoundingFP16's calibrated rounding.

The statistics (input mean and second moment per distinct layer input, bounded in memory by
`max_full_dim`) come from quant_core's StatisticsRecorder; these nodes only drive ComfyUI's
sampler or text encoder with the recorder attached, and save/load the result as a file in
`models/calibration` (the same file the CLI takes with `--calib`).

The statistics are recorded in folds that split the *text*: each conditioning (each prompt, the
negative) of the diffusion model, each prompt of a text encoder, goes to one fold, so the converter
can check every layer's rounding on text it was not computed from (quant_core.held_out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..quant_core.calibration import (
    DEFAULT_MAX_FULL_DIM,
    CalibrationStatistics,
    StatisticsRecorder,
    load_statistics,
)
from ..quant_core.calibration.statistics_file import statistics_state_dict
from ..quant_core.safetensors_io import stage_state_dict
from .handles import CALIBRATION_TYPE, CATEGORY
from .paths import (
    CALIBRATION_FOLDER,
    calibration_folders,
    publish,
    relative_name,
    resolve_model_file,
    save_location,
)


def recorded_steps(steps: int, record_steps: int) -> set[int]:
    """Which sampling steps (0-based) to record: `record_steps` of them spread over the schedule.

    Early steps see noisy latents and late ones nearly clean ones; inference runs through all of
    them, so the recorded steps cover the whole schedule rather than its start.
    """
    if record_steps <= 0 or record_steps >= steps:
        return set(range(steps))
    return {math.floor(i * steps / record_steps) for i in range(record_steps)}


class ConditioningFolds:
    """A model function wrapper that puts each conditioning's batch rows in one fold of the recorder.

    ComfyUI runs the prompts and the negative of a step in one batch, one chunk per conditioning
    (`cond_or_uncond`), and names each conditioning with a uuid that stays the same for the whole
    sampling (`transformer_options["uuids"]`). Folds follow the order in which conditionings first
    appear (prompt 1, prompt 2, ..., the negative, alternately into the folds), so every seed and
    step of one text lands in the same fold. A wrapper already set on the model is called inside this one.
    """

    def __init__(self, recorder: StatisticsRecorder, inner: Callable | None = None):
        self.recorder = recorder
        self.inner = inner
        self.order: dict[object, int] = {}

    def fold_of(self, key: object) -> int:
        return self.order.setdefault(key, len(self.order)) % self.recorder.folds

    def __call__(self, apply_model: Callable, args: dict) -> Any:
        x, chunks = args["input"], args["cond_or_uncond"]
        uuids = args["c"].get("transformer_options", {}).get("uuids")
        keys = uuids or [f"chunk{i}:{kind}" for i, kind in enumerate(chunks)]
        rows = x.shape[0] // max(1, len(keys))
        folds = [self.fold_of(key) for key in keys for _ in range(rows)]
        self.recorder.assign_folds(folds if len(folds) == x.shape[0] else None)
        try:
            if self.inner is not None:
                return self.inner(apply_model, args)
            return apply_model(x, args["timestep"], **args["c"])
        finally:
            self.recorder.assign_folds(None)


def summary_text(stats: CalibrationStatistics, what: str) -> str:
    return (
        f"{what}: {len(stats.layers)} layers, {len(stats.inputs)} distinct inputs, "
        f"{stats.tokens:,} tokens, {stats.forward_calls} forward passes, "
        f"{stats.memory_bytes / 2**20:.1f} MiB of statistics"
    )


class CalibrateForQuantFP16:
    """Samples like KSampler while recording the diffusion model's Linear inputs."""

    DESCRIPTION = (
        "Runs the model on your prompts (like KSampler) and records what each Linear layer sees, "
        "so LearnedRoundingFP16 can round weights where your prompts need precision."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (CALIBRATION_TYPE, "LATENT", "STRING")
    RETURN_NAMES = ("calibration", "latent", "summary")
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import comfy.samplers

        return {
            "required": {
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "record_steps": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 10000,
                        "tooltip": "Steps recorded, spread over the schedule (0 = all)",
                    },
                ),
                "max_full_dim": (
                    "INT",
                    {
                        "default": DEFAULT_MAX_FULL_DIM,
                        "min": 0,
                        "max": 65536,
                        "tooltip": "Inputs up to this width keep their full second moment; "
                        "wider ones a low-rank summary",
                    },
                ),
            },
        }

    def calibrate(
        self,
        model,
        positive,
        negative,
        latent_image: dict,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        denoise: float,
        record_steps: int,
        max_full_dim: int,
    ) -> tuple[CalibrationStatistics, dict, str]:
        import comfy.sample
        import comfy.utils
        import latent_preview

        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        recorder = StatisticsRecorder(model.model.diffusion_model, max_full_dim=max_full_dim)
        model = model.clone()  # the wrapper is set on this sampling's copy only
        inner = model.model_options.get("model_function_wrapper")
        model.set_model_unet_function_wrapper(ConditioningFolds(recorder, inner))
        wanted = recorded_steps(steps, record_steps)
        preview = latent_preview.prepare_callback(model, steps)

        def on_step(step: int, x0: Any, x: Any, total_steps: int) -> None:
            preview(step, x0, x, total_steps)
            if step + 1 in wanted:
                recorder.attach()
            else:
                recorder.detach()

        if 0 in wanted:
            recorder.attach()
        try:
            samples = comfy.sample.sample(
                model,
                noise,
                steps,
                cfg,
                sampler_name,
                scheduler,
                positive,
                negative,
                latent,
                denoise=denoise,
                noise_mask=latent_image.get("noise_mask"),
                callback=on_step,
                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                seed=seed,
            )
        finally:
            recorder.detach()
        stats = recorder.statistics(model=type(model.model).__name__, extra={"calib.kind": "diffusion_model"})
        out = dict(latent_image)
        out["samples"] = samples
        return stats, out, summary_text(stats, f"recorded {len(wanted)} of {steps} steps")


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


class CalibrateTextEncoderForQuantFP16:
    """Encodes a list of prompts with a CLIP/T5 text encoder while recording its Linear inputs."""

    DESCRIPTION = "Encodes your prompts (one per line) and records what the text encoder's Linear layers see."
    CATEGORY = CATEGORY
    RETURN_TYPES = (CALIBRATION_TYPE, "STRING")
    RETURN_NAMES = ("calibration", "summary")
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("CLIP",),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "One prompt per line"}),
                "max_full_dim": ("INT", {"default": DEFAULT_MAX_FULL_DIM, "min": 0, "max": 65536}),
            },
        }

    def calibrate(self, clip, prompts: str, max_full_dim: int) -> tuple[CalibrationStatistics, str]:
        import comfy.model_management
        import comfy.utils

        lines = prompt_lines(prompts)
        if not lines:
            raise ValueError("no prompts: write at least one prompt, one per line")
        bar = comfy.utils.ProgressBar(len(lines))
        with StatisticsRecorder(clip.cond_stage_model, max_full_dim=max_full_dim) as recorder:
            for done, line in enumerate(lines, 1):
                comfy.model_management.throw_exception_if_processing_interrupted()
                recorder.assign_folds((done - 1) % recorder.folds)  # whole prompts per fold
                clip.encode_from_tokens(clip.tokenize(line))
                bar.update_absolute(done, len(lines))
        stats = recorder.statistics(model=type(clip.cond_stage_model).__name__, extra={"calib.kind": "text_encoder"})
        return stats, summary_text(stats, f"{len(lines)} prompts")


class SaveCalibrationFP16:
    """Saves a calibration to models/calibration, reusable across runs and by the CLI's --calib."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "calibration": (CALIBRATION_TYPE,),
                "filename_prefix": ("STRING", {"default": "calibration/model"}),
            }
        }

    def save(self, calibration: CalibrationStatistics, filename_prefix: str) -> dict:
        root = Path(calibration_folders()[0])
        folder, stem = save_location(root, filename_prefix)
        tensors, metadata = statistics_state_dict(calibration)
        with stage_state_dict(tensors, folder, metadata, stem) as staged:  # written once, into its folder
            target = publish(staged, folder, stem)  # first free <name>_NNNNN, never overwriting
        return {"ui": {"text": [f"saved {target.relative_to(root)}"]}}


class LoadCalibrationFP16:
    """Loads a saved calibration (tensors are read lazily, one input at a time)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (CALIBRATION_TYPE, "STRING")
    RETURN_NAMES = ("calibration", "summary")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        calibration_folders()
        return {"required": {"calibration_name": (folder_paths.get_filename_list(CALIBRATION_FOLDER),)}}

    def load(self, calibration_name: str) -> tuple[CalibrationStatistics, str]:
        relative_name(calibration_name)
        calibration_folders()
        stats = load_statistics(resolve_model_file(CALIBRATION_FOLDER, calibration_name))
        return stats, summary_text(stats, calibration_name)
