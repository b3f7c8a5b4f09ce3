// Picking the next token from logits: greedy, or sampling with temperature
// and top-k from a seeded generator (reproducible across platforms: the
// uniform draw is built from raw 64-bit mt19937 output, not from a
// library distribution).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <random>
#include <vector>

namespace qdec::runtime {

struct SamplingOptions {
  double temperature = 0.0;  // <= 0: greedy
  int64_t top_k = 0;         // 0: the whole vocabulary
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {}
  // logits: float [vocab] on any device. Greedy ties go to the smaller id.
  // Float32 logits on the CPU are read in place (no copy).
  int64_t next(const at::Tensor& logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
  std::vector<int64_t> index_buf_;  // reused across calls: no vocabulary-sized allocation per token
  std::vector<double> weight_buf_;
};

}  // namespace qdec::runtime
