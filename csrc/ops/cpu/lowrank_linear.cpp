// CPU kernel of qdec::lowrank_linear (schema: csrc/ops/registration.cpp,
// reference: qdec.reference.lowrank_linear_ref).
//
// Decode-sized batches (B <= kLowRankFusedMaxRows) run the two phases of
// csrc/include/qdec/cpu_kernels.h straight off the factors in their storage
// dtype: t = L_B x into one float32 buffer of B*r values, then y = L_A t
// written directly in x's dtype. Nothing of size N or K is allocated and each
// factor is read once for all B rows, which is what a memory-bound batch-1 op
// needs. Threads split phase 1 over the r factor rows and phase 2 over the N
// outputs (two parallel regions: phase 2 needs all of t).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/cpu/common.h"

namespace qdec::cpu {
namespace {

// Beyond this many rows (prefill, perplexity evaluation) the op is two GEMMs
// of B*r*(K+N) flops: the BLAS's blocked, ISA-specific GEMM beats this
// file's dot-product loops (built without -march flags), and converting the
// factors to float32 first costs r*(N+K) values, below 1/B of the flops. The
// same threshold as quantized_matmul's fused path.
constexpr int64_t kLowRankFusedMaxRows = 8;

// Work per task of the parallel loops (~32k multiply-adds), so that small
// problems stay on one thread instead of paying the fork/join.
constexpr int64_t kGrainMacs = 32768;

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& lowrank_a,
                              const at::Tensor& lowrank_b) {
  check_cpu(x, "x");
  check_cpu(lowrank_a, "lowrank_a");
  check_cpu(lowrank_b, "lowrank_b");
  const auto g = check_lowrank_linear(x, lowrank_a, lowrank_b);
  const int64_t K = g.K, N = g.N, r = g.r;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;

  const auto x2d = x.reshape({-1, K});
  const int64_t B = x2d.size(0);
  if (B > kLowRankFusedMaxRows) {
    const auto t = at::matmul(x2d.to(at::kFloat), lowrank_b.to(at::kFloat).t());
    return at::matmul(t, lowrank_a.to(at::kFloat).t()).to(x.scalar_type()).reshape(out_shape);
  }
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y.reshape(out_shape);
  const auto xf = x2d.to(at::kFloat).contiguous();  // B*K values: negligible
  const auto a = lowrank_a.contiguous();
  const auto b = lowrank_b.contiguous();
  std::vector<float> t(static_cast<size_t>(B * r));
  const float* x_ptr = xf.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_linear",
                                  [&] {
    const scalar_t* a_ptr = a.data_ptr<scalar_t>();
    const scalar_t* b_ptr = b.data_ptr<scalar_t>();
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    const int64_t grain1 = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, B * K));
    at::parallel_for(0, r, grain1, [&](int64_t begin, int64_t end) {
      lowrank_project(b_ptr, x_ptr, B, K, r, begin, end, t.data());
    });
    const int64_t grain2 = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, B * r));
    at::parallel_for(0, N, grain2, [&](int64_t begin, int64_t end) {
      lowrank_expand(a_ptr, t.data(), B, N, r, begin, end, y_ptr);
    });
  });
  return y.reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cpu

TORCH_LIBRARY_IMPL(qdec, CPU, m) {
  m.impl("lowrank_linear", &qdec::cpu::lowrank_linear_cpu);
}
