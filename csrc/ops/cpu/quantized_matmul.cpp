// CPU kernel of qdec::quantized_matmul (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.quantized_matmul_ref).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/cpu/common.h"

namespace qdec::cpu {

// Up to this many activation rows the fused decode+dot kernel wins: it reads
// the packed weight once. Beyond it (prefill, perplexity evaluation) the
// matrix is dequantized once and handed to the BLAS GEMM, whose blocking is
// far better than a dot-product loop for many rows.
constexpr int64_t kFusedMaxRows = 8;

at::Tensor quantized_matmul_fp32(const at::Tensor& x2d, const at::Tensor& qweight,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                 int64_t bits, const WeightGeometry& geom) {
  const int64_t B = x2d.size(0);
  const auto bufs = weight_buffers(qweight, scales, zeros);
  const auto w = packed_weight(bufs, geom);
  if (B > kFusedMaxRows) {
    auto dense = at::empty({geom.N, geom.K}, x2d.options());
    float* dense_ptr = dense.data_ptr<float>();
    dispatch_bits(static_cast<int>(bits), [&]<int BITS>() {
      at::parallel_for(0, geom.N, 16, [&](int64_t begin, int64_t end) {
        dequantize_rows<BITS>(w, begin, end, dense_ptr);
      });
    });
    return at::mm(x2d, dense.t());
  }
  auto y = at::zeros({B, geom.N}, x2d.options());
  if (B == 0) return y;
  const float* x_ptr = x2d.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  dispatch_bits(static_cast<int>(bits), [&]<int BITS>() {
    at::parallel_for(0, geom.N, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row_buf(geom.K);
      gemv_rows<BITS>(w, x_ptr, B, begin, end, y_ptr, row_buf.data());
    });
  });
  return y;
}

namespace {

at::Tensor quantized_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                int64_t bits, int64_t group_size) {
  check_cpu(x, "x");
  check_cpu(qweight, "qweight");
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "qdec: x must have shape [*, K], got a 0-D tensor");
  const int64_t K = x.size(-1);
  const auto geom =
      check_packed_weight(qweight, scales, zeros, bits, group_size, K, x.scalar_type());
  const auto x2d = x.reshape({-1, K}).to(at::kFloat).contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() = geom.N;
  return quantized_matmul_fp32(x2d, qweight, scales, zeros, bits, geom)
      .to(x.scalar_type())
      .reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cpu

TORCH_LIBRARY_IMPL(qdec, CPU, m) {
  m.impl("quantized_matmul", &qdec::cpu::quantized_matmul_cpu);
}
