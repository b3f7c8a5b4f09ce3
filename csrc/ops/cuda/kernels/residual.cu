// Torch-free CUDA kernels for the residual store: gather of dequantized rows,
// and the compensation axpy sum_j x[b, j] * R[:, j] over selected j, as
// partial sums over splits of the k channels plus a combine epilogue.
//
// Why this shape: a selected channel's residual is one contiguous row of
// ceil(N/32)*BITS words, so each thread owns one 32-output block and adjacent
// threads read adjacent BITS-word chunks of the row: the warp's reads from
// (possibly host-mapped) memory are contiguous, which is what zero-copy PCIe
// reads need to approach the link's bandwidth. In the axpy a thread owns its
// 32 outputs of row b for one split of the k selected rows and accumulates in
// float32 registers; splits write separate partial sums, which the combine
// adds in a fixed order, so there are no atomics and results are reproducible.
#include <algorithm>

#include "ops/cuda/kernels/convert.cuh"
#include "qdec/bitpack.h"
#include "qdec/cuda_kernels.h"

namespace qdec::cuda {
namespace {

template <int BITS>
__global__ void residual_gather_kernel(ResidualView r, const int64_t* channels, int64_t rows,
                                       float* out) {
  const int64_t blocks = (r.N + kBlock - 1) / kBlock;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= blocks) return;
  // grid.y is capped at 65535, so rows are strided over it.
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
  const int64_t j = channels[row];
  const int64_t n0 = c * kBlock;
  float* dst = out + row * r.N + n0;
  const int len = static_cast<int>(min(static_cast<int64_t>(kBlock), r.N - n0));
  if (j < 0 || j >= r.K) {
    for (int i = 0; i < len; ++i) dst[i] = 0.f;
    continue;
  }
  uint32_t words[BITS];
#pragma unroll
  for (int i = 0; i < BITS; ++i) words[i] = r.residual[j * r.words_per_row + c * BITS + i];
  const float offset = static_cast<float>(1 << (BITS - 1));
#pragma unroll
  for (int i = 0; i < kBlock; ++i)
    if (i < len) dst[i] = (static_cast<float>(unpack_one<BITS>(words, i)) - offset) * r.scales[n0 + i];
  }
}

// Selected rows a thread reads before using any: a zero-copy read of host
// memory takes a PCIe round trip (~1-2 us), so reading the split's rows one
// after another would cost that many round trips; with splits = ceil(k/4),
// a thread's rows (k <= 128) are all in flight at once.
constexpr int kRowsInFlight = 4;

template <int BITS, typename TX>
__global__ void residual_axpy_partial_kernel(ResidualView r, const int64_t* channels, int64_t k,
                                             const TX* x, int64_t B, int64_t K,
                                             float* partial) {
  const int64_t blocks = (r.N + kBlock - 1) / kBlock;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= blocks) return;
  const int64_t n0 = c * kBlock;
  const int len = static_cast<int>(min(static_cast<int64_t>(kBlock), r.N - n0));
  const float offset = static_cast<float>(1 << (BITS - 1));
  const int64_t split = blockIdx.z, splits = gridDim.z;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float sum[kBlock];
#pragma unroll
    for (int i = 0; i < kBlock; ++i) sum[i] = 0.f;
    // Rows s = split, split + splits, ... < k, in that order, kRowsInFlight
    // at a time: all loads of a batch are issued before the first use.
    for (int64_t s0 = split; s0 < k; s0 += splits * kRowsInFlight) {
      int64_t j[kRowsInFlight];
      float xv[kRowsInFlight];
      uint32_t words[kRowsInFlight][BITS];
#pragma unroll
      for (int t = 0; t < kRowsInFlight; ++t) {
        const int64_t s = s0 + t * splits;
        j[t] = s < k ? channels[b * k + s] : -1;
      }
#pragma unroll
      for (int t = 0; t < kRowsInFlight; ++t) {
        const bool valid = j[t] >= 0 && j[t] < K;  // out-of-range channels are skipped
        xv[t] = valid ? load_as_float(x, b * K + j[t]) : 0.f;
#pragma unroll
        for (int i = 0; i < BITS; ++i)
          words[t][i] = valid ? r.residual[j[t] * r.words_per_row + c * BITS + i] : 0u;
      }
#pragma unroll
      for (int t = 0; t < kRowsInFlight; ++t) {
        if (j[t] < 0 || j[t] >= K) continue;  // same sums as skipping the row
#pragma unroll
        for (int i = 0; i < kBlock; ++i)
          sum[i] += xv[t] * (static_cast<float>(unpack_one<BITS>(words[t], i)) - offset);
      }
    }
    // The per-output scale factors out of the sum over channels.
    float* dst = partial + (split * B + b) * r.N + n0;
#pragma unroll
    for (int i = 0; i < kBlock; ++i)
      if (i < len) dst[i] = sum[i] * r.scales[n0 + i];
  }
}

template <typename TO>
__global__ void compensation_combine_kernel(const float* acc, const float* partial,
                                            int64_t splits, int64_t total, TO* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  float v = acc[i];
  for (int64_t z = 0; z < splits; ++z) v += partial[z * total + i];
  store_float(out, i, v);
}

}  // namespace

cudaError_t launch_residual_gather(const ResidualView& r, const int64_t* channels, int64_t rows,
                                   float* out, cudaStream_t stream) {
  const int64_t blocks = (r.N + kBlock - 1) / kBlock;
  if (rows == 0 || blocks == 0) return cudaSuccess;
  const int tpb = 128;
  const dim3 grid(static_cast<unsigned>((blocks + tpb - 1) / tpb),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  dispatch_bits(r.bits, [&]<int BITS>() {
    residual_gather_kernel<BITS><<<grid, tpb, 0, stream>>>(r, channels, rows, out);
  });
  return cudaGetLastError();
}

// The axpy's launch shape, one place for the launcher and for the SM budget:
// a thread per 32-output block, kAxpyThreads threads a CTA, grid.y = rows.
namespace {
constexpr int kAxpyThreads = 128;
dim3 axpy_grid(int64_t N, int64_t B, int64_t splits) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  return dim3(static_cast<unsigned>((blocks + kAxpyThreads - 1) / kAxpyThreads),
              static_cast<unsigned>(std::min<int64_t>(B, 65535)),
              static_cast<unsigned>(std::max<int64_t>(splits, 1)));
}
}  // namespace

int64_t residual_axpy_splits(int64_t k, int64_t N, int64_t B, int64_t sm_budget) {
  // ~4 selected rows per thread: enough independent loads per CTA to cover
  // PCIe latency, few enough partial sums for the combine to stay trivial.
  const int64_t splits = std::clamp<int64_t>((k + 3) / 4, 1, 32);
  if (sm_budget <= 0) return splits;
  // Fewer CTAs per split leave more SMs to the GEMV beside it.
  const dim3 one_split = axpy_grid(N, B, 1);
  const int64_t per_split = std::max<int64_t>(1, int64_t{one_split.x} * one_split.y);
  return std::clamp<int64_t>(sm_budget / per_split, 1, splits);
}

cudaError_t launch_residual_axpy_partial(const ResidualView& r, const int64_t* channels,
                                         int64_t k, const void* x, DType x_dtype, int64_t B,
                                         int64_t K, int64_t splits, float* partial,
                                         cudaStream_t stream) {
  if (B == 0 || r.N == 0) return cudaSuccess;
  const dim3 grid = axpy_grid(r.N, B, splits);
  dispatch_dtype(x_dtype, [&](auto tx) {
    using TX = decltype(tx);
    dispatch_bits(r.bits, [&]<int BITS>() {
      residual_axpy_partial_kernel<BITS, TX><<<grid, kAxpyThreads, 0, stream>>>(
          r, channels, k, static_cast<const TX*>(x), B, K, partial);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_compensation_combine(const float* acc, const float* partial, int64_t splits,
                                        int64_t B, int64_t N, void* out, DType out_dtype,
                                        cudaStream_t stream) {
  const int64_t total = B * N;
  if (total == 0) return cudaSuccess;
  const int tpb = 256;
  const auto grid = static_cast<unsigned>((total + tpb - 1) / tpb);
  dispatch_dtype(out_dtype, [&](auto to) {
    using TO = decltype(to);
    compensation_combine_kernel<TO><<<grid, tpb, 0, stream>>>(acc, partial, splits, total,
                                                              static_cast<TO*>(out));
  });
  return cudaGetLastError();
}

}  // namespace qdec::cuda
