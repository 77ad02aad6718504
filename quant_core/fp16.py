"""Float16 grid arithmetic: exact power-of-two scaling and correctly rounded casts.

Everything here is exact by construction: a power-of-two scale only shifts the exponent, and the
casts below round once (torch's float64 -> float16 cast goes through float32 and can round twice).
"""

from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0
# A scale must itself be a normal float32 (it is stored as float32).
MIN_SCALE_EXPONENT = -126
MAX_SCALE_EXPONENT = 127


def work_dtype_for(source_dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a source tensor is scaled and compared exactly."""
    return torch.float64 if source_dtype == torch.float64 else torch.float32


def choose_scale_exponent(abs_max: float) -> int:
    """Smallest e with abs_max * 2**-e <= FP16_MAX.

    Pushing the largest magnitude to the top of the float16 range moves every element as far from
    the subnormal floor as possible, which maximises both the number of exactly representable
    elements and the precision of the others. An all-zero tensor gets scale 1.
    """
    if not math.isfinite(abs_max):
        raise ValueError(f"cannot scale a tensor whose largest magnitude is {abs_max}")
    if abs_max == 0.0:
        return 0
    mantissa, exponent = math.frexp(abs_max / FP16_MAX)  # abs_max/FP16_MAX = mantissa * 2**exponent
    e = exponent if mantissa > 0.5 else exponent - 1
    while math.ldexp(abs_max, -e) > FP16_MAX:
        e += 1
    while e - 1 >= MIN_SCALE_EXPONENT and math.ldexp(abs_max, -(e - 1)) <= FP16_MAX:
        e -= 1
    e = max(e, MIN_SCALE_EXPONENT)
    if e > MAX_SCALE_EXPONENT:
        raise ValueError(f"largest magnitude {abs_max:g} needs a scale beyond float32's range")
    return e


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round float32/float64 values to the nearest float16 (ties to even), rounding exactly once."""
    q = x.to(torch.float16)
    if x.dtype != torch.float64:
        return q  # float32 -> float16 is a single correctly rounded step
    other = other_neighbour(x, q)  # q itself where x == q, which then stays (err_q == 0)
    err_q = (x - q.to(x.dtype)).abs()
    err_other = (x - other.to(x.dtype)).abs()
    other_is_even = (other.view(torch.int16) & 1) == 0
    better = (err_other < err_q) | ((err_other == err_q) & other_is_even & (err_q > 0))
    return torch.where(better, other, q)


def other_neighbour(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The float16 neighbour of x on the other side from its rounding q (q itself where x == q)."""
    toward = torch.where(x > q.to(x.dtype), torch.full_like(q, math.inf), torch.full_like(q, -math.inf))
    return torch.where(x == q.to(x.dtype), q, torch.nextafter(q, toward))


def exact_fp16_cast(t: torch.Tensor) -> bool:
    """True when casting t to float16 loses nothing: every value finite and reproduced bit-for-bit."""
    if t.dtype == torch.float16:
        return bool(torch.isfinite(t).all())
    w = t.to(work_dtype_for(t.dtype))
    q = round_to_fp16(w)
    return bool(torch.isfinite(q).all()) and bool(torch.equal(q.to(w.dtype), w))
