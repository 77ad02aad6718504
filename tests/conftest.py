from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from comfyui_server import Server, running_server

from quant_core.example import write_example_model


@pytest.fixture
def example_model(tmp_path: Path) -> Path:
    return write_example_model(tmp_path / "model.safetensors")


@pytest.fixture
def save(tmp_path: Path):
    """Write a state dict to tmp_path/<name> and return its path."""

    def _save(tensors: dict[str, torch.Tensor], name: str = "in.safetensors", metadata: dict | None = None) -> Path:
        path = tmp_path / name
        save_file(tensors, str(path), metadata=metadata)
        return path

    return _save


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """A real ComfyUI server per test module (the real-ComfyUI tests, skipped without COMFYUI_PATH)."""
    with running_server(tmp_path_factory.mktemp("comfy_base")) as running:
        yield running
