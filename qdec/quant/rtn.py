"""Round-to-nearest (RTN) quantization: the min-max grid of :mod:`qdec.quant.grid`
applied independently to every (row, group)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..packing import check_bits
from .grid import (QuantizedWeight, _check_weight, check_group_size, compute_grid,
                   make_quantized_weight, quantize_to_grid)


def quantize_rtn(weight: Tensor, bits: int, group_size: int, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Quantize ``weight`` to the nearest point of its per-group min-max grid.

    Args:
        weight: float ``[N, K]`` (rows = output channels), any floating dtype;
            the math is float32.
        bits: code width, 2..8.
        group_size: ``-1`` (one group per row) or a positive multiple of 32; a
            ragged last group is used when K is not a multiple of it.
        symmetric: fixed zero point ``2**(bits-1)`` instead of a stored zero.
        scale_dtype: dtype of the stored scales (and zeros).

    Returns:
        :class:`QuantizedWeight` with codes in the original column order.
    """
    check_bits(bits)
    check_group_size(group_size)
    _check_weight(weight)
    scales, zeros = compute_grid(weight, bits, group_size, symmetric, scale_dtype)
    codes = quantize_to_grid(weight, scales, zeros, bits, group_size)
    return make_quantized_weight(codes, scales, zeros, bits, group_size, scale_dtype)
