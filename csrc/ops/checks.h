// Argument checks shared by the CPU and CUDA glue. Every message names the
// argument and prints what it got and what was expected, because these are
// the errors users see first.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>
#include <string>

namespace qdec {

inline void check_bits(int64_t bits, const char* name) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "qdec: ", name, " must be in 2..8, got ", bits);
}

// Group size along K: a positive multiple of 32 (so a packed 32-value block
// never spans two groups), or -1 for one group per row.
inline int64_t check_group_size(int64_t group_size, int64_t K) {
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 32 == 0),
              "qdec: group_size must be a positive multiple of 32 or -1 (whole row), got ",
              group_size);
  return group_size == -1 ? std::max<int64_t>(K, 1) : group_size;
}

inline int64_t num_groups(int64_t K, int64_t G) { return (K + G - 1) / G; }

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              "qdec: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "qdec: ", name, " must be ", want, ", got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "qdec: ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.sizes() == want, "qdec: ", name, " must have shape ", want, ", got ",
              t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "qdec: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// Validated geometry of a packed weight: N, K, groups.
struct WeightGeometry {
  int64_t N, K, G, groups;
};

// Checks qweight/scales/zeros against each other and against K; returns the
// geometry. `x_dtype`, when given, is the dtype scales and zeros must match.
inline WeightGeometry check_packed_weight(const at::Tensor& qweight, const at::Tensor& scales,
                                          const std::optional<at::Tensor>& zeros, int64_t bits,
                                          int64_t group_size, int64_t K,
                                          std::optional<at::ScalarType> x_dtype) {
  check_bits(bits, "bits");
  check_dtype(qweight, at::kInt, "qweight");
  check_dim(qweight, 2, "qweight");
  check_dim(scales, 2, "scales");
  check_float(scales, "scales");
  TORCH_CHECK(K >= 1, "qdec: in_features (K) must be >= 1, got ", K);
  const int64_t N = qweight.size(0);
  const int64_t G = check_group_size(group_size, K);
  const int64_t groups = num_groups(K, G);
  const int64_t words = ((K + 31) / 32) * bits;
  TORCH_CHECK(qweight.size(1) == words, "qdec: qweight must have shape [N, ceil(K/32)*bits] = [",
              N, ", ", words, "] for K=", K, ", bits=", bits, ", got ", qweight.sizes());
  check_shape(scales, {N, groups}, "scales ([N, ceil(K/group_size)])");
  check_same_device(scales, qweight, "scales", "qweight");
  if (x_dtype) {
    TORCH_CHECK(scales.scalar_type() == *x_dtype, "qdec: scales dtype ", scales.scalar_type(),
                " must match x dtype ", *x_dtype);
  }
  if (zeros) {
    check_shape(*zeros, {N, groups}, "zeros ([N, ceil(K/group_size)])");
    TORCH_CHECK(zeros->scalar_type() == scales.scalar_type(), "qdec: zeros dtype ",
                zeros->scalar_type(), " must match scales dtype ", scales.scalar_type());
    check_same_device(*zeros, qweight, "zeros", "qweight");
  }
  return {N, K, G, groups};
}

// Validated geometry of a residual store: K input channels, N outputs.
struct ResidualGeometry {
  int64_t K, N;
};

inline ResidualGeometry check_residual(const at::Tensor& residual,
                                       const at::Tensor& residual_scales,
                                       int64_t residual_bits) {
  check_bits(residual_bits, "residual_bits");
  check_dtype(residual, at::kInt, "residual");
  check_dim(residual, 2, "residual");
  check_dtype(residual_scales, at::kFloat, "residual_scales");
  check_dim(residual_scales, 1, "residual_scales");
  const int64_t N = residual_scales.size(0);
  const int64_t words = ((N + 31) / 32) * residual_bits;
  TORCH_CHECK(residual.size(1) == words,
              "qdec: residual must have shape [K, ceil(N/32)*residual_bits] with N=", N,
              " (from residual_scales), residual_bits=", residual_bits, ": expected ", words,
              " columns, got shape ", residual.sizes());
  return {residual.size(0), N};
}

inline void check_k(int64_t k, int64_t K) {
  TORCH_CHECK(k >= 0 && k <= K, "qdec: k must be in [0, K] = [0, ", K, "], got ", k);
}

// channels: int64 [rows, k] with every value in [0, K).
inline void check_channels(const at::Tensor& channels, int64_t rows, int64_t k, int64_t K,
                           bool check_values) {
  check_dtype(channels, at::kLong, "channels");
  TORCH_CHECK(channels.dim() >= 1 && channels.numel() == rows * k,
              "qdec: channels must have shape [*, k] matching x's leading dims (", rows,
              " rows, k=", k, "), got ", channels.sizes());
  if (check_values && channels.numel() > 0) {
    const auto lo = channels.min().item<int64_t>();
    const auto hi = channels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < K, "qdec: channels values must be in [0, ", K, "), got range [",
                lo, ", ", hi, "]");
  }
}

// Shape of x [*, K]: returns K.
inline int64_t check_activations(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "qdec: x must have shape [*, K], got a 0-D tensor");
  return x.size(-1);
}

// Everything compensated_linear checks on every backend: activations, the
// packed weight against x, the residual store against the layer, and k.
inline std::pair<WeightGeometry, ResidualGeometry> check_compensated_linear(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
    const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
    const at::Tensor& residual, const at::Tensor& residual_scales, int64_t residual_bits,
    int64_t k) {
  const int64_t K = check_activations(x);
  const auto geom =
      check_packed_weight(qweight, scales, zeros, bits, group_size, K, x.scalar_type());
  const auto rgeom = check_residual(residual, residual_scales, residual_bits);
  TORCH_CHECK(rgeom.K == K && rgeom.N == geom.N, "qdec: residual store is [K=", rgeom.K,
              ", N=", rgeom.N, "] but the layer is [K=", K, ", N=", geom.N, "]");
  check_k(k, K);
  return {geom, rgeom};
}

// sm_budget of compensated_linear: a thread-block cap, 0 = automatic. Checked
// on every backend so a bad value fails the same way on CPU and CUDA.
inline void check_sm_budget(int64_t sm_budget) {
  TORCH_CHECK(sm_budget >= 0, "qdec: sm_budget must be >= 0 (0 = automatic), got ", sm_budget);
}

// Validated geometry of a static low-rank term y = L_A (L_B x).
struct LowRankGeometry {
  int64_t N, K, r;
};

// Everything lowrank_linear checks on every backend: x [*, K], lowrank_a
// [N, r], lowrank_b [r, K], one floating dtype for all three, one device.
inline LowRankGeometry check_lowrank_linear(const at::Tensor& x, const at::Tensor& lowrank_a,
                                            const at::Tensor& lowrank_b) {
  const int64_t K = check_activations(x);
  check_float(lowrank_a, "lowrank_a");
  check_float(lowrank_b, "lowrank_b");
  check_dim(lowrank_a, 2, "lowrank_a ([N, r])");
  check_dim(lowrank_b, 2, "lowrank_b ([r, K])");
  TORCH_CHECK(lowrank_a.scalar_type() == x.scalar_type() &&
                  lowrank_b.scalar_type() == x.scalar_type(),
              "qdec: lowrank_a and lowrank_b must have x's dtype ", x.scalar_type(), ", got ",
              lowrank_a.scalar_type(), " and ", lowrank_b.scalar_type());
  const int64_t r = lowrank_b.size(0);
  TORCH_CHECK(lowrank_b.size(1) == K, "qdec: lowrank_b must have shape [r, K] with K = x.size(-1) = ",
              K, ", got ", lowrank_b.sizes());
  TORCH_CHECK(lowrank_a.size(1) == r,
              "qdec: lowrank_a must have shape [N, r] with r = lowrank_b.size(0) = ", r, ", got ",
              lowrank_a.sizes());
  check_same_device(lowrank_a, x, "lowrank_a", "x");
  check_same_device(lowrank_b, x, "lowrank_b", "x");
  return {lowrank_a.size(0), K, r};
}

}  // namespace qdec
