// CPU kernel of qdec::dequantize (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.dequantize_ref).
#include <torch/library.h>

#include "ops/cpu/common.h"

namespace qdec::cpu {
namespace {

at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, int64_t bits,
                          int64_t group_size, int64_t in_features) {
  check_cpu(qweight, "qweight");
  const auto geom =
      check_packed_weight(qweight, scales, zeros, bits, group_size, in_features, std::nullopt);
  return dequantize_fp32(weight_tensors(qweight, scales, zeros), bits, geom)
      .to(scales.scalar_type());
}

}  // namespace
}  // namespace qdec::cpu

TORCH_LIBRARY_IMPL(qdec, CPU, m) { m.impl("dequantize", &qdec::cpu::dequantize_cpu); }
