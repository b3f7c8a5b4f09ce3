"""CUDA-only behaviour: the residual store in pinned host memory (read
zero-copy), CUDA-graph capture of compensated_linear, and CUDA against the
CPU kernel. The device-generic tests in test_ops.py also run on CUDA."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_layer, strided_residual_stores

import qdec

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pinned_host_residual_matches_cpu(dtype):
    layer = make_layer(300, 1024, 3, 128)
    x = torch.randn(1, 1024).to(dtype)
    want = qdec.compensated_linear(x.float(), *layer.to("cpu", torch.float32).weight_args(),
                                   *layer.residual_args(), 16)
    gpu = layer.to("cuda", dtype)
    got = qdec.compensated_linear(x.cuda(), *gpu.weight_args(), layer.residual.pin_memory(),
                                  layer.residual_scales.cuda(), 4, 16)
    # fp16/bf16 activations and scales versus an fp32 CPU run: the difference
    # is the rounding of the inputs, well inside 2 % of the output scale.
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2 * want.abs().max())


@pytest.mark.parametrize("k", [1, 5, 64, 200, 1024])  # 1 to 32 splits of the k rows
@pytest.mark.parametrize("batch", [1, 3])
def test_compensation_splits_match_cpu_float32(k, batch):
    # float32 end to end: CPU and CUDA differ only in summation order (GEMV
    # lanes, split partial sums), ~1e-6 relative; 1e-4 of the output scale.
    layer = make_layer(300, 1024, 3, 128)
    x = torch.randn(batch, 1024)
    want = qdec.compensated_linear(x, *layer.to("cpu", torch.float32).weight_args(),
                                   *layer.residual_args(), k)
    gpu = layer.to("cuda", torch.float32)
    args = (x.cuda(), *gpu.weight_args(), layer.residual.pin_memory(),
            layer.residual_scales.cuda(), 4, k)
    got = qdec.compensated_linear(*args)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max())
    assert torch.equal(qdec.compensated_linear(*args), got)  # no atomics: same bits


def test_compensation_overlap_off_gives_the_same_bits(tmp_path):
    # QDEC_COMPENSATION_OVERLAP=0 runs the side-stream work on the current
    # stream; the kernels are the same, so the output must be bit-identical.
    layer = make_layer(300, 1024, 3, 128)
    x = torch.randn(2, 1024, dtype=torch.float16)
    gpu = layer.to("cuda", torch.float16)
    got = qdec.compensated_linear(x.cuda(), *gpu.weight_args(), layer.residual.pin_memory(),
                                  layer.residual_scales.cuda(), 4, 24).cpu()
    qweight, scales, zeros, bits, group = gpu.weight_args()
    torch.save({"x": x, "qweight": qweight.cpu(), "scales": scales.cpu(), "zeros": zeros.cpu(),
                "residual": layer.residual, "rscales": layer.residual_scales,
                "bits": bits, "group": group}, tmp_path / "in.pt")
    script = (
        "import sys, torch, qdec\n"
        "d = torch.load(sys.argv[1])\n"
        "y = qdec.compensated_linear(d['x'].cuda(), d['qweight'].cuda(), d['scales'].cuda(),\n"
        "    d['zeros'].cuda(), d['bits'], d['group'], d['residual'].pin_memory(),\n"
        "    d['rscales'].cuda(), 4, 24)\n"
        "torch.save(y.cpu(), sys.argv[2])\n")
    env = {**os.environ, "QDEC_COMPENSATION_OVERLAP": "0"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env)
    assert torch.equal(torch.load(tmp_path / "out.pt"), got)


# ------------------------------------------------------------ quantized GEMV
@functools.lru_cache(maxsize=None)
def gemv_layer(N, K, bits):
    # Built once per shape and shared by its dtype and batch cases (24 per
    # Llama shape); without the residual store, which the GEMV never reads.
    return make_layer(N, K, bits, 128, residual=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,batch", [(1024, 4096, 1), (301, 14336, 1), (301, 14336, 4)])
def test_gemv_llama_widths_match_cpu(bits, dtype, N, K, batch):
    # K = 14336 makes each of the CTA's 128 threads walk 3 or 4 blocks; N = 301
    # leaves a CTA with one of its four rows. Both sides see the same fp16/bf16
    # inputs and accumulate in float32 in different orders (~1e-6 relative),
    # then round once to the dtype: two ulps of the dtype at the output scale.
    layer = gemv_layer(N, K, bits)
    x = torch.randn(batch, K).to(dtype)
    cpu = layer.to("cpu", dtype)
    want = qdec.quantized_matmul(x, *cpu.weight_args()).float()
    got = qdec.quantized_matmul(x.cuda(), *layer.to("cuda", dtype).weight_args()).float().cpu()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps * want.abs().max())


def test_gemv_misaligned_weight_view_gives_the_same_bits():
    # The GEMV's 16-byte loads need an aligned weight; a contiguous view that
    # starts one word into its storage is copied by the glue, not misread.
    layer = make_layer(64, 256, 4, 32)
    gpu = layer.to("cuda", torch.float16)
    qweight, scales, zeros, bits, group = gpu.weight_args()
    storage = torch.zeros(qweight.numel() + 1, dtype=torch.int32, device="cuda")
    storage[1:] = qweight.flatten()
    shifted = storage[1:].view(qweight.shape)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    assert torch.equal(qdec.quantized_matmul(x, shifted, scales, zeros, bits, group),
                       qdec.quantized_matmul(x, qweight, scales, zeros, bits, group))


def test_pageable_host_residual_is_refused():
    layer = make_layer(64, 128)
    gpu = layer.to("cuda", torch.float32)
    with pytest.raises(RuntimeError, match="pinned memory"):
        qdec.compensated_linear(torch.randn(1, 128, device="cuda"), *gpu.weight_args(),
                                layer.residual, layer.residual_scales.cuda(), 4, 4)


def test_pinned_host_residual_with_strided_scales():
    # The deployment path (pinned host residual, scales on the GPU) with
    # non-contiguous scales: the glue's contiguous copy must outlive the kernel.
    layer = make_layer(300, 1024, 3, 128)
    gpu = layer.to("cuda", torch.float32)
    residual = layer.residual.pin_memory()
    x = torch.randn(2, 1024, device="cuda")
    channels = torch.randint(0, 1024, (2, 64), device="cuda")
    for name, _, scales in strided_residual_stores(layer.residual, gpu.residual_scales):
        if not scales.is_contiguous():
            want = qdec.compensated_linear(x, *gpu.weight_args(), residual, scales.contiguous(),
                                           4, 64)
            got = qdec.compensated_linear(x, *gpu.weight_args(), residual, scales, 4, 64)
            assert torch.equal(got, want), name
            gathered = qdec.residual_gather(residual, scales, channels, 4)
            assert torch.equal(gathered, qdec.residual_gather(residual, scales.contiguous(),
                                                              channels, 4)), name


def test_strided_pinned_host_residual_is_refused():
    # Its contiguous copy would be pageable memory, which no kernel can read.
    layer = make_layer(64, 128)
    gpu = layer.to("cuda", torch.float32)
    words = layer.residual.shape[1]
    wide = torch.zeros(128, words + 1, dtype=torch.int32).pin_memory()
    wide[:, :words] = layer.residual
    with pytest.raises(RuntimeError, match="CPU residual must be contiguous"):
        qdec.compensated_linear(torch.randn(1, 128, device="cuda"), *gpu.weight_args(),
                                wide[:, :words], gpu.residual_scales, 4, 4)


def test_compensated_linear_cuda_graph_capture():
    layer = make_layer(256, 512, 3, 128)
    gpu = layer.to("cuda", torch.float16)
    residual = layer.residual.pin_memory()
    rscales = layer.residual_scales.cuda()
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    eager = qdec.compensated_linear(x, *gpu.weight_args(), residual, rscales, 4, 8)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up the caching allocator outside capture
        qdec.compensated_linear(x, *gpu.weight_args(), residual, rscales, 4, 8)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qdec.compensated_linear(x, *gpu.weight_args(), residual, rscales, 4, 8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# ------------------------------------------------------------- lowrank_linear
@functools.lru_cache(maxsize=None)
def _lowrank_factors(N, K, r, dtype, seed=0):
    # Cached: built once per shape and dtype, shared by the batch cases.
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, r, generator=g) / max(r, 1) ** 0.5
    b = torch.randn(r, K, generator=g) / K ** 0.5
    return a.to(dtype), b.to(dtype)


def _lowrank_ref(x, a, b):
    # Factored, in float64: x·Bᵀ then ·Aᵀ costs B·r·(N + K), where the dense
    # A·B of a 4096x14336 layer costs N·r·K per case. Both orders agree to
    # float64 rounding, far below the tolerances.
    return (x.double() @ b.double().t()) @ a.double().t()


# Named ids (4096x14336r16): the memcheck step of benchmarks/gpu_run.sh leaves
# out the large shapes by their size in the test id.
LOWRANK_SHAPES = [(4096, 4096, 128), (1024, 4096, 16), (4096, 14336, 16), (4096, 14336, 128),
                  (33, 100, 5), (7, 45, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}r{s[2]}")
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_lowrank_linear_cuda_matches_float64(dtype, shape, batch):
    # Llama-3-8B shapes (vectorised loads, several K chunks in phase 1) and odd
    # ones (scalar loads); batch 16 is the one-launch kernel's largest.
    N, K, r = shape
    a, b = _lowrank_factors(N, K, r, dtype)
    x = torch.randn(batch, K).to(dtype)
    got = qdec.ops.lowrank_linear(x.cuda(), a.cuda(), b.cuda())
    want = _lowrank_ref(x, a, b)
    # float32 accumulation (rtol 1e-5) plus one rounding to the output dtype.
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=1e-5 * want.abs().max())


def test_lowrank_linear_cuda_gemm_fallback_and_large_rank():
    # 17 rows and B * r > 12288 floats of shared memory both take the GEMMs.
    for batch, r in [(17, 16), (4, 4096)]:
        a, b = _lowrank_factors(300, 4096, r, torch.float16, seed=1)
        x = torch.randn(batch, 4096).half()
        got = qdec.ops.lowrank_linear(x.cuda(), a.cuda(), b.cuda())
        want = _lowrank_ref(x, a, b)
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-3,
                                   atol=1e-5 * want.abs().max())


def test_lowrank_linear_cuda_deterministic_and_graph_capture():
    a, b = (t.cuda() for t in _lowrank_factors(4096, 4096, 64, torch.float16, seed=2))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    eager = qdec.ops.lowrank_linear(x, a, b)
    assert torch.equal(qdec.ops.lowrank_linear(x, a, b), eager)  # no atomics: same bits
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up the caching allocator outside capture
        qdec.ops.lowrank_linear(x, a, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qdec.ops.lowrank_linear(x, a, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_lowrank_linear_cuda_matches_cpu_kernel():
    a, b = _lowrank_factors(1024, 4096, 32, torch.float32, seed=3)
    x = torch.randn(2, 4096)
    torch.testing.assert_close(qdec.ops.lowrank_linear(x.cuda(), a.cuda(), b.cuda()).cpu(),
                               qdec.ops.lowrank_linear(x, a, b), rtol=1e-5, atol=1e-5)
