// CPU kernel of qdec::compensated_linear (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.compensated_linear_ref).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/cpu/common.h"

namespace qdec::cpu {
namespace {

at::Tensor compensated_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                  const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                  int64_t bits, int64_t group_size, const at::Tensor& residual,
                                  const at::Tensor& residual_scales, int64_t residual_bits,
                                  int64_t k, const std::optional<at::Tensor>& channels,
                                  int64_t sm_budget) {
  check_sm_budget(sm_budget);  // a CUDA scheduling knob: nothing to schedule here
  check_cpu(x, "x");
  check_cpu(qweight, "qweight");
  check_cpu(residual, "residual");
  check_cpu(residual_scales, "residual_scales");
  const auto [geom, rgeom] = check_compensated_linear(x, qweight, scales, zeros, bits, group_size,
                                                      residual, residual_scales, residual_bits, k);
  const int64_t K = geom.K;

  const auto x2d = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t B = x2d.size(0);
  at::Tensor idx;
  if (channels) {
    check_cpu(*channels, "channels");
    check_channels(*channels, B, k, K, /*check_values=*/true);
    idx = channels->reshape({B, k}).contiguous();
  } else {
    idx = outlier_select_fp32(x2d, k);
  }

  auto acc = quantized_matmul_fp32(x2d, qweight, scales, zeros, bits, geom);
  if (k > 0 && B > 0) {
    const auto res = residual.contiguous();
    const auto rscales = residual_scales.contiguous();
    const auto r = packed_residual(res, rscales, rgeom);
    const float* x_ptr = x2d.data_ptr<float>();
    const int64_t* idx_ptr = idx.data_ptr<int64_t>();
    float* acc_ptr = acc.data_ptr<float>();
    // Rows are independent, so threads split the batch; within a row the k
    // axpys accumulate into the row's fp32 accumulator in selection order.
    dispatch_bits(static_cast<int>(residual_bits), [&]<int BITS>() {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t i = 0; i < k; ++i) {
            const int64_t j = idx_ptr[b * k + i];
            residual_axpy<BITS>(r, j, x_ptr[b * K + j], acc_ptr + b * geom.N);
          }
        }
      });
    });
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = geom.N;
  return acc.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cpu

TORCH_LIBRARY_IMPL(qdec, CPU, m) {
  m.impl("compensated_linear", &qdec::cpu::compensated_linear_cpu);
}
