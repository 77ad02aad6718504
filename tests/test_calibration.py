"""The statistics recorder: exact moments, shared inputs, bounded memory, files, name matching."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant_core import QuantError
from quant_core.calibration import (
    CalibrationStatistics,
    StatisticsRecorder,
    load_statistics,
    match_weight_keys,
    save_statistics,
    statistics_for_weights,
)


class Attention(nn.Module):
    """q/k/v read one tensor; out reads another; a conv that must be ignored."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.up = nn.Linear(d, 3 * d)
        self.down = nn.Linear(3 * d, d)
        self.conv = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1) @ self.v(x)
        x = x + self.out(a)
        x = x + self.conv(x.transpose(-1, -2)).transpose(-1, -2)
        return x + self.down(torch.relu(self.up(x)))


def captured_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every Linear's input rows, captured independently of the recorder."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.setdefault(name, []).append(
                args[0].reshape(-1, args[0].shape[-1]).double()
            )
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def record(model: nn.Module, batches: list[torch.Tensor], **kwargs) -> CalibrationStatistics:
    with StatisticsRecorder(model, **kwargs) as recorder, torch.no_grad():
        for b in batches:
            model(b)
    return recorder.statistics(model="attention-test")


@pytest.fixture
def model_and_batches():
    torch.manual_seed(0)
    model = Attention()
    batches = [torch.randn(2, 5, 12) * torch.linspace(0.1, 3, 12) + 1 for _ in range(3)]
    return model, batches


def test_recorded_statistics_equal_direct_computation(model_and_batches):
    model, batches = model_and_batches
    stats = record(model, batches)
    direct = captured_inputs(model, batches)
    assert set(stats.layers) == set(direct) == {"q", "k", "v", "out", "up", "down"}  # conv not recorded
    for layer, x in direct.items():
        s = stats.for_layer(layer)
        assert s.count == x.shape[0] == 30
        torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.hessian(), x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)
    assert stats.forward_calls == 3


def test_recording_under_inference_mode(model_and_batches):
    model, batches = model_and_batches
    with StatisticsRecorder(model) as recorder, torch.inference_mode():
        for b in batches:
            model(b)
    torch.testing.assert_close(
        recorder.statistics().for_layer("v").hessian(), record(model, batches).for_layer("v").hessian()
    )


def test_shared_inputs_share_statistics(model_and_batches):
    model, batches = model_and_batches
    shared = record(model, batches)
    assert shared.layers["q"] == shared.layers["k"] == shared.layers["v"] == "q"
    assert len({shared.layers[n] for n in ("q", "out", "up", "down")}) == 4
    assert len(shared.inputs) == 4
    separate = record(model, batches, share_inputs=False)
    assert len(separate.inputs) == 6
    assert separate.memory_bytes > shared.memory_bytes
    torch.testing.assert_close(separate.for_layer("k").hessian(), shared.for_layer("k").hessian())


def test_sharing_that_changes_between_forwards_is_an_error():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x * 2)

    with pytest.raises(QuantError, match="share_inputs=False"):
        record(Flaky(), [torch.randn(3, 4), torch.randn(3, 4)])
    stats = record(Flaky(), [torch.randn(3, 4), torch.randn(3, 4)], share_inputs=False)
    assert stats.layers == {"a": "a", "b": "b"}


def test_max_tokens_caps_what_is_accumulated(model_and_batches):
    model, batches = model_and_batches
    stats = record(model, batches, max_tokens=7)
    direct = captured_inputs(model, batches)
    assert stats.tokens == 7
    torch.testing.assert_close(stats.for_layer("up").mean, direct["up"][:7].mean(0))


def test_memory_cap_keeps_an_eigen_summary_exact_for_low_rank_inputs():
    torch.manual_seed(1)
    n, rank = 48, 6
    layer = nn.Linear(n, 3)
    basis = torch.randn(rank, n)
    batches = [torch.randn(40, rank) @ basis for _ in range(5)]
    with StatisticsRecorder(layer, max_full_dim=16, summary_rank=8) as recorder, torch.no_grad():
        for b in batches:
            layer(b)
        assert recorder.memory_bytes < n * n * 8  # never the full n x n
    stats = recorder.statistics().for_layer("")
    assert not stats.is_full and stats.eigenvectors.shape == (n, 8)
    summary_bytes = (n * 8 + 8 + 2 * n) * 8
    assert len(stats.folds) == 2 and all(not fold.is_full for fold in stats.folds)
    assert stats.memory_bytes == 3 * summary_bytes  # the merge made for this use, and the two folds it came from
    x = torch.cat(batches).double()
    torch.testing.assert_close(stats.hessian(), x.T @ x / x.shape[0], rtol=1e-9, atol=1e-9)


def test_eigen_summary_of_full_rank_inputs_keeps_diagonal_and_top_directions():
    torch.manual_seed(2)
    n = 40
    layer = nn.Linear(n, 2)
    scales = torch.logspace(1, -2, n)
    batches = [torch.randn(64, n) * scales for _ in range(8)]
    with StatisticsRecorder(layer, max_full_dim=10, summary_rank=10) as recorder, torch.no_grad():
        for b in batches:
            layer(b)
    stats = recorder.statistics().for_layer("")
    x = torch.cat(batches).double()
    exact = x.T @ x / x.shape[0]
    approx = stats.hessian()
    torch.testing.assert_close(approx.diagonal(), exact.diagonal(), rtol=1e-9, atol=1e-12)
    top = torch.linalg.eigvalsh(exact)[-3:]
    torch.testing.assert_close(stats.eigenvalues[:3].flip(0), top, rtol=0.05, atol=0)
    assert torch.linalg.norm(approx - exact) < 0.05 * torch.linalg.norm(exact)


def test_save_and_load_roundtrip(model_and_batches, tmp_path):
    model, batches = model_and_batches
    stats = record(model, batches, max_full_dim=20, summary_rank=4)  # 'down' (width 36) is summarized
    path = save_statistics(stats, tmp_path / "stats.safetensors")
    loaded = load_statistics(path)
    assert loaded.layers == stats.layers and loaded.model == "attention-test"
    assert loaded.forward_calls == 3 and loaded.tokens == 30
    assert loaded.settings["max_full_dim"] == 20
    assert loaded.dim_of("down") == 36 and not loaded.for_layer("down").is_full
    for layer in stats.layers:
        torch.testing.assert_close(loaded.for_layer(layer).hessian(), stats.for_layer(layer).hessian(), rtol=0, atol=0)
        torch.testing.assert_close(loaded.for_layer(layer).mean, stats.for_layer(layer).mean, rtol=0, atol=0)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["calib.format"] == "quant_core.calibration"
    assert json.loads(meta["calib.layers"])["k"] == "q"


def test_loading_something_else_is_a_clear_error(tmp_path):
    plain = tmp_path / "weights.safetensors"
    save_file({"a.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(QuantError, match="not a calibration statistics file"):
        load_statistics(plain)
    with pytest.raises(QuantError, match="not found"):
        load_statistics(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(QuantError, match="not a valid safetensors file"):
        load_statistics(garbage)


@pytest.mark.parametrize(
    "layers,keys,expected",
    [
        # the file carries a prefix the recorded module tree lacks
        (
            ["blocks.0.attn.q", "blocks.1.attn.q"],
            ["model.diffusion_model.blocks.0.attn.q.weight", "model.diffusion_model.blocks.1.attn.q.weight"],
            {
                "model.diffusion_model.blocks.0.attn.q.weight": "blocks.0.attn.q",
                "model.diffusion_model.blocks.1.attn.q.weight": "blocks.1.attn.q",
            },
        ),
        # recorded on a wrapper (sentence-transformers), file without it
        (
            ["0.auto_model.encoder.layer.0.attention.self.query"],
            ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias"],
            {"encoder.layer.0.attention.self.query.weight": "0.auto_model.encoder.layer.0.attention.self.query"},
        ),
        # whole components only: 'layer.10' is not 'layer.0', 'output.dense' is not 'attention.output.dense'
        (
            ["layer.0.output.dense", "layer.0.attention.output.dense"],
            ["layer.10.output.dense.weight", "layer.0.attention.output.dense.weight"],
            {"layer.0.attention.output.dense.weight": "layer.0.attention.output.dense"},
        ),
        # ambiguous: one short key fits two layers, one short layer fits two keys -> nothing guessed
        (["a.proj", "b.proj"], ["proj.weight"], {}),
        (["proj"], ["a.proj.weight", "b.proj.weight"], {}),
    ],
)
def test_layer_names_map_onto_weight_keys(layers, keys, expected):
    assert match_weight_keys(layers, keys) == expected


def test_statistics_of_another_model_are_refused(model_and_batches):
    model, batches = model_and_batches
    stats = record(model, batches)
    with pytest.raises(QuantError, match="none of its 6 recorded layers"):
        statistics_for_weights(stats, {"other.weight": (4, 12)}, "m.safetensors")
    with pytest.raises(QuantError, match="'up' was recorded with 12 input features but 'x.up.weight'.*has 16"):
        statistics_for_weights(stats, {"x.up.weight": (36, 16)}, "m.safetensors")
    assert statistics_for_weights(stats, {"x.up.weight": (36, 12), "emb.weight": (9, 12)}, "m") == {"x.up.weight": "up"}
