// CPU kernel of qdec::residual_gather (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.residual_gather_ref).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/cpu/common.h"

namespace qdec::cpu {
namespace {

at::Tensor residual_gather_cpu(const at::Tensor& residual, const at::Tensor& residual_scales,
                               const at::Tensor& channels, int64_t residual_bits) {
  check_cpu(residual, "residual");
  check_cpu(residual_scales, "residual_scales");
  check_cpu(channels, "channels");
  const auto geom = check_residual(residual, residual_scales, residual_bits);
  TORCH_CHECK(channels.dim() >= 1, "qdec: channels must have shape [*, k], got a 0-D tensor");
  const int64_t k = channels.size(-1);
  const int64_t rows = k == 0 ? 0 : channels.numel() / k;
  check_channels(channels, rows, k, geom.K, /*check_values=*/true);
  auto out_shape = channels.sizes().vec();
  out_shape.push_back(geom.N);
  auto out = at::empty(out_shape, residual_scales.options());
  const auto res = residual.contiguous();
  const auto scales = residual_scales.contiguous();
  const auto idx = channels.contiguous();
  const auto r = packed_residual(res, scales, geom);
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  dispatch_bits(static_cast<int>(residual_bits), [&]<int BITS>() {
    at::parallel_for(0, idx.numel(), 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) residual_row<BITS>(r, idx_ptr[i], out_ptr + i * geom.N);
    });
  });
  return out;
}

}  // namespace
}  // namespace qdec::cpu

TORCH_LIBRARY_IMPL(qdec, CPU, m) { m.impl("residual_gather", &qdec::cpu::residual_gather_cpu); }
