// CPU kernel of qdec::compensated_linear (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.compensated_linear_ref). The torch-free kernels it
// runs, one per instruction-set level: csrc/include/qdec/cpu_decode.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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
    // Named locals: the views below keep raw pointers into these tensors.
    const auto res = residual.contiguous();
    const auto rscales = residual_scales.contiguous();
    const ResidualStore r{reinterpret_cast<const uint32_t*>(res.data_ptr<int32_t>()),
                          rscales.data_ptr<float>(), static_cast<int>(residual_bits), rgeom.K,
                          rgeom.N, res.size(1)};
    const auto& kernels = active_kernels();
    const float* x_ptr = x2d.data_ptr<float>();
    const int64_t* idx_ptr = idx.data_ptr<int64_t>();
    float* acc_ptr = acc.data_ptr<float>();
    const int64_t N = geom.N, n_blocks = (N + 31) / 32;
    const float offset = static_cast<float>(1 << (residual_bits - 1));
    // sum_i x_j (q_jn - offset) s_n = s_n (sum_i x_j q_jn - offset sum_i x_j):
    // the kernel accumulates undecoded codes, the scale and offset are applied
    // once per output (so the k rows cost one multiply-add per code).
    std::vector<float> alpha(k);
    auto codes_sum = at::empty({n_blocks * 32}, x2d.options());
    float* sum_ptr = codes_sum.data_ptr<float>();
    // Output channels per task: whole 32-value blocks, ~64k codes of work.
    const int64_t grain = std::max<int64_t>(1, 65536 / (32 * k));
    for (int64_t b = 0; b < B; ++b) {
      float alpha_sum = 0.f;
      for (int64_t i = 0; i < k; ++i) {
        alpha[i] = x_ptr[b * K + idx_ptr[b * k + i]];
        alpha_sum += alpha[i];
      }
      std::fill(sum_ptr, sum_ptr + n_blocks * 32, 0.f);
      const int64_t* channels = idx_ptr + b * k;
      at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
        kernels.residual_codes_axpy(r, channels, alpha.data(), k, begin * 32,
                                    std::min(N, end * 32), sum_ptr);
      });
      const float* rs = r.scales;
      float* y = acc_ptr + b * N;
      const float shift = offset * alpha_sum;
      for (int64_t n = 0; n < N; ++n) y[n] += rs[n] * (sum_ptr[n] - shift);
    }
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
