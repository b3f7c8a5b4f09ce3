// Every qdec operator schema, declared once. Kernels live one file per op and
// dispatch key: csrc/ops/cpu/<op>.cpp and csrc/ops/cuda/<op>.cu. The Python
// wrappers (with fake kernels) are in qdec/ops.py, the executable spec in
// qdec/reference.py.
//
// Shared conventions (bit layout: csrc/include/qdec/bitpack.h):
//   x          float32 | float16 | bfloat16, [*, K] (leading dims flattened)
//   qweight    int32 [N, ceil(K/32) * bits], codes of W[N, K]
//   scales     [N, ceil(K/G)], same dtype as x (for dequantize: any float)
//   zeros      optional, like scales, in code units (w = (q - z) * s);
//              None means symmetric: z = 2^(bits-1)
//   group_size G: a positive multiple of 32, or -1 for one group per row
//   residual   int32 [K, ceil(N/32) * residual_bits]: row j = input channel j
//   residual_scales float32 [N]: r = (q - 2^(residual_bits-1)) * scale[n]
//   channels   int64 [*, k], input-channel indices
// All math accumulates in float32.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <exception>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "qdec/cpu_decode.h"

namespace {

// The CPU decode kernels' instruction-set level (csrc/include/qdec/cpu_decode.h).
std::string cpu_isa() {
  try {
    return qdec::cpu::isa_name(qdec::cpu::active_isa());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "qdec: ", e.what());
  }
}

std::string set_cpu_isa(std::string level) {
  const std::string previous = cpu_isa();
  try {
    qdec::cpu::set_isa(qdec::cpu::parse_isa(level.c_str()));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "qdec: set_cpu_isa: ", e.what());
  }
  return previous;
}

// The CPU GEMV's activation precision (csrc/include/qdec/cpu_decode.h).
std::string cpu_activations() {
  try {
    return qdec::cpu::activation_precision_name(qdec::cpu::activation_precision());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "qdec: ", e.what());
  }
}

std::string set_cpu_activations(std::string precision) {
  const std::string previous = cpu_activations();
  try {
    qdec::cpu::set_activation_precision(qdec::cpu::parse_activation_precision(precision.c_str()));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "qdec: set_cpu_activations: ", e.what());
  }
  return previous;
}

// Distinct threads that ran a parallel_for over `work_items` items of grain
// 1: a diagnostic that the build's at::parallel_for really is parallel (an
// extension compiled without OpenMP flags silently runs it on one thread).
int64_t parallel_threads(int64_t work_items) {
  TORCH_CHECK(work_items >= 1, "qdec: parallel_threads: work_items must be >= 1, got ", work_items);
  std::mutex mutex;
  std::set<std::thread::id> seen;
  at::parallel_for(0, work_items, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

TORCH_LIBRARY(qdec, m) {
  // W = (q - z) * s as a dense [N, in_features] tensor of scales' dtype.
  // in_features is needed because rows are padded to whole 32-value blocks.
  m.def(
      "dequantize(Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
      "int group_size, int in_features) -> Tensor");

  // y[*, N] = x[*, K] @ W^T with W held packed; output dtype = x dtype.
  m.def(
      "quantized_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, "
      "int bits, int group_size) -> Tensor");

  // Indices [*, k] (int64) of the k largest |x| per row, ordered by
  // descending |x|; ties go to the smaller index; NaN ranks as +inf.
  // k is a fixed capacity, so shapes stay static for graphs and compile.
  m.def("outlier_select(Tensor x, int k) -> Tensor");

  // Dequantized residual rows for the chosen channels: float32 [*, k, N],
  // out[..., i, n] = R[n, channels[..., i]].
  m.def(
      "residual_gather(Tensor residual, Tensor residual_scales, Tensor channels, "
      "int residual_bits) -> Tensor");

  // y = x @ W^T + sum_{j in S} R[:, j] * x[j] per row, S = outlier_select(x, k)
  // or the given channels ([*, k]). k = 0 returns exactly quantized_matmul.
  // sm_budget caps the thread blocks the CUDA compensation kernel occupies
  // beside the GEMV (0 = automatic); a performance knob for the tuner, it
  // changes only the float32 summation order, and the CPU kernel ignores it.
  m.def(
      "compensated_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, "
      "int bits, int group_size, Tensor residual, Tensor residual_scales, "
      "int residual_bits, int k, Tensor? channels=None, int sm_budget=0) -> Tensor");

  // Static low-rank term y[*, N] = (x[*, K] @ lowrank_b^T) @ lowrank_a^T with
  // lowrank_a [N, r], lowrank_b [r, K] in x's dtype; the r-vector t = L_B x is
  // kept in float32 and the output is in x's dtype. r = 0 gives zeros.
  m.def("lowrank_linear(Tensor x, Tensor lowrank_a, Tensor lowrank_b) -> Tensor");

  // The CPU decode kernels' instruction-set level: "scalar", "avx2" or
  // "avx512" (QDEC_CPU_ISA picks it at start-up; default: the best the CPU
  // has). set_cpu_isa forces one ("auto" = the best) and returns the previous;
  // a level the CPU cannot run is an error naming the missing features.
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("set_cpu_isa(str level) -> str", &set_cpu_isa);
  // How the CPU GEMV represents x: "int16x2" (two int16 terms per value,
  // float-grade; default) or "int16" (one term: faster, error <= max|x|/65534
  // per span of 32-128 inputs). QDEC_CPU_ACTIVATIONS sets it at start-up;
  // set_cpu_activations returns the previous one.
  m.def("cpu_activations() -> str", &cpu_activations);
  m.def("set_cpu_activations(str precision) -> str", &set_cpu_activations);
  // Threads a parallel loop of the CPU ops actually uses (a build check).
  m.def("parallel_threads(int work_items) -> int", &parallel_threads);
}
