"""Coordinate descent: every reported gain is real, it ends where no single float16 step gains, and
updown's values stay next to their weights."""

import pytest
import torch
from test_feedback import F64, exact_row_losses, full_statistics, summary_statistics, weights

from quant_core.feedback import DenseFactor, LowRankFactor
from quant_core.fp16 import other_neighbour, round_to_fp16
from quant_core.refine import coordinate_descent


def descend(w: torch.Tensor, factor, sweeps: int, neighbours_only: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """From round-to-nearest: (q in the weight's order, loss change per row, sweeps run)."""
    w_t = w[:, factor.order].T.contiguous()
    q_t = round_to_fp16(w_t)
    e_t = w_t - q_t.to(F64)
    change, sweeps_run = coordinate_descent(e_t, q_t, factor, sweeps, neighbours_only, block=8, inner=4)
    q = torch.empty(w.shape, dtype=torch.float16)
    q[:, factor.order] = q_t.T
    return q, change, sweeps_run


@pytest.mark.parametrize("kind", ["dense", "low rank"])
@pytest.mark.parametrize("neighbours_only", [False, True])
def test_descent_gains_what_it_reports_and_ends_at_a_local_minimum(kind, neighbours_only):
    n = 24
    stats = full_statistics(n, 11) if kind == "dense" else summary_statistics(n, 5, 11)
    factor = (
        DenseFactor.build(stats.hessian(), 0.01, F64)
        if kind == "dense"
        else LowRankFactor.build(stats, 0.01, torch.device("cpu"), F64, block=8)
    )
    w = weights(6, n, 12)
    nearest = round_to_fp16(w)
    q, change, sweeps = descend(w, factor, 1000, neighbours_only)
    assert sweeps < 1000  # converged: a sweep without moves
    before = exact_row_losses(stats, w - nearest.to(F64))
    after = exact_row_losses(stats, w - q.to(F64))
    torch.testing.assert_close(after - before, change, rtol=1e-6, atol=1e-9 * float(before.max()))
    assert (change < 0).all()
    if neighbours_only:
        assert ((q == nearest) | (q == other_neighbour(w, nearest))).all()
        return
    for i in range(w.shape[0]):  # no single step of any value lowers its row's loss
        for j in range(n):
            for toward in (float("inf"), float("-inf")):
                moved = q[i].clone()
                moved[j] = torch.nextafter(moved[j], torch.tensor(toward, dtype=torch.float16))
                loss = exact_row_losses(stats, (w[i] - moved.to(F64))[None])
                assert loss >= after[i] * (1 - 1e-9)
