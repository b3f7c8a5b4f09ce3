// AVX-512 (F, BW, VL, VBMI, VNNI) level of the CPU decode kernels (interface
// and math: csrc/include/qdec/cpu_decode.h; loops: decode_loops.h).
//
// Decoding a whole 32-value block of any width 2..8 in one register: a plain
// 32-byte load (the row's last block goes through a padded copy, RowBlocks);
// one VBMI byte permute puts the two bytes holding value i into 16-bit lane i;
// a per-lane shift right and a mask leave the code. A masked load of exactly
// the block's 4*BITS bytes needs no copy but measured 2x slower on Sapphire
// Rapids (the whole GEMV: 9.8 ms vs 5.6 ms at 14336x4096 W4 g128, one thread).
// VNNI's vpdpwssd fuses the multiply-add and the accumulate (vpmaddwd + vpaddd).
#include <immintrin.h>

#include <cstdint>

#include "qdec/cpu_decode.h"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push( \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")
#endif

namespace qdec::cpu::avx512 {
namespace {

struct Vec {
  using Codes = __m512i;  // the block's 32 codes, one per 16-bit lane

  template <int BITS>
  struct Decoder {
    __m512i permute, shifts, mask;
    Decoder() {
      alignas(64) uint8_t perm[64];
      alignas(64) uint16_t shift[32];
      for (int i = 0; i < 32; ++i) {
        const int bit = BITS * i, byte = bit >> 3;
        perm[2 * i] = static_cast<uint8_t>(byte);
        perm[2 * i + 1] = static_cast<uint8_t>(byte + 1);  // <= 32: a zero byte of the load
        shift[i] = static_cast<uint16_t>(bit & 7);
      }
      permute = _mm512_load_si512(perm);
      shifts = _mm512_load_si512(shift);
      mask = _mm512_set1_epi16(static_cast<int16_t>((1 << BITS) - 1));
    }
    // Lane i holds the byte pair starting at bit BITS*i; a per-lane shift
    // right by (BITS*i) mod 8 and a mask leave code i. (A multiply to the top
    // and a shift down did the same, but both run on port 0, which the
    // multiply-adds also need; the AND can issue on port 5.)
    Codes decode(const uint8_t* block) const {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
      const __m512i v = _mm512_permutexvar_epi8(permute, _mm512_zextsi256_si512(raw));
      return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), mask);
    }
  };
  // Bytes decode reads from a block's start (the next 1-3 blocks' too at
  // BITS < 8).
  template <int BITS>
  static constexpr int kReadBytes = 32;

  using IAcc = __m512i;
  static IAcc zero_i() { return _mm512_setzero_si512(); }
  static IAcc madd(IAcc acc, const Codes& q, const int16_t* x) {
    return _mm512_dpwssd_epi32(acc, q, _mm512_loadu_si512(x));
  }

  using FAcc = __m512;
  static FAcc zero_f() { return _mm512_setzero_ps(); }
  static FAcc fma(FAcc acc, IAcc v, float s) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(s), acc);
  }
  static FAcc fma_f(FAcc a, float s, FAcc b) { return _mm512_fmadd_ps(a, _mm512_set1_ps(s), b); }
  static float hsum(FAcc v) { return _mm512_reduce_add_ps(v); }

  // Codes [16h, 16h + 16) as float32.
  static __m512 half(const Codes& q, int h) {
    const __m256i part = h ? _mm512_extracti64x4_epi64(q, 1) : _mm512_castsi512_si256(q);
    return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(part));
  }
  static void axpy(const Codes& q, float a, float* out) {
    const __m512 va = _mm512_set1_ps(a);
    for (int h = 0; h < 2; ++h)
      _mm512_storeu_ps(out + 16 * h, _mm512_fmadd_ps(va, half(q, h), _mm512_loadu_ps(out + 16 * h)));
  }
  static void dequantize(const Codes& q, float zero, float scale, float* out, int len) {
    const __m512 vz = _mm512_set1_ps(zero), vs = _mm512_set1_ps(scale);
    const uint32_t keep = len >= 32 ? 0xffffffffu : ((1u << len) - 1u);
    for (int h = 0; h < 2; ++h) {
      // (q - z) * s, the reference's two roundings (not one FMA).
      const __m512 v = _mm512_mul_ps(_mm512_sub_ps(half(q, h), vz), vs);
      _mm512_mask_storeu_ps(out + 16 * h, static_cast<__mmask16>(keep >> (16 * h)), v);
    }
  }
};

#include "decode_loops.h"

}  // namespace

const DecodeKernels kKernels = make_kernels<Vec>();

}  // namespace qdec::cpu::avx512

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#else  // not x86-64: best_isa() never picks this level

namespace qdec::cpu::avx512 {
const DecodeKernels kKernels{nullptr, nullptr, nullptr};
}

#endif
