// Torch-free CUDA kernel of the static low-rank term y = L_A (L_B x) at decode
// batch sizes, both factors in ONE launch. Launcher: qdec/cuda_kernels.h.
//
// Why this shape. The term is memory-bound: it reads r*(N+K) factor values and
// does 2 MACs per value read. At Llama-3-8B shapes in fp16 that is
//   K=4096,  N=4096,  r=16..128:  0.25..2.0 MiB -> 0.08..0.63 us at 3.35 TB/s (H100)
//   K=4096,  N=14336, r=128:      4.5 MiB       -> 1.4 us
//   K=14336, N=4096,  r=128:      4.5 MiB       -> 1.4 us
// so a kernel launch (~2-4 us of launch latency and inter-kernel gap) is worth
// more than the whole DRAM time: two launches (or two cuBLAS GEMVs plus a
// cast) would roughly double the cost of the term at batch 1.
//
// Options for one launch:
// (a) every block recomputes t = L_B x and then does its slice of y = L_A t.
//     Phase 2 must spread N rows over >= 132 SMs, so L_B (r*K*2 bytes) is
//     re-read by >= 132 blocks from L2: 132 * 128 KiB = 17 MB at r=16, K=4096
//     (~3 us at ~5.5 TB/s of L2, already more than the DRAM floor), and
//     132 * 3.5 MiB = 480 MB at r=128, K=14336 (~90 us, plus 240M redundant
//     FMAs). Only viable when r*K is tiny, which is not the range asked for.
// (b) a cooperative grid (all blocks co-resident) with one grid-wide barrier:
//     phase 1 splits L_B's r*K values over ~1024 warps (rows j x chunks of K;
//     each warp writes one float32 partial of t per batch row, no atomics, so
//     the result is deterministic), grid.sync(), then every block sums the
//     chunk partials of t into shared memory (<= 1024*B floats from L2 per
//     block) and its warps compute rows of y = L_A t. L_B and L_A are each
//     read once from DRAM; the barrier is expected to cost on the order of a
//     microsecond. This is the design used here.
// Where the device cannot launch cooperatively, the same kernel runs as two
// ordinary launches (phase 1, then phase 2); the results are bit-identical.
//
// Loads: lanes read 16-byte vectors (8 fp16/bf16 or 4 fp32 values) when K, r
// and every pointer allow it, else scalars. In phase 2 a group of G lanes
// (a power of two, G*V >= r when possible) shares one row of L_A, so a warp
// covers 32/G rows per step and short rows (r = 16) do not idle 31 lanes.
// Not run on a GPU yet: correctness is covered by tests/python/test_cuda_ops.py
// and the cost by benchmarks/bench_gemv.py, both to be run on the GPU machine.
#include <cooperative_groups.h>

#include <algorithm>

#include "ops/cuda/kernels/convert.cuh"
#include "qdec/cuda_kernels.h"

namespace qdec::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarp = 32;
constexpr int kWarps = 8;  // warps per block
constexpr int kThreads = kWarp * kWarps;
constexpr int kMaxBlocksPerSm = 4;

// V consecutive values at p as float: one 16-byte load when V > 1 (the caller
// guarantees alignment), a scalar load when V == 1.
template <int V, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = load_as_float(p, 0);
  } else {
    static_assert(V * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = load_as_float(e, v);
  }
}

struct LowRankArgs {
  int64_t B, N, K, r, chunk, splits;
  int group;   // lanes per L_A row in phase 2 (power of two, <= 32)
  int phases;  // 1: phase 1 only, 2: phase 2 only, 3: both with a grid barrier
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSm)
    lowrank_kernel(const T* __restrict__ x, const T* __restrict__ lowrank_a,
                   const T* __restrict__ lowrank_b, float* __restrict__ partial,
                   T* __restrict__ y, LowRankArgs p) {
  extern __shared__ float t_shared[];  // [B, r]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarps;

  if (p.phases & 1) {
    // Item (s, j): the dot of L_B[j, chunk s] with every x row's chunk s.
    // Consecutive items go to different blocks (warp-major numbering), so a
    // small item count still spreads over all SMs.
    const int64_t items = p.splits * p.r;
    for (int64_t item = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x; item < items;
         item += total_warps) {
      const int64_t s = item / p.r, j = item % p.r;
      const int64_t k0 = s * p.chunk;
      const int64_t k1 = min(p.K, k0 + p.chunk);
      const T* row = lowrank_b + j * p.K;
      float sum[kMaxLowRankRows];
#pragma unroll
      for (int b = 0; b < kMaxLowRankRows; ++b) sum[b] = 0.f;
#pragma unroll 4
      for (int64_t k = k0 + lane * V; k < k1; k += kWarp * V) {
        float w[V];
        load_vec<V>(row + k, w);
#pragma unroll
        for (int b = 0; b < kMaxLowRankRows; ++b) {
          if (b < p.B) {
            float xv[V];
            load_vec<V>(x + b * p.K + k, xv);
#pragma unroll
            for (int v = 0; v < V; ++v) sum[b] += w[v] * xv[v];
          }
        }
      }
#pragma unroll
      for (int b = 0; b < kMaxLowRankRows; ++b) {
        if (b >= p.B) break;
        float v = sum[b];
#pragma unroll
        for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) partial[(s * p.B + b) * p.r + j] = v;
      }
    }
  }

  if (p.phases == 3) cg::this_grid().sync();  // partials of t visible grid-wide

  if (p.phases & 2) {
    // t[b, j] = sum over chunks, in chunk order (deterministic).
    const int64_t br = p.B * p.r;
    for (int64_t i = threadIdx.x; i < br; i += kThreads) {
      float v = 0.f;
      for (int64_t s = 0; s < p.splits; ++s) v += partial[s * br + i];
      t_shared[i] = v;
    }
    __syncthreads();
    const int G = p.group;
    const int rows_per_warp = kWarp / G;
    const int g = lane / G, gl = lane % G;
    // The loop bound is warp-uniform, so every lane reaches the shuffles.
    for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * rows_per_warp;
         base < p.N; base += total_warps * rows_per_warp) {
      const int64_t n = base + g;
      const bool valid = n < p.N;
      float acc[kMaxLowRankRows];
#pragma unroll
      for (int b = 0; b < kMaxLowRankRows; ++b) acc[b] = 0.f;
      if (valid) {
        const T* row = lowrank_a + n * p.r;
#pragma unroll 2
        for (int64_t j = static_cast<int64_t>(gl) * V; j < p.r; j += static_cast<int64_t>(G) * V) {
          float a[V];
          load_vec<V>(row + j, a);
#pragma unroll
          for (int b = 0; b < kMaxLowRankRows; ++b) {
            if (b < p.B) {
#pragma unroll
              for (int v = 0; v < V; ++v) acc[b] += a[v] * t_shared[b * p.r + j + v];
            }
          }
        }
      }
#pragma unroll
      for (int b = 0; b < kMaxLowRankRows; ++b) {
        if (b >= p.B) break;
        float v = acc[b];
        // Groups are aligned runs of G lanes, so xor offsets < G stay inside.
        for (int off = G / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (valid && gl == 0) store_float(y, b * p.N + n, v);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Co-resident blocks per SM of one kernel instantiation on the current device
// at the largest shared-memory size the glue allows (so valid for any call),
// and whether the device can launch cooperatively. Cached per device: the
// queries are host calls that would otherwise run on every decode step.
struct DeviceLimits {
  int sms = 0, blocks_per_sm = 0;
  bool cooperative = false;
};

template <typename T, int V>
cudaError_t device_limits(DeviceLimits& out) {
  constexpr int kMaxDevices = 64;
  static DeviceLimits cache[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < kMaxDevices && cache[dev].sms > 0) {
    out = cache[dev];
    return cudaSuccess;
  }
  DeviceLimits l;
  int coop = 0;
  if ((err = cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev)) != cudaSuccess)
    return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &l.blocks_per_sm, lowrank_kernel<T, V>, kThreads,
      kMaxLowRankSharedFloats * sizeof(float));
  if (err != cudaSuccess) return err;
  l.cooperative = coop != 0 && l.blocks_per_sm > 0;
  l.blocks_per_sm = std::max(1, std::min(l.blocks_per_sm, kMaxBlocksPerSm));
  if (dev < kMaxDevices) cache[dev] = l;
  out = l;
  return cudaSuccess;
}

template <typename T, int V>
cudaError_t launch_typed(const LowRankView& w, const T* x, int64_t B, float* partial, T* y,
                         cudaStream_t stream) {
  DeviceLimits lim;
  cudaError_t err = device_limits<T, V>(lim);
  if (err != cudaSuccess) return err;
  LowRankArgs p;
  p.B = B;
  p.N = w.N;
  p.K = w.K;
  p.r = w.r;
  p.chunk = lowrank_chunk(w.K, w.r);
  p.splits = lowrank_splits(w.K, w.r);
  int group = 1;
  while (group < kWarp && static_cast<int64_t>(group) * V < w.r) group *= 2;
  p.group = group;
  // No more blocks than either phase has warp-sized work for: a smaller
  // cooperative grid also makes the barrier cheaper.
  const int64_t phase2_warps = (w.N + kWarp / group - 1) / (kWarp / group);
  const int64_t work_warps = std::max<int64_t>(p.splits * p.r, phase2_warps);
  const int64_t want_blocks = std::max<int64_t>(1, (work_warps + kWarps - 1) / kWarps);
  const auto grid = static_cast<unsigned>(
      std::min<int64_t>(want_blocks, static_cast<int64_t>(lim.sms) * lim.blocks_per_sm));
  const size_t smem = static_cast<size_t>(B * w.r) * sizeof(float);
  const auto* a = static_cast<const T*>(w.lowrank_a);
  const auto* b = static_cast<const T*>(w.lowrank_b);
  if (lim.cooperative) {
    p.phases = 3;
    void* args[] = {const_cast<T**>(&x), const_cast<T**>(&a), const_cast<T**>(&b), &partial, &y,
                    &p};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(lowrank_kernel<T, V>),
                                       dim3(grid), dim3(kThreads), args, smem, stream);
  }
  p.phases = 1;
  lowrank_kernel<T, V><<<grid, kThreads, 0, stream>>>(x, a, b, partial, y, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  p.phases = 2;
  lowrank_kernel<T, V><<<grid, kThreads, smem, stream>>>(x, a, b, partial, y, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lowrank(const LowRankView& w, const void* x, int64_t B, float* partial,
                           void* y, cudaStream_t stream) {
  if (B == 0 || w.N == 0) return cudaSuccess;
  if (B > kMaxLowRankRows || B * w.r > kMaxLowRankSharedFloats) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(w.dtype, [&](auto tx) {
    using T = decltype(tx);
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    // Rows start on 16-byte boundaries only when K and r are multiples of
    // the vector width (and the base pointers are aligned).
    const bool vec = w.K % kVec == 0 && w.r % kVec == 0 && aligned16(x) &&
                     aligned16(w.lowrank_a) && aligned16(w.lowrank_b);
    const auto* xt = static_cast<const T*>(x);
    auto* yt = static_cast<T*>(y);
    err = vec ? launch_typed<T, kVec>(w, xt, B, partial, yt, stream)
              : launch_typed<T, 1>(w, xt, B, partial, yt, stream);
  });
  return err;
}

}  // namespace qdec::cuda
