"""The residual quantizer: ``R = W_ref - W_hat`` to a few bits for the host store.

Format (what :func:`qdec.reference.residual_rows_ref` decodes):

* symmetric, one float32 scale per *output* row ``n``, no groups;
* code ``c = q + 2**(b-1)`` with ``q`` clamped to ``[-(2**(b-1) - 1), 2**(b-1) - 1]``,
  so codes lie in ``[1, 2**b - 1]`` and code 0 (``q = -2**(b-1)``) is never
  produced. The range is symmetric on purpose, as in DecDEC's 4-bit
  residual (q in [-7, 7]): residuals have no preferred sign, and a symmetric
  clamp keeps the grid search below simple;
* decode ``r[n, j] = (c - 2**(b-1)) * scale[n]``;
* stored transposed: ``int32 [K, ceil(N/32) * b]`` packed with
  :func:`qdec.packing.pack_codes`, so input channel ``j`` is one contiguous row
  (the rows the decode step gathers).

The scale of row ``n`` is the best, by squared error of that row, of
``grid_points`` candidates ``max|r_n| / qmax * t`` with ``t`` evenly spaced in
``[1/grid_points, 1]`` (DecDEC uses 32). ``t = 1`` is the plain max scale, so the
chosen scale never does worse than it. A row that is all zero gets scale 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..packing import check_bits
from .grid import _check_weight, pack_rows

# Elements of one chunk of the search ([grid_points, rows, K] float32, 4 MiB):
# bounds its temporaries and keeps them cache-resident (measured fastest of
# 2^18..2^22 on SmolLM2's shapes).
SEARCH_ELEMENTS = 1 << 20


def residual_scale_search(residual: Tensor, bits: int = 4, grid_points: int = 32
                          ) -> tuple[Tensor, Tensor]:
    """Per-row MSE-optimal scale on the grid, and the signed codes.

    Args:
        residual: float ``[N, K]``.
        bits: 2..8.
        grid_points: number of candidate scales per row (>= 1).

    Returns:
        ``(q, scales)``: int8 ``[N, K]`` signed codes in ``[-qmax, qmax]``
        (``qmax = 2**(bits-1) - 1``) and float32 ``[N]`` scales.
    """
    check_bits(bits)
    _check_weight(residual, "residual")
    if not isinstance(grid_points, int) or grid_points < 1:
        raise ValueError(f"grid_points must be a positive int, got {grid_points!r}")
    N, K = residual.shape
    qmax = float((1 << (bits - 1)) - 1)
    fractions = torch.linspace(1.0 / grid_points, 1.0, grid_points, dtype=torch.float32)
    fractions[-1] = 1.0  # the plain max scale exactly
    codes = torch.empty(N, K, dtype=torch.int8)
    scales = torch.empty(N, dtype=torch.float32)
    # All candidates of a chunk of rows at once ([grid, rows, K]), the chunk
    # small enough that the few elementwise passes stay in cache: a loop over
    # candidates on big chunks streamed every pass through DRAM.
    rows_per_chunk = max(1, SEARCH_ELEMENTS // (K * grid_points))
    for r0 in range(0, N, rows_per_chunk):
        r = residual[r0:r0 + rows_per_chunk].float()
        max_scale = r.abs().amax(1) / qmax  # [n]
        empty = max_scale == 0
        max_scale = torch.where(empty, torch.ones_like(max_scale), max_scale)
        cand = max_scale * fractions[:, None]  # [grid, n]
        c3 = cand[:, :, None]
        q = torch.div(r, c3).round_().clamp_(-qmax, qmax)
        err = q.mul_(c3).sub_(r).square_().sum(2)  # [grid, n], per candidate as before
        # The smallest error wins, ties to the earlier candidate in grid order:
        # argmin returns the first minimum (errors are finite, the input is).
        best_scale = cand.gather(0, err.argmin(0, keepdim=True))[0]
        q = torch.round(r / best_scale[:, None]).clamp_(-qmax, qmax)
        best_scale = torch.where(empty, torch.zeros_like(best_scale), best_scale)
        codes[r0:r0 + rows_per_chunk] = q.to(torch.int8)
        scales[r0:r0 + rows_per_chunk] = best_scale
    return codes, scales


def quantize_residual(residual: Tensor, bits: int = 4, grid_points: int = 32
                      ) -> tuple[Tensor, Tensor]:
    """Quantize and pack a residual for the host store.

    Args:
        residual: float ``[N, K]`` = ``W_ref - W_hat`` (rows = output channels).
        bits: residual code width, 2..8 (the CUDA kernel's fast path is 4).
        grid_points: candidate scales per row.

    Returns:
        ``(packed, scales)``: int32 ``[K, ceil(N/32) * bits]`` (row j = input
        channel j, codes ``q + 2**(bits-1)``) and float32 ``[N]``.
    """
    q, scales = residual_scale_search(residual, bits, grid_points)
    return pack_residual(q, bits), scales


def pack_residual(q: Tensor, bits: int) -> Tensor:
    """Signed codes ``[N, K]`` (in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``) to the
    transposed store ``int32 [K, ceil(N/32) * bits]`` with offset ``2**(bits-1)``."""
    check_bits(bits)
    half = 1 << (bits - 1)
    if q.numel() and (int(q.min()) < -(half - 1) or int(q.max()) > half - 1):
        raise ValueError(f"residual codes must lie in [{-(half - 1)}, {half - 1}] for "
                         f"bits={bits}, got [{int(q.min())}, {int(q.max())}]")
    stored = (q.to(torch.int16) + half).to(torch.uint8)
    return pack_rows(stored.t().contiguous(), bits)


def dequantize_residual(q: Tensor, scales: Tensor) -> Tensor:
    """float32 ``[N, K]`` from signed codes ``[N, K]`` and scales ``[N]``."""
    return q.float() * scales[:, None]
