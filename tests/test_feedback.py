"""The error-feedback kernel: the factored algebra equals the definition of GPTQ, the low-rank form equals
the dense one, and the loss it reports is the objective."""

import pytest
import torch

from quant_core.calibration import InputStatistics
from quant_core.feedback import DenseFactor, LowRankFactor, error_feedback
from quant_core.fp16 import round_to_fp16

F64 = torch.float64


def summary_statistics(n: int, k: int, seed: int, dead: int = 0) -> InputStatistics:
    """A rank-k eigen summary with a positive residual diagonal; the last `dead` inputs are always zero."""
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    v[n - dead :] = 0
    lam = torch.logspace(2, -1, k, dtype=F64)
    residual = torch.rand(n, generator=g, dtype=F64) * 0.05
    residual[n - dead :] = 0
    return InputStatistics(100, torch.zeros(n, dtype=F64), eigenvectors=v, eigenvalues=lam, residual=residual)


def full_statistics(n: int, seed: int) -> InputStatistics:
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(3 * n, n, generator=g, dtype=F64)
        @ torch.randn(n, n, generator=g, dtype=F64)
        * torch.logspace(0, -2, n, dtype=F64)
    )
    return InputStatistics(3 * n, x.mean(0), second_moment=x.T @ x / x.shape[0])


def exact_row_losses(stats: InputStatistics, errors: torch.Tensor) -> torch.Tensor:
    """The objective per row, from the dense matrix the statistics stand for (independent of the factors)."""
    return ((errors @ stats.hessian()) * errors).sum(1)


def weights(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 300


def sequential_reference(w: torch.Tensor, h: torch.Tensor, damp: float, order: torch.Tensor) -> torch.Tensor:
    """GPTQ from its definition: each column, in order, is rounded from the continuous optimum of every
    column not yet rounded given the errors of those already rounded (a linear solve per column)."""
    hd = h[order][:, order] + damp * torch.eye(h.shape[0], dtype=F64)
    w = w[:, order]
    q = torch.empty_like(w)
    for j in range(w.shape[1]):
        fixed, rest = slice(0, j), slice(j, None)
        errors = w[:, fixed] - q[:, fixed]
        targets = w[:, rest] + torch.linalg.solve(hd[rest, rest], hd[rest, fixed] @ errors.T).T
        q[:, j] = round_to_fp16(targets[:, 0]).to(F64)
    out = torch.empty_like(q)
    out[:, order] = q
    return out


def run(w: torch.Tensor, factor, dtype=F64, block: int = 8, inner: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in the weight's column order, the loop's per-row losses); small blocks by default, to cross several."""
    w_t = w[:, factor.order].T.to(dtype).contiguous()
    q_t = torch.empty(w_t.shape, dtype=torch.float16)
    losses = error_feedback(w_t, factor, q_t, block=block, inner=inner)
    q = torch.empty(w.shape, dtype=torch.float16)
    q[:, factor.order] = q_t.T
    return q, losses


@pytest.mark.parametrize("kind", ["dense", "low rank"])
def test_feedback_is_gptq_by_its_definition(kind):
    n = 30
    stats = full_statistics(n, 1) if kind == "dense" else summary_statistics(n, 6, 1)
    w = weights(7, n, 2)
    factor = (
        DenseFactor.build(stats.hessian(), 0.01, F64)
        if kind == "dense"
        else LowRankFactor.build(stats, 0.01, torch.device("cpu"), F64, block=8)
    )
    q, losses = run(w, factor)
    expected = sequential_reference(w, stats.hessian(), factor.damp, factor.order)
    assert torch.equal(q.to(F64), expected)
    torch.testing.assert_close(losses, exact_row_losses(stats, w - expected), rtol=1e-9, atol=0)


def test_low_rank_factor_equals_the_dense_factor_of_the_expanded_summary():
    stats = summary_statistics(200, 24, 3)
    low = LowRankFactor.build(stats, 0.01, torch.device("cpu"), F64, block=64)
    dense = DenseFactor.build(stats.hessian(), 0.01, F64)
    assert torch.equal(low.order, dense.order) and low.damp == pytest.approx(dense.damp, rel=1e-12)
    torch.testing.assert_close(low.curvature, dense.curvature, rtol=1e-9, atol=0)
    for b0, b1 in ((0, 200), (37, 101)):
        torch.testing.assert_close(low.coupling(b0, b1), dense.coupling(b0, b1), rtol=1e-8, atol=1e-10)
    errors = weights(5, 200, 4) * 1e-3
    torch.testing.assert_close(low.estimated_losses(errors), dense.estimated_losses(errors), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["dense", "low rank"])
def test_inputs_that_are_always_zero_are_rounded_to_nearest(kind):
    n, dead = 40, 5
    stats = summary_statistics(n, 8, 5, dead=dead)
    factor = (
        DenseFactor.build(stats.hessian(), 0.01, F64)
        if kind == "dense"
        else LowRankFactor.build(stats, 0.01, torch.device("cpu"), F64)
    )
    w = weights(6, n, 6)
    q, _ = run(w, factor)
    assert torch.equal(q[:, n - dead :], round_to_fp16(w[:, n - dead :]))
    assert not torch.equal(q[:, : n - dead], round_to_fp16(w[:, : n - dead]))  # the others do get feedback


@pytest.mark.parametrize("kind", ["dense", "low rank"])
def test_float32_feedback_decides_like_float64(kind):
    """The same problem in float32 (factorization included for the dense factor) and float64: nearly
    every value identical, the objective the same to 1e-3, and the loop's loss is the objective."""
    stats = full_statistics(512, 7) if kind == "dense" else summary_statistics(512, 32, 7)
    w = weights(256, 512, 8).float().double()  # values float32 holds exactly
    results = {}
    for dtype in (F64, torch.float32):
        if kind == "dense":
            factor = DenseFactor.build(stats.hessian(), 0.01, dtype)
        else:
            factor = LowRankFactor.build(stats, 0.01, torch.device("cpu"), dtype)
        q, losses = run(w, factor, dtype, block=128, inner=16)
        results[dtype] = (q, float(exact_row_losses(stats, w - q.to(F64)).sum()), float(losses.sum()))
    (q64, exact64, _), (q32, exact32, loop32) = results[F64], results[torch.float32]
    assert (q64 != q32).double().mean() < 0.05
    assert exact32 == pytest.approx(exact64, rel=1e-3)
    assert loop32 == pytest.approx(exact32, rel=1e-4)
