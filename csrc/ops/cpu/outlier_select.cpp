// CPU kernel of qdec::outlier_select (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.outlier_select_ref).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/cpu/common.h"

namespace qdec::cpu {

at::Tensor outlier_select_fp32(const at::Tensor& x2d, int64_t k) {
  const int64_t B = x2d.size(0), K = x2d.size(1);
  auto out = at::empty({B, k}, x2d.options().dtype(at::kLong));
  if (B == 0 || k == 0) return out;
  const float* x_ptr = x2d.data_ptr<float>();
  int64_t* out_ptr = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch kept between calls (compensated_linear selects once
    // per linear and token; value-initialised vectors zeroed 16 bytes per
    // input channel every time).
    thread_local std::vector<uint32_t> keys, bucket;
    thread_local std::vector<int64_t> picked;
    if (static_cast<int64_t>(keys.size()) < K) keys.resize(K), bucket.resize(K);
    if (static_cast<int64_t>(picked.size()) < k) picked.resize(k);
    for (int64_t b = begin; b < end; ++b)
      outlier_select_row(x_ptr + b * K, K, k, out_ptr + b * k, keys.data(), bucket.data(),
                         picked.data());
  });
  return out;
}

namespace {

at::Tensor outlier_select_cpu(const at::Tensor& x, int64_t k) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "qdec: x must have shape [*, K], got a 0-D tensor");
  const int64_t K = x.size(-1);
  check_k(k, K);
  auto out_shape = x.sizes().vec();
  out_shape.back() = k;
  return outlier_select_fp32(x.reshape({-1, K}).to(at::kFloat).contiguous(), k)
      .reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cpu

TORCH_LIBRARY_IMPL(qdec, CPU, m) { m.impl("outlier_select", &qdec::cpu::outlier_select_cpu); }
