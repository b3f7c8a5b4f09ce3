// Helpers shared by the CPU glue files: turn checked tensors into the
// torch-free views of csrc/include/qdec/cpu_kernels.h, and the pieces that
// more than one op is built from.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "ops/checks.h"
#include "qdec/cpu_kernels.h"

namespace qdec::cpu {

// Float32 contiguous copies (or the tensors themselves when already so) that
// must outlive any PackedWeight made from them.
struct WeightBuffers {
  at::Tensor qweight, scales, zeros;
};

inline WeightBuffers weight_buffers(const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros) {
  WeightBuffers b;
  b.qweight = qweight.contiguous();
  b.scales = scales.to(at::kFloat).contiguous();
  if (zeros) b.zeros = zeros->to(at::kFloat).contiguous();
  return b;
}

inline PackedWeight packed_weight(const WeightBuffers& b, const WeightGeometry& g) {
  return PackedWeight{reinterpret_cast<const uint32_t*>(b.qweight.data_ptr<int32_t>()),
                      b.scales.data_ptr<float>(),
                      b.zeros.defined() ? b.zeros.data_ptr<float>() : nullptr,
                      g.N,
                      g.K,
                      g.G,
                      g.groups,
                      b.qweight.size(1)};
}

inline PackedResidual packed_residual(const at::Tensor& residual, const at::Tensor& scales,
                                      const ResidualGeometry& g) {
  return PackedResidual{reinterpret_cast<const uint32_t*>(residual.data_ptr<int32_t>()),
                        scales.data_ptr<float>(), g.K, g.N, residual.size(1)};
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "qdec: ", name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// x[B, K] (float32, contiguous) @ W^T -> float32 [B, N]. Shared by
// quantized_matmul and compensated_linear so that k = 0 is bit-identical.
at::Tensor quantized_matmul_fp32(const at::Tensor& x2d, const at::Tensor& qweight,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                 int64_t bits, const WeightGeometry& geom);

// Indices int64 [B, k] of the k largest |x| per row of x2d (float32, contiguous).
at::Tensor outlier_select_fp32(const at::Tensor& x2d, int64_t k);

}  // namespace qdec::cpu
