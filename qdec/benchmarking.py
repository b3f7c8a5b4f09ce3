"""Shared pieces of the speed measurements (``benchmarks/*.py`` and
``qdec tune``): timing, random operands in the packed format, torch's int4
tinygemm baseline, and the run metadata every result file carries.

Weights are random: the kernels' cost does not depend on the code values, only
on the shapes, bit widths and k.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Llama-3-8B decoder linears, name -> (N, K) = (out_features, in_features).
LLAMA3_8B_LINEARS: dict[str, tuple[int, int]] = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
# SmolLM2-135M decoder linears (hidden 576, 9 heads / 3 KV heads of 64, MLP 1536).
SMOLLM2_135M_LINEARS: dict[str, tuple[int, int]] = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
SHAPE_PRESETS = {"llama3-8b": LLAMA3_8B_LINEARS, "smollm2-135m": SMOLLM2_135M_LINEARS}


def git_commit() -> str:
    """Short commit of the checkout this code runs from, or ``unknown``.
    ``QDEC_COMMIT`` comes first: a copied tree (the GPU machine's) may have
    neither git nor .git, and benchmarks/gpu_run.py sets it for its steps."""
    if os.environ.get("QDEC_COMMIT"):
        return os.environ["QDEC_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(device: str) -> dict:
    """Device, torch/CUDA versions and commit: what a result must be read with."""
    return {"device": device_name(device), "device_type": device, "torch": torch.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(),
            "threads": torch.get_num_threads() if device == "cpu" else None}


def time_op(fn: Callable[[], object], device: str, iters: int, warmup: int) -> float:
    """Median seconds of one call of ``fn``.

    CUDA: per-call CUDA-event intervals after ``warmup`` calls, so each sample
    includes the op's launch overhead, as a decode step pays it. CPU: per-call
    ``time.perf_counter`` intervals.
    """
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_words(rows: int, cols: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """Random int32 words: every bit pattern is a valid packed code block."""
    w = torch.randint(-(2 ** 31), 2 ** 31, (rows, cols), dtype=torch.int64, generator=gen)
    return w.to(torch.int32).to(device)


def packed_layer(N: int, K: int, bits: int, group_size: int, dtype: torch.dtype, device: str,
                 gen: torch.Generator) -> tuple[tuple, int]:
    """Random ``(qweight, scales, zeros, bits, group_size)`` in the packed
    format and the bytes a GEMV reads from them."""
    words = -(-K // 32) * bits
    groups = -(-K // group_size)
    qweight = random_words(N, words, device, gen)
    scales = ((torch.rand(N, groups, generator=gen) + 0.5) * 0.02 / (1 << (bits - 1))).to(
        device, dtype)
    zeros = torch.randint(0, 1 << bits, (N, groups), generator=gen).to(device, dtype)
    nbytes = qweight.numel() * 4 + 2 * scales.numel() * scales.element_size()
    return (qweight, scales, zeros, bits, group_size), nbytes


def residual_store(N: int, K: int, residual_bits: int, device: str,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random residual store ``[K, ceil(N/32)*bits]`` int32 (pinned host
    memory when ``device`` is CUDA, read zero-copy as deployed) and its float32
    per-output-channel scales on ``device``."""
    residual = random_words(K, -(-N // 32) * residual_bits, "cpu", gen)
    if device == "cuda":
        residual = residual.pin_memory()
    scales = ((torch.rand(N, generator=gen) + 0.5) * 0.002).to(device)
    return residual, scales


def tinygemm_setup(N: int, K: int, group_size: int, device: str,
                   gen: torch.Generator) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``(fn, weight bytes)`` for torch's int4 tinygemm
    (``aten._weight_int4pack_mm``, bf16 activations), or raises with the
    reason it cannot run here."""
    if device != "cuda":
        raise RuntimeError("tinygemm (aten._weight_int4pack_mm) is a CUDA kernel")
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=gen).to(device)
    try:  # torch >= 2.5: uint8 [N, K/2], two codes per byte
        packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    except (RuntimeError, TypeError):  # older torch: int32 [N, K]
        w = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
    sz = torch.ones(K // group_size, N, 2, dtype=torch.bfloat16, device=device)
    fn = lambda x: torch.ops.aten._weight_int4pack_mm(x, w, group_size, sz)  # noqa: E731
    fn(torch.randn(1, K, device=device, dtype=torch.bfloat16))  # fails here if unsupported
    return fn, w.numel() * w.element_size() + sz.numel() * 2


def copy_bandwidth(device: str, nbytes: int = 1 << 28, iters: int = 20) -> float:
    """Measured bytes/s of a device-to-device copy (read + write counted), the
    roof a memory-bound GEMV is compared with. On CPU: a memcpy-like clone."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_op(lambda: dst.copy_(src), device, iters, warmup=3)
    return 2 * nbytes / seconds


def pinned_read_bandwidths(N: int = 4096, K: int = 14336, residual_bits: int = 4,
                           iters: int = 20) -> dict[str, float] | None:
    """Measured bytes/s of reading pinned host memory from the GPU, the roofs
    of the residual fetch (None without CUDA):

    - ``dma_h2d``: a pinned-host-to-device copy (the copy engines, the link's
      practical peak);
    - ``zero_copy_sequential``: ``residual_gather`` of *every* row of an
      ``N x K`` store, i.e. the kernel's own zero-copy read of one contiguous
      block: what gathering k scattered rows is compared against.
    """
    if not torch.cuda.is_available():
        return None
    gen = torch.Generator().manual_seed(0)
    residual, scales = residual_store(N, K, residual_bits, "cuda", gen)
    nbytes = residual.numel() * 4
    dst = torch.empty(residual.shape, dtype=residual.dtype, device="cuda")
    dma = time_op(lambda: dst.copy_(residual, non_blocking=True), "cuda", iters, warmup=3)
    rows = torch.arange(K, device="cuda")
    from .ops import residual_gather

    gather = time_op(lambda: residual_gather(residual, scales, rows, residual_bits), "cuda",
                     iters, warmup=3)
    return {"bytes": nbytes, "dma_h2d": nbytes / dma, "zero_copy_sequential": nbytes / gather}


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int,
                        warmup: int = 1,
                        before: dict[str, Callable[[], object]] | None = None,
                        ) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each callable, timed in ``rounds``
    rounds that call every one once, in turn: on a shared or throttling CPU
    the contenders then see the same machine state, so their ratios hold even
    when absolute times drift. ``before[name]``, where given, runs untimed
    right before each call of that contender (e.g. a process-wide setting it
    needs). Returns ``{name: {"wall": s, "cpu": s}}`` (CPU time sums all
    threads of the process)."""
    before = before or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])}
            for name in fns}


def cpu_read_bandwidth(nbytes: int = 1 << 28, rounds: int = 7) -> float:
    """Bytes/s at which the current torch thread count streams memory in: the
    faster of summing a float32 buffer and BLAS sgemv over a float32 matrix,
    both far larger than the caches (each does one or two flops per 4 bytes,
    well below what a core retires, so they measure the memory system; which
    of the two streams better depends on the torch build). The roof a
    memory-bound CPU GEMV is judged against."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    mat = buf.view(-1, 4096)
    vec = torch.ones(4096)
    seconds = min(time_op(lambda: buf.sum(), "cpu", rounds, warmup=2),
                  time_op(lambda: torch.mv(mat, vec), "cpu", rounds, warmup=2))
    return nbytes / seconds


def torch_int4_cpu_setup(N: int, K: int, group_size: int,
                         gen: torch.Generator) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``(fn, weight bytes)`` of torch's CPU int4 GEMM
    (``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``,
    bf16 activations): the baseline quantized CPU matmul torch ships."""
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=gen)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = ((torch.rand(K // group_size, N, 2, generator=gen) + 0.5) * 0.01).to(torch.bfloat16)
    fn = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group_size, sz)  # noqa: E731
    return fn, w.numel() * w.element_size() + sz.numel() * 2


def torch_int8_cpu_setup(N: int, K: int,
                         gen: torch.Generator) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``(fn, weight bytes)`` of torch's int8 weight-only GEMM
    (``_weight_int8pack_mm``, per-output-channel scales, bf16 activations)."""
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    scales = ((torch.rand(N, generator=gen) + 0.5) * 0.01).to(torch.bfloat16)
    fn = lambda x: torch.ops.aten._weight_int8pack_mm(x, w, scales)  # noqa: E731
    return fn, w.numel() + scales.numel() * 2
