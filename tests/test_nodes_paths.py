"""Node file-name inputs cannot leave ComfyUI's folders; save prefixes are cleaned."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
import torch
from comfy_standin import harness
from safetensors.torch import save_file

harness.import_pack()

import folder_paths  # noqa: E402
from learned_rounding_fp16_pack.nodes.checkpoint import LoadCheckpointForQuant  # noqa: E402
from learned_rounding_fp16_pack.nodes.handles import QuantSource, ScaledFP16File  # noqa: E402
from learned_rounding_fp16_pack.nodes.loader import ScaledFP16Loader  # noqa: E402
from learned_rounding_fp16_pack.nodes.paths import relative_name, sanitize_prefix  # noqa: E402
from learned_rounding_fp16_pack.nodes.save import SaveScaledFP16  # noqa: E402
from learned_rounding_fp16_pack.quant_core import QuantError  # noqa: E402
from learned_rounding_fp16_pack.quant_core.report import ConversionReport  # noqa: E402


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = harness.configure_folders(tmp_path / "comfy")
    dirs["outside"] = tmp_path / "outside"
    dirs["outside"].mkdir()
    save_file({"w.weight": torch.ones(2, 2)}, str(dirs["outside"] / "secret.safetensors"))
    save_file({"w.weight": torch.ones(2, 2)}, str(dirs["diffusion_models"] / "real.safetensors"))
    return dirs


@pytest.mark.parametrize(
    "name",
    [
        "../outside/secret.safetensors",
        "a/../../x.safetensors",
        "..\\x.safetensors",
        "/etc/passwd",
        "\\\\server\\share\\x",
        "C:\\models\\x.safetensors",
        "",
        "   ",
        "a\x00b",
        "./",
    ],
)
def test_escaping_names_are_refused(name: str) -> None:
    with pytest.raises(QuantError):
        relative_name(name)


def test_plain_and_nested_names_pass() -> None:
    assert relative_name("sd/model.safetensors") == PurePosixPath("sd/model.safetensors")
    assert relative_name("sd\\model.safetensors") == PurePosixPath("sd/model.safetensors")
    assert relative_name("./a//b.safetensors") == PurePosixPath("a/b.safetensors")


@pytest.mark.parametrize(
    "model_file",
    [
        "checkpoints/../../outside/secret.safetensors",
        "checkpoints//etc/passwd",
        "/etc/passwd",
        "loras/x.safetensors",
        "checkpoints/",
    ],
)
def test_checkpoint_node_refuses_escapes(model_file: str, dirs) -> None:
    with pytest.raises(QuantError):
        LoadCheckpointForQuant().load(model_file, "everything")


def test_symlinked_files_comfyui_lists_are_accepted(dirs) -> None:
    """Model files linked in from a shared drive: ComfyUI lists them and its loaders read them; so do the nodes."""
    (dirs["checkpoints"] / "link.safetensors").symlink_to(dirs["outside"] / "secret.safetensors")
    assert "checkpoints/link.safetensors" in LoadCheckpointForQuant.INPUT_TYPES()["required"]["model_file"][0]
    (source,) = LoadCheckpointForQuant().load("checkpoints/link.safetensors", "everything")
    assert source.tensors == 1 and Path(source.path).resolve() == (dirs["outside"] / "secret.safetensors").resolve()
    (dirs["text_encoders"] / "te.safetensors").symlink_to(dirs["outside"] / "secret.safetensors")
    assert "te.safetensors" in ScaledFP16Loader.INPUT_TYPES()["required"]["clip_name"][0]


def test_names_comfyui_does_not_list_are_not_found(dirs) -> None:
    with pytest.raises(QuantError, match="not found in checkpoints"):
        LoadCheckpointForQuant().load("checkpoints/secret.safetensors", "everything")  # it is in `outside`
    with pytest.raises(QuantError, match="not found in checkpoints"):
        LoadCheckpointForQuant().load("checkpoints/real.safetensors", "everything")  # it is in diffusion_models


def test_symlink_between_model_folders_and_symlinked_folders_are_fine(dirs, tmp_path: Path) -> None:
    (dirs["checkpoints"] / "alias.safetensors").symlink_to(dirs["diffusion_models"] / "real.safetensors")
    (source,) = LoadCheckpointForQuant().load("checkpoints/alias.safetensors", "everything")
    assert Path(source.path).resolve() == (dirs["diffusion_models"] / "real.safetensors").resolve()
    elsewhere = tmp_path / "big_disk"
    elsewhere.mkdir()
    save_file({"w.weight": torch.ones(2, 2)}, str(elsewhere / "far.safetensors"))
    folder_paths.add_model_folder_path("checkpoints", str(elsewhere))  # e.g. extra_model_paths.yaml
    (source,) = LoadCheckpointForQuant().load("checkpoints/far.safetensors", "everything")
    assert source.tensors == 1


def test_loader_refuses_escaping_names_before_loading_anything(dirs) -> None:
    with pytest.raises(QuantError, match=r"'\.\.' is refused"):
        ScaledFP16Loader().load("../outside/secret.safetensors", "None", "None", "stable_diffusion")
    with pytest.raises(QuantError, match="absolute"):
        ScaledFP16Loader().load("None", str(dirs["outside"] / "secret.safetensors"), "None", "flux")
    with pytest.raises(QuantError, match="choose a diffusion model"):
        ScaledFP16Loader().load("None", "None", "None", "stable_diffusion")


@pytest.mark.parametrize(
    "prefix, expected",
    [
        ("model", "model"),
        ("sub/dir/model", "sub/dir/model"),
        ("my:model*?<>|", "my_model_"),
        (" name. ", "name"),
        ("flux\\dev fp16", "flux/dev fp16"),
        ("ünïcode-模型", "ünïcode-模型"),
        ("...", "_"),
        ("a/./b", "a/b"),
    ],
)
def test_prefixes_are_sanitized(prefix: str, expected: str) -> None:
    assert sanitize_prefix(prefix) == PurePosixPath(expected)


@pytest.mark.parametrize("prefix", ["../x", "a/../../x", "/abs/x", "C:\\x", ""])
def test_escaping_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(QuantError):
        sanitize_prefix(prefix)


def _handle(dirs) -> ScaledFP16File:
    temp = dirs["temp"] / "m.safetensors"
    save_file({"w.weight": torch.ones(2, 2, dtype=torch.float16)}, str(temp))
    source = QuantSource(str(temp), "diffusion_models/m.safetensors", "everything", "", 1)
    return ScaledFP16File(str(temp), source, ConversionReport(str(temp), str(temp), {}))


def test_save_refuses_a_subfolder_symlinked_outside(dirs) -> None:
    (dirs["diffusion_models"] / "escape").symlink_to(dirs["outside"], target_is_directory=True)
    with pytest.raises(QuantError, match="not a folder inside"):
        SaveScaledFP16().save(_handle(dirs), "escape/model", "diffusion_models")
    assert sorted(p.name for p in dirs["outside"].iterdir()) == ["secret.safetensors"]


def test_save_refuses_traversal_in_the_prefix(dirs) -> None:
    with pytest.raises(QuantError, match=r"'\.\.' is refused"):
        SaveScaledFP16().save(_handle(dirs), "../../outside/model", "diffusion_models")
    with pytest.raises(QuantError, match="destination"):
        SaveScaledFP16().save(_handle(dirs), "model", "loras")
    assert sorted(p.name for p in dirs["outside"].iterdir()) == ["secret.safetensors"]
