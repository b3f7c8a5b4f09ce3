// AVX2 + FMA level of the CPU decode kernels (interface and math:
// csrc/include/qdec/cpu_decode.h; loops: decode_loops.h).
//
// Decoding 16 codes of any width 2..8: the 16 values of half a block occupy
// 2*BITS bytes starting on a byte boundary. Broadcast those bytes to both
// 128-bit lanes; a byte shuffle puts the two bytes holding value i into
// 16-bit lane i; a multiply by 2^(16 - shift_i - BITS) moves the value's top
// bit to bit 15 (dropping everything above it) and a shift right by 16 - BITS
// leaves the code. Four instructions for 16 codes, whatever BITS is.
#include <immintrin.h>

#include <cstdint>

#include "qdec/cpu_decode.h"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace qdec::cpu::avx2 {
namespace {

struct Vec {
  struct Codes {
    __m256i lo, hi;  // values 0..15 and 16..31 of the block, one per 16-bit lane
  };

  template <int BITS>
  struct Decoder {
    __m256i shuffle, multiplier;
    Decoder() {
      alignas(32) uint8_t shuf[32];
      alignas(32) uint16_t mul[16];
      for (int i = 0; i < 16; ++i) {
        const int lane = i / 8, j = i % 8;
        const int bit = BITS * i, byte = bit >> 3, shift = bit & 7;
        shuf[16 * lane + 2 * j] = static_cast<uint8_t>(byte);
        // 0x80 makes pshufb write a zero; the byte is above the value anyway.
        shuf[16 * lane + 2 * j + 1] = static_cast<uint8_t>(byte + 1 < 16 ? byte + 1 : 0x80);
        mul[i] = static_cast<uint16_t>(1u << (16 - shift - BITS));
      }
      shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(shuf));
      multiplier = _mm256_load_si256(reinterpret_cast<const __m256i*>(mul));
    }
    __m256i half(const uint8_t* p) const {
      const __m256i v =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(v, shuffle), multiplier),
                               16 - BITS);
    }
    Codes decode(const uint8_t* block) const { return {half(block), half(block + 2 * BITS)}; }
  };
  // Bytes decode reads from a block's start: half() loads 16 bytes from byte
  // 2*BITS, past the block for BITS < 8 (two blocks further at BITS = 2).
  template <int BITS>
  static constexpr int kReadBytes = 2 * BITS + 16;

  using IAcc = __m256i;
  static IAcc zero_i() { return _mm256_setzero_si256(); }
  static IAcc madd(IAcc acc, const Codes& q, const int16_t* x) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(q.lo, x0),
                                                  _mm256_madd_epi16(q.hi, x1)));
  }

  using FAcc = __m256;
  static FAcc zero_f() { return _mm256_setzero_ps(); }
  static FAcc fma(FAcc acc, IAcc v, float s) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(s), acc);
  }
  static FAcc fma_f(FAcc a, float s, FAcc b) { return _mm256_fmadd_ps(a, _mm256_set1_ps(s), b); }
  static float hsum(FAcc v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // The 8 codes of 16-bit lanes [8h, 8h + 8) as float32.
  static __m256 eighth(const Codes& q, int h) {
    const __m256i v = h < 2 ? q.lo : q.hi;
    const __m128i part = (h & 1) ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v);
    return _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(part));
  }
  static void axpy(const Codes& q, float a, float* out) {
    const __m256 va = _mm256_set1_ps(a);
    for (int h = 0; h < 4; ++h)
      _mm256_storeu_ps(out + 8 * h, _mm256_fmadd_ps(va, eighth(q, h), _mm256_loadu_ps(out + 8 * h)));
  }
  static void dequantize(const Codes& q, float zero, float scale, float* out, int len) {
    const __m256 vz = _mm256_set1_ps(zero), vs = _mm256_set1_ps(scale);
    alignas(32) float tmp[32];
    float* dst = len == 32 ? out : tmp;
    // (q - z) * s, the reference's two roundings (not one FMA).
    for (int h = 0; h < 4; ++h)
      _mm256_storeu_ps(dst + 8 * h, _mm256_mul_ps(_mm256_sub_ps(eighth(q, h), vz), vs));
    if (len < 32)
      for (int i = 0; i < len; ++i) out[i] = tmp[i];
  }
};

#include "decode_loops.h"

}  // namespace

const DecodeKernels kKernels = make_kernels<Vec>();

}  // namespace qdec::cpu::avx2

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#else  // not x86-64: best_isa() never picks this level

namespace qdec::cpu::avx2 {
const DecodeKernels kKernels{nullptr, nullptr, nullptr};
}

#endif
