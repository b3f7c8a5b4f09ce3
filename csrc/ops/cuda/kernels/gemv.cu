// Torch-free CUDA kernels for the packed base weight: dequantize and the
// batch <= 16 GEMV. Launchers are declared in qdec/cuda_kernels.h.
//
// The GEMV is bound by reading the packed weight once (0.375 bytes a value at
// 3 bits), so it is built for bytes in flight and cheap decode: 16-/8-byte
// loads where the width allows, several rows per thread loaded before use,
// x read once per block and shared by those rows, and the decode of
// qdec/gemv_block.h (one integer and two float ops per value). Accumulation
// is float32 throughout.
#include "ops/cuda/kernels/convert.cuh"
#include "qdec/bitpack.h"
#include "qdec/cuda_kernels.h"
#include "qdec/gemv_block.h"

namespace qdec::cuda {
namespace {

constexpr int kWarp = 32;

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

// ---- batch <= 16 GEMV ------------------------------------------------------
// A CTA of kGemvThreads threads owns kGemvRows consecutive output rows of one
// activation row (grid.y = batch); its threads split the row's 32-value blocks
// (thread t takes blocks t, t + 128, ...), so at K = 4096 every thread loads
// one block of each of its 4 rows at once. The per-block arithmetic is
// qdec/gemv_block.h (host-tested); partial sums are reduced by warp shuffles
// and then across warps through shared memory, in a fixed order (no atomics,
// so repeated calls and graph replays give the same bits).
constexpr int kGemvThreads = 128;
constexpr int kGemvRows = 4;

// The BITS words of one packed block, with the widest loads its alignment
// allows: a block starts at a multiple of BITS words, so 16-byte loads for
// BITS % 4 == 0 and 8-byte loads for BITS % 2 == 0, given a 16-byte aligned
// base (checked by the launcher). Odd widths load word by word; a warp's
// loads still cover one contiguous span.
template <int BITS>
__device__ __forceinline__ void load_block_words(const uint32_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  } else if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 2; ++i) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldg(p + i);
  }
}

// Two 16-bit values packed in a 32-bit word, as floats.
__device__ __forceinline__ void unpack_pair(uint32_t u, __half, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}
__device__ __forceinline__ void unpack_pair(uint32_t u, __nv_bfloat16, float* out) {
  out[0] = __uint_as_float(u << 16);  // bf16 is the high half of a float32
  out[1] = __uint_as_float(u & 0xffff0000u);
}

// x[c*32 .. c*32+31] as float, zero past K. `vec`: 16-byte loads are aligned
// (checked by the launcher); the last, partial block always goes element-wise.
template <typename T>
__device__ __forceinline__ void load_x_block(const T* xb, int64_t K, int64_t c, bool vec,
                                             float (&x)[kBlock]) {
  const int64_t k0 = c * kBlock;
  if (vec && k0 + kBlock <= K) {
    const uint4* p = reinterpret_cast<const uint4*>(xb + k0);
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int j = 0; j < kBlock / 4; ++j) {
        const uint4 v = __ldg(p + j);
        x[4 * j] = __uint_as_float(v.x), x[4 * j + 1] = __uint_as_float(v.y);
        x[4 * j + 2] = __uint_as_float(v.z), x[4 * j + 3] = __uint_as_float(v.w);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kBlock / 8; ++j) {
        const uint4 v = __ldg(p + j);
        unpack_pair(v.x, T{}, x + 8 * j);
        unpack_pair(v.y, T{}, x + 8 * j + 2);
        unpack_pair(v.z, T{}, x + 8 * j + 4);
        unpack_pair(v.w, T{}, x + 8 * j + 6);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kBlock; ++i) x[i] = k0 + i < K ? load_as_float(xb, k0 + i) : 0.f;
  }
}

template <int BITS, typename T, typename TO>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(PackedWeightView w, const T* __restrict__ x, bool vec_x, TO* __restrict__ out) {
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemvRows;
  const int64_t b = blockIdx.y;
  const T* xb = x + b * w.K;
  const T* scales = static_cast<const T*>(w.scales);
  const T* zeros = static_cast<const T*>(w.zeros);
  const int64_t blocks = (w.K + kBlock - 1) / kBlock;
  const int64_t blocks_per_group = (w.G + kBlock - 1) / kBlock;
  float sum[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) sum[r] = 0.f;
  gemv::gemv_thread<BITS, kGemvRows>(
      n0, w.N, blocks, blocks_per_group, threadIdx.x, kGemvThreads,
      [&](int64_t c, float (&xv)[kBlock]) { load_x_block(xb, w.K, c, vec_x, xv); },
      [&](int64_t n, int64_t c, uint32_t (&words)[BITS]) {
        load_block_words<BITS>(w.qweight + n * w.words_per_row + c * BITS, words);
      },
      [&](int64_t n, int64_t g, float& scale, float& zero) {
        scale = load_as_float(scales, n * w.groups + g);
        zero = zeros ? load_as_float(zeros, n * w.groups + g)
                     : static_cast<float>(1 << (BITS - 1));
      },
      sum);
  __shared__ float warp_sums[kGemvThreads / kWarp][kGemvRows];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
    float v = sum[r];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) warp_sums[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < kGemvRows && n0 + threadIdx.x < w.N) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kGemvThreads / kWarp; ++i) total += warp_sums[i][threadIdx.x];
    store_float(out, b * w.N + n0 + threadIdx.x, total);
  }
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
    dispatch_bits(w.bits, [&]<int BITS>() {
      dequantize_kernel<BITS, TS><<<grid, tpb, 0, stream>>>(w, out);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_gemv(const PackedWeightView& w, const void* x, DType x_dtype, int64_t B,
                        void* out, DType out_dtype, cudaStream_t stream) {
  if (w.N == 0 || B == 0) return cudaSuccess;
  // The glue guarantees a batch this small, one dtype for x and the scales,
  // an output in float32 or x's dtype, and a 16-byte aligned weight (vector
  // loads); anything else is a bug there.
  if (B > kMaxGemvRows || x_dtype != w.scale_dtype ||
      (out_dtype != DType::kFloat32 && out_dtype != x_dtype) ||
      reinterpret_cast<uintptr_t>(w.qweight) % 16 != 0)
    return cudaErrorInvalidValue;
  const int64_t x_size = x_dtype == DType::kFloat32 ? 4 : 2;
  // Row b starts at b*K elements: 16-byte loads need every row aligned.
  const bool vec_x =
      reinterpret_cast<uintptr_t>(x) % 16 == 0 && (B == 1 || (w.K * x_size) % 16 == 0);
  const dim3 grid(static_cast<unsigned>((w.N + kGemvRows - 1) / kGemvRows),
                  static_cast<unsigned>(B));
  dispatch_dtype(x_dtype, [&](auto tx) {
    using T = decltype(tx);
    dispatch_bits(w.bits, [&]<int BITS>() {
      // Written in x's dtype straight from the kernel for quantized_matmul
      // (no separate cast kernel: at batch 1 a launch costs as much as the
      // GEMV), or float32 for the compensation's combine epilogue.
      if (out_dtype == DType::kFloat32)
        gemv_kernel<BITS, T, float><<<grid, kGemvThreads, 0, stream>>>(
            w, static_cast<const T*>(x), vec_x, static_cast<float*>(out));
      else
        gemv_kernel<BITS, T, T><<<grid, kGemvThreads, 0, stream>>>(
            w, static_cast<const T*>(x), vec_x, static_cast<T*>(out));
    });
  });
  return cudaGetLastError();
}

}  // namespace qdec::cuda
