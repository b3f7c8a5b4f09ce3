// CUDA glue of qdec::compensated_linear (schema: csrc/ops/registration.cpp).
//
// First implementation, sequential on the current stream: base GEMV into a
// float32 accumulator, exact top-k selection, then one axpy kernel that reads
// the k selected residual rows (zero-copy when the store is pinned host
// memory) and adds them into the accumulator; one cast at the end. No host
// synchronisation or host-side allocation outside the caching allocator, so
// the whole op can be captured in a CUDA graph. Overlapping the compensation
// with the GEMV (side stream or fused kernel) is the next step and needs GPU
// measurements.
#include <torch/library.h>

#include "ops/cuda/common.cuh"

namespace qdec::cuda {
namespace {

at::Tensor compensated_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& scales,
                                   const std::optional<at::Tensor>& zeros, int64_t bits,
                                   int64_t group_size, const at::Tensor& residual,
                                   const at::Tensor& residual_scales, int64_t residual_bits,
                                   int64_t k, const std::optional<at::Tensor>& channels) {
  const auto [geom, rgeom] = check_compensated_linear(x, qweight, scales, zeros, bits, group_size,
                                                      residual, residual_scales, residual_bits, k);
  const int64_t K = geom.K;
  check_on_cuda(qweight, x, "qweight");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x2d = x.reshape({-1, K}).contiguous();
  const int64_t B = x2d.size(0);
  at::Tensor idx;
  if (channels) {
    check_on_cuda(*channels, x, "channels");
    check_channels(*channels, B, k, K, /*check_values=*/false);
    idx = channels->reshape({B, k}).contiguous();
  } else {
    idx = outlier_select_cuda_impl(x2d, k);
  }
  auto acc = quantized_matmul_fp32_cuda(x2d, qweight, scales, zeros, bits, geom);
  if (k > 0 && B > 0) {
    const auto view = residual_view(residual.contiguous(), residual_scales.contiguous(), rgeom,
                                    residual_bits, x);
    check_launch(launch_residual_axpy(view, idx.data_ptr<int64_t>(), k, x2d.data_ptr(),
                                      dtype_of(x2d), B, K, acc.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream()),
                 "residual axpy");
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = geom.N;
  return acc.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cuda

TORCH_LIBRARY_IMPL(qdec, CUDA, m) {
  m.impl("compensated_linear", &qdec::cuda::compensated_linear_cuda);
}
