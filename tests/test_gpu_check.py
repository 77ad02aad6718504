"""bench/gpu_check.py, the conversion half of the GPU check, kept working where no GPU is: CPU against CPU."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def test_the_check_runs_every_method_and_passes_on_identical_devices(tmp_path, capsys):
    assert (
        gpu_check.main(["--device", "cpu", "--hidden", "64", "--tokens", "256", "--out", str(tmp_path / "r.md")]) == 0
    )
    table = (tmp_path / "r.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if "PASS" in line] == list(gpu_check.METHODS)


def test_the_check_fails_on_differing_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    w = torch.randn(8, 8).half()
    save_file({"w.weight": w}, str(a))
    save_file({"w.weight": torch.where(torch.arange(64).reshape(8, 8) < 4, -w, w)}, str(b))
    ok, verdict = gpu_check.compare("rtn", a, b, {"w.weight": None}, {"w.weight": None})
    assert not ok and "must be bit-identical" in verdict
