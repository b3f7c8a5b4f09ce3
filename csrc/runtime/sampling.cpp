#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace qdec::runtime {

int64_t Sampler::next(const at::Tensor& logits_in) {
  // Comparisons and exp() read the float32 logits directly: float -> double is
  // exact, so this picks what a double copy would, without copying the
  // vocabulary (a 49152 x 8 B buffer per token) every step.
  const auto logits = logits_in.to(at::kCPU, at::kFloat).contiguous();
  const float* p = logits.data_ptr<float>();
  const int64_t V = logits.numel();
  if (V == 0) throw std::invalid_argument("sampler: empty logits");
  if (options_.temperature <= 0.0) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; ++i)
      if (p[i] > p[best] || (std::isnan(p[i]) && !std::isnan(p[best]))) best = i;
    return best;
  }
  // The index and weight buffers persist across calls (sized once per vocabulary).
  std::vector<int64_t>& idx = index_buf_;
  idx.resize(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  int64_t keep = options_.top_k > 0 ? std::min(options_.top_k, V) : V;
  // Highest logits first; equal logits keep id order, so the result does not
  // depend on the sort implementation.
  auto by_logit = [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
  if (keep < V) std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), by_logit);
  else std::sort(idx.begin(), idx.end(), by_logit);
  const double top = static_cast<double>(p[idx[0]]) / options_.temperature;
  std::vector<double>& w = weight_buf_;
  w.resize(static_cast<size_t>(keep));
  double total = 0;
  for (int64_t i = 0; i < keep; ++i)
    total += (w[i] = std::exp(static_cast<double>(p[idx[i]]) / options_.temperature - top));
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * total;  // [0, total)
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += w[i];
    if (u < acc) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace qdec::runtime
