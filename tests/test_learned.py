"""The data-free learned rounding does real work and is never worse than round-to-nearest."""

import pytest
import torch

from quant_core.fp16 import choose_scale_exponent, other_neighbour, round_to_fp16
from quant_core.learned import learned_rounding
from quant_core.methods import rounding_settings
from quant_core.rounding import ScaledWeight, abs_max, round_nearest


def scaled(w):
    return ScaledWeight(w, choose_scale_exponent(abs_max(w)), torch.device("cpu"))


def objective(weight: ScaledWeight, q: torch.Tensor, k: int) -> tuple[float, float]:
    """(plain, projected) squared error with exact top-k singular vectors, computed independently."""
    x = weight.source.double() * 2.0**-weight.exponent
    e = x - q.double()
    u, _, vh = torch.linalg.svd(x)
    p = u[:, :k].T @ e @ vh[:k].T
    return float((e**2).sum()), float((p**2).sum())


@pytest.mark.parametrize("shape,k", [((64, 96), 1), ((200, 50), 3), ((1, 17), 1)])
def test_learned_picks_neighbours_and_cancels_projected_error(shape, k):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g) * torch.logspace(-1, 1, shape[1])  # anisotropic columns
    weight = scaled(w)
    rtn = round_nearest(weight, rounding_settings())
    out = learned_rounding(weight, rounding_settings(num_iter=64, top_k=k))
    x = weight.source * 2.0**-weight.exponent
    lower_or_upper = (out.q == rtn.q) | (out.q == other_neighbour(x, round_to_fp16(x)))
    assert lower_or_upper.all(), "every value is one of the two float16 neighbours"
    plain_rtn, proj_rtn = objective(weight, rtn.q, k)
    plain, proj = objective(weight, out.q, k)
    m, n = shape
    lam = m * n / k**2
    assert plain + lam * proj <= plain_rtn + lam * proj_rtn
    assert out.details["objective_ratio"] <= 1.0
    if min(shape) > 1:
        assert proj < 0.2 * proj_rtn, "the search must do real work on the principal error"
        assert plain < 1.25 * plain_rtn, "at a bounded plain-error cost"
        assert out.details["toggled"] > 0


def test_error_statistics_are_exact():
    g = torch.Generator().manual_seed(0)
    weight = scaled(torch.randn(40, 30, generator=g))
    out = learned_rounding(weight, rounding_settings())
    x = weight.source.double() * 2.0**-weight.exponent
    e = x - out.q.double()
    assert out.stats.error_sq == pytest.approx(float((e**2).sum()), rel=1e-6)
    assert out.stats.max_abs_error == pytest.approx(float(e.abs().max()), rel=1e-6)
    assert out.stats.exact == int((e == 0).sum())


def test_exact_tensors_are_skipped():
    w = torch.randn(32, 32).to(torch.bfloat16)
    out = learned_rounding(scaled(w), rounding_settings())
    assert out.iterations == 0 and out.stats.exact_fraction == 1.0


def test_deterministic():
    w = torch.randn(50, 70, generator=torch.Generator().manual_seed(5))
    a = learned_rounding(scaled(w), rounding_settings())
    b = learned_rounding(scaled(w), rounding_settings())
    assert torch.equal(a.q, b.q)


def test_num_iter_zero_is_round_to_nearest():
    w = torch.randn(50, 70, generator=torch.Generator().manual_seed(5))
    assert torch.equal(
        learned_rounding(scaled(w), rounding_settings(num_iter=0)).q, round_nearest(scaled(w), rounding_settings()).q
    )
