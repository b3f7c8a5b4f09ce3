#include "decode_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace qdec::runtime::decode_cpu {

namespace {

// Eight independent partial sums: without -ffast-math the compiler may not
// reorder one running sum, so a single accumulator would be a serial chain
// of dependent adds; eight lanes let it emit SIMD multiply-adds.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[i + u] * b[i + u];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Below this many multiply-adds an attention call stays on the calling
// thread: waking the pool costs a few microseconds, more than small
// contexts take to attend.
constexpr int64_t kParallelAttendWork = 1 << 14;

}  // namespace

void rms_norm(const float* x, const float* w, int64_t n, double eps, float* out) {
  // The sum of squares in double: the order differs from ATen's float
  // reduction anyway, and double keeps the difference at rounding level.
  double ss[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int u = 0; u < 4; ++u) ss[u] += static_cast<double>(x[i + u]) * x[i + u];
  double s = (ss[0] + ss[1]) + (ss[2] + ss[3]);
  for (; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  // As the float32 ATen ops: mean in float, eps added in float, 1/sqrt.
  const float var = static_cast<float>(s / static_cast<double>(n));
  const float r = 1.0f / std::sqrt(var + static_cast<float>(eps));
  for (int64_t j = 0; j < n; ++j) out[j] = w[j] * (x[j] * r);
}

void rope(float* x, const float* cos, const float* sin, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

void attend(const float* q, const float* keys, const float* values, int64_t num_heads,
            int64_t num_kv_heads, int64_t head_dim, int64_t capacity, int64_t len, double scale,
            float* scores, float* out) {
  const int64_t group = num_heads / num_kv_heads;
  const float sc = static_cast<float>(scale);
  auto one_head = [&](int64_t h) {
    const int64_t kv = h / group;
    const float* qh = q + h * head_dim;
    const float* K = keys + kv * capacity * head_dim;
    const float* V = values + kv * capacity * head_dim;
    float* s = scores + h * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < len; ++j) {
      s[j] = dot(qh, K + j * head_dim, head_dim) * sc;
      m = std::max(m, s[j]);
    }
    double total = 0.0;
    for (int64_t j = 0; j < len; ++j) total += (s[j] = std::exp(s[j] - m));
    float* o = out + h * head_dim;
    std::fill(o, o + head_dim, 0.0f);
    for (int64_t j = 0; j < len; ++j) {
      const float p = s[j];
      const float* vj = V + j * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) o[d] += p * vj[d];
    }
    const float inv = static_cast<float>(1.0 / total);
    for (int64_t d = 0; d < head_dim; ++d) o[d] *= inv;
  };
  const int64_t work = num_heads * len * head_dim;
  // parallel_for runs inline when the range is not larger than the grain.
  const int64_t grain = work < kParallelAttendWork ? num_heads : 1;
  at::parallel_for(0, num_heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) one_head(h);
  });
}

void silu_mul(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void add_inplace(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

}  // namespace qdec::runtime::decode_cpu
