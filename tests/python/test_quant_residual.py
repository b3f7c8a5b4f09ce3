"""The residual quantizer: MSE scale search, symmetric range, transposed packing."""

from __future__ import annotations

import pytest
import torch

from qdec.packing import unpack_codes
from qdec.quant import dequantize_residual, quantize_residual, residual_scale_search
from qdec.reference import residual_rows_ref


def _residual(N=40, K=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(N, K, generator=g) * 1e-3
    r[:, 3] *= 20  # heavy-tailed rows, where a shrunk scale pays off
    return r


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_and_reference_decode(bits):
    r = _residual()
    packed, scales = quantize_residual(r, bits)
    assert packed.dtype == torch.int32 and packed.shape == (100, -(-40 // 32) * bits)
    assert scales.dtype == torch.float32 and scales.shape == (40,)
    q, s = residual_scale_search(r, bits)
    assert torch.equal(s, scales)
    # Row j of the store is input channel j; the reference decodes the transpose.
    rows = residual_rows_ref(packed, scales, bits)  # [K, N]
    assert torch.equal(rows, dequantize_residual(q, s).t())
    codes = unpack_codes(packed, bits, 40)
    half = 1 << (bits - 1)
    assert int(codes.min()) >= 1 and int(codes.max()) <= 2 * half - 1  # code 0 unused


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_not_worse_than_max_scale(bits):
    r = _residual(seed=bits)
    q, s = residual_scale_search(r, bits)
    qmax = (1 << (bits - 1)) - 1
    max_scale = r.abs().amax(1) / qmax
    plain = torch.round(r / max_scale[:, None]).clamp(-qmax, qmax) * max_scale[:, None]
    err_search = (dequantize_residual(q, s) - r).square().sum(1)
    err_plain = (plain - r).square().sum(1)
    assert (err_search <= err_plain).all()
    if bits <= 4:
        assert err_search.sum() < err_plain.sum()  # the search does help at low bit widths


def test_grid_endpoints():
    r = _residual()
    q1, s1 = residual_scale_search(r, 4, grid_points=1)  # only the max scale
    assert torch.equal(s1, r.abs().amax(1) / 7)
    q, s = residual_scale_search(r, 4, grid_points=64)
    assert ((s >= r.abs().amax(1) / 7 / 64 * (1 - 1e-6)) & (s <= s1)).all()


def test_zero_rows_and_chunking(monkeypatch):
    import qdec.quant.residual as residual
    r = _residual(N=70, K=50)
    r[5] = 0
    full_q, full_s = residual_scale_search(r, 4)
    monkeypatch.setattr(residual, "SEARCH_ELEMENTS", 3 * 50 * 32)  # 3 rows (x 32 candidates) per chunk
    q, s = residual_scale_search(r, 4)
    assert torch.equal(q, full_q) and torch.equal(s, full_s)
    assert s[5] == 0 and (q[5] == 0).all()


@pytest.mark.parametrize("bits", [1, 9])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_residual(torch.randn(4, 8), bits)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_residual(torch.randn(4, 8, 2))
    with pytest.raises(ValueError, match="grid_points"):
        quantize_residual(torch.randn(4, 8), 4, grid_points=0)
