"""The command line keeps the original script's flags, defaults and naming."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors.torch import load_file

from quant_core import ConvertOptions, __version__, convert_file
from quant_core.cli import build_parser, main
from quant_core.convert import TOOL_NAME, default_output_path

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_the_original_script():
    args = build_parser().parse_args(["--input", "m.safetensors"])
    assert (args.num_iter, args.top_k, args.calib_samples) == (256, 1, 3072)
    assert (args.t5xxl, args.keep_distillation, args.output, args.method) == (False, False, None, "learned")


@pytest.mark.parametrize(
    "name,distill,expected",
    [
        ("models/flux.safetensors", False, "models/flux_float16_scaled_learned_svd.safetensors"),
        ("models/flux.safetensors", True, "models/flux_float16_scaled_learned_nodistill_svd.safetensors"),
        ("t5.v1.safetensors", False, "t5.v1_float16_scaled_learned_svd.safetensors"),
    ],
)
def test_output_naming(name, distill, expected):
    assert default_output_path(name, distill) == Path(expected)


def test_default_output_beside_input_and_summary(example_model, capsys):
    assert main(["--input", str(example_model)]) == 0
    out = default_output_path(example_model)
    assert out.exists() and "scaled_fp16" in load_file(str(out))
    printed = capsys.readouterr().out
    assert "bit-exact" in printed and "overall relative error" in printed
    report = json.loads(out.with_name(out.name.replace(".safetensors", ".report.json")).read_text())
    assert report["summary"]["quantized"] > 0


def test_refuses_to_replace_input(example_model, capsys):
    assert main(["--input", str(example_model), "--output", str(example_model)]) == 1
    assert "replace the input" in capsys.readouterr().err


def test_existing_output_needs_overwrite(example_model, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert main(["--input", str(example_model), "--output", str(out), "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["--input", str(example_model), "--output", str(out), "-q", "--overwrite"]) == 0
    assert "scaled_fp16" in load_file(str(out))


def test_output_without_folder_goes_to_cwd(example_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--input", str(example_model), "--output", "plain.safetensors", "-q", "--method", "rtn"]) == 0
    assert (tmp_path / "plain.safetensors").exists()


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope.safetensors")]) == 1
    assert "input file not found" in capsys.readouterr().err


def test_invalid_numbers_are_rejected(example_model):
    with pytest.raises(SystemExit):
        main(["--input", str(example_model), "--top_k", "0"])


@pytest.mark.parametrize("entry", [["convert_fp16_scaled_learned_svd_fast.py"], ["-m", "quant_core"]])
def test_entry_points_end_to_end(entry, example_model, tmp_path):
    out = tmp_path / "cli.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, *entry, "--input", str(example_model), "--output", str(out), "--num_iter", "16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "quantized" in result.stdout and out.exists()


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "garbage", "cuda:x"])
def test_devices_other_than_cuda_and_the_cpu_are_refused_up_front_in_one_line(device, example_model, tmp_path, capsys):
    calib = tmp_path / "missing.calib.safetensors"  # never read: the device is refused first
    out = tmp_path / "out.safetensors"
    assert main(["--input", str(example_model), "--output", str(out), "--device", device, "--calib", str(calib)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}: not supported; the converter runs on CUDA or the CPU")
    assert "loads on any device" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [example_model]


def test_input_yielding_nothing_useful_is_refused_with_the_causes_counted(save, tmp_path, capsys):
    """No weight would be quantized: one line (no warning per tensor) counting each cause and what to do."""
    fp8 = {f"fp8.{i}.weight": torch.full((4, 4), 0.5).to(torch.float8_e4m3fn) for i in range(3)}
    src = save({**fp8, "a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4), "a.bias": torch.zeros(4)})
    out = tmp_path / "out" / "o.safetensors"
    assert main(["--input", str(src), "--output", str(out), "--exclude", r"^[ab]\."]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {src}: no weight would be quantized, so nothing was written "
        "(3 weights in float8: convert the original bf16/fp16/fp32 file; "
        "2 weights excluded by --exclude: check the patterns)\n"
    )
    assert not (tmp_path / "out").exists()


def test_plain_format_holding_no_weight_is_refused(save, tmp_path, capsys):
    src = save({"big.weight": torch.full((4, 4), 1e5), "big.bias": torch.zeros(4)})
    assert main(["--input", str(src), "--output", str(tmp_path / "o.safetensors"), "--format", "plain"]) == 1
    err = capsys.readouterr().err
    assert (
        "1 weight that plain float16 cannot hold (values beyond 65504 or in its subnormal range): use --format scaled"
        in err
    )
    assert main(["--input", str(src), "--output", str(tmp_path / "o.safetensors"), "--format", "scaled", "-q"]) == 0


@pytest.mark.parametrize("given", ["new/", "existing", "existing/"])
def test_output_folder_gets_the_default_name(given, example_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    assert main(["--input", str(example_model), "--output", given, "--method", "rtn"]) == 0
    folder = tmp_path / given.rstrip("/")
    name = default_output_path(example_model).name
    assert sorted(p.name for p in folder.iterdir()) == [name.replace(".safetensors", ".report.json"), name]
    assert "scaled_fp16" in load_file(str(folder / name))
    assert f"per-layer report: {folder.name}/{name.replace('.safetensors', '.report.json')}" in capsys.readouterr().out


def test_a_failed_run_removes_only_the_empty_folders_it_created(example_model, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()

    def cancel_after_the_writing_started():
        if any(existing.rglob("*.partial")):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_file(
            example_model,
            existing / "a" / "b" / "o.safetensors",
            ConvertOptions(method="rtn"),
            check_cancelled=cancel_after_the_writing_started,
        )
    assert list(existing.iterdir()) == [], "a/b were made by the run: removed; 'existing' was not: kept"


def test_a_folder_as_input_says_so(tmp_path, capsys):
    assert main(["--input", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path}: is a folder; give the .safetensors file to convert\n"


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin"])
def test_a_pytorch_checkpoint_gets_the_hint_to_export_it(name, tmp_path, capsys):
    checkpoint = tmp_path / name
    torch.save({"state_dict": {"a.weight": torch.ones(2, 2)}}, checkpoint)
    assert main(["--input", str(checkpoint), "--output", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a valid safetensors file" in err
    assert "a PyTorch pickle checkpoint must be exported to safetensors first, from a file you trust" in err
    assert "save_file(sd.get('state_dict', sd), 'model.safetensors')" in err


def _run(entry: list[str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *entry, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "entry,name",
    [
        (["convert_fp16_scaled_learned_svd_fast.py"], "convert_fp16_scaled_learned_svd_fast.py"),
        (["-m", "quant_core"], "python -m quant_core"),
    ],
)
def test_help_uses_the_name_it_was_run_as_and_shows_only_defaults_that_say_something(entry, name):
    result = _run(entry, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {name} ")
    assert "default: None" not in result.stdout and "default: False" not in result.stdout
    assert "(default: 256)" in result.stdout


def test_quiet_and_verbose_together_are_refused(example_model):
    result = _run(["-m", "quant_core"], "--input", str(example_model), "-q", "-v")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_verbose_log_lines_never_land_inside_the_progress_bar(example_model, tmp_path):
    result = _run(
        ["-m", "quant_core"],
        "--input",
        str(example_model),
        "--output",
        str(tmp_path / "o.safetensors"),
        "--method",
        "rtn",
        "-v",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.split("\n")
    logged = [line for line in lines if "DEBUG: " in line]
    assert len(logged) >= 10 and any("it/s" in line or "tensor/s" in line for line in lines), result.stderr
    for line in logged:
        assert line.split("\r")[-1].startswith("DEBUG: "), repr(line)  # what is left after the bar was cleared
    assert 0 <= result.stderr.index("checking values") < result.stderr.index("converting"), "no silent scan first"


def test_version_is_the_package_version(capsys):
    """--version and the files' `quant.tool` name the version the package (and the registry) publishes."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"]
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == TOOL_NAME == f"learned-rounding-fp16 {project['version']}"
