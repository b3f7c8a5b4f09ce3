"""The QDEC packed-code layout in pure PyTorch (twin of ``csrc/include/qdec/bitpack.h``).

A matrix of unsigned codes ``q[rows, cols]``, each ``bits`` wide (2..8), is stored
row by row in blocks of 32 consecutive columns (the last block zero-padded). A
block occupies exactly ``bits`` int32 words; value ``i`` of a block sits at bit
offset ``bits * i`` of the little-endian concatenation of those words, so a value
may straddle two words (as in GPTQ's 3-bit format). Packed shape:
``int32 [rows, ceil(cols / 32) * bits]``.

The base weight ``W[N, K]`` is packed with rows = outputs; the residual store packs
``R^T[K, N]`` so that one input channel is one contiguous row.
"""

from __future__ import annotations

import torch

BLOCK = 32
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, name: str = "bits") -> None:
    """Raise ``ValueError`` unless ``bits`` is an integer in 2..8."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def packed_words(cols: int, bits: int) -> int:
    """Number of int32 words a packed row of ``cols`` values occupies."""
    return (cols + BLOCK - 1) // BLOCK * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[rows, cols]`` (any integer dtype, values in
    ``[0, 2**bits)``) into ``int32 [rows, ceil(cols/32) * bits]``."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, cols], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    rows, cols = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(
            f"codes must lie in [0, {1 << bits}) for bits={bits}, "
            f"got range [{int(codes.min())}, {int(codes.max())}]"
        )
    blocks = (cols + BLOCK - 1) // BLOCK
    padded = torch.zeros(rows, blocks * BLOCK, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes.to(torch.int64)
    # Bit b of value i of a block lands at global bit bits*i + b of that block.
    vals = padded.view(rows, blocks, BLOCK)
    bit_idx = torch.arange(bits, device=codes.device)
    bitvals = (vals.unsqueeze(-1) >> bit_idx) & 1  # [rows, blocks, 32, bits]
    bitvals = bitvals.reshape(rows, blocks, bits, BLOCK)  # global bit order, 32 per word
    weights = torch.ones(BLOCK, dtype=torch.int64, device=codes.device) << torch.arange(
        BLOCK, device=codes.device
    )
    words = (bitvals * weights).sum(-1)  # [rows, blocks, bits] as uint32 values
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.reshape(rows, blocks * bits).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``int32 [rows, ceil(cols/32)*bits]`` to
    ``uint8 [rows, cols]`` (``int16`` is never needed: codes are at most 8 bits)."""
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(
            f"packed must be int32 [rows, words], got {packed.dtype} {tuple(packed.shape)}"
        )
    rows = packed.shape[0]
    if packed.shape[1] != packed_words(cols, bits):
        raise ValueError(
            f"packed has {packed.shape[1]} words per row; {cols} values at {bits} bits "
            f"need {packed_words(cols, bits)}"
        )
    blocks = packed.shape[1] // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(BLOCK, device=packed.device)
    bitvals = (words.view(rows, blocks, bits, 1) >> shifts) & 1  # [rows, blocks, bits, 32]
    bitvals = bitvals.reshape(rows, blocks, BLOCK, bits)
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(
        bits, device=packed.device
    )
    vals = (bitvals * weights).sum(-1).reshape(rows, blocks * BLOCK)
    return vals[:, :cols].to(torch.uint8)


def expand_groups(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """Repeat per-group values ``[rows, ceil(cols/G)]`` to ``[rows, cols]``
    (``group_size=-1`` means one group per row)."""
    g = cols if group_size == -1 else group_size
    return t.repeat_interleave(g, dim=1)[:, :cols]
