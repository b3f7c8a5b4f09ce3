// x -> int16 spans for the integer dot products of the CPU decode kernels
// (the math and its error bound: csrc/include/qdec/cpu_decode.h). Portable
// C++: it is O(B*K), small beside the O(N*K) weight decode, but it runs once
// per linear and token, so it avoids divisions and library calls.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "qdec/cpu_decode.h"

namespace qdec::cpu {

int64_t activation_span(int64_t G, int64_t groups) {
  if (groups <= 1) return 128;
  // G is a positive multiple of 32 here (checks.h), so one of these divides it.
  for (int64_t span : {128, 64, 32})
    if (G % span == 0) return span;
  return 32;
}

void load_row_params(const LowBitWeight& w, int64_t n, float* scale, float* zero) {
  const int64_t off = n * w.groups;
  auto to_float = [&](const void* base, float* out) {
    switch (w.param_type) {
      case ParamType::kFloat32:
        std::memcpy(out, static_cast<const float*>(base) + off, w.groups * sizeof(float));
        return;
      case ParamType::kBFloat16: {
        const auto* p = static_cast<const uint16_t*>(base) + off;
        for (int64_t g = 0; g < w.groups; ++g) {
          const uint32_t bits = static_cast<uint32_t>(p[g]) << 16;
          std::memcpy(out + g, &bits, sizeof(float));
        }
        return;
      }
      case ParamType::kFloat16: {
        const auto* p = static_cast<const uint16_t*>(base) + off;
        for (int64_t g = 0; g < w.groups; ++g) {
          // IEEE binary16 -> binary32, subnormals and inf/NaN included.
          const uint32_t h = p[g];
          const uint32_t sign = (h & 0x8000u) << 16;
          const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
          float v;
          if (exp == 0) {
            v = std::ldexp(static_cast<float>(mant), -24);
          } else if (exp == 31) {
            v = mant ? std::numeric_limits<float>::quiet_NaN()
                     : std::numeric_limits<float>::infinity();
          } else {
            const uint32_t bits = ((exp + 112u) << 23) | (mant << 13);
            std::memcpy(&v, &bits, sizeof(float));
          }
          uint32_t vb;
          std::memcpy(&vb, &v, sizeof(float));
          vb |= sign;
          std::memcpy(out + g, &vb, sizeof(float));
        }
        return;
      }
    }
  };
  to_float(w.scales, scale);
  if (w.zeros) {
    to_float(w.zeros, zero);
  } else {
    std::fill(zero, zero + w.groups, static_cast<float>(1 << (w.bits - 1)));
  }
}

RowParams row_params(const LowBitWeight& w, int64_t n, float* scale_buf, float* zero_buf) {
  if (w.param_type != ParamType::kFloat32) {
    load_row_params(w, n, scale_buf, zero_buf);
    return {scale_buf, zero_buf};
  }
  const int64_t off = n * w.groups;
  const float* scale = static_cast<const float*>(w.scales) + off;
  if (w.zeros) return {scale, static_cast<const float*>(w.zeros) + off};
  std::fill(zero_buf, zero_buf + w.groups, static_cast<float>(1 << (w.bits - 1)));
  return {scale, zero_buf};
}

namespace {

ActivationPrecision initial_precision() {
  const char* env = std::getenv("QDEC_CPU_ACTIVATIONS");
  if (env == nullptr || *env == '\0') return ActivationPrecision::kInt16x2;
  try {
    return parse_activation_precision(env);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("QDEC_CPU_ACTIVATIONS: ") + e.what());
  }
}

// -1 = not chosen yet (an atomic int, as the ISA level in isa.cpp).
std::atomic<int> g_precision{-1};

}  // namespace

ActivationPrecision parse_activation_precision(const char* name) {
  const std::string s(name);
  if (s == "int16x2") return ActivationPrecision::kInt16x2;
  if (s == "int16") return ActivationPrecision::kInt16;
  throw std::invalid_argument("unknown CPU activation precision '" + s +
                              "'; expected one of int16x2, int16");
}

const char* activation_precision_name(ActivationPrecision precision) {
  return precision == ActivationPrecision::kInt16 ? "int16" : "int16x2";
}

ActivationPrecision activation_precision() {
  int v = g_precision.load(std::memory_order_acquire);
  if (v < 0) {
    v = static_cast<int>(initial_precision());
    g_precision.store(v, std::memory_order_release);
  }
  return static_cast<ActivationPrecision>(v);
}

void set_activation_precision(ActivationPrecision precision) {
  g_precision.store(static_cast<int>(precision), std::memory_order_release);
}

QuantizedActivations quantize_activations(const float* x, int64_t B, int64_t K, int64_t G,
                                          int64_t groups, int16_t* xq, float* span_scale,
                                          float* group_sum) {
  const int64_t span = activation_span(G, groups);
  const int64_t blocks = activation_blocks(K);
  const int64_t stride = blocks * 64;  // per x row: each block's 32 high, then 32 low terms
  const int64_t spans = activation_spans(K, span);
  // With one group the row is one group of many spans; otherwise G / span.
  const int64_t spans_per_group = groups <= 1 ? spans : G / span;
  const bool two_terms = activation_precision() == ActivationPrecision::kInt16x2;
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * K;
    int16_t* qr = xq + b * stride;
    float* dr = span_scale + b * spans;
    float* gr = group_sum + b * groups;
    std::fill(gr, gr + groups, 0.f);
    // Zero terms past K in the last block (the kernels read whole blocks).
    for (int64_t k = K; k < blocks * 32; ++k) {
      const int64_t c = k / 32, i = k % 32;
      qr[c * 64 + i] = qr[c * 64 + 32 + i] = 0;
    }
    for (int64_t sp = 0; sp < spans; ++sp) {
      const int64_t k0 = sp * span, k1 = std::min(K, k0 + span);
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = k0; k < k1; ++k) {
        const float a = std::fabs(xr[k]);
        finite &= std::isfinite(a);
        amax = std::max(amax, a);
      }
      double sum = 0.0;
      if (!finite || amax == 0.f) {
        // A NaN scale makes every output this span touches NaN; an all-zero
        // span contributes nothing. Either way its terms are zero.
        dr[sp] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t c = k / 32, i = k % 32;
          qr[c * 64 + i] = qr[c * 64 + 32 + i] = 0;
        }
      } else {
        const double d = static_cast<double>(amax) / 32767.0;
        dr[sp] = static_cast<float>(d);
        const double step = static_cast<double>(dr[sp]);  // the scale the kernels use
        // Reciprocals instead of two divisions per value (a division costs
        // ~15 cycles, and at K = 576 this pass was a visible share of a
        // SmolLM2 GEMV): x * (1/d) can differ from x / d only in the last
        // bit, which at worst moves a rounding tie of the high term by one;
        // the low term is computed from the high term actually taken, so
        // |x - x^| <= d / 65536 still holds (cpu_decode.h).
        const double inv_step = 1.0 / step, inv_lo_step = 32768.0 / step;
        // Round to nearest (ties to even) by adding and subtracting 1.5 * 2^52:
        // exact for |v| < 2^51 in the default rounding mode, and unlike
        // std::nearbyint it needs no library call at the baseline ISA.
        constexpr double kRound = 6755399441055744.0;
        double hi_sum = 0.0, lo_sum = 0.0;  // integers: exact in double
        for (int64_t k = k0; k < k1; ++k) {
          // High term: x / d rounded (|.| <= 32767); low term: what is left,
          // in units of d / 32768 (|.| <= 16384 + rounding). Both exact int16.
          const double v = static_cast<double>(xr[k]);
          const double hi = std::min(std::max((v * inv_step + kRound) - kRound, -32767.0), 32767.0);
          const double lo =
              two_terms ? std::min(std::max(((v - hi * step) * inv_lo_step + kRound) - kRound,
                                            -32767.0),
                                   32767.0)
                        : 0.0;
          const int64_t c = k / 32, i = k % 32;
          qr[c * 64 + i] = static_cast<int16_t>(hi);
          qr[c * 64 + 32 + i] = static_cast<int16_t>(lo);
          hi_sum += hi;
          lo_sum += lo;
        }
        sum = step * (hi_sum + lo_sum / 32768.0);
      }
      // X_g of the represented x, so that sum_g s_g (sum q x^ - z X_g) is
      // exactly sum_k w_k x^_k (cpu_decode.h).
      const int64_t g = groups <= 1 ? 0 : sp / spans_per_group;
      gr[g] += finite ? static_cast<float>(sum) : dr[sp];
    }
  }
  return QuantizedActivations{xq,    span_scale, group_sum,       B,      blocks,
                              span,  spans,      spans_per_group, groups, two_terms ? 2 : 1};
}

}  // namespace qdec::cpu
