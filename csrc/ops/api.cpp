// Implementation of csrc/include/qdec/ops.h: typed dispatcher handles, looked
// up once per process.
#include "qdec/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace qdec {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using OptTensor = const std::optional<at::Tensor>&;

}  // namespace

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, OptTensor zeros,
                      int64_t bits, int64_t group_size, int64_t in_features) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, OptTensor, int64_t, int64_t, int64_t)>(
          "qdec::dequantize");
  return handle.call(qweight, scales, zeros, bits, group_size, in_features);
}

at::Tensor quantized_matmul(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, OptTensor zeros, int64_t bits,
                            int64_t group_size) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     OptTensor, int64_t, int64_t)>("qdec::quantized_matmul");
  return handle.call(x, qweight, scales, zeros, bits, group_size);
}

at::Tensor outlier_select(const at::Tensor& x, int64_t k) {
  static auto handle = op<at::Tensor(const at::Tensor&, int64_t)>("qdec::outlier_select");
  return handle.call(x, k);
}

at::Tensor residual_gather(const at::Tensor& residual, const at::Tensor& residual_scales,
                           const at::Tensor& channels, int64_t residual_bits) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
          "qdec::residual_gather");
  return handle.call(residual, residual_scales, channels, residual_bits);
}

at::Tensor compensated_linear(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& scales, OptTensor zeros, int64_t bits,
                              int64_t group_size, const at::Tensor& residual,
                              const at::Tensor& residual_scales, int64_t residual_bits, int64_t k,
                              OptTensor channels, int64_t sm_budget) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, OptTensor, int64_t,
                    int64_t, const at::Tensor&, const at::Tensor&, int64_t, int64_t, OptTensor,
                    int64_t)>("qdec::compensated_linear");
  return handle.call(x, qweight, scales, zeros, bits, group_size, residual, residual_scales,
                     residual_bits, k, channels, sm_budget);
}

at::Tensor lowrank_linear(const at::Tensor& x, const at::Tensor& lowrank_a,
                          const at::Tensor& lowrank_b) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "qdec::lowrank_linear");
  return handle.call(x, lowrank_a, lowrank_b);
}

std::string set_cpu_activations(const std::string& precision) {
  static auto handle = op<std::string(std::string)>("qdec::set_cpu_activations");
  return handle.call(precision);
}

std::string cpu_activations() {
  static auto handle = op<std::string()>("qdec::cpu_activations");
  return handle.call();
}

bool ops_registered() {
  for (const char* name : {"qdec::dequantize", "qdec::quantized_matmul", "qdec::outlier_select",
                           "qdec::residual_gather", "qdec::compensated_linear",
                           "qdec::lowrank_linear"}) {
    if (!c10::Dispatcher::singleton().findSchema({name, ""})) return false;
  }
  return true;
}

}  // namespace qdec
