// Torch-free CUDA kernel of outlier_select: the k largest |x| of each row, in
// one kernel launch, exact, no calibration thresholds, no host round trip.
//
// Why this shape: one CTA per row (decode has B = 1..16 rows of K <= 14336).
// Every element gets a unique 64-bit key, |x|'s float bits (NaN -> +inf; for
// non-negative floats the bit pattern orders like the value) above the
// complemented index, so ties rank the smaller index first exactly as the
// reference's stable sort does, and "the k largest keys" is a set of exactly
// k elements. A most-significant-digit radix select (8-bit digits, shared
// histogram, one warp scanning 256 bins) narrows a key prefix until the
// elements under it are exactly the ones still needed; usually 2-4 passes over
// the row (read from L1/L2), at most 8. The k winners are gathered into
// shared memory and bitonic-sorted by descending key, so the output order is
// the reference's: descending |x|, ties by ascending index.
#include <cstdint>

#include "ops/cuda/kernels/convert.cuh"
#include "qdec/cuda_kernels.h"

namespace qdec::cuda {
namespace {

constexpr int kSelectThreads = 1024;
constexpr int kBins = 256;

__device__ __forceinline__ uint64_t select_key(float v, int64_t i) {
  uint32_t u = __float_as_uint(fabsf(v));
  if (u > 0x7f800000u) u = 0x7f800000u;  // NaN ranks as +inf
  return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
}

template <typename TX>
__global__ void __launch_bounds__(kSelectThreads)
    outlier_select_kernel(const TX* x, int64_t K, int64_t k, int64_t* out) {
  __shared__ uint32_t hist[kBins];
  __shared__ uint64_t chosen[kMaxSelectK];
  __shared__ uint32_t digit_s, need_s, bin_count_s, count_s;
  const TX* row = x + static_cast<int64_t>(blockIdx.x) * K;
  int64_t* dst = out + static_cast<int64_t>(blockIdx.x) * k;
  const int tid = threadIdx.x;

  // Invariant: the selection is every key whose masked prefix is above
  // `prefix`, plus the `need` largest keys whose masked prefix equals it.
  uint64_t prefix = 0, mask = 0;
  uint32_t need = static_cast<uint32_t>(k);
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = tid; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    // Magnitudes share few exponents, so most keys fall in a handful of bins:
    // lanes with the same bin add once per warp (__match_any_sync), instead
    // of up to 32 serialised shared-memory atomics on one address. The loop
    // bound is the same for every lane, so the warp stays converged.
    for (int64_t base = 0; base < K; base += blockDim.x) {
      const int64_t i = base + tid;
      bool counted = false;
      uint32_t bin = 0;
      if (i < K) {
        const uint64_t key = select_key(load_as_float(row, i), i);
        counted = (key & mask) == prefix;
        bin = static_cast<uint32_t>(key >> shift) & 0xffu;
      }
      const unsigned voters = __ballot_sync(0xffffffffu, counted);
      if (counted) {
        const unsigned peers = __match_any_sync(voters, bin);
        if (__ffs(peers) - 1 == static_cast<int>(tid & 31)) atomicAdd(&hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 255-8l down to 248-8l; a warp scan finds the bin
      // where the running count (from the top) reaches `need`.
      const int lane = tid;
      uint32_t c[8], total = 0;
#pragma unroll
      for (int q = 0; q < 8; ++q) total += (c[q] = hist[kBins - 1 - 8 * lane - q]);
      uint32_t incl = total;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      uint32_t before = incl - total;
      if (before < need && need <= incl) {  // exactly one lane
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (before + c[q] >= need) {
            digit_s = kBins - 1 - 8 * lane - q;
            need_s = need - before;
            bin_count_s = c[q];
            break;
          }
          before += c[q];
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(digit_s) << shift;
    mask |= static_cast<uint64_t>(0xff) << shift;
    need = need_s;
    const bool done = bin_count_s == need;  // every key under the prefix is taken
    __syncthreads();  // all threads read the shared results before they change
    if (done) break;
  }

  // Gather the k winners (any order), pad to a power of two with key 0, which
  // is below every real key (a real key's low word is 0xffffffff - i > 0).
  int n = 1;
  while (n < k) n <<= 1;
  if (tid == 0) count_s = 0;
  __syncthreads();
  for (int64_t i = tid; i < K; i += blockDim.x) {
    const uint64_t key = select_key(load_as_float(row, i), i);
    if ((key & mask) >= prefix) chosen[atomicAdd(&count_s, 1u)] = key;
  }
  for (int i = static_cast<int>(k) + tid; i < n; i += blockDim.x) chosen[i] = 0;
  __syncthreads();
  // Bitonic sort, descending.
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < n; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t a = chosen[i], b = chosen[j];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) {
            chosen[i] = b;
            chosen[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = tid; i < k; i += blockDim.x)
    dst[i] = static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(chosen[i]));
}

}  // namespace

cudaError_t launch_outlier_select(const void* x, DType x_dtype, int64_t B, int64_t K, int64_t k,
                                  int64_t* out, cudaStream_t stream) {
  if (k < 0 || k > kMaxSelectK || k > K || K > 0xffffffffLL) return cudaErrorInvalidValue;
  if (B == 0 || k == 0) return cudaSuccess;
  if (B > 0x7fffffffLL) return cudaErrorInvalidValue;
  dispatch_dtype(x_dtype, [&](auto tx) {
    using TX = decltype(tx);
    outlier_select_kernel<TX><<<static_cast<unsigned>(B), kSelectThreads, 0, stream>>>(
        static_cast<const TX*>(x), K, k, out);
  });
  return cudaGetLastError();
}

}  // namespace qdec::cuda
