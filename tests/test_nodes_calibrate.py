"""Calibration nodes through the ComfyUI stand-in: recorded statistics, save/load, use in quantization.

Sampling a diffusion model needs real ComfyUI (tests/test_comfyui_integration.py); here the text
encoder node drives a small torch encoder behind an object with comfy.sd.CLIP's two methods.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_standin import harness
from safetensors.torch import save_file

pack = harness.import_pack()

from learned_rounding_fp16_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from learned_rounding_fp16_pack.nodes.calibrate import (  # noqa: E402
    CalibrateTextEncoderForQuantFP16,
    ConditioningFolds,
    LoadCalibrationFP16,
    SaveCalibrationFP16,
    recorded_steps,
)
from learned_rounding_fp16_pack.nodes.checkpoint import LoadCheckpointForQuant  # noqa: E402
from learned_rounding_fp16_pack.nodes.quantize import LearnedRoundingFP16  # noqa: E402
from learned_rounding_fp16_pack.quant_core import QuantError  # noqa: E402
from learned_rounding_fp16_pack.quant_core.calibration import StatisticsRecorder  # noqa: E402


class TinyEncoder(torch.nn.Module):
    """A text-encoder-like module: embedding, q/k/v reading one tensor, an MLP."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.fc = torch.nn.Linear(16, 32)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(50, 16, generator=g) * torch.logspace(-1, 1, 16))
        self.inputs: list[torch.Tensor] = []

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        self.inputs.append(x.detach().reshape(-1, 16).double())
        h = self.q(x) + self.k(x) * self.v(x)
        return self.fc(h)


class StandInCLIP:
    """comfy.sd.CLIP's surface used by the node: cond_stage_model, tokenize(text), encode_from_tokens(tokens)."""

    def __init__(self) -> None:
        self.cond_stage_model = TinyEncoder()

    def tokenize(self, text: str) -> torch.Tensor:
        return torch.tensor([[sum(map(ord, word)) % 50 for word in text.split()]])

    def encode_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.cond_stage_model.encode(tokens)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return harness.configure_folders(tmp_path)


PROMPTS = "a red fox in the snow\n\nan old castle at dawn\nportrait of a sailor, oil painting\n"


def test_nodes_registered() -> None:
    for name in (
        "CalibrateForQuantFP16",
        "CalibrateTextEncoderForQuantFP16",
        "SaveCalibrationFP16",
        "LoadCalibrationFP16",
    ):
        assert name in NODE_CLASS_MAPPINGS


@pytest.mark.parametrize(
    "steps,record,expected", [(10, 0, set(range(10))), (10, 5, {0, 2, 4, 6, 8}), (4, 9, {0, 1, 2, 3}), (20, 1, {0})]
)
def test_recorded_steps_cover_the_schedule(steps: int, record: int, expected: set[int]) -> None:
    assert recorded_steps(steps, record) == expected


def test_text_encoder_statistics_equal_direct_computation(folders) -> None:
    clip = StandInCLIP()
    stats, summary = CalibrateTextEncoderForQuantFP16().calibrate(clip, PROMPTS, max_full_dim=64)
    x = torch.cat(clip.cond_stage_model.inputs)
    assert x.shape[0] == 17  # three non-empty prompts, 17 words
    q = stats.for_layer("q")
    torch.testing.assert_close(q.mean, x.mean(0))
    torch.testing.assert_close(q.hessian(), x.T @ x / x.shape[0])
    assert stats.layers["q"] == stats.layers["k"] == stats.layers["v"] != stats.layers["fc"]  # q/k/v share one input
    assert "3 prompts" in summary and "17 tokens" in summary
    assert [fold.count for fold in q.folds] == [12, 5]  # whole prompts alternate: prompts 1 and 3, prompt 2
    first = x[:6]
    torch.testing.assert_close(q.folds[1].mean, x[6:11].mean(0))
    torch.testing.assert_close(q.folds[0].second_moment, (first.T @ first + x[11:].T @ x[11:]) / 12)


def test_each_conditioning_of_a_sampling_batch_goes_to_one_fold() -> None:
    """ComfyUI's model function wrapper call: one chunk of rows per conditioning, named by its uuid."""
    layer = torch.nn.Linear(4, 2)
    recorder = StatisticsRecorder(layer)
    seen = []

    def inner(apply_model, args):  # a wrapper set before ours (e.g. by another node) still runs
        seen.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapper = ConditioningFolds(recorder, inner)

    def apply_model(x, t, transformer_options):
        return layer(x)

    steps = [torch.randn(6, 3, 4) for _ in range(2)]  # 2 rows (seeds) x 3 conditionings per step
    with recorder:
        wrapper(
            apply_model,
            {
                "input": steps[0],
                "timestep": None,
                "cond_or_uncond": [0, 0, 1],
                "c": {"transformer_options": {"uuids": ["p1", "p2", "neg"]}},
            },
        )
        wrapper(
            apply_model,
            {
                "input": steps[1][[2, 3, 4, 5, 0, 1]],
                "timestep": None,
                "cond_or_uncond": [0, 1, 0],
                "c": {"transformer_options": {"uuids": ["p2", "neg", "p1"]}},
            },
        )
    stats = recorder.statistics().for_layer("")
    assert seen == [[0, 0, 1], [0, 1, 0]]
    fold0 = torch.cat([steps[0][[0, 1, 4, 5]], steps[1][[0, 1, 4, 5]]]).reshape(-1, 4).double()  # p1 and neg
    assert [fold.count for fold in stats.folds] == [24, 12]
    torch.testing.assert_close(stats.folds[0].second_moment, fold0.T @ fold0 / 24)


def test_empty_prompt_list_is_refused(folders) -> None:
    with pytest.raises(ValueError, match="no prompts"):
        CalibrateTextEncoderForQuantFP16().calibrate(StandInCLIP(), "\n  \n", max_full_dim=64)


def test_save_and_load_round_trip(folders) -> None:
    stats, _ = CalibrateTextEncoderForQuantFP16().calibrate(StandInCLIP(), PROMPTS, max_full_dim=64)
    SaveCalibrationFP16().save(stats, "mine/encoder")
    SaveCalibrationFP16().save(stats, "mine/encoder")  # never overwrites: a second numbered file
    names = LoadCalibrationFP16.INPUT_TYPES()["required"]["calibration_name"][0]
    assert names == ["mine/encoder_00001.safetensors", "mine/encoder_00002.safetensors"]
    loaded, summary = LoadCalibrationFP16().load(names[0])
    torch.testing.assert_close(loaded.for_layer("fc").hessian(), stats.for_layer("fc").hessian())
    assert loaded.layers == stats.layers
    assert Path(loaded.source).name == "encoder_00001.safetensors"  # the converter reads the saved file itself


@pytest.mark.parametrize("name", ["../escape.safetensors", "/etc/passwd"])
def test_load_refuses_paths_outside(folders, name: str) -> None:
    with pytest.raises(QuantError):
        LoadCalibrationFP16().load(name)


def test_quantize_with_calibration_uses_it_where_layers_match(folders) -> None:
    clip = StandInCLIP()
    stats, _ = CalibrateTextEncoderForQuantFP16().calibrate(clip, PROMPTS * 8, max_full_dim=64)
    weights = {f"text_model.{k}": v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    save_file(weights, str(folders["text_encoders"] / "encoder.safetensors"))
    (source,) = LoadCheckpointForQuant().load("text_encoders/encoder.safetensors", "everything")
    result = LearnedRoundingFP16().quantize(
        source, "calibrated", 64, 1, False, False, "", calibration=stats, unique_id="1"
    )
    handle = result["result"][0]
    report = handle.report
    temp_files = [p for p in folders["temp"].rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    assert temp_files == [Path(handle.path)], "the statistics in memory go to the converter, never to a file"
    assert report.settings["calib"] is None and report.settings["calib_tokens"] == stats.tokens
    methods = {layer.name: layer.method for layer in report.layers}
    assert methods == {
        "text_model.embed.weight": "learned",  # no recorded input: data-free
        "text_model.q.weight": "calibrated",
        "text_model.k.weight": "calibrated",
        "text_model.v.weight": "calibrated",
        "text_model.fc.weight": "calibrated",
    }
    assert report.settings["calib_layers"] == 4
