// CUDA glue of qdec::lowrank_linear (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.lowrank_linear_ref).
//
// Decode batches (B <= kMaxLowRankRows, B*r floats in shared memory) run the
// one-launch kernel of csrc/ops/cuda/kernels/lowrank.cu: both factors, float32
// t = L_B x, output written in x's dtype. Larger batches are two cuBLAS GEMMs
// in float32 (compute-bound there; converting the factors costs r*(N+K)
// values, under 1/B of the flops). No host synchronisation, and allocations
// only through the caching allocator, so the op can be captured in a graph.
#include <torch/library.h>

#include "ops/cuda/common.cuh"

namespace qdec::cuda {
namespace {

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& lowrank_a,
                               const at::Tensor& lowrank_b) {
  const auto g = check_lowrank_linear(x, lowrank_a, lowrank_b);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = g.N;
  const auto x2d = x.reshape({-1, g.K}).contiguous();
  const int64_t B = x2d.size(0);
  if (B > kMaxLowRankRows || B * g.r > kMaxLowRankSharedFloats) {
    const auto t = at::mm(x2d.to(at::kFloat), lowrank_b.to(at::kFloat).t());
    return at::mm(t, lowrank_a.to(at::kFloat).t()).to(x.scalar_type()).reshape(out_shape);
  }
  auto y = at::empty({B, g.N}, x2d.options());
  if (B == 0 || g.N == 0) return y.reshape(out_shape);
  const auto a = lowrank_a.contiguous();
  const auto b = lowrank_b.contiguous();
  auto partial = at::empty({lowrank_splits(g.K, g.r) * B * g.r}, x2d.options().dtype(at::kFloat));
  const LowRankView view{a.data_ptr(), b.data_ptr(), dtype_of(x2d), g.N, g.K, g.r};
  check_launch(launch_lowrank(view, x2d.data_ptr(), B, partial.data_ptr<float>(), y.data_ptr(),
                              c10::cuda::getCurrentCUDAStream()),
               "low-rank kernel");
  return y.reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cuda

TORCH_LIBRARY_IMPL(qdec, CUDA, m) {
  m.impl("lowrank_linear", &qdec::cuda::lowrank_linear_cuda);
}
