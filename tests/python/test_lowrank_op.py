"""qdec::lowrank_linear, the static low-rank term y = (x @ L_B^T) @ L_A^T,
against its reference (qdec.reference.lowrank_linear_ref) and a float64 dense
reference x @ (L_A L_B)^T, on every available device; opcheck; error cases;
and LowRankTerm.forward, which calls the op.

Tolerances (the inputs are rounded to the dtype under test *before* either
reference sees them, so input rounding cancels; what is left is):
- against lowrank_linear_ref: both accumulate in float32, in different orders,
  so float32 outputs differ by the rounding of a K-term sum (rtol 1e-5 plus an
  atol of 1e-5 of the output scale, for outputs that cancel to near zero);
  fp16/bf16 outputs are one rounding of those float32 values, so they may land
  one unit in the last place apart (rtol = 2 * eps of the dtype).
- against the float64 dense product: the float32 accumulation error
  (same atol) plus the final rounding to the output dtype, at most half an ulp:
  rtol 1e-5 (fp32), 1e-3 (fp16, half-ulp 4.9e-4), 8e-3 (bf16, half-ulp 3.9e-3).
"""

from __future__ import annotations

import pytest
import torch

import qdec
from qdec import reference as ref
from qdec.lowrank import LowRankTerm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REF_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DENSE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def factors(N, K, r, dtype, device, seed=0):
    """L_A [N, r], L_B [r, K] scaled so that y has entries of order 1 for x ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, r, generator=g) / max(r, 1) ** 0.5
    b = torch.randn(r, K, generator=g) / K ** 0.5
    return a.to(device, dtype), b.to(device, dtype)


def dense64(x, a, b):
    return x.double() @ (a.double() @ b.double()).t()


def check(got, x, a, b, dtype):
    want = ref.lowrank_linear_ref(x.cpu(), a.cpu(), b.cpu())
    assert got.dtype == dtype and got.shape == want.shape
    scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.cpu(), want, rtol=REF_RTOL[dtype], atol=1e-5 * scale)
    dense = dense64(x.cpu(), a.cpu(), b.cpu())
    torch.testing.assert_close(got.cpu().double(), dense, rtol=DENSE_RTOL[dtype],
                               atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [7, 33])
@pytest.mark.parametrize("K", [45, 100, 576])
@pytest.mark.parametrize("r", [0, 1, 5, 64])
def test_matches_references_odd_sizes(device, dtype, N, K, r):
    a, b = factors(N, K, r, dtype, device)
    x = torch.randn(3, K).to(device, dtype)
    got = qdec.ops.lowrank_linear(x, a, b)
    check(got, x, a, b, dtype)
    if r == 0:
        assert torch.equal(got.cpu(), torch.zeros(3, N, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 5), (0,), (9,), (4, 5)])
def test_batch_shapes(device, dtype, lead):
    # (9,) and (4, 5) = 20 rows pass the fused paths' row limits (CPU 8, CUDA 16)
    # and take the GEMM fallback.
    N, K, r = 33, 100, 5
    a, b = factors(N, K, r, dtype, device, seed=1)
    x = torch.randn(*lead, K).to(device, dtype)
    got = qdec.ops.lowrank_linear(x, a, b)
    assert got.shape == (*lead, N)
    check(got, x, a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_inputs(device, dtype):
    N, K, r = 33, 576, 5
    a, b = factors(N, K, r, dtype, device, seed=2)
    x = torch.randn(K, 2, 3).to(device, dtype).permute(1, 2, 0)  # [2, 3, K]
    assert not x.is_contiguous()
    check(qdec.ops.lowrank_linear(x, a, b), x, a, b, dtype)
    a_nc, b_nc = a.t().contiguous().t(), b.t().contiguous().t()
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous()
    assert torch.equal(qdec.ops.lowrank_linear(x, a_nc, b_nc), qdec.ops.lowrank_linear(x, a, b))
    x_offset = torch.randn(2 * K + 1).to(device, dtype)[1:].view(2, K)  # misaligned start
    check(qdec.ops.lowrank_linear(x_offset, a, b), x_offset, a, b, dtype)


def test_row_results_do_not_depend_on_batch(device):
    # Each row is computed on its own (same summation order at any B <= the
    # fused limit), so a row alone and inside a batch give identical bits.
    a, b = factors(40, 96, 8, torch.float32, device, seed=3)
    x = torch.randn(4, 96, device=device)
    batched = qdec.ops.lowrank_linear(x, a, b)
    for i in range(4):
        assert torch.equal(qdec.ops.lowrank_linear(x[i], a, b), batched[i])


def test_opcheck(device):
    for dtype, lead, r in [(torch.float32, (2,), 5), (torch.float16, (), 3),
                           (torch.bfloat16, (2, 3), 0)]:
        a, b = factors(24, 96, r, dtype, device)
        x = torch.randn(*lead, 96).to(device, dtype)
        torch.library.opcheck(torch.ops.qdec.lowrank_linear.default, (x, a, b))


def test_torch_compile_fullgraph(device):
    a, b = factors(24, 96, 4, torch.float32, device)

    @torch.compile(fullgraph=True, backend="eager" if device == "cpu" else "inductor")
    def step(x):
        return qdec.ops.lowrank_linear(x, a, b) * 2

    x = torch.randn(1, 96, device=device)
    torch.testing.assert_close(step(x), 2 * qdec.ops.lowrank_linear(x, a, b))


def test_errors_name_the_argument_and_values():
    a, b = factors(7, 45, 5, torch.float32, "cpu")
    x = torch.randn(2, 45)
    op = qdec.ops.lowrank_linear
    with pytest.raises(RuntimeError, match=r"lowrank_a must have shape \[N, r\] with "
                                           r"r = lowrank_b.size\(0\) = 5, got \[7, 4\]"):
        op(x, a[:, :4], b)
    with pytest.raises(RuntimeError, match=r"lowrank_b must have shape \[r, K\] with "
                                           r"K = x.size\(-1\) = 45, got \[5, 44\]"):
        op(x, a, b[:, :44])
    with pytest.raises(RuntimeError, match=r"lowrank_a and lowrank_b must have x's dtype Float, "
                                           r"got Half and Float"):
        op(x, a.half(), b)
    with pytest.raises(RuntimeError, match=r"lowrank_a and lowrank_b must have x's dtype "
                                           r"BFloat16, got Float and Float"):
        op(x.bfloat16(), a, b)
    with pytest.raises(RuntimeError, match=r"lowrank_a \(\[N, r\]\) must be 2-D, got shape \[35\]"):
        op(x, a.reshape(-1), b)
    with pytest.raises(RuntimeError, match=r"lowrank_b \(\[r, K\]\) must be 2-D, got shape "
                                           r"\[1, 5, 45\]"):
        op(x, a, b[None])
    with pytest.raises(RuntimeError, match=r"x must be float32, float16 or bfloat16, got Int"):
        op(x.int(), a, b)
    with pytest.raises(RuntimeError, match=r"x must be float32, float16 or bfloat16, got Double"):
        op(x.double(), a.double(), b.double())
    with pytest.raises(RuntimeError, match=r"lowrank_a must be float32, float16 or bfloat16, "
                                           r"got Long"):
        op(x, a.long(), b)
    with pytest.raises(RuntimeError, match=r"lowrank_b must be float32, float16 or bfloat16, "
                                           r"got Int"):
        op(x, a, b.int())
    with pytest.raises(RuntimeError, match=r"x must have shape \[\*, K\], got a 0-D tensor"):
        op(torch.tensor(1.0), a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_error_on_mixed_devices():
    a, b = factors(7, 45, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"lowrank_a is on cpu but x is on cuda"):
        qdec.ops.lowrank_linear(torch.randn(2, 45, device="cuda"), a, b)


# ------------------------------------------------------------- LowRankTerm
@pytest.mark.parametrize("factor_dtype", DTYPES)
def test_lowrank_term_uses_the_op(device, factor_dtype):
    a, b = factors(33, 100, 6, torch.float32, "cpu", seed=4)
    term = LowRankTerm(a, b, dtype=factor_dtype).to(device)
    x = torch.randn(2, 3, 100, device=device)  # float32 activations
    got = term(x)
    # Compute in the factors' dtype (x is cast to it first), result in x's dtype.
    want = qdec.ops.lowrank_linear(x.to(factor_dtype), term.lowrank_a, term.lowrank_b).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    check(got.to(factor_dtype), x.to(factor_dtype), term.lowrank_a, term.lowrank_b, factor_dtype)


def test_lowrank_term_float64_and_autograd_fall_back_to_matmul():
    a, b = factors(12, 20, 3, torch.float64, "cpu", seed=5)
    x = torch.randn(4, 20, dtype=torch.float64)
    torch.testing.assert_close(LowRankTerm(a, b)(x), dense64(x, a, b))
    xg = torch.randn(4, 20, requires_grad=True)
    out = LowRankTerm(a.float(), b.float())(xg)
    out.sum().backward()
    torch.testing.assert_close(xg.grad, (a.float() @ b.float()).sum(0).expand(4, 20))
