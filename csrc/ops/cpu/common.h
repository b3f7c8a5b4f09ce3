// Helpers shared by the CPU glue files: turn checked tensors into the
// torch-free views of csrc/include/qdec/cpu_kernels.h and cpu_decode.h, and
// the pieces that more than one op is built from.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "ops/checks.h"
#include "qdec/cpu_decode.h"
#include "qdec/cpu_kernels.h"

namespace qdec::cpu {

// Contiguous tensors behind a LowBitWeight view; they must outlive it.
// Scales and zeros keep their dtype (the kernels convert one row's groups at a
// time), unless the two differ, in which case both become float32.
struct WeightTensors {
  at::Tensor qweight, scales, zeros;
};

WeightTensors weight_tensors(const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros);

LowBitWeight lowbit_weight(const WeightTensors& t, int64_t bits, const WeightGeometry& g);

inline PackedResidual packed_residual(const at::Tensor& residual, const at::Tensor& scales,
                                      const ResidualGeometry& g) {
  return PackedResidual{reinterpret_cast<const uint32_t*>(residual.data_ptr<int32_t>()),
                        scales.data_ptr<float>(), g.K, g.N, residual.size(1)};
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "qdec: ", name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// x[B, K] (float32, contiguous) @ W^T -> float32 [B, N]. Shared by
// quantized_matmul and compensated_linear so that k = 0 is bit-identical.
at::Tensor quantized_matmul_fp32(const at::Tensor& x2d, const at::Tensor& qweight,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                 int64_t bits, const WeightGeometry& geom);

// Dense float32 W [N, K] through the active level's dequantize kernel.
at::Tensor dequantize_fp32(const WeightTensors& t, int64_t bits, const WeightGeometry& geom);

// Indices int64 [B, k] of the k largest |x| per row of x2d (float32, contiguous).
at::Tensor outlier_select_fp32(const at::Tensor& x2d, int64_t k);

// The active level's kernels; a QDEC_CPU_ISA the CPU cannot run becomes a
// c10::Error naming the missing features.
const DecodeKernels& active_kernels();

}  // namespace qdec::cpu
