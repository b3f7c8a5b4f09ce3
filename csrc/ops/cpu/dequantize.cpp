// CPU kernel of qdec::dequantize (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.dequantize_ref).
#include <ATen/Parallel.h>
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
  const auto bufs = weight_buffers(qweight, scales, zeros);
  const auto w = packed_weight(bufs, geom);
  auto out = at::empty({geom.N, geom.K}, scales.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();
  dispatch_bits(static_cast<int>(bits), [&]<int BITS>() {
    at::parallel_for(0, geom.N, 16, [&](int64_t begin, int64_t end) {
      dequantize_rows<BITS>(w, begin, end, out_ptr);
    });
  });
  return out.to(scales.scalar_type());
}

}  // namespace
}  // namespace qdec::cpu

TORCH_LIBRARY_IMPL(qdec, CPU, m) { m.impl("dequantize", &qdec::cpu::dequantize_cpu); }
