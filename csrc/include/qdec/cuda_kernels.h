// Torch-free CUDA launchers: raw pointers, sizes and a stream. The ATen glue
// (csrc/ops/cuda/<op>.cu) validates arguments, allocates outputs and calls
// these; the kernels themselves are in csrc/ops/cuda/kernels/.
#pragma once

#include <cuda_runtime.h>

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

// acc[b, n] = sum_k x[b, k] * W[n, k] in float32, for B <= kMaxGemvRows.
constexpr int64_t kMaxGemvRows = 16;
cudaError_t launch_gemv(const PackedWeightView& w, const void* x, DType x_dtype, int64_t B,
                        float* acc, cudaStream_t stream);

// out[r, :] = R[:, channels[r]] (float32 [rows, N]); out-of-range channels
// give zero rows (no host-side check, so the op stays graph-capturable).
cudaError_t launch_residual_gather(const ResidualView& r, const int64_t* channels, int64_t rows,
                                   float* out, cudaStream_t stream);

// acc[b, :] += sum_i x[b, channels[b, i]] * R[:, channels[b, i]] for b < B.
// Out-of-range channels are skipped.
cudaError_t launch_residual_axpy(const ResidualView& r, const int64_t* channels, int64_t k,
                                 const void* x, DType x_dtype, int64_t B, int64_t K, float* acc,
                                 cudaStream_t stream);

}  // namespace qdec::cuda
