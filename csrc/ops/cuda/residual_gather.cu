// CUDA glue of qdec::residual_gather (schema: csrc/ops/registration.cpp). The
// residual may be a pinned CPU tensor, read zero-copy (see common.cuh).
#include <torch/library.h>

#include "ops/cuda/common.cuh"

namespace qdec::cuda {
namespace {

at::Tensor residual_gather_cuda(const at::Tensor& residual, const at::Tensor& residual_scales,
                                const at::Tensor& channels, int64_t residual_bits) {
  const auto geom = check_residual(residual, residual_scales, residual_bits);
  TORCH_CHECK(channels.dim() >= 1, "qdec: channels must have shape [*, k], got a 0-D tensor");
  TORCH_CHECK(channels.is_cuda(), "qdec: channels must be a CUDA tensor, got ", channels.device());
  const int64_t k = channels.size(-1);
  const int64_t rows = k == 0 ? 0 : channels.numel() / k;
  // Values are not checked here (that would need a device-to-host copy and
  // break graph capture); the kernel writes zero rows for out-of-range channels.
  check_channels(channels, rows, k, geom.K, /*check_values=*/false);
  const c10::cuda::CUDAGuard guard(channels.device());
  const auto idx = channels.contiguous();
  // Named: the view's pointers must outlive the kernel (see residual_tensors).
  const auto rt = residual_tensors(residual, residual_scales);
  const auto view = residual_view(rt, geom, residual_bits, channels);
  auto out_shape = channels.sizes().vec();
  out_shape.push_back(geom.N);
  auto out = at::empty(out_shape, residual_scales.options());
  check_launch(launch_residual_gather(view, idx.data_ptr<int64_t>(), idx.numel(),
                                      out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "residual gather");
  return out;
}

}  // namespace
}  // namespace qdec::cuda

TORCH_LIBRARY_IMPL(qdec, CUDA, m) { m.impl("residual_gather", &qdec::cuda::residual_gather_cuda); }
