"""Shared fixtures: devices under test and builders of random packed layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qdec  # noqa: F401  (registers the ops)
from qdec.packing import pack_codes

# The cuda parameter carries the `cuda` marker, as do the CUDA-only tests, so
# that benchmarks/gpu_run.sh runs exactly the tests that need the GPU (-m cuda).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)]
                     if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@dataclasses.dataclass
class Layer:
    """A random packed layer and its residual store, in the op argument order."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    residual: torch.Tensor
    residual_scales: torch.Tensor
    residual_bits: int
    N: int
    K: int

    def weight_args(self):
        return (self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def residual_args(self):
        return (self.residual, self.residual_scales, self.residual_bits)

    def to(self, device: str, dtype: torch.dtype) -> "Layer":
        return dataclasses.replace(
            self,
            qweight=self.qweight.to(device),
            scales=self.scales.to(device, dtype),
            zeros=None if self.zeros is None else self.zeros.to(device, dtype),
            residual=self.residual.to(device),
            residual_scales=self.residual_scales.to(device),
        )


def make_layer(N: int, K: int, bits: int = 4, group_size: int = 32, symmetric: bool = False,
               residual_bits: int = 4, seed: int = 0, residual: bool = True) -> Layer:
    """Random codes with scales ~ a real layer's (|w| ~ 0.02) and a residual of
    about a tenth of that magnitude. residual=False leaves the store out (an
    empty [K, 0] one, same weights) for tests of the weight alone, where
    packing K x N residual codes would be most of the cost."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-K // group_size)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = (torch.rand(N, groups, generator=g) + 0.5) * 0.02 / (1 << (bits - 1))
    zeros = None if symmetric else torch.randint(0, 1 << bits, (N, groups), generator=g).float()
    if residual:  # drawn after the weight, so the weight does not depend on it
        rcodes = torch.randint(0, 1 << residual_bits, (K, N), generator=g)
        rstore = pack_codes(rcodes, residual_bits)
        rscales = (torch.rand(N, generator=g) + 0.5) * 0.002
    else:
        rstore, rscales = torch.zeros(K, 0, dtype=torch.int32), torch.zeros(0)
    return Layer(pack_codes(codes, bits), scales, zeros, bits, group_size,
                 rstore, rscales, residual_bits, N, K)


def cpu_decode_atol(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    """Per-output error bound [B, N] of the CPU decode kernels against the
    float reference (derivation: csrc/include/qdec/cpu_decode.h), at the
    activation precision in use (qdec.cpu_activations()).

    The kernels represent x per span by two int16 terms, |x_k - x^_k| <=
    max_row|x| / 32767 / 65536 (int16x2), or by one, <= max_row|x| / 32767 / 2
    (int16), so the output moves by at most that times sum_k |w_k|. On top, the
    two float32 sums sum_g s_g d sum q xq and sum_g s_g z_g X_g (each term up
    to s * 2^bits * |x|) round at 2^-24 per add; 2^-18 * sum_k s_k 2^bits |x_k|
    covers that with room. x is [B, K] on any device; the bound is on CPU."""
    from qdec import reference as ref
    from qdec.packing import expand_groups

    xf = x.detach().float().cpu().reshape(-1, layer.K)
    args = [t.cpu() if torch.is_tensor(t) else t for t in layer.weight_args()]
    dense = ref.dequantize_ref(*args, layer.K).float()
    group = layer.K if layer.group_size == -1 else layer.group_size
    scale = expand_groups(args[1].float().abs(), group, layer.K)
    import qdec

    x_step = 65536 if qdec.cpu_activations() == "int16x2" else 2
    rounding = xf.abs().amax(dim=1, keepdim=True) / 32767 / x_step * dense.abs().sum(dim=1)
    sums = 2.0 ** -18 * (xf.abs() @ (scale * (1 << layer.bits)).t())
    return rounding + sums


def assert_matmul_close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, layer: Layer,
                        rtol: float) -> None:
    """got ~ want within the CPU decode bound (cpu_decode_atol) plus `rtol`
    of |want| for the final cast to x's dtype. Leading dims are flattened."""
    atol = cpu_decode_atol(x, layer)
    g = got.detach().float().cpu().reshape(atol.shape)
    w = want.detach().float().cpu().reshape(atol.shape)
    err = (g - w).abs()
    limit = atol + rtol * w.abs()
    worst = (err - limit).argmax()
    assert bool((err <= limit).all()), (
        f"error {err.flatten()[worst].item():.3g} exceeds the bound "
        f"{limit.flatten()[worst].item():.3g} at flat index {worst.item()}")


def strided_residual_stores(residual, residual_scales):
    """The same residual store as non-contiguous tensors: (name, residual,
    residual_scales). Each must give the bits of the contiguous store; the
    kernels read raw pointers, so the glue has to keep its contiguous copies
    alive while they run (issue 14: it once kept pointers into temporaries)."""
    K, words = residual.shape
    N = residual_scales.numel()
    every_other = residual_scales.new_zeros(2 * N)
    every_other[::2] = residual_scales
    column = torch.stack([residual_scales, -residual_scales], dim=1)[:, 0]
    wide = residual.new_zeros(K, words + 3)
    wide[:, 1:words + 1] = residual
    transposed = residual.t().contiguous().t()
    cases = [("scales_step2", residual, every_other[::2]),
             ("scales_column", residual, column),
             ("scales_expand", residual, residual_scales[:1].expand(N)),
             ("residual_column_slice", wide[:, 1:words + 1], residual_scales),
             ("both_strided", wide[:, 1:words + 1], every_other[::2])]
    if words > 1:  # a [K, 1] transpose is still contiguous
        cases.append(("residual_transposed", transposed, column))
    for name, r, s in cases:
        assert not (r.is_contiguous() and s.is_contiguous()), name
    return cases
