"""Every qdec op against its reference (qdec.reference), on every available
device, plus torch.library.opcheck and the error cases.

Tolerances: kernels and reference both accumulate in float32 but in different
orders, so float32 outputs differ by rounding of a K-term sum (rtol 1e-5 with an
atol scaled to the output magnitude); fp16/bf16 outputs are one cast of that
float32 result, so they may differ by one unit in the last place of the output
dtype (rtol = eps of the dtype). The CPU GEMV (batches up to 16) also rounds x
to int16 per span; its outputs are held to the bound derived in
csrc/include/qdec/cpu_decode.h (conftest.cpu_decode_atol) instead of the
float32 tolerance (close_to_matmul below).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matmul_close, make_layer, strided_residual_stores

import qdec
from qdec import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def close_to_matmul(got, want, x, layer, dtype):
    """got ~ want for an op built on the low-bit GEMV: the CPU kernel's int16
    bound (plus the output dtype's rounding), else the float tolerance."""
    if got.device.type == "cpu":
        assert_matmul_close(got, want, x, layer, TOL[dtype]["rtol"])
    else:
        torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


# ---------------------------------------------------------------- dequantize
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_matches_reference_bit_for_bit(device, bits, group_size, symmetric):
    layer = make_layer(19, 200, bits, group_size, symmetric).to(device, torch.float32)
    got = qdec.dequantize(*layer.weight_args(), layer.K)
    want = ref.dequantize_ref(*(t.cpu() if torch.is_tensor(t) else t for t in layer.weight_args()),
                              layer.K)
    # Same float32 formula (q - z) * s, one rounding: must be identical.
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_output_dtype_follows_scales(device, dtype):
    layer = make_layer(8, 64).to(device, dtype)
    out = qdec.dequantize(*layer.weight_args(), layer.K)
    assert out.dtype == dtype and out.shape == (8, 64)


# ---------------------------------------------------------------- quantized_matmul
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("shape", [(33, 96), (64, 576), (7, 45)])
def test_quantized_matmul_matches_reference(device, dtype, bits, batch, shape):
    N, K = shape
    layer = make_layer(N, K, bits, 32 if K % 32 == 0 else -1).to(device, dtype)
    x = torch.randn(batch, K, device=device).to(dtype)
    got = qdec.quantized_matmul(x, *layer.weight_args())
    want = ref.quantized_matmul_ref(x.cpu(), *(t.cpu() if torch.is_tensor(t) else t
                                                for t in layer.weight_args()))
    assert got.dtype == dtype and got.shape == (batch, N)
    close_to_matmul(got, want, x, layer, dtype)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_quantized_matmul_ragged_groups(device, group_size):
    # K = 576 (SmolLM2's hidden size) is not a multiple of 128: last group has 64.
    layer = make_layer(40, 576, 3, group_size).to(device, torch.float32)
    x = torch.randn(2, 576, device=device)
    want = x.cpu() @ ref.dequantize_ref(*(t.cpu() if torch.is_tensor(t) else t
                                          for t in layer.weight_args()), 576).t()
    close_to_matmul(qdec.quantized_matmul(x, *layer.weight_args()), want, x, layer, torch.float32)


def test_quantized_matmul_leading_dims_and_noncontiguous(device):
    layer = make_layer(24, 64).to(device, torch.float32)
    x = torch.randn(64, 2, 3, device=device).permute(1, 2, 0)  # [2, 3, 64], non-contiguous
    assert not x.is_contiguous()
    got = qdec.quantized_matmul(x, *layer.weight_args())
    want = ref.quantized_matmul_ref(x.contiguous().cpu(), *(t.cpu() if torch.is_tensor(t) else t
                                                             for t in layer.weight_args()))
    assert got.shape == (2, 3, 24)
    close_to_matmul(got, want, x, layer, torch.float32)


def test_quantized_matmul_empty_batch(device):
    layer = make_layer(8, 32).to(device, torch.float32)
    out = qdec.quantized_matmul(torch.empty(0, 32, device=device), *layer.weight_args())
    assert out.shape == (0, 8)


# ---------------------------------------------------------------- outlier_select
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,k", [(1, 0), (1, 1), (37, 5), (576, 0), (576, 576), (1536, 15)])
def test_outlier_select_matches_reference(device, dtype, K, k):
    x = torch.randn(3, K, device=device).to(dtype)
    got = qdec.outlier_select(x, k)
    assert got.dtype == torch.int64 and got.shape == (3, k)
    assert torch.equal(got.cpu(), ref.outlier_select_ref(x.cpu(), k))


def test_outlier_select_tie_breaking_and_nan(device):
    x = torch.tensor([[1.0, -3.0, 3.0, 0.5, -3.0, float("nan"), 2.0]], device=device)
    # NaN ranks as +inf; equal |x| = 3 go to the smaller index first.
    assert qdec.outlier_select(x, 5).cpu().tolist() == [[5, 1, 2, 4, 6]]
    z = torch.zeros(1, 6, device=device)
    assert qdec.outlier_select(z, 3).cpu().tolist() == [[0, 1, 2]]
    # +inf and NaN tie (both rank as +inf): the smaller index first.
    inf = float("inf")
    y = torch.tensor([[-inf, 1.0, float("nan"), inf, 5.0]], device=device)
    assert qdec.outlier_select(y, 4).cpu().tolist() == [[0, 2, 3, 4]]
    assert ref.outlier_select_ref(y.cpu(), 4).tolist() == [[0, 2, 3, 4]]


@pytest.mark.parametrize("K,k", [(14336, 1), (14336, 115), (4096, 2048), (5000, 2049),
                                 (3000, 3000), (33, 33)])
def test_outlier_select_ties_and_large_k(device, K, k):
    # Values on a coarse grid (many equal |x|) with +-inf and NaN sprinkled in:
    # the order must still be exactly the reference's. On CUDA, k <= 2048 is
    # the radix-select kernel and larger k the sort fallback.
    g = torch.Generator().manual_seed(K + k)
    x = torch.round(torch.randn(2, K, generator=g) * 2) / 2
    x[0, 7 % K] = float("nan")
    x[1, 3 % K] = float("inf")
    x[1, 11 % K] = -float("inf")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(device, dtype)
        assert torch.equal(qdec.outlier_select(xd, k).cpu(), ref.outlier_select_ref(xd.cpu(), k))


def test_outlier_select_batched_rows_are_independent(device):
    x = torch.randn(4, 2, 100, device=device)
    got = qdec.outlier_select(x, 10)
    assert got.shape == (4, 2, 10)
    for i in range(4):
        for j in range(2):
            assert torch.equal(got[i, j], qdec.outlier_select(x[i, j:j + 1], 10)[0])


# ---------------------------------------------------------------- residual_gather
@pytest.mark.parametrize("residual_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("N", [1, 31, 100])
def test_residual_gather_matches_reference(device, residual_bits, N):
    layer = make_layer(N, 70, residual_bits=residual_bits).to(device, torch.float32)
    channels = torch.randint(0, 70, (3, 9), device=device)
    got = qdec.residual_gather(*layer.residual_args()[:2], channels, residual_bits)
    want = ref.residual_gather_ref(layer.residual.cpu(), layer.residual_scales.cpu(),
                                   channels.cpu(), residual_bits)
    assert got.shape == (3, 9, N)
    assert torch.equal(got.cpu(), want)  # one float32 product per value: exact


def test_residual_gather_empty_selection(device):
    layer = make_layer(16, 32).to(device, torch.float32)
    channels = torch.empty(2, 0, dtype=torch.int64, device=device)
    assert qdec.residual_gather(layer.residual, layer.residual_scales, channels, 4).shape == (2, 0, 16)


@pytest.mark.parametrize("op", ["residual_gather", "compensated_linear"])
def test_strided_residual_store_gives_the_contiguous_bits(device, op):
    layer = make_layer(100, 96, 3, 32).to(device, torch.float32)
    channels = torch.randint(0, 96, (4, 24), device=device)
    x = torch.randn(4, 96, device=device)

    def run(residual, residual_scales):
        if op == "residual_gather":
            return qdec.residual_gather(residual, residual_scales, channels, 4)
        return qdec.compensated_linear(x, *layer.weight_args(), residual, residual_scales, 4, 24)

    # Scales of the expand case are all equal: compare each case with its own
    # contiguous copy, which holds the same values.
    for name, r, s in strided_residual_stores(layer.residual, layer.residual_scales):
        assert torch.equal(run(r, s), run(r.contiguous(), s.contiguous())), name


# ---------------------------------------------------------------- compensated_linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,residual_bits", [(2, 4), (3, 4), (4, 8), (3, 2)])
@pytest.mark.parametrize("batch", [1, 5, 12])
@pytest.mark.parametrize("k_frac", [0.0, 0.05, 0.5, 1.0])
def test_compensated_linear_matches_reference(device, dtype, bits, residual_bits, batch, k_frac):
    N, K = 45, 160
    k = round(k_frac * K)
    layer = make_layer(N, K, bits, 64, residual_bits=residual_bits).to(device, dtype)
    x = torch.randn(batch, K, device=device).to(dtype)
    got = qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), k)
    want = ref.compensated_linear_ref(
        x.cpu(), *(t.cpu() if torch.is_tensor(t) else t for t in layer.weight_args()),
        layer.residual.cpu(), layer.residual_scales.cpu(), residual_bits, k)
    close_to_matmul(got, want, x, layer, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 20])
def test_compensated_linear_k0_is_exactly_quantized_matmul(device, dtype, batch):
    layer = make_layer(50, 128, 3).to(device, dtype)
    x = torch.randn(batch, 128, device=device).to(dtype)
    assert torch.equal(qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), 0),
                       qdec.quantized_matmul(x, *layer.weight_args()))


def test_compensated_linear_with_explicit_channels(device):
    layer = make_layer(30, 96).to(device, torch.float32)
    x = torch.randn(4, 96, device=device)
    channels = torch.stack([torch.randperm(96)[:7] for _ in range(4)]).to(device)
    got = qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), 7, channels)
    want = ref.compensated_linear_ref(
        x.cpu(), *(t.cpu() if torch.is_tensor(t) else t for t in layer.weight_args()),
        layer.residual.cpu(), layer.residual_scales.cpu(), 4, 7, channels.cpu())
    close_to_matmul(got, want, x, layer, torch.float32)


def test_compensated_linear_full_k_recovers_dense_residual(device):
    # With k = K every channel is compensated: y = x @ (W_hat + R)^T.
    layer = make_layer(20, 64).to(device, torch.float32)
    x = torch.randn(3, 64, device=device)
    dense = ref.dequantize_ref(*(t.cpu() if torch.is_tensor(t) else t
                                 for t in layer.weight_args()), 64)
    dense = dense + ref.residual_rows_ref(layer.residual.cpu(), layer.residual_scales.cpu(), 4).t()
    got = qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), 64)
    close_to_matmul(got, x.cpu() @ dense.t(), x, layer, torch.float32)


def test_compensated_linear_sm_budget_changes_only_summation_order(device):
    # sm_budget caps the CUDA compensation's thread blocks, i.e. how many
    # float32 partial sums k is split into: the result moves by rounding only
    # (float32 tolerance), and not at all on CPU, which ignores it.
    layer = make_layer(300, 1024, 3, 128).to(device, torch.float32)
    x = torch.randn(2, 1024, device=device)
    args = (x, *layer.weight_args(), *layer.residual_args(), 100)
    auto = qdec.compensated_linear(*args)
    for budget in (1, 3, 64, 10_000):
        got = qdec.compensated_linear(*args, None, budget)
        if device == "cpu":
            assert torch.equal(got, auto)
        torch.testing.assert_close(got, auto, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match=r"sm_budget must be >= 0 \(0 = automatic\), got -1"):
        qdec.compensated_linear(*args, None, -1)


# ---------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    layer = make_layer(24, 96, 3, 32).to(device, torch.float16)
    x = torch.randn(2, 96, device=device, dtype=torch.float16)
    ch = torch.randint(0, 96, (2, 5), device=device)
    return [
        (torch.ops.qdec.dequantize.default, (*layer.weight_args(), 96)),
        (torch.ops.qdec.quantized_matmul.default, (x, *layer.weight_args())),
        (torch.ops.qdec.outlier_select.default, (x, 7)),
        (torch.ops.qdec.residual_gather.default, (layer.residual, layer.residual_scales, ch, 4)),
        (torch.ops.qdec.compensated_linear.default,
         (x, *layer.weight_args(), *layer.residual_args(), 5)),
        (torch.ops.qdec.compensated_linear.default,
         (x, *layer.weight_args(), *layer.residual_args(), 5, ch)),
        (torch.ops.qdec.compensated_linear.default,
         (x, *layer.weight_args(), *layer.residual_args(), 0)),
        (torch.ops.qdec.compensated_linear.default,
         (x, *layer.weight_args(), *layer.residual_args(), 5, None, 2)),
    ]


def test_opcheck_every_op(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    layer = make_layer(24, 96).to(device, torch.float32)

    @torch.compile(fullgraph=True, backend="eager" if device == "cpu" else "inductor")
    def step(x):
        return qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), 4)

    x = torch.randn(1, 96, device=device)
    torch.testing.assert_close(
        step(x), qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), 4))


# ---------------------------------------------------------------- errors
def test_errors_name_the_argument_and_values():
    layer = make_layer(16, 64)
    x = torch.randn(2, 64)
    w = layer.weight_args()
    with pytest.raises(RuntimeError, match=r"bits must be in 2\.\.8, got 9"):
        qdec.quantized_matmul(x, w[0], w[1], w[2], 9, 32)
    with pytest.raises(RuntimeError, match=r"bits must be in 2\.\.8, got 1"):
        qdec.dequantize(w[0], w[1], w[2], 1, 32, 64)
    with pytest.raises(RuntimeError, match=r"group_size must be a positive multiple of 32.*got 48"):
        qdec.quantized_matmul(x, w[0], w[1], w[2], 4, 48)
    with pytest.raises(RuntimeError, match=r"qweight must have shape \[N, ceil\(K/32\)\*bits\]"):
        qdec.quantized_matmul(torch.randn(2, 96), *w)
    with pytest.raises(RuntimeError, match=r"scales dtype .*Half.* must match x dtype"):
        qdec.quantized_matmul(x, w[0], w[1].half(), None, 4, 32)
    with pytest.raises(RuntimeError, match=r"qweight must be Int, got Long"):
        qdec.quantized_matmul(x, w[0].long(), *w[1:])
    with pytest.raises(RuntimeError, match=r"x must be float32, float16 or bfloat16, got Int"):
        qdec.outlier_select(torch.ones(2, 3, dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match=r"zeros \(\[N, ceil\(K/group_size\)\]\) must have shape \[16, 2\], got \[16, 1\]"):
        qdec.quantized_matmul(x, w[0], w[1], w[2][:, :1], 4, 32)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, K\] = \[0, 64\], got 65"):
        qdec.outlier_select(x, 65)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, K\] = \[0, 64\], got -1"):
        qdec.compensated_linear(x, *w, *layer.residual_args(), -1)
    with pytest.raises(RuntimeError, match=r"residual_bits must be in 2\.\.8, got 16"):
        qdec.residual_gather(layer.residual, layer.residual_scales, torch.zeros(1, 1).long(), 16)
    with pytest.raises(RuntimeError, match=r"residual_scales must be Float"):
        qdec.residual_gather(layer.residual, layer.residual_scales.half(),
                             torch.zeros(1, 1).long(), 4)
    with pytest.raises(RuntimeError, match=r"channels values must be in \[0, 64\), got range"):
        qdec.residual_gather(layer.residual, layer.residual_scales, torch.tensor([[3, 64]]), 4)
    with pytest.raises(RuntimeError, match=r"channels must be Long"):
        qdec.residual_gather(layer.residual, layer.residual_scales, torch.tensor([[3]]).int(), 4)
    with pytest.raises(RuntimeError, match=r"channels must have shape \[\*, k\]"):
        qdec.compensated_linear(x, *w, *layer.residual_args(), 3, torch.zeros(2, 4).long())
    other = make_layer(16, 32)
    with pytest.raises(RuntimeError, match=r"residual store is \[K=32, N=16\] but the layer is \[K=64"):
        qdec.compensated_linear(x, *w, *other.residual_args(), 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_error_on_mixed_devices():
    layer = make_layer(16, 64)
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(RuntimeError, match=r"cuda|CUDA|cpu|CPU"):
        qdec.quantized_matmul(x, *layer.weight_args())
