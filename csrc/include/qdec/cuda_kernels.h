// Torch-free CUDA launchers: raw pointers, sizes and a stream. The ATen glue
// (csrc/ops/cuda/<op>.cu) validates arguments, allocates outputs and calls
// these; the kernels themselves are in csrc/ops/cuda/kernels/.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace qdec::cuda {

// Element type of activations, scales and zeros (the glue maps torch dtypes).
enum class DType { kFloat32, kFloat16, kBFloat16 };

// A packed base weight W[N, K] in device memory (layout: qdec/bitpack.h).
struct PackedWeightView {
  const uint32_t* qweight;  // [N, words_per_row]
  const void* scales;       // [N, groups], dtype `scale_dtype`
  const void* zeros;        // [N, groups] or nullptr (symmetric)
  DType scale_dtype;
  int64_t N, K, G, groups, words_per_row;
  int bits;
};

// A residual store R^T[K, N]; `residual` may be a device pointer or the device
// alias of mapped pinned host memory (read zero-copy over PCIe).
struct ResidualView {
  const uint32_t* residual;  // [K, words_per_row]
  const float* scales;       // [N], device memory
  int64_t K, N, words_per_row;
  int bits;
};

// W as dense float32 [N, K].
cudaError_t launch_dequantize(const PackedWeightView& w, float* out, cudaStream_t stream);

// out[b, n] = sum_k x[b, k] * W[n, k], accumulated in float32 and stored
// in out_dtype (float32 or x_dtype), for B <= kMaxGemvRows.
constexpr int64_t kMaxGemvRows = 16;
cudaError_t launch_gemv(const PackedWeightView& w, const void* x, DType x_dtype, int64_t B,
                        void* out, DType out_dtype, cudaStream_t stream);

// out[r, :] = R[:, channels[r]] (float32 [rows, N]); out-of-range channels
// give zero rows (no host-side check, so the op stays graph-capturable).
cudaError_t launch_residual_gather(const ResidualView& r, const int64_t* channels, int64_t rows,
                                   float* out, cudaStream_t stream);

// out[b, :k] = indices of the k largest |x[b, :]|, descending, ties to the
// smaller index, NaN as +inf (qdec.reference.outlier_select_ref), one launch
// for k <= kMaxSelectK (the winners are sorted in shared memory); larger k
// returns cudaErrorInvalidValue and the caller sorts instead.
constexpr int64_t kMaxSelectK = 2048;
cudaError_t launch_outlier_select(const void* x, DType x_dtype, int64_t B, int64_t K, int64_t k,
                                  int64_t* out, cudaStream_t stream);

// Dynamic compensation in two launches, deterministic (no atomics):
//  1. partial[z, b, :] = sum over i = z, z + splits, ... < k of
//     x[b, channels[b, i]] * R[:, channels[b, i]]   (out-of-range channels skipped);
//     splitting k over `splits` CTAs keeps many independent zero-copy reads in
//     flight instead of one thread walking all k rows of the store serially.
//  2. out[b, n] = acc[b, n] + sum_z partial[z, b, n], cast to out_dtype, summed
//     in z order (the GEMV's epilogue; same bits on every run and in a graph).
// partial is float32 [splits, B, N]; every element is written by step 1.
// The number of splits of k: about 4 selected rows per thread, at most 32,
// and, when sm_budget > 0, at most as many as keep the kernel's thread blocks
// (ceil(N / 4096) * B per split) within sm_budget (at least one split).
int64_t residual_axpy_splits(int64_t k, int64_t N, int64_t B, int64_t sm_budget);
cudaError_t launch_residual_axpy_partial(const ResidualView& r, const int64_t* channels,
                                         int64_t k, const void* x, DType x_dtype, int64_t B,
                                         int64_t K, int64_t splits, float* partial,
                                         cudaStream_t stream);
cudaError_t launch_compensation_combine(const float* acc, const float* partial, int64_t splits,
                                        int64_t B, int64_t N, void* out, DType out_dtype,
                                        cudaStream_t stream);

// A static low-rank term y = L_A (L_B x): L_A [N, r], L_B [r, K], row-major,
// in device memory, with x and y in the same dtype.
struct LowRankView {
  const void* lowrank_a;  // [N, r]
  const void* lowrank_b;  // [r, K]
  DType dtype;
  int64_t N, K, r;
};

// The one-launch kernel serves B <= kMaxLowRankRows rows whose float32
// t = L_B x (B*r values) fits in shared memory; the glue uses GEMMs otherwise.
constexpr int64_t kMaxLowRankRows = 16;
constexpr int64_t kMaxLowRankSharedFloats = 12288;  // 48 KiB, the default limit

// Phase 1 splits K into chunks (a multiple of 256 values, so every lane's
// 16-byte loads stay inside one chunk) so that about 1024 warps share
// L_B's r*K values, but at most 1024/r chunks: every block of phase 2 sums
// the chunk partials of t, which must stay cheap. Depends only on the shape,
// so results do not depend on the GPU's SM count.
inline int64_t lowrank_chunk(int64_t K, int64_t r) {
  const int64_t want =
      std::max<int64_t>(1, std::min<int64_t>((K + 255) / 256, 1024 / std::max<int64_t>(r, 1)));
  const int64_t chunk = ((std::max<int64_t>(K, 1) + want - 1) / want + 255) / 256 * 256;
  return std::max<int64_t>(chunk, 256);
}
inline int64_t lowrank_splits(int64_t K, int64_t r) {
  return std::max<int64_t>(1, (K + lowrank_chunk(K, r) - 1) / lowrank_chunk(K, r));
}

// y[b, :] = L_A (L_B x[b, :]) for b < B, accumulated in float32, in ONE
// launch (cooperative grid; two launches of the same kernel where cooperative
// launch is unsupported). `partial` is float32 scratch of
// lowrank_splits(K, r) * B * r values. Needs B <= kMaxLowRankRows and
// B * r <= kMaxLowRankSharedFloats.
cudaError_t launch_lowrank(const LowRankView& w, const void* x, int64_t B, float* partial,
                           void* y, cudaStream_t stream);

}  // namespace qdec::cuda
