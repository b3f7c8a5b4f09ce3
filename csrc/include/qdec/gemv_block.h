// The arithmetic core of the CUDA batch-1 GEMV (csrc/ops/cuda/kernels/gemv.cu),
// written host/device so the C++ tests check it on a machine with no GPU
// (tests/cpp/test_gemv_block.cpp runs it against a plain dequantize-and-dot).
//
// Why it looks like this. A batch-1 GEMV over 2..4-bit codes moves so few
// bytes per value that the decode, not the memory, becomes the limit: at
// 3 bits an H100 SM must retire ~38 values per clock to keep up with HBM.
// The textbook decode (shift, mask, int->float convert, subtract the zero,
// multiply by the scale, multiply-add with x) costs ~6 instructions a value,
// and the int->float convert runs at a quarter rate. Here each value costs
// one integer op and two float ops:
//   * q is turned into a float without a convert: OR-ing the masked code into
//     the mantissa of 2^23 (bit pattern 0x4B000000) and subtracting 2^23
//     gives q * 2^pos exactly, where pos is the bit position the code already
//     sits at in its word, so no shift is needed per value either;
//   * x is pre-scaled by 2^-pos once per block (shared by every row a thread
//     handles, and exact: a power of two), so q * 2^pos * x * 2^-pos = q * x;
//   * the scale and zero are applied once per 32-value block, not per value:
//       sum_i (q_i - z) s x_i = s * (sum_i q_i x_i - z * sum_i x_i),
//     with sum_i x_i also computed once per block for all rows.
// Everything is float32; the result differs from the CPU kernel's
// per-value dequantize only in rounding order (tests state the tolerance).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "qdec/bitpack.h"

namespace qdec::gemv {

// Where value i of a BITS-wide block is decoded from, all compile-time:
//   kInWord:  bits [sh, sh+BITS) of word w, wholly below bit 23 (mantissa);
//   kHighHalf: the same bits, but reaching past bit 22: decoded from w >> 16;
//   kStraddle: the value crosses into word w+1 (3-, 5-, 6-, 7-bit layouts):
//              the two words are funnel-shifted so it starts at bit 0.
enum class Slot { kInWord, kHighHalf, kStraddle };

constexpr int value_word(int bits, int i) { return (bits * i) >> 5; }
constexpr int value_shift(int bits, int i) { return (bits * i) & 31; }
constexpr Slot value_slot(int bits, int i) {
  return value_shift(bits, i) + bits > 32   ? Slot::kStraddle
         : value_shift(bits, i) + bits > 23 ? Slot::kHighHalf
                                            : Slot::kInWord;
}
// Bit position of the code inside the float mantissa it is OR-ed into.
constexpr int value_pos(int bits, int i) {
  return value_slot(bits, i) == Slot::kInWord     ? value_shift(bits, i)
         : value_slot(bits, i) == Slot::kHighHalf ? value_shift(bits, i) - 16
                                                  : 0;
}
// 2^-pos, exactly (pos <= 22).
constexpr float value_unscale(int bits, int i) {
  return 1.0f / static_cast<float>(1u << value_pos(bits, i));
}

QDEC_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// q_i * 2^pos(i) as an exact float, for value i of the block `words`.
template <int BITS, int I>
QDEC_HOST_DEVICE float code_times_pow2(const uint32_t (&words)[BITS]) {
  constexpr int w = value_word(BITS, I);
  constexpr int pos = value_pos(BITS, I);
  constexpr uint32_t mask = ((1u << BITS) - 1u) << pos;
  uint32_t src;
  if constexpr (value_slot(BITS, I) == Slot::kInWord) {
    src = words[w];
  } else if constexpr (value_slot(BITS, I) == Slot::kHighHalf) {
    src = words[w] >> 16;
  } else {
    constexpr int sh = value_shift(BITS, I);
    src = (words[w] >> sh) | (words[w + 1] << (32 - sh));  // one SHF.R on the GPU
  }
  return bits_to_float((src & mask) | 0x4B000000u) - 8388608.0f;
}

// Returns sum_i x[i], then scales x[i] by 2^-pos(i) in place (the form
// block_dot takes). Done once per block and shared by every row a thread
// multiplies with this block of x.
template <int BITS>
QDEC_HOST_DEVICE float prescale_block(float (&x)[kBlock]) {
  float sum = 0.f;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < kBlock; ++i) {
    sum += x[i];
    x[i] *= value_unscale(BITS, i);
  }
  return sum;
}

namespace detail {
template <int BITS, int I>
QDEC_HOST_DEVICE void dot_step(const uint32_t (&words)[BITS], const float (&xs)[kBlock],
                               float (&acc)[4]) {
  if constexpr (I < kBlock) {
    // Four independent chains so consecutive FMAs do not wait on each other.
    acc[I & 3] = fmaf(code_times_pow2<BITS, I>(words), xs[I], acc[I & 3]);
    dot_step<BITS, I + 1>(words, xs, acc);
  }
}
}  // namespace detail

// sum_i q_i * x_i over one block, given xs = x prescaled by prescale_block.
template <int BITS>
QDEC_HOST_DEVICE float block_dot(const uint32_t (&words)[BITS], const float (&xs)[kBlock]) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  detail::dot_step<BITS, 0>(words, xs, acc);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// One block's contribution to an output: s * (sum q x - z * sum x).
QDEC_HOST_DEVICE float block_term(float dot, float xsum, float scale, float zero) {
  return scale * fmaf(-zero, xsum, dot);
}

// One thread's share of rows n0 .. n0+ROWS-1 (rows >= N skipped) of W x for
// one activation row: blocks c = first, first + stride, ... < blocks. The
// loaders hide where data lives (device vector loads in the kernel, plain
// arrays in the host test):
//   load_x(c, float (&x)[32])           x[c*32 .. c*32+31], zero past K;
//   load_words(n, c, uint32_t (&w)[BITS]) the packed block (n, c);
//   params(n, g, float& scale, float& zero) row n's parameters of group g
//                                       (g = c / blocks_per_group, found once
//                                       per block for all rows: groups are
//                                       whole blocks, G % 32 == 0 or G = K).
// All rows' words are loaded before any is used, so ROWS*BITS independent
// loads are in flight per thread.
template <int BITS, int ROWS, typename LoadX, typename LoadWords, typename Params>
QDEC_HOST_DEVICE void gemv_thread(int64_t n0, int64_t N, int64_t blocks,
                                  int64_t blocks_per_group, int64_t first, int64_t stride, LoadX&& load_x, LoadWords&& load_words,
                                  Params&& params, float (&acc)[ROWS]) {
  for (int64_t c = first; c < blocks; c += stride) {
    uint32_t words[ROWS][BITS];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int r = 0; r < ROWS; ++r) {
      // Rows past N re-read row N-1 (always valid) instead of branching.
      const int64_t n = n0 + r < N ? n0 + r : N - 1;
      load_words(n, c, words[r]);
    }
    float xs[kBlock];
    load_x(c, xs);
    const float xsum = prescale_block<BITS>(xs);
    const int64_t g = c / blocks_per_group;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int r = 0; r < ROWS; ++r) {
      const int64_t n = n0 + r < N ? n0 + r : N - 1;
      float scale, zero;
      params(n, g, scale, zero);
      acc[r] += block_term(block_dot<BITS>(words[r], xs), xsum, scale, zero);
    }
  }
}

}  // namespace qdec::gemv
