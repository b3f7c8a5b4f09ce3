"""Uniform integer grids for weight-only quantization, and the common result type.

A weight ``W[N, K]`` (rows = output channels) is cut along K into groups of
``group_size`` consecutive input channels (``-1``: one group per row). Each
(row, group) has a scale ``s`` and an integer zero ``z``; codes are unsigned,
``q in [0, 2**bits - 1]``, and ``w_hat = (q - z) * s``.

Asymmetric grid (formats.md §1, the AWQ/RTN quantizer)::

    s = max(max - min, 1e-5) / (2**b - 1)
    z = clamp(-round(min / s), 0, 2**b - 1)
    q = clamp(round(w / s) + z, 0, 2**b - 1)

with one deliberate difference: ``min``/``max`` are taken over the group *and 0*
(``min <= 0 <= max``), as GPTQ's reference quantizer does. For any group that
straddles zero (every group of a real weight matrix) this is exactly the AWQ
formula; for an all-positive or all-negative group it keeps ``z`` inside
``[0, 2**b - 1]`` without saturating every code to one value. It also lets a
ragged group be padded with zeros without changing its parameters.

Symmetric grid (no stored zero; ``z = 2**(b-1)``, so ``q - z`` spans
``[-2**(b-1), 2**(b-1) - 1]``)::

    s = max(-min / 2**(b-1), max / (2**(b-1) - 1), 1e-5 / (2**b - 1))
    q = clamp(round(w / s) + 2**(b-1), 0, 2**b - 1)

i.e. the smallest step for which every weight of the group lies inside the
fixed signed range without clipping; the extra negative level ``-2**(b-1)`` is
used when the group's extreme is negative.

Scales (and zeros) are rounded to the stored dtype (float16 by default) *before*
the codes are computed, so ``(q - z) * s`` with the stored values is exactly the
grid the codes were chosen on. Scales are clamped to the smallest positive value
of the stored dtype so that an all-zero group never divides by zero.

Ragged groups: when ``K`` is not a multiple of ``group_size`` the last group is
shorter (``ceil(K / G)`` groups; e.g. K=576, G=128 gives 4 groups of 128 and one
of 64). :mod:`qdec.packing` and the ops support this layout directly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..packing import BLOCK, MAX_BITS, MIN_BITS, check_bits, pack_codes, unpack_codes

# Smallest range a group may have (formats.md §1): keeps s > 0 for constant groups.
MIN_RANGE = 1e-5

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Elements per row chunk: large weights are processed a few rows at a time so the
# float32 temporaries stay small (~16 MB each) whatever the layer size.
CHUNK_ELEMENTS = 1 << 22


def row_chunks(rows: int, cols: int) -> list[slice]:
    """Slices of consecutive rows holding about ``CHUNK_ELEMENTS`` values each."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """:func:`qdec.packing.pack_codes`, run a chunk of rows at a time (its int64
    temporaries are several times the codes' size)."""
    rows, cols = codes.shape
    return torch.cat([pack_codes(codes[sl], bits) for sl in row_chunks(rows, cols * 8)])


def check_group_size(group_size: int, in_features: int | None = None, name: str = "group_size"
                     ) -> None:
    """Raise ``ValueError`` unless ``group_size`` is ``-1`` or a positive multiple of 32
    (the packing block; the ops require it)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (
            group_size == -1 or (group_size > 0 and group_size % BLOCK == 0)):
        raise ValueError(
            f"{name} must be -1 (one group per row) or a positive multiple of {BLOCK}, "
            f"got {group_size!r}")
    if in_features is not None and in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")


def effective_group_size(group_size: int, in_features: int) -> int:
    """``group_size``, or ``in_features`` for ``-1``."""
    return in_features if group_size == -1 else group_size


def num_groups(in_features: int, group_size: int) -> int:
    """``ceil(K / G)``: groups per row, counting a ragged last group."""
    g = effective_group_size(group_size, in_features)
    return -(-in_features // g)


def _check_weight(weight: Tensor, name: str = "weight") -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [out_features, in_features], got "
                         f"{type(weight).__name__} of shape "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else None}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise ValueError(f"{name} has non-finite values (first at [row, col] = {bad})")


def _grouped(weight: Tensor, group_size: int) -> Tensor:
    """float32 ``[N, groups, G]`` view of ``weight``, the ragged last group padded
    with zeros (which change neither grid: both include 0 in their range)."""
    N, K = weight.shape
    g = effective_group_size(group_size, K)
    groups = -(-K // g)
    w = weight.float()
    if groups * g != K:
        w = torch.nn.functional.pad(w, (0, groups * g - K))
    return w.reshape(N, groups, g)


def _round_scale(scale: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """Round float32 scales to ``scale_dtype`` (kept positive) and return them as
    float32 holding exactly the stored values."""
    finfo = torch.finfo(scale_dtype)
    smallest = finfo.tiny * finfo.eps  # smallest positive (subnormal) value
    stored = scale.clamp(min=smallest).to(scale_dtype)
    if not torch.isfinite(stored).all():
        raise ValueError(f"a scale overflows {scale_dtype} (max {scale.max().item():.4g}); "
                         f"use a wider scale_dtype")
    return stored.clamp(min=smallest).float()


def grid_params_from_range(wmin: Tensor, wmax: Tensor, bits: int, symmetric: bool,
                           scale_dtype: torch.dtype = torch.float16
                           ) -> tuple[Tensor, Tensor | None]:
    """Scales and zeros of the grid covering ``[wmin, wmax]`` (any matching shapes).

    Returns float32 tensors holding values exactly representable in
    ``scale_dtype``: ``(scales, zeros)``, ``zeros`` is ``None`` when symmetric.
    """
    check_bits(bits)
    qmax = (1 << bits) - 1
    wmin = wmin.float().clamp(max=0.0)
    wmax = wmax.float().clamp(min=0.0)
    if symmetric:
        half = float(1 << (bits - 1))
        scale = torch.maximum(-wmin / half, wmax / (half - 1.0))
        scale = scale.clamp(min=MIN_RANGE / qmax)
        return _round_scale(scale, scale_dtype), None
    scale = (wmax - wmin).clamp(min=MIN_RANGE) / qmax
    scale = _round_scale(scale, scale_dtype)
    zero = (-torch.round(wmin / scale)).clamp(0, qmax)
    return scale, zero


def compute_grid(weight: Tensor, bits: int, group_size: int, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor | None]:
    """Min-max grid parameters per (row, group).

    Args:
        weight: float ``[N, K]``.
        bits: code width, 2..8.
        group_size: ``-1`` or a positive multiple of 32 (ragged last group allowed).
        symmetric: fixed zero ``2**(bits-1)`` (see the module docstring).
        scale_dtype: dtype the scales will be stored in.

    Returns:
        ``(scales, zeros)``: float32 ``[N, ceil(K/G)]`` holding values exact in
        ``scale_dtype``; ``zeros`` is ``None`` when symmetric.
    """
    check_bits(bits)
    _check_weight(weight)
    check_group_size(group_size)
    scales, zeros = [], []
    for sl in row_chunks(*weight.shape):
        w = _grouped(weight[sl], group_size)
        s, z = grid_params_from_range(w.amin(-1), w.amax(-1), bits, symmetric, scale_dtype)
        scales.append(s)
        zeros.append(z)
    return torch.cat(scales), None if symmetric else torch.cat(zeros)


def quantize_to_grid(weight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                     group_size: int) -> Tensor:
    """Codes ``uint8 [N, K]`` of ``weight [N, K]`` on the given grid:
    ``clamp(round(w / s) + z, 0, 2**bits - 1)`` (``z = 2**(bits-1)`` if ``zeros`` is None).
    ``scales``/``zeros`` are ``[N, ceil(K/G)]``."""
    N, K = weight.shape
    g = effective_group_size(group_size, K)
    codes = torch.empty(N, K, dtype=torch.uint8, device=weight.device)
    for sl in row_chunks(N, K):
        s = scales[sl].float().repeat_interleave(g, dim=1)[:, :K]
        z = (float(1 << (bits - 1)) if zeros is None
             else zeros[sl].float().repeat_interleave(g, dim=1)[:, :K])
        q = torch.round(weight[sl].float() / s) + z
        codes[sl] = q.clamp_(0, (1 << bits) - 1)
    return codes


def fake_quantize(weight: Tensor, bits: int, group_size: int, symmetric: bool = False,
                  scale_dtype: torch.dtype = torch.float16) -> Tensor:
    """``dequantize(quantize_rtn(weight))`` as float32 ``[N, K]``, computed without
    building a :class:`QuantizedWeight` (used in the AWQ searches). Bit-identical to
    ``quantize_rtn(...).dequantize(torch.float32)``."""
    check_bits(bits)
    N, K = weight.shape
    out = torch.empty(N, K, dtype=torch.float32, device=weight.device)
    for sl in row_chunks(N, K):
        w = _grouped(weight[sl], group_size)
        scale, zero = grid_params_from_range(w.amin(-1), w.amax(-1), bits, symmetric,
                                             scale_dtype)
        scale = scale.unsqueeze(-1)
        zero = float(1 << (bits - 1)) if zero is None else zero.unsqueeze(-1)
        q = (torch.round(w / scale) + zero).clamp_(0, (1 << bits) - 1)
        out[sl] = ((q - zero) * scale).reshape(w.shape[0], -1)[:, :K]
    return out


@dataclasses.dataclass
class QuantizedWeight:
    """A weight quantized on a uniform grid, codes kept unpacked.

    Attributes:
        codes: uint8 ``[N, K]``, values in ``[0, 2**bits - 1]``, original input order.
        scales: ``[N, ceil(K/G)]`` in the stored dtype (float16 by default).
        zeros: ``[N, ceil(K/G)]`` in ``scales.dtype`` (integer values), or ``None``
            for symmetric codes (``z = 2**(bits-1)``).
        bits: code width, 2..8.
        group_size: ``-1`` (one group per row) or a positive multiple of 32; the
            last group may be ragged.
        in_features: ``K``.

    ``dequantize()`` is ``(codes - zeros) * scales`` in float32, bit-identical to
    :func:`qdec.reference.dequantize_ref` on ``pack()``'s output.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8 [N, K], got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        N, K = self.codes.shape
        if K != self.in_features:
            raise ValueError(f"codes have {K} columns but in_features={self.in_features}")
        groups = num_groups(K, self.group_size)
        if tuple(self.scales.shape) != (N, groups):
            raise ValueError(f"scales must be [{N}, {groups}] for K={K}, "
                             f"group_size={self.group_size}; got {tuple(self.scales.shape)}")
        if self.scales.dtype not in SCALE_DTYPES:
            raise ValueError(f"scales dtype must be one of {SCALE_DTYPES}, got {self.scales.dtype}")
        if self.zeros is not None and (tuple(self.zeros.shape) != (N, groups)
                                       or self.zeros.dtype != self.scales.dtype):
            raise ValueError(f"zeros must be [{N}, {groups}] {self.scales.dtype}, got "
                             f"{self.zeros.dtype} {tuple(self.zeros.shape)}")
        if self.codes.numel() and int(self.codes.max()) >= 1 << self.bits:
            raise ValueError(f"codes exceed {self.bits} bits (max {int(self.codes.max())})")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def pack(self) -> Tensor:
        """Packed codes ``int32 [N, ceil(K/32) * bits]`` (layout: :mod:`qdec.packing`)."""
        return pack_rows(self.codes, self.bits)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_hat[N, K] = (q - z) * s`` computed in float32, then cast to ``dtype``
        (default ``scales.dtype``, as :func:`qdec.reference.dequantize_ref`)."""
        N, K = self.codes.shape
        g = effective_group_size(self.group_size, K)
        out = torch.empty(N, K, dtype=self.scales.dtype if dtype is None else dtype,
                          device=self.codes.device)
        for sl in row_chunks(N, K):
            s = self.scales[sl].float().repeat_interleave(g, dim=1)[:, :K]
            if self.zeros is None:
                z = torch.full_like(s, float(1 << (self.bits - 1)))
            else:
                z = self.zeros[sl].float().repeat_interleave(g, dim=1)[:, :K]
            out[sl] = (self.codes[sl].float() - z) * s
        return out

    def nbytes(self) -> int:
        """Bytes of the packed form: qweight + scales (+ zeros)."""
        words = -(-self.in_features // BLOCK) * self.bits
        n = self.out_features * words * 4 + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            n += self.zeros.numel() * self.zeros.element_size()
        return n

    @classmethod
    def from_packed(cls, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                    group_size: int, in_features: int) -> "QuantizedWeight":
        """Inverse of :meth:`pack` (with the scales and zeros that go with it)."""
        return cls(unpack_codes(qweight, bits, in_features), scales, zeros, bits, group_size,
                   in_features)


def make_quantized_weight(codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                          group_size: int, scale_dtype: torch.dtype = torch.float16
                          ) -> QuantizedWeight:
    """Build a :class:`QuantizedWeight`, casting float32 scales/zeros (already exact
    in ``scale_dtype``) to the stored dtype."""
    return QuantizedWeight(codes, scales.to(scale_dtype),
                           None if zeros is None else zeros.to(scale_dtype), bits, group_size,
                           codes.shape[1])


__all__ = [
    "MAX_BITS", "MIN_BITS", "MIN_RANGE", "QuantizedWeight", "check_group_size", "compute_grid",
    "effective_group_size", "fake_quantize", "grid_params_from_range", "make_quantized_weight",
    "num_groups", "quantize_to_grid",
]
