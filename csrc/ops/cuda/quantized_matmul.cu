// CUDA kernel glue of qdec::quantized_matmul (schema: csrc/ops/registration.cpp).
#include <torch/library.h>

#include "ops/cuda/common.cuh"

namespace qdec::cuda {

at::Tensor quantized_matmul_2d_cuda(const at::Tensor& x2d, const at::Tensor& qweight,
                                    const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, int64_t bits,
                                    const WeightGeometry& geom, at::ScalarType out_dtype) {
  const int64_t B = x2d.size(0);
  auto t = weight_tensors(qweight, scales, zeros);
  // The GEMV reads packed blocks with 16-byte loads. Allocator blocks are
  // aligned; only a view into the middle of another tensor may not be, and is
  // copied (rarely taken, and better than failing).
  if (reinterpret_cast<uintptr_t>(t.qweight.data_ptr()) % 16 != 0) t.qweight = t.qweight.clone();
  const auto view = weight_view(t, geom, bits);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (B > kMaxGemvRows) {
    // Prefill-sized batches are compute-bound: dequantize once and let cuBLAS
    // run the GEMM (in float32, matching the CPU path's accumulation).
    auto dense = at::empty({geom.N, geom.K}, x2d.options().dtype(at::kFloat));
    check_launch(launch_dequantize(view, dense.data_ptr<float>(), stream), "dequantize");
    return at::mm(x2d.to(at::kFloat), dense.t()).to(out_dtype);
  }
  auto out = at::empty({B, geom.N}, x2d.options().dtype(out_dtype));
  check_launch(launch_gemv(view, x2d.data_ptr(), dtype_of(x2d), B, out.data_ptr(),
                           dtype_of(out), stream),
               "quantized GEMV");
  return out;
}

namespace {

at::Tensor quantized_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                 int64_t bits, int64_t group_size) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "qdec: x must have shape [*, K], got a 0-D tensor");
  const int64_t K = x.size(-1);
  const auto geom =
      check_packed_weight(qweight, scales, zeros, bits, group_size, K, x.scalar_type());
  check_on_cuda(qweight, x, "qweight");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x2d = x.reshape({-1, K}).contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() = geom.N;
  return quantized_matmul_2d_cuda(x2d, qweight, scales, zeros, bits, geom, x.scalar_type())
      .reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cuda

TORCH_LIBRARY_IMPL(qdec, CUDA, m) {
  m.impl("quantized_matmul", &qdec::cuda::quantized_matmul_cuda);
}
