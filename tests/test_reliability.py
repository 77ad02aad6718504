"""Hostile, broken and unusual inputs; a damaged environment; interruptions. Nothing is lost."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpus import CASES, Case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from quant_core import ConvertOptions, QuantError, convert_file
from quant_core.cli import main as cli_main
from quant_core.staging import StagedFile, discard_unplaced

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_valid_output(source: Path, output: Path) -> None:
    """The output re-reads, and every tensor dequantizes to its source within float16 rounding."""
    src, out = load_file(str(source)), load_file(str(output))
    assert "scaled_fp16" in out
    for name, original in src.items():
        if name not in out:
            continue
        stored = out[name]
        scale_key = name[: -len("weight")] + "scale_weight" if name.endswith(".weight") else None
        if scale_key and scale_key in out:
            scale = out[scale_key].double()
            restored = stored.double() * scale
            reference = original.double()
            bound = reference.abs() * 2.0**-10 + scale * 2.0**-24  # one ulp (learned picks either neighbour)
            assert torch.isfinite(restored).all(), name
            assert ((restored - reference).abs() <= bound).all(), name
        elif original.is_floating_point():
            same = stored.to(original.dtype)
            assert torch.equal(same, original) or torch.equal(same.isnan(), original.isnan()), name
        else:
            assert torch.equal(stored, original), name


def run_node_graph(source: Path, output: Path) -> None:
    """The ComfyUI path: load -> quantize -> save through the nodes (on the ComfyUI stand-in)."""
    from learned_rounding_fp16_pack.nodes.checkpoint import LoadCheckpointForQuant
    from learned_rounding_fp16_pack.nodes.quantize import LearnedRoundingFP16
    from learned_rounding_fp16_pack.nodes.save import SaveScaledFP16

    (handle,) = LoadCheckpointForQuant().load(f"checkpoints/{source.name}", "everything")
    scaled = LearnedRoundingFP16().quantize(handle, "auto", 256, 1, False, False, "", unique_id="1")["result"][0]
    saved = SaveScaledFP16().save(scaled, output.stem, "output")["result"][0]
    produced = output.parent / saved
    produced.rename(output)
    produced.with_name(produced.stem + ".report.json").rename(output.with_name(output.stem + ".report.json"))


def run_entry(entry: str, source: Path, output: Path, options: dict, capsys) -> str | None:
    """Run one entry point; return the error message, or None on success."""
    if entry == "node":
        from comfy_standin import harness

        pack = harness.import_pack()  # the pack's own copy of quant_core, as ComfyUI imports it
        try:
            run_node_graph(source, output)
        except pack.quant_core.QuantError as exc:
            return str(exc)
        return None
    if entry == "api":
        try:
            convert_file(source, output, ConvertOptions(**options))
        except QuantError as exc:
            return str(exc)
        return None
    argv = ["--input", str(source), "--output", str(output), "-q"]
    code = cli_main(argv)
    err = capsys.readouterr().err
    if code == 0:
        return None
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err  # one line
    return err


@pytest.mark.parametrize("entry", ["api", "cli", "node"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(case: Case, entry: str, tmp_path: Path, capsys) -> None:
    if entry == "node":  # ComfyUI's layout: the input in models/checkpoints, the output in output/
        from comfy_standin import harness

        folders = harness.configure_folders(tmp_path)
        in_dir, out_dir, temp_dir = folders["checkpoints"], folders["output"], folders["temp"]
    else:
        in_dir, out_dir, temp_dir = tmp_path / "in", tmp_path / "out", None
        in_dir.mkdir()
        out_dir.mkdir()
    source = case.build(in_dir)
    before = sha256(source)
    output = out_dir / "result.safetensors"
    message = run_entry(entry, source, output, case.options, capsys)
    assert sha256(source) == before, "the input must never change"
    if case.error is None:
        assert message is None, message
        assert sorted(p.name for p in out_dir.iterdir()) == ["result.report.json", "result.safetensors"]
        assert_valid_output(source, output)
    else:
        assert message is not None, "expected an error"
        assert re.search(case.error, message), message
        assert list(out_dir.iterdir()) == [], "no output, no temporary file"
        if temp_dir is not None:
            assert [p for p in temp_dir.rglob("*") if p.is_file()] == [], "nothing left in ComfyUI's temp folder"
    assert sorted(p.name for p in in_dir.iterdir()) == ["input.safetensors"]


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


# --- the environment -------------------------------------------------------------------------


def test_output_parent_is_a_file(example_model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(QuantError, match="cannot write the output"):
        convert_file(example_model, blocker / "out.safetensors")


def test_output_symlink_to_input_is_refused(example_model: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.safetensors"
    link.symlink_to(example_model)
    with pytest.raises(QuantError, match="replace the input"):
        convert_file(example_model, link, ConvertOptions(overwrite=True))


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "quant_core", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_disk_full_leaves_nothing(example_model: Path, tmp_path: Path) -> None:
    """A file-size limit (like a full disk) makes the write fail cleanly."""
    import resource

    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = _cli(["--input", str(example_model), "--output", str(out_dir / "o.safetensors")], preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "cannot write the output" in err
    assert list(out_dir.iterdir()) == []


def test_too_little_free_space_is_refused_before_any_work(example_model: Path, tmp_path: Path) -> None:
    """A 1 MiB filesystem (a tmpfs in a private mount namespace) as the output folder: refused up front with the
    exact size the output has (compared with a real output), the free space, and nothing created there."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "--map-root-user", "true"]).returncode:
        pytest.skip("needs unshare with user namespaces, for a small filesystem of its own")
    reference = tmp_path / "ref" / "o.safetensors"
    assert cli_main(["--input", str(example_model), "--output", str(reference), "--method", "rtn", "-q"]) == 0
    small = tmp_path / "small"
    small.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {small} || exit 77; "
        f"{sys.executable} -m quant_core --input {example_model} --output {small}/sub/o.safetensors --method rtn -q; "
        f"code=$?; ls -A {small}; exit $code"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode == 77:
        pytest.skip("mounting a tmpfs is not allowed here")
    size = reference.stat().st_size
    assert result.returncode == 1 and result.stdout == "", result.stderr  # `ls` lists nothing: no folder, no file
    assert result.stderr == (
        f"error: {small}/sub: not enough free space for the output: {size / 2**20:.1f} MiB ({size:,} bytes) needed, "
        "1.0 MiB (1,048,576 bytes) free; free some space there or write the output elsewhere\n"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_leaves_nothing(sig: int, tmp_path: Path) -> None:
    source = _big_model(tmp_path)
    before = sha256(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _cli(["--input", str(source), "--output", str(out_dir / "o.safetensors"), "-q"])
    deadline = time.monotonic() + 120
    while not any(out_dir.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "no output was written" in err
    assert list(out_dir.iterdir()) == []
    assert sha256(source) == before


def test_an_interrupt_before_the_owner_takes_charge_still_leaves_nothing(tmp_path: Path) -> None:
    """A file whose StagedFile never came to be (the interrupt landed right after its creation) is removed
    by the interrupt's handler; a file already placed, and other files, are not."""
    orphan = StagedFile(tmp_path, "o.safetensors").path  # its owner dropped without discard or place
    placed = StagedFile(tmp_path, "p.safetensors").place(tmp_path / "p.safetensors")
    (tmp_path / "other").write_bytes(b"x")
    assert orphan.exists()
    discard_unplaced()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "p.safetensors"]
    assert placed.stat().st_mode & 0o777 == 0o666 & ~_umask()  # the user's usual permissions, not 0600


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _big_model(folder: Path) -> Path:
    source = folder / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"l{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(24)}, str(source))
    return source


def test_a_killed_runs_partial_file_is_removed_by_the_next_run_which_says_so(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) leaves the hidden file; its process is gone, so the next run removes it."""
    source = _big_model(tmp_path)
    out_dir = tmp_path / "out"
    output = out_dir / "o.safetensors"
    proc = _cli(["--input", str(source), "--output", str(output), "-q"])

    def written() -> int:  # bytes of data in the hidden file so far
        return sum(p.stat().st_blocks * 512 for p in out_dir.glob(".*.partial")) if out_dir.exists() else 0

    deadline = time.monotonic() + 120
    while written() < 2**20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = out_dir.glob(".*.partial")
    on_disk = left.stat().st_blocks * 512
    rerun = _cli(["--input", str(source), "--output", str(output), "--method", "rtn"])
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    warning = [line for line in err.splitlines() if "stale" in line]
    assert warning == [
        f"WARNING: removed 1 stale partial file of o.safetensors in {out_dir}, left by an interrupted run "
        f"({on_disk / 2**20:.1f} MiB freed)"
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.report.json", "o.safetensors"]


def test_partial_files_of_live_processes_and_others_are_left_alone(example_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "o.safetensors"
    with StagedFile(tmp_path, output.name) as live:  # this process: alive
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        host, _pid, rest = live.path.name[len(".o.safetensors.") :].replace("-", ".", 1).split(".", 2)
        others = [
            # another host
            f".o.safetensors.{'0' * 8 if host != '0' * 8 else '1' * 8}-{gone.stdout.strip()}.abcdefgh.partial",
            f".o.safetensors.{host}-{gone.stdout.strip()}.abcdefgh.tmp",  # not our form
            f".other.safetensors.{host}-{gone.stdout.strip()}.abcdefgh.partial",  # another target
            ".o.safetensors.abcdefgh.partial",  # no owner in the name
        ]
        for name in others:
            (tmp_path / name).write_bytes(b"x")
        stale = tmp_path / f".o.safetensors.{host}-{gone.stdout.strip()}.abcdefgh.partial"
        stale.write_bytes(b"x" * 5000)
        convert_file(example_model, output, ConvertOptions(method="rtn"))
        assert not stale.exists()
        assert live.path.exists() and all((tmp_path / name).exists() for name in others)


# --- random models, random corruption ----------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.bool]


@st.composite
def small_models(draw) -> dict[str, torch.Tensor]:
    count = draw(st.integers(1, 4))
    tensors = {}
    for i in range(count):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from(DTYPES))
        magnitude = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e5, 1e30]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        values = torch.randn(shape, generator=g, dtype=torch.float64) * magnitude
        tensors[f"layer{i}.weight" if draw(st.booleans()) else f"layer{i}.extra"] = values.to(dtype)
    return tensors


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=small_models(),
    corruption=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_random_models_and_corruptions(model, corruption, cut, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("prop")
    source = folder / "in.safetensors"
    save_file(model, str(source))
    data = bytearray(source.read_bytes())
    for position, value in corruption:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    source.write_bytes(bytes(data))
    out_dir = folder / "out"
    out_dir.mkdir()
    output = out_dir / "o.safetensors"
    try:
        convert_file(source, output, ConvertOptions(method="learned", rounding={"num_iter": 8}))
    except QuantError:
        assert list(out_dir.iterdir()) == []
        return
    assert_valid_output(source, output)


# --- soak: repeated conversions with random interruptions -------------------------------------


class Interrupted(Exception):
    pass


def test_soak_with_random_interruptions(example_model: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)
    out_dir = tmp_path / "soak"
    completed, interrupted = [], 0
    for run in range(50):
        budget = rng.randint(1, 60) if rng.random() < 0.6 else None  # checks before the interruption
        calls = 0

        def check(budget: int | None = budget) -> None:
            nonlocal calls
            calls += 1
            if budget is not None and calls >= budget:
                raise Interrupted

        output = out_dir / f"run{run}.safetensors"
        try:
            convert_file(
                example_model, output, ConvertOptions(method=rng.choice(["rtn", "learned"])), check_cancelled=check
            )
            completed.append(output)
        except Interrupted:
            interrupted += 1
            assert not output.exists()
    leftovers = [p.name for p in out_dir.iterdir() if p.suffix == ".partial" or p.name.startswith(".")]
    assert leftovers == []
    print(f"soak: {len(completed)} completed, {interrupted} interrupted, no leftovers")
    assert interrupted >= 10 and len(completed) >= 10
    for output in completed:
        assert_valid_output(example_model, output)
