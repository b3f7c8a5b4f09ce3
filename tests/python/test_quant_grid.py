"""Grid formulas, QuantizedWeight, RTN and the packed round trip."""

from __future__ import annotations

import pytest
import torch

import qdec
from qdec.packing import unpack_codes
from qdec.quant import QuantizedWeight, compute_grid, fake_quantize, quantize_rtn
from qdec.quant.grid import num_groups
from qdec.reference import dequantize_ref


def _codes(w, bits, symmetric=False):
    return quantize_rtn(torch.tensor([w]), bits, -1, symmetric).codes[0].tolist()


# --- hand-computed cases ----------------------------------------------------------------

def test_asymmetric_formula_by_hand():
    # 3 bits, range [-0.75, 1]: s = 1.75 / 7 = 0.25, z = -round(-0.75 / 0.25) = 3.
    qw = quantize_rtn(torch.tensor([[-0.75, 0.0, 1.0, 0.3]]), 3, -1)
    assert qw.scales.item() == 0.25 and qw.zeros.item() == 3
    assert qw.codes[0].tolist() == [0, 3, 7, 4]  # 0.3 / 0.25 = 1.2 -> 1, + 3
    assert qw.dequantize(torch.float32)[0].tolist() == [-0.75, 0.0, 1.0, 0.25]


def test_rounding_is_half_to_even():
    # 2 bits, range [-1, 2]: s = 1, z = 1; 0.5 rounds to 0 (torch.round), so q = 1.
    assert _codes([-1.0, 0.0, 0.5, 2.0], 2) == [0, 1, 1, 3]


def test_one_signed_group_keeps_zero_in_range():
    # An all-positive group: the range is extended to include 0, so z = 0 and the
    # codes spread over the grid instead of all saturating.
    qw = quantize_rtn(torch.tensor([[0.25, 0.5, 0.75, 1.0]]), 2, -1)
    assert qw.zeros.item() == 0
    assert qw.scales.item() == torch.tensor(1 / 3).half().item()
    assert qw.codes[0].tolist() == [1, 2, 2, 3]
    # All-negative: z = 2**b - 1.
    assert quantize_rtn(torch.tensor([[-1.0, -0.5]]), 2, -1).zeros.item() == 3


def test_symmetric_formula_by_hand():
    # 4 bits, z = 8; s = max(2 / 8, 1.75 / 7) = 0.25: the negative extreme uses code 0.
    qw = quantize_rtn(torch.tensor([[-2.0, 1.0, 1.75]]), 4, -1, symmetric=True)
    assert qw.zeros is None and qw.scales.item() == 0.25
    assert qw.codes[0].tolist() == [0, 12, 15]
    # Positive extreme: s = max(1 / 8, 3.5 / 7) = 0.5.
    qw = quantize_rtn(torch.tensor([[-1.0, 3.5]]), 4, -1, symmetric=True)
    assert qw.scales.item() == 0.5 and qw.codes[0].tolist() == [6, 15]


def test_constant_and_zero_groups():
    qw = quantize_rtn(torch.zeros(2, 64), 3, 32)
    assert (qw.scales > 0).all()
    assert torch.equal(qw.dequantize(torch.float32), torch.zeros(2, 64))
    qs = quantize_rtn(torch.zeros(2, 64), 3, 32, symmetric=True)
    assert (qs.codes == 4).all() and torch.equal(qs.dequantize(torch.float32), torch.zeros(2, 64))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_scales_are_rounded_before_codes(bits, symmetric):
    """Codes are the nearest grid points of the *stored* fp16 scales: every weight
    is within half a step of its reconstruction (min-max grids never clip)."""
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits)) * 0.03
    qw = quantize_rtn(w, bits, 32, symmetric)
    assert qw.scales.dtype == torch.float16
    step = qw.scales.float().repeat_interleave(32, 1)
    err = (qw.dequantize(torch.float32) - w).abs()
    assert (err <= step / 2 * (1 + 1e-5)).all()


def test_ragged_last_group():
    w = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    qw = quantize_rtn(w, 4, 32)
    assert qw.scales.shape == (4, 4) == (4, num_groups(100, 32))
    last = quantize_rtn(w[:, 96:], 4, -1)
    assert torch.equal(qw.scales[:, 3:], last.scales) and torch.equal(qw.zeros[:, 3:], last.zeros)
    assert torch.equal(qw.codes[:, 96:], last.codes)
    assert num_groups(576, 128) == 5


def test_compute_grid_matches_quantized_weight():
    w = torch.randn(8, 576)
    s, z = compute_grid(w, 3, 128)
    qw = quantize_rtn(w, 3, 128)
    assert s.dtype == torch.float32 and torch.equal(s.half(), qw.scales)
    assert torch.equal(z.half(), qw.zeros)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_dtypes(scale_dtype):
    w = torch.randn(8, 64)
    qw = quantize_rtn(w, 4, 32, scale_dtype=scale_dtype)
    assert qw.scales.dtype == qw.zeros.dtype == scale_dtype
    assert torch.equal(fake_quantize(w, 4, 32, scale_dtype=scale_dtype),
                       qw.dequantize(torch.float32))


# --- the packed form is bit-identical ----------------------------------------------------

@pytest.mark.parametrize("K", [576, 64, 100])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_dequantize_bit_identical(bits, group_size, symmetric, K):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    w = torch.randn(48, K, generator=g) * 0.02
    w[:, ::7] *= 8  # outlier columns
    qw = quantize_rtn(w, bits, group_size, symmetric)
    packed = qw.pack()
    assert packed.dtype == torch.int32 and packed.shape == (48, -(-K // 32) * bits)
    assert torch.equal(unpack_codes(packed, bits, K), qw.codes)
    for dtype in (torch.float16, torch.float32):  # the stored dtype, and a float32 caller
        scales = qw.scales.to(dtype)
        zeros = None if qw.zeros is None else qw.zeros.to(dtype)
        ref = dequantize_ref(packed, scales, zeros, bits, group_size, K)
        assert torch.equal(ref, qw.dequantize(dtype))
    assert torch.equal(qdec.dequantize(packed, qw.scales, qw.zeros, bits, group_size, K),
                       qw.dequantize())
    back = QuantizedWeight.from_packed(packed, qw.scales, qw.zeros, bits, group_size, K)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(fake_quantize(w, bits, group_size, symmetric), qw.dequantize(torch.float32))
    assert qw.nbytes() == packed.numel() * 4 + qw.scales.numel() * 2 * (1 if symmetric else 2)


def test_more_bits_less_error():
    w = torch.randn(32, 256)
    errs = [(quantize_rtn(w, b, 64).dequantize(torch.float32) - w).square().mean().item()
            for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 9, 0, 3.0])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(torch.randn(4, 64), bits, 32)


@pytest.mark.parametrize("group_size", [0, 48, -2, 16, 100])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(torch.randn(4, 64), 4, group_size)


def test_bad_weights():
    with pytest.raises(ValueError, match=r"2-D"):
        quantize_rtn(torch.randn(64), 4, 32)
    with pytest.raises(ValueError, match="floating"):
        quantize_rtn(torch.ones(4, 64, dtype=torch.int32), 4, 32)
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\[2, 5\]"):
        quantize_rtn(w, 4, 32)


def test_quantized_weight_checks_shapes():
    qw = quantize_rtn(torch.randn(4, 64), 4, 32)
    with pytest.raises(ValueError, match="in_features=65"):
        QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 32, 65)
    with pytest.raises(ValueError, match=r"scales must be \[4, 1\]"):
        QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 64, 64)
    with pytest.raises(ValueError, match="zeros"):
        QuantizedWeight(qw.codes, qw.scales, qw.zeros.float(), 4, 32, 64)
    with pytest.raises(ValueError, match="exceed 3 bits"):
        QuantizedWeight(qw.codes | 8, qw.scales, qw.zeros, 3, 32, 64)
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight(qw.codes.int(), qw.scales, qw.zeros, 4, 32, 64)
