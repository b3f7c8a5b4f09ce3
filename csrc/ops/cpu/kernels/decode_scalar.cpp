// Portable C++ level of the CPU decode kernels (interface and math:
// csrc/include/qdec/cpu_decode.h): the fallback on CPUs without AVX2 and the
// plain statement of what the SIMD levels compute.
#include <algorithm>
#include <cstring>
#include <vector>

#include "qdec/bitpack.h"
#include "qdec/cpu_decode.h"

namespace qdec::cpu::scalar {
namespace {

template <int BITS>
void gemv(const LowBitWeight& w, const QuantizedActivations& x, int64_t n_begin, int64_t n_end,
          float* y) {
  const int64_t stride = x.blocks * 64;  // per block: 32 high, then 32 low terms
  const int64_t blocks_per_span = x.span / 32;
  std::vector<float> scale(w.groups), zero(w.groups);
  std::vector<uint8_t> codes(x.blocks * 32);  // one row, decoded once for all B rows of x
  uint32_t block[kBlock];
  for (int64_t n = n_begin; n < n_end; ++n) {
    load_row_params(w, n, scale.data(), zero.data());
    const uint32_t* row = w.qweight + n * w.words_per_row;
    for (int64_t c = 0; c < x.blocks; ++c) {
      unpack_block<BITS>(row + c * BITS, block);
      for (int i = 0; i < kBlock; ++i) codes[c * kBlock + i] = static_cast<uint8_t>(block[i]);
    }
    for (int64_t b = 0; b < x.B; ++b) {
      const int16_t* xq = x.xq + b * stride;
      const float* d = x.span_scale + b * x.spans;
      const float* xsum = x.group_sum + b * x.groups;
      float acc = 0.f, zero_term = 0.f;
      for (int64_t g = 0; g < x.groups; ++g) {
        const int64_t sp1 = std::min(x.spans, (g + 1) * x.spans_per_group);
        for (int64_t sp = g * x.spans_per_group; sp < sp1; ++sp) {
          const int64_t c0 = sp * blocks_per_span;
          const int64_t c1 = std::min(x.blocks, c0 + blocks_per_span);
          int32_t hi = 0, lo = 0;
          for (int64_t c = c0; c < c1; ++c)
            for (int i = 0; i < kBlock; ++i) {
              hi += static_cast<int32_t>(codes[c * kBlock + i]) * xq[c * 64 + i];
              lo += static_cast<int32_t>(codes[c * kBlock + i]) * xq[c * 64 + 32 + i];
            }
          const float f = scale[g] * d[sp];
          acc += f * static_cast<float>(hi) + (f * (1.f / 32768.f)) * static_cast<float>(lo);
        }
        zero_term += scale[g] * zero[g] * xsum[g];
      }
      y[b * w.N + n] = acc - zero_term;
    }
  }
}

template <int BITS>
void dequantize(const LowBitWeight& w, int64_t n_begin, int64_t n_end, float* out) {
  std::vector<float> scale(w.groups), zero(w.groups);
  uint32_t block[kBlock];
  const int64_t blocks = (w.K + kBlock - 1) / kBlock;
  for (int64_t n = n_begin; n < n_end; ++n) {
    load_row_params(w, n, scale.data(), zero.data());
    const uint32_t* row = w.qweight + n * w.words_per_row;
    float* o = out + n * w.K;
    for (int64_t c = 0; c < blocks; ++c) {
      unpack_block<BITS>(row + c * BITS, block);
      const int64_t k0 = c * kBlock;
      const int64_t g = k0 / w.G;
      const int64_t len = std::min<int64_t>(kBlock, w.K - k0);
      for (int64_t i = 0; i < len; ++i)
        o[k0 + i] = (static_cast<float>(block[i]) - zero[g]) * scale[g];
    }
  }
}

template <int BITS>
void residual_codes_axpy(const ResidualStore& r, const int64_t* channels, const float* alpha,
                         int64_t k, int64_t n_begin, int64_t n_end, float* acc) {
  uint32_t block[kBlock];
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t* row = r.residual + channels[i] * r.words_per_row;
    const float a = alpha[i];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlock) {
      unpack_block<BITS>(row + (n0 / kBlock) * BITS, block);
      const int64_t len = std::min<int64_t>(kBlock, n_end - n0);
      for (int64_t j = 0; j < len; ++j) acc[n0 + j] += a * static_cast<float>(block[j]);
    }
  }
}

void gemv_any(const LowBitWeight& w, const QuantizedActivations& x, int64_t n0, int64_t n1,
              float* y) {
  dispatch_bits(w.bits, [&]<int BITS>() { gemv<BITS>(w, x, n0, n1, y); });
}
void dequantize_any(const LowBitWeight& w, int64_t n0, int64_t n1, float* out) {
  dispatch_bits(w.bits, [&]<int BITS>() { dequantize<BITS>(w, n0, n1, out); });
}
void residual_any(const ResidualStore& r, const int64_t* ch, const float* alpha, int64_t k,
                  int64_t n0, int64_t n1, float* acc) {
  dispatch_bits(r.bits, [&]<int BITS>() { residual_codes_axpy<BITS>(r, ch, alpha, k, n0, n1, acc); });
}

}  // namespace

const DecodeKernels kKernels{&gemv_any, &dequantize_any, &residual_any};

}  // namespace qdec::cpu::scalar
