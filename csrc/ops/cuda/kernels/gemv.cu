// Torch-free CUDA kernels for the packed base weight: dequantize and the
// batch <= 16 GEMV. Launchers are declared in qdec/cuda_kernels.h.
//
// Why this shape: a batch-1 GEMV is bound by reading the packed weight, so
// each warp owns one output row and its lanes stream consecutive 32-value
// blocks (BITS words each: adjacent lanes read adjacent words, so a warp's
// loads are contiguous). Codes are decoded in registers (BITS is a template
// constant, so every shift is an immediate), scaled once per block (a block
// never spans two groups), and multiplied with up to 16 activation rows so
// small batches reuse the decoded weights. Accumulation is float32.
#include "ops/cuda/kernels/convert.cuh"
#include "qdec/bitpack.h"
#include "qdec/cuda_kernels.h"

namespace qdec::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <int BITS, typename TS>
__device__ __forceinline__ void block_params(const PackedWeightView& w, int64_t n, int64_t c,
                                             float& scale, float& zero) {
  const int64_t g = (c * kBlock) / w.G;
  scale = load_as_float(static_cast<const TS*>(w.scales), n * w.groups + g);
  zero = w.zeros ? load_as_float(static_cast<const TS*>(w.zeros), n * w.groups + g)
                 : static_cast<float>(1 << (BITS - 1));
}

template <int BITS, typename TS>
__global__ void dequantize_kernel(PackedWeightView w, float* out) {
  const int64_t blocks = (w.K + kBlock - 1) / kBlock;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= w.N * blocks) return;
  const int64_t n = idx / blocks, c = idx % blocks;
  uint32_t words[BITS];
#pragma unroll
  for (int i = 0; i < BITS; ++i) words[i] = w.qweight[n * w.words_per_row + c * BITS + i];
  float scale, zero;
  block_params<BITS, TS>(w, n, c, scale, zero);
  const int64_t k0 = c * kBlock;
#pragma unroll
  for (int i = 0; i < kBlock; ++i) {
    if (k0 + i < w.K)
      out[n * w.K + k0 + i] = (static_cast<float>(unpack_one<BITS>(words, i)) - zero) * scale;
  }
}

template <int BITS, typename TS, typename TX>
__global__ void gemv_kernel(PackedWeightView w, const TX* __restrict__ x, int64_t B,
                            float* __restrict__ acc) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= w.N) return;
  float sum[kMaxGemvRows];
#pragma unroll
  for (int b = 0; b < kMaxGemvRows; ++b) sum[b] = 0.f;
  const int64_t blocks = (w.K + kBlock - 1) / kBlock;
  const uint32_t* row = w.qweight + n * w.words_per_row;
  for (int64_t c = lane; c < blocks; c += kWarp) {
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = __ldg(row + c * BITS + i);
    float scale, zero;
    block_params<BITS, TS>(w, n, c, scale, zero);
    const int64_t k0 = c * kBlock;
    const int len = static_cast<int>(min(static_cast<int64_t>(kBlock), w.K - k0));
#pragma unroll
    for (int i = 0; i < kBlock; ++i) {
      if (i < len) {
        const float wv = (static_cast<float>(unpack_one<BITS>(words, i)) - zero) * scale;
#pragma unroll
        for (int b = 0; b < kMaxGemvRows; ++b)
          if (b < B) sum[b] += wv * load_as_float(x, b * w.K + k0 + i);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < kMaxGemvRows; ++b) {
    if (b >= B) break;
    float v = sum[b];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) acc[b * w.N + n] = v;
  }
}

template <typename F>
void dispatch_bits_host(int bits, F&& f) {
  dispatch_bits(bits, f);
}

}  // namespace

cudaError_t launch_dequantize(const PackedWeightView& w, float* out, cudaStream_t stream) {
  const int64_t blocks = (w.K + kBlock - 1) / kBlock;
  const int64_t threads = w.N * blocks;
  if (threads == 0) return cudaSuccess;
  const int tpb = 256;
  const auto grid = static_cast<unsigned>((threads + tpb - 1) / tpb);
  dispatch_dtype(w.scale_dtype, [&](auto ts) {
    using TS = decltype(ts);
    dispatch_bits_host(w.bits, [&]<int BITS>() {
      dequantize_kernel<BITS, TS><<<grid, tpb, 0, stream>>>(w, out);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_gemv(const PackedWeightView& w, const void* x, DType x_dtype, int64_t B,
                        float* acc, cudaStream_t stream) {
  if (w.N == 0 || B == 0) return cudaSuccess;
  if (B > kMaxGemvRows) return cudaErrorInvalidValue;
  const auto grid = static_cast<unsigned>((w.N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  dispatch_dtype(w.scale_dtype, [&](auto ts) {
    using TS = decltype(ts);
    dispatch_dtype(x_dtype, [&](auto tx) {
      using TX = decltype(tx);
      dispatch_bits_host(w.bits, [&]<int BITS>() {
        gemv_kernel<BITS, TS, TX><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
            w, static_cast<const TX*>(x), B, acc);
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace qdec::cuda
