// ATen glue shared by the CUDA op files: dtype mapping, device views of the
// packed weight and the residual store, and the pieces several ops build on.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "ops/checks.h"
#include "qdec/cuda_kernels.h"

namespace qdec::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "qdec: unsupported dtype ", t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "qdec: launching ", what, " failed: ", cudaGetErrorString(err));
}

inline void check_on_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "qdec: ", name, " is on ", t.device(),
              " but x is on ", ref.device());
}

// The tensors behind a PackedWeightView (contiguous), kept alive by the caller.
struct WeightTensors {
  at::Tensor qweight, scales, zeros;
};

inline WeightTensors weight_tensors(const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros) {
  return {qweight.contiguous(), scales.contiguous(),
          zeros ? zeros->contiguous() : at::Tensor()};
}

inline PackedWeightView weight_view(const WeightTensors& t, const WeightGeometry& g,
                                    int64_t bits) {
  return {reinterpret_cast<const uint32_t*>(t.qweight.data_ptr<int32_t>()),
          t.scales.data_ptr(),
          t.zeros.defined() ? t.zeros.data_ptr() : nullptr,
          dtype_of(t.scales),
          g.N, g.K, g.G, g.groups, t.qweight.size(1), static_cast<int>(bits)};
}
PackedWeightView weight_view(WeightTensors&&, const WeightGeometry&, int64_t) = delete;

// The tensors behind a ResidualView (contiguous), kept alive by the caller for
// as long as kernels launched with the view may run: a view of temporaries
// would point into blocks that the caching allocator hands to the next
// allocation (the op's own output, say) while the kernels still read them.
struct ResidualTensors {
  at::Tensor residual, scales;
};

inline ResidualTensors residual_tensors(const at::Tensor& residual,
                                        const at::Tensor& residual_scales) {
  // A strided CPU residual cannot be made contiguous in place: the copy would
  // be pageable memory, which no kernel can read.
  TORCH_CHECK(!residual.is_cpu() || residual.is_contiguous(),
              "qdec: a CPU residual must be contiguous (and pinned) to be read zero-copy by "
              "the CUDA kernel, got strides ", residual.strides());
  return {residual.contiguous(), residual_scales.contiguous()};
}

// The residual may live on the GPU, or in pinned host memory that kernels read
// zero-copy through its device alias (the whole point of QDEC: the store never
// occupies GPU memory). Pageable host memory cannot be read by a kernel.
inline ResidualView residual_view(const ResidualTensors& t, const ResidualGeometry& g,
                                  int64_t bits, const at::Tensor& x) {
  const at::Tensor& residual = t.residual;
  TORCH_CHECK(residual.is_contiguous() && t.scales.is_contiguous(),
              "qdec: residual_view needs the contiguous tensors of residual_tensors()");
  check_on_cuda(t.scales, x, "residual_scales");
  const void* ptr = residual.data_ptr();
  if (residual.is_cpu()) {
    TORCH_CHECK(residual.is_pinned(),
                "qdec: a CPU residual must be in pinned memory (residual.pin_memory()) to be "
                "read zero-copy by the CUDA kernel");
    void* dev = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, const_cast<void*>(ptr), 0));
    ptr = dev;
  } else {
    check_on_cuda(residual, x, "residual");
  }
  return {static_cast<const uint32_t*>(ptr), t.scales.data_ptr<float>(), g.K, g.N,
          residual.size(1), static_cast<int>(bits)};
}
// Views hold raw pointers: refuse to build one from a temporary at compile time.
ResidualView residual_view(ResidualTensors&&, const ResidualGeometry&, int64_t,
                           const at::Tensor&) = delete;

// x[B, K] @ W^T as [B, N] in out_dtype (float32 or x's dtype), accumulated
// in float32 and rounded once; shared by quantized_matmul and
// compensated_linear so that k = 0 is bit-identical.
at::Tensor quantized_matmul_2d_cuda(const at::Tensor& x2d, const at::Tensor& qweight,
                                    const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, int64_t bits,
                                    const WeightGeometry& geom, at::ScalarType out_dtype);

// int64 [B, k] indices of the k largest |x| per row (x2d contiguous).
at::Tensor outlier_select_cuda_impl(const at::Tensor& x2d, int64_t k);

}  // namespace qdec::cuda
