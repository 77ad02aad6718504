"""Statistics in folds: recorded per disjoint part of the data, merged on demand, stored as folds only.

The held-out check (tests/test_held_out.py) rounds on one fold and judges on another; these tests
check the folds themselves: which data goes where, that their merge is the whole, that the file keeps
them (and only them), that shrinkage keeps a summary a summary, and that old files still load.
"""

import json

import pytest
import torch
from anisotropic import Anisotropic
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant_core import QuantError
from quant_core.calibration import (
    CalibrationStatistics,
    InputStatistics,
    StatisticsRecorder,
    load_statistics,
    merge_statistics,
    save_statistics,
)


def record(layer: nn.Module, batches: list[torch.Tensor], **kwargs) -> CalibrationStatistics:
    with StatisticsRecorder(layer, **kwargs) as recorder, torch.no_grad():
        for batch in batches:
            layer(batch)
    return recorder.statistics()


def moment(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / x.shape[0]


def subspace_data(n: int, rank: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rank, generator=g) @ torch.randn(rank, n, generator=g)


def test_forward_calls_alternate_between_folds_and_the_folds_merge_to_the_whole():
    torch.manual_seed(0)
    batches = [torch.randn(7, 12) + i for i in range(4)]
    stats = record(nn.Linear(12, 5), batches).for_layer("")
    assert [fold.count for fold in stats.folds] == [14, 14] and stats.count == 28
    even, odd = torch.cat(batches[0::2]), torch.cat(batches[1::2])
    torch.testing.assert_close(stats.folds[0].second_moment, moment(even))
    torch.testing.assert_close(stats.folds[1].mean, odd.double().mean(0))
    torch.testing.assert_close(stats.second_moment, moment(torch.cat(batches)))
    torch.testing.assert_close(stats.mean, torch.cat(batches).double().mean(0))


def test_rows_of_one_forward_go_to_their_assigned_folds():
    x = torch.randn(3, 4, 6)  # a batch of 3, 4 tokens each
    layer = nn.Linear(6, 2)
    with StatisticsRecorder(layer) as recorder, torch.no_grad():
        recorder.assign_folds([1, 0, 1])
        layer(x)
        recorder.assign_folds(0)
        layer(x[:1])
        with pytest.raises(ValueError, match="folds must be in 0..1"):
            recorder.assign_folds([2])
    stats = recorder.statistics().for_layer("")
    assert [fold.count for fold in stats.folds] == [8, 8]
    torch.testing.assert_close(stats.folds[1].second_moment, moment(x[[0, 2]]))
    torch.testing.assert_close(stats.folds[0].second_moment, moment(torch.cat([x[1], x[0]])))


def test_one_fold_of_data_gives_statistics_without_folds():
    stats = record(nn.Linear(6, 2), [torch.randn(5, 6)]).for_layer("")
    assert stats.folds == () and stats.count == 5
    assert record(nn.Linear(6, 2), [torch.randn(5, 6)] * 3, folds=1).for_layer("").folds == ()


def test_the_token_cap_counts_every_fold():
    batches = [torch.randn(5, 6) for _ in range(3)]
    stats = record(nn.Linear(6, 2), batches, max_tokens=12).for_layer("")
    assert [fold.count for fold in stats.folds] == [7, 5]
    torch.testing.assert_close(stats.folds[0].second_moment, moment(torch.cat([batches[0], batches[2][:2]])))


def test_the_merge_is_made_per_use_and_not_held():
    n = 10
    stats = record(nn.Linear(n, 2), [torch.randn(8, n) for _ in range(4)])
    one = (n * n + n) * 8  # a full moment and a mean, float64
    assert stats.memory_bytes == 2 * one  # the folds only
    whole = stats.for_layer("")
    assert whole.memory_bytes == 3 * one  # the merge, and the folds it refers to
    assert stats.for_layer("") is not whole  # made again: nothing cached


def test_summaries_merge_exactly_within_their_rank():
    n = 40
    a, b = (
        record(nn.Linear(n, 2), [subspace_data(n, 3, 50, seed)], max_full_dim=8, summary_rank=4).for_layer("")
        for seed in (0, 1)
    )
    whole = merge_statistics([a, b], rank=8)
    assert whole.rank == 8 and whole.folds == (a, b)
    torch.testing.assert_close(whole.hessian(), (a.hessian() * 50 + b.hessian() * 50) / 100, rtol=1e-9, atol=1e-9)


def test_folds_survive_the_statistics_file_which_holds_only_them(tmp_path):
    n = 40
    batches = [subspace_data(n, 4, 50, seed) for seed in range(3)]
    stats = record(nn.Linear(n, 3), batches, max_full_dim=16, summary_rank=8)
    path = save_statistics(stats, tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "..mean" not in keys and ".fold0.mean" in keys and ".fold1.eigenvectors" in keys
    assert not any(key.startswith(".mean") or key == ".eigenvectors" for key in keys)  # the whole is not stored
    assert meta["calib.format_version"] == "2" and json.loads(meta["calib.inputs"])[""]["folds"] == [100, 50]
    loaded = load_statistics(path).for_layer("")
    original = stats.for_layer("")
    assert [fold.count for fold in loaded.folds] == [100, 50]
    torch.testing.assert_close(loaded.folds[1].hessian(), original.folds[1].hessian(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.hessian(), original.hessian(), rtol=0, atol=0)
    one_fold = save_statistics(record(nn.Linear(n, 3), batches, folds=1), tmp_path / "one.safetensors")
    assert path.stat().st_size < 2.1 * one_fold.stat().st_size  # two folds, not three tensors' worth


def test_version_1_files_without_folds_still_load(tmp_path):
    x = Anisotropic(24).draw(300).double()
    plain = InputStatistics(300, x.mean(0), second_moment=x.T @ x / 300)
    path = save_statistics(CalibrationStatistics({"": ""}, {"": plain}), tmp_path / "v2.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = {**f.metadata(), "calib.format_version": "1"}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "v1.safetensors"), metadata)
    loaded = load_statistics(tmp_path / "v1.safetensors").for_layer("")
    assert loaded.folds == () and torch.equal(loaded.second_moment, plain.second_moment)


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_shrinkage_toward_the_diagonal_keeps_a_summary_a_summary(alpha):
    n = 30
    summary = record(nn.Linear(n, 2), [Anisotropic(n).draw(64) for _ in range(2)], max_full_dim=8, summary_rank=6)
    stats = summary.for_layer("")
    shrunk = stats.shrunk(alpha)
    h = stats.hessian()
    expected = (1 - alpha) * h + alpha * torch.diag(h.diagonal())
    assert not shrunk.is_full and shrunk.rank == stats.rank
    torch.testing.assert_close(shrunk.hessian(), expected, rtol=1e-12, atol=1e-12)
    full = InputStatistics(stats.count, stats.mean, second_moment=h).shrunk(alpha)
    torch.testing.assert_close(full.second_moment, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shrinkage"):
        stats.shrunk(1.5)


def test_a_file_missing_a_fold_is_refused(tmp_path):
    path = save_statistics(record(nn.Linear(6, 2), [torch.randn(5, 6) for _ in range(2)]), tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != ".fold1.mean"}
        save_file(tensors, str(tmp_path / "broken.safetensors"), f.metadata())
    with pytest.raises(QuantError, match="statistics for input '' are missing; record it again"):
        load_statistics(tmp_path / "broken.safetensors")
