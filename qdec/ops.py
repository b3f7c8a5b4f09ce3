"""Typed Python wrappers of the ``torch.ops.qdec`` operators, each with its fake
(meta) kernel beside it for ``torch.compile``, export and ``opcheck``.

Schemas: ``csrc/ops/registration.cpp``. CPU kernels: ``csrc/ops/cpu/<op>.cpp``.
CUDA kernels: ``csrc/ops/cuda/<op>.cu``. Specification: :mod:`qdec.reference`.

Shared argument conventions (K = in_features, N = out_features, G = group size):

- ``x``: float32 | float16 | bfloat16 ``[*, K]``.
- ``qweight``: int32 ``[N, ceil(K/32) * bits]``, the codes of ``W[N, K]`` in the
  layout of :mod:`qdec.packing`.
- ``scales``: ``[N, ceil(K/G)]``, same dtype as ``x``; ``zeros``: same shape and
  dtype, in code units (``w = (q - z) * s``), or ``None`` for symmetric
  (``z = 2**(bits-1)``).
- ``group_size``: a positive multiple of 32, or -1 for one group per row; the
  last group may be ragged when K is not a multiple of G.
- ``residual``: int32 ``[K, ceil(N/32) * residual_bits]`` (row j = input channel
  j); ``residual_scales``: float32 ``[N]``; ``r = (q - 2**(bits-1)) * scale[n]``.
- ``lowrank_a`` ``[N, r]``, ``lowrank_b`` ``[r, K]``: the factors of a static
  low-rank term ``L_A L_B``, in ``x``'s dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compensated_linear",
    "cpu_isa",
    "dequantize",
    "lowrank_linear",
    "outlier_select",
    "quantized_matmul",
    "residual_gather",
    "set_cpu_isa",
]


def _groups(K: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-K // group_size)


def dequantize(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    """Dense ``W [N, in_features]`` in ``scales.dtype`` from its packed form.

    Args:
        qweight: int32 ``[N, ceil(in_features/32) * bits]``.
        scales: float ``[N, ceil(in_features/G)]`` (any float dtype).
        zeros: like ``scales`` or ``None`` (symmetric).
        bits: code width, 2..8.
        group_size: multiple of 32, or -1 (whole row).
        in_features: K (rows are padded to 32-value blocks, so K is not implied).
    """
    return torch.ops.qdec.dequantize.default(qweight, scales, zeros, bits, group_size, in_features)


@torch.library.register_fake("qdec::dequantize")
def _(qweight, scales, zeros, bits, group_size, in_features):
    torch._check(qweight.dim() == 2, lambda: "qweight must be 2-D")
    return scales.new_empty((qweight.shape[0], in_features))


def quantized_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    """``x @ W^T`` with ``W`` packed: ``[*, K] -> [*, N]`` in ``x.dtype``,
    accumulated in float32. See the module docstring for the layouts."""
    return torch.ops.qdec.quantized_matmul.default(x, qweight, scales, zeros, bits, group_size)


@torch.library.register_fake("qdec::quantized_matmul")
def _(x, qweight, scales, zeros, bits, group_size):
    torch._check(scales.dtype == x.dtype, lambda: "scales dtype must match x dtype")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def outlier_select(x: Tensor, k: int) -> Tensor:
    """Indices (int64 ``[*, k]``) of the ``k`` largest ``|x|`` along the last dim.

    Ordered by descending ``|x|``; equal magnitudes go to the smaller index;
    NaN ranks as +inf. ``k`` is a fixed capacity in ``[0, K]`` so that output
    shapes are static (CUDA graphs, ``torch.compile``).
    """
    return torch.ops.qdec.outlier_select.default(x, k)


@torch.library.register_fake("qdec::outlier_select")
def _(x, k):
    torch._check(0 <= k <= x.shape[-1], lambda: f"k must be in [0, {x.shape[-1]}]")
    return x.new_empty((*x.shape[:-1], k), dtype=torch.int64)


def residual_gather(
    residual: Tensor, residual_scales: Tensor, channels: Tensor, residual_bits: int
) -> Tensor:
    """Dequantized residual columns ``R[:, channels]`` as float32 ``[*, k, N]``.

    Args:
        residual: int32 ``[K, ceil(N/32) * residual_bits]``, one input channel a
            row; on CUDA it may be a pinned CPU tensor (read zero-copy).
        residual_scales: float32 ``[N]``.
        channels: int64 ``[*, k]`` input-channel indices in ``[0, K)``.
        residual_bits: code width, 2..8.
    """
    return torch.ops.qdec.residual_gather.default(residual, residual_scales, channels, residual_bits)


@torch.library.register_fake("qdec::residual_gather")
def _(residual, residual_scales, channels, residual_bits):
    return residual_scales.new_empty((*channels.shape, residual_scales.shape[0]))


def compensated_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    residual: Tensor,
    residual_scales: Tensor,
    residual_bits: int,
    k: int,
    channels: Tensor | None = None,
    sm_budget: int = 0,
) -> Tensor:
    """Quantized matmul plus dynamic residual compensation, ``[*, K] -> [*, N]``.

    ``y = x @ W^T + sum_{j in S} R[:, j] * x[j]`` per row, with
    ``S = outlier_select(x, k)`` unless ``channels`` (int64 ``[*, k]``) is given
    (static, random or oracle selection). ``k = 0`` returns exactly
    :func:`quantized_matmul`. Accumulation is float32; output in ``x.dtype``.

    ``sm_budget`` caps the thread blocks the CUDA compensation kernel occupies
    beside the GEMV (0 = automatic, up to 32 splits of the k rows); ``qdec
    tune`` picks it per projection. It changes only the float32 summation
    order, and the CPU kernel ignores it.
    """
    return torch.ops.qdec.compensated_linear.default(
        x, qweight, scales, zeros, bits, group_size, residual, residual_scales, residual_bits, k,
        channels, sm_budget,
    )


@torch.library.register_fake("qdec::compensated_linear")
def _(x, qweight, scales, zeros, bits, group_size, residual, residual_scales, residual_bits, k,
      channels=None, sm_budget=0):
    torch._check(0 <= k <= x.shape[-1], lambda: f"k must be in [0, {x.shape[-1]}]")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def lowrank_linear(x: Tensor, lowrank_a: Tensor, lowrank_b: Tensor) -> Tensor:
    """The static low-rank term ``(x @ L_B^T) @ L_A^T``, ``[*, K] -> [*, N]``.

    The rank-``r`` intermediate ``t = L_B x`` is kept in float32 and the output
    is rounded once to ``x.dtype``; at decode batch sizes both factors are read
    in one pass (CPU) or one kernel launch (CUDA).

    Args:
        x: float32 | float16 | bfloat16 ``[*, K]`` (any leading dims, may be
            empty or non-contiguous).
        lowrank_a: ``L_A``, ``[N, r]``, same dtype and device as ``x``.
        lowrank_b: ``L_B``, ``[r, K]``, same dtype and device as ``x``;
            ``r = 0`` gives zeros.
    """
    return torch.ops.qdec.lowrank_linear.default(x, lowrank_a, lowrank_b)


@torch.library.register_fake("qdec::lowrank_linear")
def _(x, lowrank_a, lowrank_b):
    torch._check(lowrank_a.dim() == 2 and lowrank_b.dim() == 2,
                 lambda: "lowrank_a and lowrank_b must be 2-D ([N, r] and [r, K])")
    torch._check(lowrank_b.shape[1] == x.shape[-1],
                 lambda: f"lowrank_b must have shape [r, K] with K = {x.shape[-1]}")
    torch._check(lowrank_a.shape[1] == lowrank_b.shape[0],
                 lambda: f"lowrank_a must have shape [N, r] with r = {lowrank_b.shape[0]}")
    torch._check(lowrank_a.dtype == x.dtype and lowrank_b.dtype == x.dtype,
                 lambda: "lowrank_a and lowrank_b must have x's dtype")
    return x.new_empty((*x.shape[:-1], lowrank_a.shape[0]))


def cpu_isa() -> str:
    """The instruction-set level of the CPU decode kernels: ``"scalar"``,
    ``"avx2"`` or ``"avx512"`` (csrc/include/qdec/cpu_decode.h). The
    environment variable ``QDEC_CPU_ISA`` (scalar | avx2 | avx512 | auto) sets
    it at start-up; the default is the best level this CPU runs."""
    return torch.ops.qdec.cpu_isa()


def cpu_activations() -> str:
    """How the CPU GEMV represents x for its integer dot products:
    ``"int16x2"`` (two int16 terms per value, float-grade: the default) or
    ``"int16"`` (one term: fewer multiply-adds, error at most max|x| / 65534
    per span of 32-128 inputs, of the order of bfloat16 activations; see
    csrc/include/qdec/cpu_decode.h). The environment variable
    ``QDEC_CPU_ACTIVATIONS`` sets it at start-up."""
    return torch.ops.qdec.cpu_activations()


def set_cpu_activations(precision: str) -> str:
    """Sets the CPU GEMV's activation precision (``"int16x2"`` or
    ``"int16"``, see :func:`cpu_activations`) for the whole process and
    returns the previous one; an unknown name raises RuntimeError."""
    return torch.ops.qdec.set_cpu_activations(precision)


def parallel_threads(work_items: int = 64) -> int:
    """How many threads a parallel loop of the qdec CPU ops uses now: at most
    ``torch.get_num_threads()``, and 1 if the extension was built without
    OpenMP (then ``torch.set_num_threads`` cannot speed the ops up)."""
    return torch.ops.qdec.parallel_threads(work_items)


def set_cpu_isa(level: str) -> str:
    """Forces the CPU decode kernels' level for the whole process (``"auto"``
    = the best this CPU runs) and returns the previous one. A level the CPU
    cannot run raises RuntimeError naming the missing CPU features."""
    return torch.ops.qdec.set_cpu_isa(level)

