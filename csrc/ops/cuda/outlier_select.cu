// CUDA glue of qdec::outlier_select (schema: csrc/ops/registration.cpp).
//
// k <= kMaxSelectK (every decode setting): the single-kernel radix select of
// kernels/select.cu. Larger k (whole-row orderings, not a decode path): ATen's
// stable descending sort of |x| (NaN -> +inf), which has the same semantics.
// Neither synchronises with the host, so both can be captured in a CUDA graph.
#include <torch/library.h>

#include <limits>

#include "ops/cuda/common.cuh"

namespace qdec::cuda {

at::Tensor outlier_select_cuda_impl(const at::Tensor& x2d, int64_t k) {
  const int64_t B = x2d.size(0), K = x2d.size(1);
  if (k <= kMaxSelectK && K <= std::numeric_limits<uint32_t>::max()) {
    auto out = at::empty({B, k}, x2d.options().dtype(at::kLong));
    check_launch(launch_outlier_select(x2d.data_ptr(), dtype_of(x2d), B, K, k,
                                       out.data_ptr<int64_t>(),
                                       c10::cuda::getCurrentCUDAStream()),
                 "outlier_select");
    return out;
  }
  // posinf too: nan_to_num would otherwise make +inf the largest finite float.
  const double inf = std::numeric_limits<double>::infinity();
  const auto key = at::nan_to_num(x2d.to(at::kFloat).abs(), inf, inf);
  const auto order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/-1, /*descending=*/true));
  return order.narrow(-1, 0, k).contiguous();
}

namespace {

at::Tensor outlier_select_cuda(const at::Tensor& x, int64_t k) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "qdec: x must have shape [*, K], got a 0-D tensor");
  const int64_t K = x.size(-1);
  check_k(k, K);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = k;
  return outlier_select_cuda_impl(x.reshape({-1, K}).contiguous(), k).reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cuda

TORCH_LIBRARY_IMPL(qdec, CUDA, m) { m.impl("outlier_select", &qdec::cuda::outlier_select_cuda); }
