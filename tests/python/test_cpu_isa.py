"""The CPU decode kernels at every instruction-set level this machine has
(csrc/include/qdec/cpu_decode.h): the low-bit GEMV, dequantize and residual
compensation against the float reference, the level switch, and its errors.

Tolerance: the GEMV represents x by two int16 terms per span, so it is
compared within the bound derived in cpu_decode.h (conftest.cpu_decode_atol:
max|x| * 4.7e-10 * sum|w| plus float32 rounding of the sums), plus the output
dtype's rounding for fp16/bf16.
Dequantize is the reference's float formula and must match bit for bit.
With QDEC_CPU_ACTIVATIONS=int16 (one term) the bound is max|x| / 65534 *
sum|w| instead (same helper: it reads the precision in use).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_matmul_close, cpu_decode_atol, make_layer

import qdec
from qdec import reference as ref

RTOL = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _levels() -> list[str]:
    """Every level this CPU can run (set_cpu_isa refuses the others)."""
    previous = torch.ops.qdec.cpu_isa()
    levels = []
    for level in ("scalar", "avx2", "avx512"):
        try:
            torch.ops.qdec.set_cpu_isa(level)
            levels.append(level)
        except RuntimeError:
            pass
    torch.ops.qdec.set_cpu_isa(previous)
    return levels


LEVELS = _levels()


@pytest.fixture(params=LEVELS)
def level(request):
    previous = torch.ops.qdec.set_cpu_isa(request.param)
    yield request.param
    torch.ops.qdec.set_cpu_isa(previous)


def _cpu_args(layer):
    return [t.cpu() if torch.is_tensor(t) else t for t in layer.weight_args()]


# (N, K, group_size): odd N; K a multiple of 32, not one (ragged last block),
# and a ragged last group (576 = 4.5 groups of 128; 200 with G = 64).
GEOMETRIES = [(33, 96, 32), (7, 45, -1), (19, 200, 64), (40, 576, 128), (9, 320, 160),
              (5, 1000, -1)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("N,K,group_size", GEOMETRIES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_gemv_every_width_and_group(level, bits, N, K, group_size, symmetric):
    layer = make_layer(N, K, bits, group_size, symmetric, seed=bits + K)
    for batch in (1, 2, 3, 4, 7, 16):
        x = torch.randn(batch, K)
        got = qdec.quantized_matmul(x, *layer.weight_args())
        assert_matmul_close(got, ref.quantized_matmul_ref(x, *layer.weight_args()), x, layer, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_gemv_activation_dtypes(level, dtype, batch):
    # Scales and zeros in x's dtype are read as stored (no per-call copy).
    layer = make_layer(37, 256, 3, 64).to("cpu", dtype)
    x = torch.randn(batch, 256).to(dtype)
    got = qdec.quantized_matmul(x, *layer.weight_args())
    assert got.dtype == dtype
    want = ref.quantized_matmul_ref(x, *layer.weight_args())
    assert_matmul_close(got, want, x, layer, RTOL[dtype])


def test_gemv_outlier_and_zero_spans(level):
    # One huge activation per span sets the span's int16 step; an all-zero
    # span must give exact zeros, not NaN (0/0).
    layer = make_layer(16, 512, 4, 128)
    x = torch.randn(2, 512) * 0.01
    x[0, 5] = 300.0
    x[1, 128:256] = 0.0
    got = qdec.quantized_matmul(x, *layer.weight_args())
    assert_matmul_close(got, ref.quantized_matmul_ref(x, *layer.weight_args()), x, layer, 0.0)
    zero = qdec.quantized_matmul(torch.zeros(1, 512), *layer.weight_args())
    assert torch.equal(zero, torch.zeros(1, 16))


def test_gemv_non_finite_input_gives_nan(level):
    layer = make_layer(8, 64, 4, 32)
    x = torch.randn(3, 64)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    got = qdec.quantized_matmul(x, *layer.weight_args())
    assert got[0].isnan().all() and got[1].isnan().all()
    assert got[2].isfinite().all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("N,K,group_size", GEOMETRIES[:4])
def test_dequantize_bit_for_bit(level, bits, N, K, group_size):
    layer = make_layer(N, K, bits, group_size, symmetric=bits % 2 == 0)
    got = qdec.dequantize(*layer.weight_args(), K)
    assert torch.equal(got, ref.dequantize_ref(*layer.weight_args(), K))


def test_batches_past_the_fused_path(level):
    # More than 16 rows: dequantize once + BLAS GEMM (float32 only).
    layer = make_layer(21, 160, 3, 32)
    x = torch.randn(40, 160)
    got = qdec.quantized_matmul(x, *layer.weight_args())
    torch.testing.assert_close(got, ref.quantized_matmul_ref(x, *layer.weight_args()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual_bits", range(2, 9))
@pytest.mark.parametrize("N", [1, 31, 33, 1100])
def test_compensation_every_residual_width(level, residual_bits, N):
    K = 96
    layer = make_layer(N, K, 3, 32, residual_bits=residual_bits, seed=N)
    for batch, k in ((1, 0), (1, 7), (3, 40), (2, K)):
        x = torch.randn(batch, K)
        got = qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), k)
        want = ref.compensated_linear_ref(x, *layer.weight_args(), *layer.residual_args(), k)
        # The GEMV bound, plus float32 rounding of the k compensation terms
        # (each up to |x_j| * scale_n * 2^residual_bits).
        comp = x.abs().sum(1, keepdim=True) * layer.residual_scales * (1 << residual_bits)
        err = (got - want).abs()
        assert bool((err <= cpu_decode_atol(x, layer) + 2.0 ** -20 * comp).all()), (batch, k)


def test_k0_is_exactly_quantized_matmul(level):
    layer = make_layer(50, 128, 3)
    for batch in (1, 4, 20):
        x = torch.randn(batch, 128)
        assert torch.equal(qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), 0),
                           qdec.quantized_matmul(x, *layer.weight_args()))


def test_levels_agree_within_the_bound():
    if len(LEVELS) < 2:
        pytest.skip(f"this CPU runs only {LEVELS}")
    layer = make_layer(70, 4096, 4, 128)
    x = torch.randn(3, 4096)
    previous = torch.ops.qdec.cpu_isa()
    outs = {}
    for lv in LEVELS:
        torch.ops.qdec.set_cpu_isa(lv)
        outs[lv] = qdec.quantized_matmul(x, *layer.weight_args())
    torch.ops.qdec.set_cpu_isa(previous)
    for lv in LEVELS[1:]:
        # Same integer sums; only the float32 summation order differs.
        assert_matmul_close(outs[lv], outs[LEVELS[0]], x, layer, 0.0)


def test_thread_count_does_not_change_results():
    layer = make_layer(300, 512, 3, 128)
    x = torch.randn(2, 512)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qdec.quantized_matmul(x, *layer.weight_args())
        torch.set_num_threads(2)
        two = qdec.quantized_matmul(x, *layer.weight_args())
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)  # rows are independent: threads split rows only


def test_parallel_loops_use_the_threads_torch_is_given():
    """The build compiles the ops with OpenMP: without it at::parallel_for runs
    on one thread whatever torch.set_num_threads says (it did, unnoticed, until
    the benchmark showed 2 threads no faster than 1)."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert qdec.parallel_threads() == 1
        if (os.cpu_count() or 1) >= 2:
            torch.set_num_threads(2)
            assert qdec.parallel_threads() == 2
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(RuntimeError, match="work_items must be >= 1"):
        qdec.parallel_threads(0)


# ------------------------------------------------- activation precision int16
@pytest.fixture
def one_term():
    """The GEMV with x as one int16 term per value (QDEC_CPU_ACTIVATIONS=int16)."""
    previous = qdec.set_cpu_activations("int16")
    yield
    qdec.set_cpu_activations(previous)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("N,K,group_size", GEOMETRIES)
def test_one_term_gemv_within_its_bound(level, one_term, bits, N, K, group_size):
    # cpu_decode_atol reads the precision: max|x| / 65534 * sum|w| here.
    layer = make_layer(N, K, bits, group_size, symmetric=bits == 4, seed=bits + K)
    for batch in (1, 3, 4, 16):
        x = torch.randn(batch, K)
        got = qdec.quantized_matmul(x, *layer.weight_args())
        assert_matmul_close(got, ref.quantized_matmul_ref(x, *layer.weight_args()), x, layer, 0.0)


def test_one_term_outliers_zero_spans_and_nan(level, one_term):
    layer = make_layer(16, 512, 4, 128)
    x = torch.randn(3, 512) * 0.01
    x[0, 5] = 300.0
    x[1, 128:256] = 0.0
    x[2, 7] = float("nan")
    got = qdec.quantized_matmul(x, *layer.weight_args())
    assert_matmul_close(got[:2], ref.quantized_matmul_ref(x[:2], *layer.weight_args()), x[:2],
                        layer, 0.0)
    assert got[2].isnan().all()


def test_one_term_is_coarser_but_close(level):
    # The two precisions differ by at most the one-term bound, and the
    # default (two terms) is tighter: a check that the switch takes effect.
    layer = make_layer(64, 1024, 4, 32)
    x = torch.randn(2, 1024)
    x[:, 3] = 50.0  # an outlier makes the one-term step coarse
    want = ref.quantized_matmul_ref(x, *layer.weight_args())
    two = qdec.quantized_matmul(x, *layer.weight_args())
    previous = qdec.set_cpu_activations("int16")
    try:
        assert qdec.cpu_activations() == "int16"
        one = qdec.quantized_matmul(x, *layer.weight_args())
        assert_matmul_close(one, want, x, layer, 0.0)
    finally:
        qdec.set_cpu_activations(previous)
    assert (two - want).abs().max() < (one - want).abs().max()
    # k = 0 compensation is still exactly the GEMV at either precision.
    assert torch.equal(qdec.compensated_linear(x, *layer.weight_args(), *layer.residual_args(), 0),
                       two)


def test_set_cpu_activations_rejects_unknown_names():
    with pytest.raises(RuntimeError, match="expected one of int16x2, int16"):
        qdec.set_cpu_activations("int8")
    assert qdec.cpu_activations() == "int16x2"


def test_activations_environment_variable():
    code = ("import torch, qdec; from qdec.packing import pack_codes; "
            "q = pack_codes(torch.randint(0, 16, (8, 64)), 4); s = torch.rand(8, 2); "
            "qdec.quantized_matmul(torch.randn(1, 64), q, s, None, 4, 32); "
            "print(qdec.cpu_activations())")
    for value, want in (("int16", "int16"), ("", "int16x2")):
        env = dict(os.environ, QDEC_CPU_ACTIVATIONS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want
    env = dict(os.environ, QDEC_CPU_ACTIVATIONS="int4")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "QDEC_CPU_ACTIVATIONS: unknown CPU activation precision 'int4'" in out.stderr


# ---------------------------------------------------------------- the switch
def test_cpu_isa_reports_a_level():
    assert torch.ops.qdec.cpu_isa() in ("scalar", "avx2", "avx512")
    assert "scalar" in LEVELS


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(RuntimeError, match="expected one of scalar, avx2, avx512, auto"):
        torch.ops.qdec.set_cpu_isa("sse9")


def test_set_cpu_isa_names_missing_features():
    missing = [lv for lv in ("avx2", "avx512") if lv not in LEVELS]
    if not missing:
        pytest.skip("this CPU runs every level")
    with pytest.raises(RuntimeError, match=f"{missing[-1]} needs .*which this CPU lacks"):
        torch.ops.qdec.set_cpu_isa(missing[-1])


def _run_with_env(value: str) -> subprocess.CompletedProcess:
    code = ("import torch, qdec; x = torch.randn(1, 64); "
            "from qdec.packing import pack_codes; "
            "q = pack_codes(torch.randint(0, 16, (8, 64)), 4); s = torch.rand(8, 2); "
            "qdec.quantized_matmul(x, q, s, None, 4, 32); print(torch.ops.qdec.cpu_isa())")
    env = dict(os.environ, QDEC_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_environment_variable_forces_a_level():
    out = _run_with_env("scalar")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"


def test_environment_variable_typo_is_a_clear_error():
    out = _run_with_env("avx3")
    assert out.returncode != 0
    assert "QDEC_CPU_ISA: unknown CPU instruction-set level 'avx3'" in out.stderr
