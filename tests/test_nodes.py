"""The four nodes through the ComfyUI stand-in: contracts, quantize -> save -> reload, progress, cancel.

Reload builds a small torch model from the pack's custom operations (on the stand-in's manual_cast)
and compares its outputs with the original weights'; loading into real ComfyUI models is covered by
tests/test_comfyui_integration.py.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfy_standin import harness
from safetensors.torch import load_file, save_file

pack = harness.import_pack()

import comfy.model_management  # noqa: E402  (the stand-in, put on sys.path by harness)
import comfy.ops  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import server  # noqa: E402
from learned_rounding_fp16_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from learned_rounding_fp16_pack.nodes.checkpoint import LoadCheckpointForQuant  # noqa: E402
from learned_rounding_fp16_pack.nodes.handles import CATEGORY  # noqa: E402
from learned_rounding_fp16_pack.nodes.loader import ScaledFP16Loader  # noqa: E402
from learned_rounding_fp16_pack.nodes.ops import scaled_fp16_ops  # noqa: E402
from learned_rounding_fp16_pack.nodes.progress import LAYER_EVENT  # noqa: E402
from learned_rounding_fp16_pack.nodes.quantize import LearnedRoundingFP16  # noqa: E402
from learned_rounding_fp16_pack.nodes.save import SaveScaledFP16  # noqa: E402
from learned_rounding_fp16_pack.quant_core import QuantError  # noqa: E402
from learned_rounding_fp16_pack.quant_core.reader import dequantize_state_dict, read_scaled_file  # noqa: E402

PREFIX = "model.diffusion_model."


class TinyNet(torch.nn.Module):
    """Layer kinds ComfyUI models use, including a weight read directly (like CLIP's position embedding)."""

    def __init__(self, ops: type, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tokens = ops.Embedding(64, 32, dtype=dtype)
        self.positions = ops.Embedding(8, 32, dtype=dtype)
        self.norm = ops.LayerNorm(32, dtype=dtype)
        self.up = ops.Linear(32, 96, dtype=dtype)
        self.down = ops.Linear(96, 32, bias=False, dtype=dtype)
        self.mix = ops.Conv1d(8, 8, 1, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids, out_dtype=torch.float32) + self.positions.weight.to(torch.float32)[: ids.shape[1]]
        x = self.down(F.gelu(self.up(self.norm(x))))
        return self.mix(x)


def tiny_net_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(p.shape) for name, p in TinyNet(comfy.ops.manual_cast).state_dict().items()}
    weights = {name: 0.05 * torch.randn(shape, generator=g) for name, shape in shapes.items()}
    weights["norm.weight"] = 1 + weights["norm.weight"]
    weights["up.weight"][0, 0] = 1.5e5  # beyond float16: only a scale keeps it
    return weights


def load_net(weights: dict[str, torch.Tensor], ops: type) -> TinyNet:
    net = TinyNet(ops)
    net.load_state_dict(weights, strict=True)
    return net


IDS = torch.tensor([[1, 5, 9, 33, 2, 63, 0, 7]])


@pytest.fixture
def comfy_env(tmp_path: Path):
    """A fresh ComfyUI layout, server, progress hook and cancel flag per test."""
    dirs = harness.configure_folders(tmp_path)
    comfy.utils.set_progress_bar_global_hook(None)
    comfy.model_management.interrupt_current_processing(False)
    dirs["server"] = server.PromptServer()
    yield dirs
    comfy.utils.set_progress_bar_global_hook(None)
    comfy.model_management.interrupt_current_processing(False)


@pytest.fixture
def checkpoint(comfy_env) -> Path:
    """A full checkpoint: the tiny net as its diffusion model, plus another component."""
    tensors = {PREFIX + k: v for k, v in tiny_net_weights().items()}
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    path = comfy_env["checkpoints"] / "full.safetensors"
    save_file(tensors, str(path))
    return path


def quantize(source, method: str = "learned", **overrides):
    args = dict(
        method=method,
        num_iter=16,
        top_k=1,
        t5xxl=False,
        keep_distillation=False,
        exclude="",
        unique_id="7",
    )
    args.update(overrides)
    return LearnedRoundingFP16().quantize(source, **args)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- contracts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_node_contract(name: str, comfy_env) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    assert NODE_DISPLAY_NAME_MAPPINGS[name]
    assert cls.CATEGORY == CATEGORY == "quantization/scaled_fp16"
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for input_name, entry in spec["required"].items():
        assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, input_name
        kind, options = entry[0], entry[1] if len(entry) == 2 else {}
        assert isinstance(kind, (str, list)) and isinstance(options, dict), input_name
        if isinstance(kind, list):
            assert all(isinstance(c, str) for c in kind)
            assert "default" not in options or options["default"] in kind, input_name
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], input_name
        elif kind in ("STRING", "BOOLEAN"):
            assert isinstance(options["default"], str if kind == "STRING" else bool), input_name
        else:
            assert kind.isupper(), input_name  # a link type such as MODEL or QUANT_SOURCE
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    for optional in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        assert len(getattr(cls, optional, cls.RETURN_TYPES)) == len(cls.RETURN_TYPES), optional
    function = getattr(cls, cls.FUNCTION)
    parameters = list(inspect.signature(function).parameters)[1:]
    declared = [*spec["required"], *spec.get("optional", {}), *spec.get("hidden", {})]
    assert parameters == declared, "the node function takes exactly the declared inputs, in order"
    if not cls.RETURN_TYPES or name == "SaveScaledFP16":
        assert cls.OUTPUT_NODE is True, "a node whose results nothing consumes must be an output node to run"


def test_quantize_widgets_are_the_declared_rounding_settings(comfy_env) -> None:
    from learned_rounding_fp16_pack.quant_core.methods import METHODS, SETTINGS

    required = LearnedRoundingFP16.INPUT_TYPES()["required"]
    assert required["method"][0] == ["auto", *METHODS] and required["method"][1]["default"] == "auto"
    for setting in SETTINGS:
        if not setting.is_widget:  # fixed, or a flag kept only for the original script's command lines
            assert setting.name not in required
            continue
        kind, options = required[setting.name]
        assert kind == "INT" and options["default"] == setting.default and options["min"] == setting.minimum
        assert options["max"] == setting.maximum and options["tooltip"] == setting.help


def test_pack_imports_without_comfyui() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(harness.ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(harness.ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert len(m.NODE_CLASS_MAPPINGS) == 8 and m.WEB_DIRECTORY == './js'\n"
        "leaked = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'folder_paths', 'server', 'nodes')]\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_source_list_offers_safetensors_from_the_three_folders(comfy_env) -> None:
    for folder, name in (("checkpoints", "a.safetensors"), ("unet", "b.safetensors"), ("text_encoders", "c.sft")):
        save_file({"x": torch.zeros(1)}, str(comfy_env[folder] / name))
    (comfy_env["checkpoints"] / "old.ckpt").write_bytes(b"pickle")
    choices = LoadCheckpointForQuant.INPUT_TYPES()["required"]["model_file"][0]
    assert choices == ["checkpoints/a.safetensors", "diffusion_models/b.safetensors", "text_encoders/c.sft"]


# --- quantize -> save -> reload ----------------------------------------------------------------


def test_component_selection_strips_the_checkpoint_prefix(checkpoint: Path) -> None:
    (source,) = LoadCheckpointForQuant().load("checkpoints/full.safetensors", "diffusion model")
    assert source.prefix == PREFIX and source.tensors == len(tiny_net_weights())
    handle = quantize(source, method="rtn")["result"][0]
    assert set(load_file(handle.path)) == {
        *tiny_net_weights(),
        "up.scale_weight",
        "down.scale_weight",
        "tokens.scale_weight",
        "positions.scale_weight",
        "scaled_fp16",
    }
    with pytest.raises(QuantError, match="no text encoder: T5XXL in this file"):
        LoadCheckpointForQuant().load("checkpoints/full.safetensors", "text encoder: T5XXL")


@pytest.mark.parametrize(
    ("folder", "keys", "component", "accepted"),
    [
        ("diffusion_models", ["input_blocks.0.0.weight", "out.2.weight"], "diffusion model", True),
        ("text_encoders", ["text_model.encoder.layers.0.mlp.fc1.weight"], "text encoder: CLIP-L", True),
        ("text_encoders", ["text_model.encoder.layers.0.mlp.fc1.weight"], "text encoder: CLIP-G", True),
        (
            "text_encoders",
            ["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"],
            "text encoder: T5XXL",
            True,
        ),
        ("text_encoders", ["text_model.encoder.layers.0.mlp.fc1.weight"], "diffusion model", False),
        ("diffusion_models", ["input_blocks.0.0.weight"], "text encoder: CLIP-L", False),
    ],
)
def test_a_standalone_file_is_its_own_component(comfy_env, folder, keys, component, accepted) -> None:
    save_file({k: torch.ones(2, 2) for k in keys}, str(comfy_env[folder] / "alone.safetensors"))
    if accepted:
        (source,) = LoadCheckpointForQuant().load(f"{folder}/alone.safetensors", component)
        assert source.prefix == "" and source.tensors == len(keys)
    else:
        with pytest.raises(QuantError, match=r"it is a standalone .* file\); choose '(diffusion model|text encoder)"):
            LoadCheckpointForQuant().load(f"{folder}/alone.safetensors", component)


def test_round_trip_through_the_nodes_matches_the_original(checkpoint: Path, comfy_env) -> None:
    (source,) = LoadCheckpointForQuant().load("checkpoints/full.safetensors", "diffusion model")
    out = quantize(source)
    handle, summary = out["result"]
    assert Path(handle.path).parent == comfy_env["temp"] / "learned_rounding_fp16"
    assert files_under(comfy_env["temp"]) == [f"learned_rounding_fp16/{Path(handle.path).name}"]  # no report yet
    assert "4 quantized" in summary
    (name,) = SaveScaledFP16().save(handle, "tiny/net", "diffusion_models")["result"]
    assert name == "tiny/net_00001.safetensors"
    saved = comfy_env["diffusion_models"] / name
    assert saved.read_bytes() == Path(handle.path).read_bytes()
    assert name in ScaledFP16Loader.INPUT_TYPES()["required"]["unet_name"][0]  # listed after a refresh

    scaled = read_scaled_file(saved)
    tensors, scales = scaled.tensors, scaled.scales
    assert "scaled_fp16" not in tensors and set(scales) == {
        f"{k}.scale_weight" for k in ("up", "down", "tokens", "positions")
    }
    net = load_net(dict(tensors), scaled_fp16_ops())  # strict: every key, scales included, is taken
    assert net.up.weight.dtype == torch.float16 and net.down.weight.dtype == torch.float16
    assert float(net.up.scale_weight) == scales["up.scale_weight"] == 4.0  # 1.5e5 needs 2**2
    assert net.tokens.weight.dtype == torch.float32 and "scale_weight" not in dict(net.tokens.named_parameters())

    original = load_net(tiny_net_weights(), comfy.ops.manual_cast)
    with torch.no_grad():
        expected, got = original(IDS), net(IDS)
        deq = load_net(dequantize_state_dict(load_file(str(saved))), comfy.ops.manual_cast)(IDS)
    assert torch.isfinite(got).all()
    assert torch.equal(got, deq), "dequantizing at forward computes exactly weight * scale_weight"
    assert (got - expected).abs().max() <= 2e-3 * expected.abs().max()


@pytest.mark.parametrize("comfy_device", ["mps", "xpu", "privateuseone:0"])  # privateuseone: DirectML
def test_a_device_the_converter_cannot_use_falls_back_to_the_cpu(
    comfy_device, checkpoint, comfy_env, monkeypatch, caplog
):
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device(comfy_device))
    (source,) = LoadCheckpointForQuant().load("checkpoints/full.safetensors", "diffusion model")
    with caplog.at_level("INFO"):
        handle, summary = quantize(source, method="rtn")["result"]
    assert "4 quantized" in summary and Path(handle.path).exists()
    (line,) = [r.getMessage() for r in caplog.records if comfy_device in r.getMessage()]
    assert "the conversion runs on the CPU" in line


def test_plain_format_through_the_nodes_is_read_by_comfyuis_own_layers(checkpoint: Path, comfy_env) -> None:
    """format plain: no scales, and a weight beyond float16 (the net's `up`, 1.5e5) kept and named in the summary."""
    (source,) = LoadCheckpointForQuant().load("checkpoints/full.safetensors", "diffusion model")
    handle, summary = quantize(source, format="plain")["result"]
    assert "1 weights kept in source precision" in summary and "up.weight" in summary
    (name,) = SaveScaledFP16().save(handle, "tiny/plain", "diffusion_models")["result"]
    saved = load_file(str(comfy_env["diffusion_models"] / name))
    assert not any(k.endswith("scale_weight") for k in saved) and "scaled_fp16" not in saved
    assert saved["up.weight"].dtype == torch.float32 and saved["down.weight"].dtype == torch.float16
    original = load_net(tiny_net_weights(), comfy.ops.manual_cast)
    plain = load_net(saved, comfy.ops.manual_cast)  # ComfyUI's own operations, no scales to apply
    with torch.no_grad():
        expected, got = original(IDS), plain(IDS)
    assert (got - expected).abs().max() <= 2e-3 * expected.abs().max()


def test_report_reaches_progress_bar_front_end_and_ui(checkpoint: Path, comfy_env) -> None:
    updates = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: updates.append((value, total, node_id))
    )
    (source,) = LoadCheckpointForQuant().load("checkpoints/full.safetensors", "everything")
    out = quantize(source, method="rtn")
    total = source.tensors
    assert updates == [(i, total, "7") for i in range(1, total + 1)]
    sent = comfy_env["server"].sent
    texts = [data["text"] for event, data, _ in sent if event == "progress_text"]
    checks = [text for text in texts if text.startswith("checking values ")]
    assert checks and texts[: len(checks)] == checks, "the value checks come first, as progress text"
    percents = [int(text.split()[2].rstrip("%")) for text in checks]
    assert percents[0] == 0 and percents == sorted(percents) and percents[-1] < 100
    assert {text.split()[3] for text in checks} >= {PREFIX + "up.weight", PREFIX + "down.weight"}  # scales up front
    tensors = texts[len(checks) :]
    assert len(tensors) == total and tensors[0].startswith(f"1/{total} ")
    layer_events = [data for event, data, _ in sent if event == LAYER_EVENT]
    (payload,) = out["ui"]["quant_report"]
    assert [e["layer"] for e in layer_events] == payload["layers"]
    assert [layer["name"] for layer in payload["layers"]] == [layer.name for layer in out["result"][0].report.layers]
    assert payload["summary"]["quantized"] == 4 and 0 < payload["summary"]["relative_error"] < 1e-3
    json.dumps(out["ui"], allow_nan=False)  # goes over the websocket as JSON


def test_cancel_mid_run_leaves_no_file(checkpoint: Path, comfy_env) -> None:
    def press_cancel_after_two(value, total, preview, node_id=None):
        if value == 2:
            comfy.model_management.interrupt_current_processing()

    comfy.utils.set_progress_bar_global_hook(press_cancel_after_two)
    (source,) = LoadCheckpointForQuant().load("checkpoints/full.safetensors", "everything")
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        quantize(source)
    assert files_under(comfy_env["temp"]) == []
    assert not comfy.model_management.processing_interrupted(), "the flag is consumed, as ComfyUI does"


def test_converter_errors_reach_the_user_as_quant_errors(comfy_env) -> None:
    bad = tiny_net_weights()
    bad["down.weight"][3, 3] = float("nan")
    save_file(bad, str(comfy_env["unet"] / "nan.safetensors"))
    (source,) = LoadCheckpointForQuant().load("diffusion_models/nan.safetensors", "everything")
    with pytest.raises(QuantError, match="'down.weight'"):
        quantize(source)
    assert files_under(comfy_env["temp"]) == []


# --- saving --------------------------------------------------------------------------------------


@pytest.fixture
def handle(checkpoint: Path):
    (source,) = LoadCheckpointForQuant().load("checkpoints/full.safetensors", "diffusion model")
    return quantize(source, method="rtn")["result"][0]


def test_save_never_overwrites_and_leaves_nothing_partial(handle, comfy_env) -> None:
    folder = comfy_env["text_encoders"]
    (folder / "enc_00001.safetensors").write_bytes(b"someone else's file")
    names = [SaveScaledFP16().save(handle, "enc", "text_encoders")["result"][0] for _ in range(2)]
    assert names == ["enc_00002.safetensors", "enc_00003.safetensors"]
    assert (folder / "enc_00001.safetensors").read_bytes() == b"someone else's file"
    assert files_under(folder) == [
        "enc_00001.safetensors",
        "enc_00002.report.json",
        "enc_00002.safetensors",
        "enc_00003.report.json",
        "enc_00003.safetensors",
    ]
    report = json.loads((folder / "enc_00002.report.json").read_text())
    assert report["output"] == str(folder / "enc_00002.safetensors") and len(report["layers"]) == 4


def test_save_to_output_reports_where_it_went(handle, comfy_env) -> None:
    out = SaveScaledFP16().save(handle, "runs/my model", "output")
    assert out["ui"]["saved"] == [{"filename": "my model_00001.safetensors", "subfolder": "runs", "type": "output"}]
    assert (comfy_env["output"] / "runs" / "my model_00001.safetensors").is_file()


def test_save_copies_across_filesystems(handle, comfy_env, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) to force a copy")
    other = shm / f"lrfp16-{tmp_path.name}"
    other.mkdir()
    try:
        folder_paths.set_output_directory(str(other))
        (name,) = SaveScaledFP16().save(handle, "x", "output")["result"]
        assert (other / name).read_bytes() == Path(handle.path).read_bytes()
        assert sorted(p.name for p in other.iterdir()) == ["x_00001.report.json", "x_00001.safetensors"]
    finally:
        for p in other.iterdir():
            p.unlink()
        other.rmdir()


def test_save_after_temp_folder_was_emptied_says_what_to_do(handle) -> None:
    Path(handle.path).unlink()
    with pytest.raises(QuantError, match="run the conversion again"):
        SaveScaledFP16().save(handle, "x", "diffusion_models")


# --- loading what was saved ----------------------------------------------------------------------


def test_a_damaged_saved_file_fails_to_load_naming_file_and_tensor(handle, comfy_env) -> None:
    (name,) = SaveScaledFP16().save(handle, "m", "diffusion_models")["result"]
    path = comfy_env["diffusion_models"] / name
    tensors = load_file(str(path))
    tensors["up.scale_weight"] = torch.tensor([float("nan")])
    save_file(tensors, str(path.with_name("broken.safetensors")))
    with pytest.raises(QuantError, match=r"broken\.safetensors: 'up\.scale_weight' is nan"):
        read_scaled_file(path.with_name("broken.safetensors"))
    path.with_name("junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(QuantError, match=r"junk\.safetensors: not a valid safetensors file"):
        read_scaled_file(path.with_name("junk.safetensors"))


def test_a_plain_file_loads_unchanged(comfy_env) -> None:
    path = comfy_env["diffusion_models"] / "plain.safetensors"
    save_file(tiny_net_weights(), str(path))
    scaled = read_scaled_file(path)
    tensors, scales = scaled.tensors, scaled.scales
    assert scales == {} and set(tensors) == set(tiny_net_weights())
    with torch.no_grad():
        assert torch.equal(
            load_net(tensors, scaled_fp16_ops())(IDS), load_net(tiny_net_weights(), comfy.ops.manual_cast)(IDS)
        )


def test_prefix_option_of_the_core_refuses_an_absent_component(checkpoint: Path, tmp_path: Path) -> None:
    from learned_rounding_fp16_pack.quant_core import ConvertOptions, convert_file

    with pytest.raises(QuantError, match="no tensor name starts with 'first_stage_model.'"):
        convert_file(checkpoint, tmp_path / "vae.safetensors", ConvertOptions(prefix="first_stage_model."))
    assert not (tmp_path / "vae.safetensors").exists()
