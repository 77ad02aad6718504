import math

import pytest
import torch

from quant_core.fp16 import FP16_MAX, choose_scale_exponent, exact_fp16_cast, other_neighbour, round_to_fp16


@pytest.mark.parametrize("abs_max", [1e-30, 1e-6, 0.013, 1.0, 65504.0, 65505.0, 1e5, 3e38])
def test_scale_exponent_is_the_tightest_fit(abs_max):
    e = choose_scale_exponent(abs_max)
    assert math.ldexp(abs_max, -e) <= FP16_MAX
    assert math.ldexp(abs_max, -(e - 1)) > FP16_MAX  # one step smaller would overflow


def test_scale_exponent_edge_cases():
    assert choose_scale_exponent(0.0) == 0
    with pytest.raises(ValueError):
        choose_scale_exponent(math.inf)
    with pytest.raises(ValueError):
        choose_scale_exponent(math.nan)
    with pytest.raises(ValueError):
        choose_scale_exponent(1e300)  # needs a scale beyond float32


def _nearest_fp16_reference(x: float) -> float:
    """Exhaustive nearest-even search over float16 bit patterns near x (pure Python, no casts)."""
    q = torch.tensor(x, dtype=torch.float32).to(torch.float16)
    candidates = torch.nextafter(q.repeat(3), torch.tensor([-math.inf, 0.0, math.inf], dtype=torch.float16))
    candidates[1] = q
    best = min(
        candidates.tolist(), key=lambda c: (abs(x - c), int(torch.tensor(c, dtype=torch.float16).view(torch.int16)) & 1)
    )
    return best


def test_float64_rounds_once():
    # 1 + 2**-11 + 2**-40: just above a float16 midpoint. Via float32 it lands on the midpoint and
    # ties to even (1.0); the correct rounding is up (1 + 2**-10).
    x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert x.to(torch.float16).item() == 1.0  # torch's cast double-rounds
    assert round_to_fp16(x).item() == 1 + 2**-10
    g = torch.Generator().manual_seed(1)
    xs = (torch.rand(2000, generator=g, dtype=torch.float64) - 0.5) * 10
    got = round_to_fp16(xs).tolist()
    assert got == [_nearest_fp16_reference(v) for v in xs.tolist()]


def test_exact_ties_go_to_even():
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11], dtype=torch.float64)
    assert round_to_fp16(x).tolist() == [1.0, 1 + 2 * 2**-10]


def test_other_neighbour_brackets_the_value():
    x = torch.tensor([1.0001, -2.3, 0.5, 1e-6])
    q = round_to_fp16(x)
    o = other_neighbour(x, q)
    lo, hi = torch.minimum(q, o).float(), torch.maximum(q, o).float()
    assert torch.all((lo <= x) & (x <= hi))
    assert o[2] == q[2]  # 0.5 is exact: no other neighbour


def test_exact_cast_check():
    assert exact_fp16_cast(torch.tensor([1.0, 0.5, -2.0], dtype=torch.bfloat16))
    assert not exact_fp16_cast(torch.tensor([0.1]))
    assert not exact_fp16_cast(torch.tensor([1e5]))
    assert not exact_fp16_cast(torch.tensor([float("nan")]))
