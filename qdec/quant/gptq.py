"""GPTQ: column-by-column quantization with Hessian-based error feedback
(Frantar et al., "GPTQ", ICLR 2023), written from the paper's algorithm.

For a linear ``y = W x`` with calibration inputs ``X``, the layer-wise objective
``||W X - W_hat X||^2`` has Hessian ``H = 2 X X^T / n``. Columns are quantized one
at a time; the error of column ``i`` is spread over the columns not yet
quantized through the upper Cholesky factor of ``H^-1``, which is equivalent to
the optimal-brain-surgeon update but numerically stable. Updates are applied
lazily: inside a block of ``block_size`` columns they touch only the block, and
the accumulated error is pushed to the rest of the matrix once per block.

Grid: the same min-max grid as RTN (:mod:`qdec.quant.grid`). With groups, a
group's parameters are computed when its first column is reached, from the
columns as they are *then* (already corrected by all earlier error feedback,
including the pending lazy updates, so the result does not depend on
``block_size``), as GPTQ does.

Act-order (``act_order=True``): columns are processed by descending ``diag(H)``
(the channels with the largest input energy first). The packed format needs
groups of consecutive *original* input channels, so with groups the parameters
of every group are computed up front from the unmodified weight on the original
order ("static groups"), and each column is quantized on the grid of its
original group. The returned codes are in the original column order; the
permutation never leaves this module.

Dead input channels (``diag(H) == 0``, never active in calibration) get
``H[j, j] = 1``; unlike the reference implementation their weights are *not*
zeroed, so they are simply rounded and spread no error.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from ..packing import check_bits
from .grid import (QuantizedWeight, _check_weight, check_group_size, compute_grid,
                   effective_group_size, grid_params_from_range, make_quantized_weight,
                   num_groups)


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` (float32 ``[K, K]``) over all tokens
    ``x_t`` seen by :meth:`add_batch` or by the forward pre-hook of :meth:`attach`."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = int(in_features)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Add tokens ``x [..., K]`` (any float dtype; flattened to ``[n, K]``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the Hessian {self.in_features}")
        x = x.reshape(-1, self.in_features).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        # Rescale the running mean first: H stays O(1) however many tokens come in.
        self.H *= self.count / (self.count + n)
        self.count += n
        x = x * math.sqrt(2.0 / self.count)
        self.H.addmm_(x.t(), x)

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Accumulate every input of ``module`` (e.g. an ``nn.Linear``) from now on."""
        def hook(mod: nn.Module, args: tuple) -> None:
            self.add_batch(args[0].detach())
        return module.register_forward_pre_hook(hook)


@contextmanager
def accumulate_hessians(modules: Mapping[str, nn.Linear]) -> Iterator[dict[str, HessianAccumulator]]:
    """Within the ``with`` block, forward passes accumulate one Hessian per linear::

        with accumulate_hessians({"q": layer.self_attn.q_proj}) as hessians:
            layer(x, **kwargs)
        qw = quantize_gptq(layer.self_attn.q_proj.weight, hessians["q"].H, 3, 128)
    """
    acc = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in modules.items()}
    handles = [acc[name].attach(m) for name, m in modules.items()]
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


def _inverse_hessian_factor(H: Tensor, damp: float, name: str) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; the damping
    is raised (x10, up to 4 times) if the factorization fails. Overwrites ``H``."""
    mean_diag = torch.diag(H).mean().item()
    added = 0.0
    # In place on the caller's private copy: a [K, K] float32 matrix is 0.8 GB at
    # K = 14336, so at most two of them are alive at once.
    for attempt in range(5):
        target = damp * 10 ** attempt * mean_diag
        H.diagonal().add_(target - added)
        added = target
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() != 0:
            continue
        torch.cholesky_inverse(L, out=H)  # H now holds the inverse
        del L
        U, info = torch.linalg.cholesky_ex(H, upper=True)
        if info.item() != 0:
            raise ValueError(f"{name}: the inverse of the damped Hessian is numerically "
                             f"not positive definite (damp={target / mean_diag:g})")
        return U
    raise ValueError(f"{name}: the damped Hessian is not positive definite even with "
                     f"damp={damp * 1e4:g} (mean diag {mean_diag:.3g})")


@torch.no_grad()
def quantize_gptq(weight: Tensor, H: Tensor, bits: int, group_size: int, symmetric: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  scale_dtype: torch.dtype = torch.float16, name: str = "weight"
                  ) -> QuantizedWeight:
    """GPTQ-quantize one linear weight.

    Args:
        weight: float ``[N, K]`` (rows = output channels); not modified.
        H: float ``[K, K]`` Hessian ``2/n X X^T`` of the layer's inputs
            (:class:`HessianAccumulator`); not modified.
        bits: code width, 2..8.
        group_size: ``-1`` or a positive multiple of 32 (ragged last group allowed).
        symmetric: fixed zero point ``2**(bits-1)``.
        act_order: process columns by descending ``diag(H)`` (static groups).
        damp: fraction of ``mean(diag(H))`` added to the diagonal ("percdamp").
        block_size: columns per lazy-update block.
        scale_dtype: stored dtype of scales/zeros.
        name: used in error messages.

    Returns:
        :class:`QuantizedWeight` in the original column order.
    """
    check_bits(bits)
    check_group_size(group_size)
    _check_weight(weight, name)
    N, K = weight.shape
    if H.dim() != 2 or tuple(H.shape) != (K, K):
        raise ValueError(f"{name}: H must be [{K}, {K}] for a weight of shape [{N}, {K}], "
                         f"got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: H has non-finite values")
    if not damp > 0:
        raise ValueError(f"{name}: damp must be positive, got {damp}")
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")

    W = weight.detach().float().clone()
    H = H.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0

    G = effective_group_size(group_size, K)
    groups = num_groups(K, group_size)
    qmax = (1 << bits) - 1
    scales = torch.empty(N, groups, dtype=torch.float32, device=W.device)
    zeros = None if symmetric else torch.empty(N, groups, dtype=torch.float32, device=W.device)

    # Static grids: per-row (group_size=-1, GPTQ computes it from the initial W too),
    # or every group up front when act-order permutes the columns.
    static = group_size == -1 or act_order
    if static:
        s_all, z_all = compute_grid(W, bits, group_size, symmetric, scale_dtype)
        scales.copy_(s_all)
        if zeros is not None:
            zeros.copy_(z_all)

    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm]
        H = H[:, perm]
    else:
        perm = torch.arange(K, device=W.device)
    # Group of each processed column (in processing order).
    group_of = torch.div(perm, G, rounding_mode="floor").tolist()

    U = _inverse_hessian_factor(H, damp, name)
    del H
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)  # processing order
    half = float(1 << (bits - 1))

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % G == 0:
                # Fresh grid for the group starting here, from the weights as corrected
                # so far: the block part from W1; past the block, W plus the pending
                # (lazy) update of this block's columns already quantized.
                end = min(col + G, K)
                if end > i2:
                    ahead = W[:, i2:end] - Err1[:, :i] @ U[i1:col, i2:end]
                    wg = torch.cat([W1[:, i:], ahead], dim=1)
                else:
                    wg = W1[:, i:i + G]
                s, z = grid_params_from_range(wg.amin(1), wg.amax(1), bits, symmetric,
                                              scale_dtype)
                scales[:, col // G] = s
                if zeros is not None:
                    zeros[:, col // G] = z
            g = group_of[col]
            s = scales[:, g]
            z = half if zeros is None else zeros[:, g]
            w = W1[:, i]
            q = (torch.round(w / s) + z).clamp_(0, qmax)
            codes[:, col] = q.to(torch.uint8)
            w_hat = (q - z) * s
            err = (w - w_hat) / U1[i, i]
            # Spread this column's error over the rest of the block (rank-1 update).
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        # Lazy update: push the whole block's error to the remaining columns at once.
        if i2 < K:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)

    if act_order:
        restored = torch.empty_like(codes)
        restored[:, perm] = codes
        codes = restored
    return make_quantized_weight(codes, scales, zeros, bits, group_size, scale_dtype)
