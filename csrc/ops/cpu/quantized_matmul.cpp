// CPU kernel of qdec::quantized_matmul (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.quantized_matmul_ref). The torch-free kernels it
// runs, one per instruction-set level: csrc/include/qdec/cpu_decode.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <stdexcept>

#include "ops/cpu/common.h"

namespace qdec::cpu {

// Up to this many activation rows the fused decode + integer-dot kernel wins:
// it reads the packed weight once and decodes each block once for all rows.
// Beyond it (prefill, perplexity evaluation) the matrix is dequantized once
// and handed to the BLAS GEMM, whose blocking is far better for many rows.
// Measured by benchmarks/bench_gemv.py (batch 16 fused vs dequantize + GEMM).
constexpr int64_t kFusedMaxRows = 16;

// Rows of W per parallel task: enough work (~64k weights) to pay for a task.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)); }

const DecodeKernels& active_kernels() {
  try {
    return decode_kernels();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "qdec: ", e.what());
  }
}

WeightTensors weight_tensors(const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros) {
  WeightTensors t;
  t.qweight = qweight.contiguous();
  const bool mixed = zeros && zeros->scalar_type() != scales.scalar_type();
  t.scales = (mixed ? scales.to(at::kFloat) : scales).contiguous();
  if (zeros) t.zeros = (mixed ? zeros->to(at::kFloat) : *zeros).contiguous();
  return t;
}

LowBitWeight lowbit_weight(const WeightTensors& t, int64_t bits, const WeightGeometry& g) {
  ParamType type = ParamType::kFloat32;
  switch (t.scales.scalar_type()) {
    case at::kFloat: type = ParamType::kFloat32; break;
    case at::kHalf: type = ParamType::kFloat16; break;
    case at::kBFloat16: type = ParamType::kBFloat16; break;
    default: TORCH_CHECK(false, "qdec: scales must be float32, float16 or bfloat16, got ",
                         t.scales.scalar_type());
  }
  return LowBitWeight{reinterpret_cast<const uint32_t*>(t.qweight.data_ptr<int32_t>()),
                      t.scales.data_ptr(),
                      t.zeros.defined() ? t.zeros.data_ptr() : nullptr,
                      type,
                      static_cast<int>(bits),
                      g.N,
                      g.K,
                      g.G,
                      g.groups,
                      t.qweight.size(1)};
}

at::Tensor dequantize_fp32(const WeightTensors& t, int64_t bits, const WeightGeometry& geom) {
  const auto& kernels = active_kernels();
  const auto w = lowbit_weight(t, bits, geom);
  auto dense = at::empty({geom.N, geom.K}, t.scales.options().dtype(at::kFloat));
  float* out = dense.data_ptr<float>();
  at::parallel_for(0, geom.N, row_grain(geom.K), [&](int64_t begin, int64_t end) {
    kernels.dequantize(w, begin, end, out);
  });
  return dense;
}

at::Tensor quantized_matmul_fp32(const at::Tensor& x2d, const at::Tensor& qweight,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                 int64_t bits, const WeightGeometry& geom) {
  const int64_t B = x2d.size(0);
  const auto tensors = weight_tensors(qweight, scales, zeros);
  if (B > kFusedMaxRows) return at::mm(x2d, dequantize_fp32(tensors, bits, geom).t());
  auto y = at::empty({B, geom.N}, x2d.options());
  if (B == 0) return y;
  const auto& kernels = active_kernels();
  const auto w = lowbit_weight(tensors, bits, geom);
  // x once per call into int16 spans (O(B*K); cpu_decode.h has the math).
  const int64_t span = activation_span(geom.G, geom.groups);
  const int64_t blocks = activation_blocks(geom.K), spans = activation_spans(geom.K, span);
  auto xq = at::empty({B, blocks * 64}, x2d.options().dtype(at::kShort));
  auto span_scale = at::empty({B, spans}, x2d.options());
  auto group_sum = at::empty({B, geom.groups}, x2d.options());
  const auto acts = quantize_activations(x2d.data_ptr<float>(), B, geom.K, geom.G, geom.groups,
                                         xq.data_ptr<int16_t>(), span_scale.data_ptr<float>(),
                                         group_sum.data_ptr<float>());
  float* y_ptr = y.data_ptr<float>();
  at::parallel_for(0, geom.N, row_grain(geom.K), [&](int64_t begin, int64_t end) {
    kernels.gemv(w, acts, begin, end, y_ptr);
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
