"""CUDA-only behaviour: the residual store in pinned host memory (read
zero-copy), CUDA-graph capture of compensated_linear, and CUDA against the
CPU kernel. The device-generic tests in test_ops.py also run on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer

import qdec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


def test_pageable_host_residual_is_refused():
    layer = make_layer(64, 128)
    gpu = layer.to("cuda", torch.float32)
    with pytest.raises(RuntimeError, match="pinned memory"):
        qdec.compensated_linear(torch.randn(1, 128, device="cuda"), *gpu.weight_args(),
                                layer.residual, layer.residual_scales.cuda(), 4, 4)


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
