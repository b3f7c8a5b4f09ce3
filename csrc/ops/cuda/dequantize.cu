// CUDA kernel glue of qdec::dequantize (schema: csrc/ops/registration.cpp).
#include <torch/library.h>

#include "ops/cuda/common.cuh"

namespace qdec::cuda {
namespace {

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, int64_t bits,
                           int64_t group_size, int64_t in_features) {
  const auto geom =
      check_packed_weight(qweight, scales, zeros, bits, group_size, in_features, std::nullopt);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const auto t = weight_tensors(qweight, scales, zeros);
  auto out = at::empty({geom.N, geom.K}, scales.options().dtype(at::kFloat));
  check_launch(launch_dequantize(weight_view(t, geom, bits), out.data_ptr<float>(),
                                 c10::cuda::getCurrentCUDAStream()),
               "dequantize");
  return out.to(scales.scalar_type());
}

}  // namespace
}  // namespace qdec::cuda

TORCH_LIBRARY_IMPL(qdec, CUDA, m) { m.impl("dequantize", &qdec::cuda::dequantize_cuda); }
