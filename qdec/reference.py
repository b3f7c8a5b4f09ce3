"""Pure-PyTorch reference of every ``qdec`` op: the executable specification.

Each ``<op>_ref`` takes the same arguments as ``torch.ops.qdec.<op>`` and is
written for clarity, not speed. The tests hold the C++ kernels (CPU and CUDA)
to these functions. All math is float32, as in the kernels.
"""

from __future__ import annotations

import torch

from .packing import expand_groups, unpack_codes


def _group_size(group_size: int, K: int) -> int:
    return K if group_size == -1 else group_size


def dequantize_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]`` in float32, returned
    in ``scales.dtype``; ``zeros=None`` means ``z = 2**(bits-1)``."""
    K = in_features
    q = unpack_codes(qweight, bits, K).float()
    s = expand_groups(scales.float(), _group_size(group_size, K), K)
    if zeros is None:
        z = torch.full_like(q, float(1 << (bits - 1)))
    else:
        z = expand_groups(zeros.float(), _group_size(group_size, K), K)
    return ((q - z) * s).to(scales.dtype)


def quantized_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x[*, K] @ W^T`` accumulated in float32, returned in ``x.dtype``."""
    K = x.shape[-1]
    w = dequantize_ref(qweight, scales.float(), None if zeros is None else zeros.float(), bits,
                       group_size, K)
    return (x.float() @ w.t()).to(x.dtype)


def outlier_select_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``int64 [*, k]`` of the ``k`` largest ``|x|`` per row, by
    descending ``|x|``; ties go to the smaller index; NaN ranks as +inf."""
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"k must be in [0, {x.shape[-1]}], got {k}")
    # posinf too: nan_to_num would otherwise turn +inf into the largest finite
    # float and rank it below NaN.
    mag = x.float().abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
    # A stable descending sort keeps equal magnitudes in ascending index order.
    order = torch.sort(mag, dim=-1, descending=True, stable=True).indices
    return order[..., :k].contiguous()


def residual_rows_ref(
    residual: torch.Tensor, residual_scales: torch.Tensor, residual_bits: int
) -> torch.Tensor:
    """The whole dequantized residual store as ``float32 [K, N]`` (row j =
    input channel j), ``r = (q - 2**(bits-1)) * scale[n]``."""
    N = residual_scales.shape[0]
    q = unpack_codes(residual, residual_bits, N).float()
    return (q - float(1 << (residual_bits - 1))) * residual_scales.float()


def residual_gather_ref(
    residual: torch.Tensor,
    residual_scales: torch.Tensor,
    channels: torch.Tensor,
    residual_bits: int,
) -> torch.Tensor:
    """Dequantized residual rows ``float32 [*, k, N]`` for ``channels [*, k]``."""
    rows = residual_rows_ref(residual, residual_scales, residual_bits)
    return rows[channels]


def compensated_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    residual: torch.Tensor,
    residual_scales: torch.Tensor,
    residual_bits: int,
    k: int,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T + sum_{j in S(x)} R[:, j] x[j]`` per row, in float32, returned
    in ``x.dtype``. ``S`` is ``outlier_select(x, k)`` unless ``channels`` is given."""
    K = x.shape[-1]
    w = dequantize_ref(qweight, scales.float(), None if zeros is None else zeros.float(), bits,
                       group_size, K)
    y = x.float() @ w.t()
    if channels is None:
        channels = outlier_select_ref(x, k)
    if channels.shape[-1] > 0:
        r = residual_gather_ref(residual, residual_scales, channels, residual_bits)  # [*, k, N]
        xs = torch.gather(x.float(), -1, channels)  # [*, k]
        y = y + (xs.unsqueeze(-1) * r).sum(-2)
    return y.to(x.dtype)


def lowrank_linear_ref(
    x: torch.Tensor, lowrank_a: torch.Tensor, lowrank_b: torch.Tensor
) -> torch.Tensor:
    """``(x @ L_B^T) @ L_A^T`` with ``L_A [N, r]``, ``L_B [r, K]``: both
    products in float32 (the rank-``r`` intermediate stays float32), returned
    in ``x.dtype``; ``r = 0`` gives zeros."""
    t = x.float() @ lowrank_b.float().t()
    return (t @ lowrank_a.float().t()).to(x.dtype)
