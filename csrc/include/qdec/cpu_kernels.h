// Torch-free CPU kernels off the decode hot path: raw pointers, sizes, and a
// half-open range of rows so the ATen glue (csrc/ops/cpu/*.cpp) can split work
// across threads. The hot path (low-bit GEMV, dequantize, residual
// compensation) has SIMD levels chosen at run time: qdec/cpu_decode.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "qdec/bitpack.h"

namespace qdec::cpu {

// sum_i a[i] * b[i] in float32. Eight independent partial sums give the
// compiler vectorisable code without -ffast-math (which would let it
// reassociate freely); the summation order is fixed, so results are
// deterministic for a given n. (A single running sum, a chain of dependent
// adds, took a third of the time in the scalar GEMV this replaced.)
template <typename T>
inline float dot_f32(const T* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += static_cast<float>(a[i + u]) * b[i + u];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += static_cast<float>(a[i]) * b[i];
  return s;
}

// Ranking key of |x|: NaN ranks as +inf (like torch.topk, NaN is "largest").
inline float outlier_key(float v) {
  const float a = std::fabs(v);
  return std::isnan(a) ? std::numeric_limits<float>::infinity() : a;
}

// The ranking key's bits: for keys >= 0 (and +inf) the IEEE bit patterns
// order as unsigned integers order, so selection can bucket by bits.
inline uint32_t outlier_key_bits(float v) {
  const float key = outlier_key(v);
  uint32_t u;
  std::memcpy(&u, &key, sizeof u);
  return u;
}

// Indices of the k largest |x[0..K)| into out[0..k), by descending |x|,
// ties to the smaller index. A radix selection, not a sort: one pass writes
// the keys' bits and a histogram of their top 11 bits (the sign bit is 0),
// the bucket holding the k-th largest key is found from the top, one pass
// gathers that bucket's keys and nth_element finds the threshold among them
// (a few dozen keys for LLM activations; all K at worst, still O(K)); one
// pass collects every index above the threshold plus, in index order, as
// many at it as fit (so ties go to the smaller index), and only those k are
// sorted (O(k log k)). Scratch: `keys` and `bucket` K uint32 each, `picked`
// k int64. (nth_element over all K float keys plus a copy of them took 2-3x
// as long at K = 4096, a third of the compensation's cost on top of the GEMV.)
inline void outlier_select_row(const float* x, int64_t K, int64_t k, int64_t* out,
                               uint32_t* keys, uint32_t* bucket, int64_t* picked) {
  if (k == 0) return;
  constexpr int kShift = 20;  // top 11 bits of a non-negative float: exponent + 3
  constexpr int kBuckets = 1 << 11;
  uint32_t hist[kBuckets] = {};
  uint32_t max_key = 0;
  for (int64_t i = 0; i < K; ++i) {
    keys[i] = outlier_key_bits(x[i]);
    ++hist[keys[i] >> kShift];
    max_key = std::max(max_key, keys[i]);
  }
  int64_t above = 0;  // keys in buckets above the threshold's
  // The walk down starts at the highest occupied bucket: activations of
  // magnitude ~1-100 fill buckets ~1016-1070, and walking down from 2047 was
  // ~1000 dependent steps per call, more than the rest at K = 576.
  int top = static_cast<int>(max_key >> kShift);
  for (; top > 0 && above + hist[top] < k; --top) above += hist[top];
  int64_t m = 0;
  for (int64_t i = 0; i < K; ++i)
    if (static_cast<int>(keys[i] >> kShift) == top) bucket[m++] = keys[i];
  const int64_t rank = k - above - 1;  // 0-based, among the bucket's keys
  std::nth_element(bucket, bucket + rank, bucket + m, std::greater<uint32_t>());
  const uint32_t threshold = bucket[rank];
  int64_t above_threshold = 0;
  for (int64_t i = 0; i < K; ++i) above_threshold += keys[i] > threshold;
  int64_t n = 0, ties_left = k - above_threshold;
  for (int64_t i = 0; i < K && n < k; ++i) {
    if (keys[i] > threshold) {
      picked[n++] = i;
    } else if (keys[i] == threshold && ties_left > 0) {
      picked[n++] = i;
      --ties_left;
    }
  }
  // A strict total order (key desc, index asc) makes the result unique.
  std::sort(picked, picked + k, [keys](int64_t a, int64_t b) {
    return keys[a] > keys[b] || (keys[a] == keys[b] && a < b);
  });
  std::copy(picked, picked + k, out);
}

// Geometry of a residual store: R^T[K, N] packed with one input channel a row.
struct PackedResidual {
  const uint32_t* residual;  // [K, words_per_row]
  const float* scales;       // [N]
  int64_t K, N, words_per_row;
};

// y[0..N) += alpha * R[:, j]. Codes are offset by 2^(BITS-1) (symmetric).
template <int BITS>
inline void residual_axpy(const PackedResidual& r, int64_t j, float alpha, float* y) {
  const uint32_t* row = r.residual + j * r.words_per_row;
  const float offset = static_cast<float>(1 << (BITS - 1));
  uint32_t codes[kBlock];
  const int64_t blocks = (r.N + kBlock - 1) / kBlock;
  for (int64_t c = 0; c < blocks; ++c) {
    unpack_block<BITS>(row + c * BITS, codes);
    const int64_t n0 = c * kBlock;
    const int64_t len = std::min<int64_t>(kBlock, r.N - n0);
    for (int64_t i = 0; i < len; ++i)
      y[n0 + i] += alpha * ((static_cast<float>(codes[i]) - offset) * r.scales[n0 + i]);
  }
}

// out[0..N) = R[:, j] (the dequantized residual row of input channel j).
template <int BITS>
inline void residual_row(const PackedResidual& r, int64_t j, float* out) {
  std::fill(out, out + r.N, 0.f);
  residual_axpy<BITS>(r, j, 1.f, out);
}

// ------------------------------------------------------------ low-rank term
// y = L_A (L_B x) with L_A [N, r], L_B [r, K] row-major. Unlike the packed
// weight, the factors are read in their storage type T (float, or the glue's
// c10::Half / c10::BFloat16: anything static_cast-able to and from float):
// converting them up front would cost as much memory traffic as the op itself.

// Phase 1: t[b, j] = sum_k L_B[j, k] x[b, k] for j in [j_begin, j_end), all
// b < B (x float32 [B, K], t float32 [B, r]). Each factor row is read once for
// all B activation rows.
template <typename T>
void lowrank_project(const T* lowrank_b, const float* x, int64_t B, int64_t K, int64_t r,
                     int64_t j_begin, int64_t j_end, float* t) {
  for (int64_t j = j_begin; j < j_end; ++j)
    for (int64_t b = 0; b < B; ++b) t[b * r + j] = dot_f32(lowrank_b + j * K, x + b * K, K);
}

// Phase 2: y[b, n] = sum_j L_A[n, j] t[b, j] for n in [n_begin, n_end), all
// b < B, rounded once to T (y [B, N]). r = 0 writes zeros.
template <typename T>
void lowrank_expand(const T* lowrank_a, const float* t, int64_t B, int64_t N, int64_t r,
                    int64_t n_begin, int64_t n_end, T* y) {
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t b = 0; b < B; ++b)
      y[b * N + n] = static_cast<T>(dot_f32(lowrank_a + n * r, t + b * r, r));
}

}  // namespace qdec::cpu
