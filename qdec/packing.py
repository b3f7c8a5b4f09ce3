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
    # Value i of a block starts at bit bits*i: word (bits*i) // 32, shift
    # (bits*i) % 32. Shifted in int64, its low 32 bits belong to that word and
    # the rest (a straddling value) to the next. Values occupy disjoint bits,
    # so adding the pieces equals OR-ing them; one shift per value, instead of
    # one int64 per bit, keeps the temporaries ~8x the codes' size.
    word, shift = _bit_positions(bits, codes.device)
    shifted = padded.view(rows, blocks, BLOCK) << shift
    words = torch.zeros(rows, blocks, bits + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(2, word, shifted & 0xFFFFFFFF)
    words.index_add_(2, word + 1, shifted >> 32)  # the extra word stays 0: blocks end on a word
    words = words[..., :bits]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as int32 bit patterns
    return words.reshape(rows, blocks * bits).to(torch.int32)


def _bit_positions(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(word, shift) int64 ``[32]``: where value ``i`` of a block starts."""
    offsets = torch.arange(BLOCK, device=device) * bits
    return offsets // 32, offsets % 32


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
    # Each value is the bits above its shift in its word, plus (if it
    # straddles) the low bits of the next word; a zero word after each block
    # makes "the next word" always exist.
    words = torch.zeros(rows, blocks, bits + 1, dtype=torch.int64, device=packed.device)
    words[..., :bits] = packed.view(rows, blocks, bits).to(torch.int64) & 0xFFFFFFFF
    word, shift = _bit_positions(bits, packed.device)
    vals = (words.index_select(2, word) >> shift) | (words.index_select(2, word + 1) << (32 - shift))
    vals = (vals & ((1 << bits) - 1)).reshape(rows, blocks * BLOCK)
    return vals[:, :cols].to(torch.uint8)


def expand_groups(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """Repeat per-group values ``[rows, ceil(cols/G)]`` to ``[rows, cols]``
    (``group_size=-1`` means one group per row)."""
    g = cols if group_size == -1 else group_size
    return t.repeat_interleave(g, dim=1)[:, :cols]
