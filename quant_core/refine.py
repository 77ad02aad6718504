"""Coordinate descent on the calibration objective: single float16 steps wherever they lower the loss.

Moving Q_ij by d changes row i's loss tr(e H e^T) by -2 d G_ij + d^2 H_jj (G = E H, E = W - Q), so
only a step toward the sign of G can gain. Columns go in act order a block at a time, every output
row at once, in the transposed layout of `feedback.py`: one product gives a block's G, and each move
reaches the later columns of its block as each error does in the feedback loop. With the recorder's
summary H = diag(r) + Z Z^T, G comes from the running Z^T E^T: O(m n k) per sweep.

It refines the feedback's result (`calibrated`), and is the whole of `updown` (from round-to-nearest,
each value kept to one of the two float16 neighbours of its weight).
"""

from __future__ import annotations

import math

import torch

from .feedback import BLOCK_COLUMNS, INNER_COLUMNS, Factor

MOVE_TOLERANCE = 1e-3  # a move must gain this fraction of its own curvature term (float32 noise is far below)


def coordinate_descent(
    errors: torch.Tensor,
    q: torch.Tensor,
    factor: Factor,
    sweeps: int,
    neighbours_only: bool = False,
    block: int = BLOCK_COLUMNS,
    inner: int = INNER_COLUMNS,
) -> tuple[torch.Tensor, int]:
    """Sweeps over errors E^T and values Q^T ([n, rows], act order; both updated in place).

    Returns (each row's loss change, float64, never positive; sweeps run). `neighbours_only` allows
    only values that stay next to their weight (|e - d| < |d|: the step crosses the weight).
    """
    n, rows = errors.shape
    change = torch.zeros(rows, dtype=torch.float64, device=errors.device)
    toward = torch.tensor([math.inf, -math.inf], dtype=q.dtype, device=q.device)  # made once: no copy per block
    factor.start_gradient(errors)
    for sweep in range(1, sweeps + 1):
        before = change.sum()
        for b0 in range(0, n, block):
            b1 = min(b0 + block, n)
            changes = torch.zeros(b1 - b0, rows, dtype=errors.dtype, device=errors.device)
            g = factor.gradient(b0, b1, errors)
            h = factor.hessian_block(b0, b1)
            _descend_block(errors[b0:b1], q[b0:b1], g, h, changes, toward, inner, neighbours_only)
            steps = -changes  # E = W - Q: the values moved by -changes
            change -= (steps * (2 * g - steps * h.diagonal()[:, None])).sum(0).double()  # g: as each move saw it
            errors[b0:b1] += changes
            q[b0:b1] = (q[b0:b1].to(errors.dtype) + steps).to(q.dtype)  # exact: a float16 value one step away
            factor.moved(b0, b1, changes)
        if bool(change.sum() == before):  # no move: one synchronisation per sweep
            return change, sweep
    return change, sweeps


def _descend_block(
    e: torch.Tensor,
    q: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    changes: torch.Tensor,
    toward: torch.Tensor,
    inner: int,
    neighbours_only: bool,
) -> None:
    """One pass over a block's columns, deciding each move from G as it stands then; `changes` receives
    the errors' changes (e and q are updated by the caller, vectorized). g ends holding each column's G
    at its decision."""
    size = e.shape[0]
    wide = e.dtype
    up = torch.nextafter(q, toward[0]).to(wide) - q.to(wide)  # inf past 65504
    down = torch.nextafter(q, toward[1]).to(wide) - q.to(wide)
    threshold = (1 + MOVE_TOLERANCE) / 2 * h.diagonal()  # gain 2dG - d^2 H_jj > tol d^2 H_jj  <=>  d (G - t d) > 0
    zero = up.new_zeros(())
    for c0 in range(0, size, inner):
        c1 = min(c0 + inner, size)
        for j in range(c0, c1):
            if j > c0:
                g[j].addmv_(changes[c0:j].T, h[c0:j, j])
            d = torch.where(g[j] > 0, up[j], down[j])  # only a step along G can gain
            take = torch.addcmul(g[j], d, threshold[j], value=-1).mul_(d) > 0  # an infinite step: -inf, never
            if neighbours_only:
                take &= (e[j] - d).abs() < d.abs()  # the step crosses the weight: it stays a neighbour
            torch.where(take, d, zero, out=changes[j]).neg_()
        if c1 < size:
            g[c1:].addmm_(h[c0:c1, c1:].T, changes[c0:c1])
