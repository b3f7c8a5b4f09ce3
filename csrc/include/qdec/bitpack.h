// QDEC packed-code layout: the one definition shared by every CPU and CUDA
// kernel (the Python twin is qdec/packing.py).
//
// A matrix of unsigned codes q[rows, cols], each `bits` wide (2..8), is stored
// row by row. Each row is cut into blocks of 32 consecutive columns (the last
// block is zero-padded). A block occupies exactly `bits` int32 words; value i
// of the block sits at bit offset bits*i of the little-endian concatenation of
// those words, so values may straddle a word boundary (as GPTQ's 3-bit format
// does). Packed shape: int32 [rows, ceil(cols / 32) * bits].
//
// Why this layout: one template serves every width 2..8 at exactly bits/8 bytes
// per value, a block is a fixed, aligned unit (bits*4 bytes) that one thread can
// load with vector loads, and with BITS a compile-time constant every shift and
// mask below folds to a constant.
//
// Uses:
//   base weight  W[N, K]:   rows = N (outputs), cols = K (inputs),
//                           w = (q - zero[n, k / G]) * scale[n, k / G]
//   residual     R^T[K, N]: rows = K (one input channel is one contiguous row),
//                           cols = N, r = (q - 2^(bits-1)) * residual_scale[n]
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QDEC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QDEC_HOST_DEVICE inline
#endif

namespace qdec {

constexpr int kBlock = 32;  // values per packed block

// Number of int32 words one packed row of `cols` values occupies.
QDEC_HOST_DEVICE int64_t packed_row_words(int64_t cols, int bits) {
  return ((cols + kBlock - 1) / kBlock) * bits;
}

// Value `i` (0..31) of a block whose `BITS` words start at `words`.
template <int BITS>
QDEC_HOST_DEVICE uint32_t unpack_one(const uint32_t* words, int i) {
  const int lo = BITS * i;
  const int w = lo >> 5;
  const int sh = lo & 31;
  uint32_t v = words[w] >> sh;
  // A value straddles two words only when it starts in the last BITS-1 bits.
  if (sh + BITS > 32) v |= words[w + 1] << (32 - sh);
  return v & ((1u << BITS) - 1u);
}

// All 32 values of a block. With BITS and the unrolled loop constant, the
// branch in unpack_one disappears.
template <int BITS>
QDEC_HOST_DEVICE void unpack_block(const uint32_t* words, uint32_t (&out)[kBlock]) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < kBlock; ++i) out[i] = unpack_one<BITS>(words, i);
}

// Calls f(std::integral_constant-like BITS) for a runtime bit width 2..8.
// Returns false (and calls nothing) for other widths; callers check first.
template <typename F>
QDEC_HOST_DEVICE bool dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f.template operator()<2>(); return true;
    case 3: f.template operator()<3>(); return true;
    case 4: f.template operator()<4>(); return true;
    case 5: f.template operator()<5>(); return true;
    case 6: f.template operator()<6>(); return true;
    case 7: f.template operator()<7>(); return true;
    case 8: f.template operator()<8>(); return true;
    default: return false;
  }
}

}  // namespace qdec
