// CUDA glue of qdec::compensated_linear (schema: csrc/ops/registration.cpp).
//
// The compensation runs beside the base GEMV, not after it: the GEMV goes on
// the current stream while a side stream from the pool selects the k channels
// and accumulates their residual rows (zero-copy from pinned host memory)
// into per-split partial sums; the current stream then waits for the side
// stream and one combine kernel adds GEMV + partials and casts. Selection and
// PCIe reads thus hide behind the memory-bound GEMV. Fork and join are CUDA
// events, so the op can be captured in a CUDA graph (the side stream joins the
// capture). Every buffer is allocated on the current stream before the fork,
// and the join precedes the op's return, so the caching allocator needs no
// record_stream. QDEC_COMPENSATION_OVERLAP=0 (read once) runs everything on
// the current stream, for profiling the two parts apart.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "ops/cuda/common.cuh"

namespace qdec::cuda {
namespace {

bool overlap_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("QDEC_COMPENSATION_OVERLAP");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// The fork and join events of the current thread on `device` (the current
// device), created once: re-recording an event is safe because a wait binds
// to the record that precedes it, and this avoids an event creation per call.
// (Raw CUDA events, not ATen's CUDAEvent, whose header needs the cuSPARSE
// headers that a minimal toolkit lacks.)
std::array<cudaEvent_t, 2> fork_join_events(c10::DeviceIndex device) {
  thread_local std::unordered_map<c10::DeviceIndex, std::array<cudaEvent_t, 2>> events;
  auto it = events.find(device);
  if (it == events.end()) {
    std::array<cudaEvent_t, 2> e{};
    for (auto& ev : e) C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    it = events.emplace(device, e).first;
  }
  return it->second;
}

at::Tensor compensated_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& scales,
                                   const std::optional<at::Tensor>& zeros, int64_t bits,
                                   int64_t group_size, const at::Tensor& residual,
                                   const at::Tensor& residual_scales, int64_t residual_bits,
                                   int64_t k, const std::optional<at::Tensor>& channels,
                                   int64_t sm_budget) {
  const auto [geom, rgeom] = check_compensated_linear(x, qweight, scales, zeros, bits, group_size,
                                                      residual, residual_scales, residual_bits, k);
  const int64_t K = geom.K;
  check_on_cuda(qweight, x, "qweight");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x2d = x.reshape({-1, K}).contiguous();
  const int64_t B = x2d.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = geom.N;
  if (channels) {
    check_on_cuda(*channels, x, "channels");
    check_channels(*channels, B, k, K, /*check_values=*/false);
  }
  if (k == 0 || B == 0) {  // exactly quantized_matmul
    return quantized_matmul_2d_cuda(x2d, qweight, scales, zeros, bits, geom, x.scalar_type())
        .reshape(out_shape);
  }
  // Named: the view's pointers must outlive the kernels (see residual_tensors).
  const auto rt = residual_tensors(residual, residual_scales);
  const auto view = residual_view(rt, rgeom, residual_bits, x);
  check_sm_budget(sm_budget);
  const int64_t splits = residual_axpy_splits(k, geom.N, B, sm_budget);
  auto partial = at::empty({splits, B, geom.N}, x2d.options().dtype(at::kFloat));
  auto out = at::empty({B, geom.N}, x2d.options());
  const auto main = c10::cuda::getCurrentCUDAStream();
  const bool overlap = overlap_enabled();
  const auto side = overlap ? c10::cuda::getStreamFromPool(/*isHighPriority=*/true, x.device().index())
                            : main;
  const auto [fork, join] = fork_join_events(x.device().index());
  if (overlap) {
    C10_CUDA_CHECK(cudaEventRecord(fork, main.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), fork, 0));
  }
  at::Tensor idx;
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    // Selected on the side stream too; with `channels` given, nothing to select.
    idx = channels ? channels->reshape({B, k}).contiguous() : outlier_select_cuda_impl(x2d, k);
    check_launch(launch_residual_axpy_partial(view, idx.data_ptr<int64_t>(), k, x2d.data_ptr(),
                                              dtype_of(x2d), B, K, splits,
                                              partial.data_ptr<float>(), side.stream()),
                 "residual axpy");
  }
  if (overlap) C10_CUDA_CHECK(cudaEventRecord(join, side.stream()));
  const auto acc = quantized_matmul_2d_cuda(x2d, qweight, scales, zeros, bits, geom, at::kFloat);
  if (overlap) C10_CUDA_CHECK(cudaStreamWaitEvent(main.stream(), join, 0));
  check_launch(launch_compensation_combine(acc.data_ptr<float>(), partial.data_ptr<float>(),
                                           splits, B, geom.N, out.data_ptr(), dtype_of(out),
                                           main.stream()),
               "compensation combine");
  return out.reshape(out_shape);
}

}  // namespace
}  // namespace qdec::cuda

TORCH_LIBRARY_IMPL(qdec, CUDA, m) {
  m.impl("compensated_linear", &qdec::cuda::compensated_linear_cuda);
}
