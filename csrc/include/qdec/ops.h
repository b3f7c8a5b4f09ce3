// Public C++ API of the qdec operators for programs that link libtorch and
// the qdec ops library but run no Python (qdec_infer, the C++ tests).
// Each function calls the registered operator through the dispatcher, so the
// CPU or CUDA kernel is picked from the inputs' device exactly as in Python.
// Argument conventions: csrc/ops/registration.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace qdec {

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                      int64_t in_features);

at::Tensor quantized_matmul(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                            int64_t bits, int64_t group_size);

at::Tensor outlier_select(const at::Tensor& x, int64_t k);

at::Tensor residual_gather(const at::Tensor& residual, const at::Tensor& residual_scales,
                           const at::Tensor& channels, int64_t residual_bits);

at::Tensor compensated_linear(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                              int64_t bits, int64_t group_size, const at::Tensor& residual,
                              const at::Tensor& residual_scales, int64_t residual_bits, int64_t k,
                              const std::optional<at::Tensor>& channels = std::nullopt,
                              int64_t sm_budget = 0);

// (x @ lowrank_b^T) @ lowrank_a^T: x [*, K], lowrank_a [N, r], lowrank_b [r, K].
at::Tensor lowrank_linear(const at::Tensor& x, const at::Tensor& lowrank_a,
                          const at::Tensor& lowrank_b);

// Sets the CPU GEMV's activation precision ("int16x2" or "int16", see
// registration.cpp) for the whole process and returns the previous one.
std::string set_cpu_activations(const std::string& precision);
std::string cpu_activations();

// True when every qdec schema is registered in this process: false means the
// ops library was linked without --no-as-needed and its registrations never ran.
bool ops_registered();

}  // namespace qdec
