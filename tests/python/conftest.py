"""Shared fixtures: devices under test and builders of random packed layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qdec  # noqa: F401  (registers the ops)
from qdec.packing import pack_codes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
               residual_bits: int = 4, seed: int = 0) -> Layer:
    """Random codes with scales ~ a real layer's (|w| ~ 0.02) and a residual of
    about a tenth of that magnitude."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-K // group_size)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = (torch.rand(N, groups, generator=g) + 0.5) * 0.02 / (1 << (bits - 1))
    zeros = None if symmetric else torch.randint(0, 1 << bits, (N, groups), generator=g).float()
    rcodes = torch.randint(0, 1 << residual_bits, (K, N), generator=g)
    rscales = (torch.rand(N, generator=g) + 0.5) * 0.002
    return Layer(pack_codes(codes, bits), scales, zeros, bits, group_size,
                 pack_codes(rcodes, residual_bits), rscales, residual_bits, N, K)
