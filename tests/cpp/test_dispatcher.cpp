// The qdec ops called through the dispatcher from a program without Python.
// Expected values are computed here independently: codes are packed bit by
// bit by this file's own packer and products are summed in double.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "catch.h"
#include "qdec/ops.h"

namespace {

// Packs codes[rows][cols] bit by bit into the QDEC layout (blocks of 32 values,
// `bits` words per block, value i at bit bits*i of the block's words).
at::Tensor pack_bitwise(const std::vector<std::vector<int>>& codes, int bits) {
  const int64_t rows = codes.size(), cols = codes[0].size();
  const int64_t blocks = (cols + 31) / 32;
  std::vector<uint32_t> words(rows * blocks * bits, 0u);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      for (int b = 0; b < bits; ++b) {
        if (!((codes[r][c] >> b) & 1)) continue;
        const int64_t bit = (c % 32) * bits + b;  // bit within the block
        words[r * blocks * bits + (c / 32) * bits + bit / 32] |= 1u << (bit % 32);
      }
  auto t = at::empty({rows, blocks * bits}, at::kInt);
  std::memcpy(t.data_ptr<int32_t>(), words.data(), words.size() * 4);
  return t;
}

struct Case {
  int64_t N = 21, K = 75, G = 32, bits = 3, rbits = 4, B = 3, k = 6;
  std::vector<std::vector<int>> q, rq;  // q[N][K], rq[K][N]
  std::vector<double> s, z, rs, x;     // s,z [N][groups], rs [N], x [B][K]
  int64_t groups() const { return (K + G - 1) / G; }
};

Case make_case(uint32_t seed) {
  Case c;
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> code(0, (1 << c.bits) - 1), rcode(0, (1 << c.rbits) - 1);
  // Scales are powers of two and activations small integers / 8, so every
  // product and partial sum below is exact in float32 and in double: the
  // comparison can be tight without depending on summation order.
  std::uniform_int_distribution<int> pow2(0, 3), xi(-16, 16), zi(0, (1 << c.bits) - 1);
  c.q.assign(c.N, std::vector<int>(c.K));
  c.rq.assign(c.K, std::vector<int>(c.N));
  for (auto& row : c.q) for (auto& v : row) v = code(gen);
  for (auto& row : c.rq) for (auto& v : row) v = rcode(gen);
  for (int64_t i = 0; i < c.N * c.groups(); ++i) {
    c.s.push_back(std::ldexp(1.0, -pow2(gen) - 4));
    c.z.push_back(zi(gen));
  }
  for (int64_t n = 0; n < c.N; ++n) c.rs.push_back(std::ldexp(1.0, -pow2(gen) - 8));
  for (int64_t i = 0; i < c.B * c.K; ++i) c.x.push_back(xi(gen) / 8.0);
  // Distinct magnitudes in the first row so the selection is unambiguous.
  for (int64_t j = 0; j < c.K; ++j) c.x[j] = (j % 2 ? -1.0 : 1.0) * (1.0 + 0.5 * ((j * 37) % c.K));
  return c;
}

at::Tensor to_tensor(const std::vector<double>& v, at::IntArrayRef shape) {
  std::vector<float> f(v.begin(), v.end());
  return at::from_blob(f.data(), shape, at::kFloat).clone();
}

// Top-k by |x| desc, index asc: written independently of the kernel.
std::vector<int64_t> topk_indices(const double* x, int64_t K, int64_t k) {
  std::vector<int64_t> idx(K);
  for (int64_t i = 0; i < K; ++i) idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int64_t a, int64_t b) { return std::fabs(x[a]) > std::fabs(x[b]); });
  idx.resize(k);
  return idx;
}

std::vector<double> expected_output(const Case& c, int64_t k) {
  std::vector<double> y(c.B * c.N, 0.0);
  for (int64_t b = 0; b < c.B; ++b) {
    const double* xb = &c.x[b * c.K];
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t j = 0; j < c.K; ++j) {
        const int64_t g = j / c.G;
        y[b * c.N + n] += xb[j] * (c.q[n][j] - c.z[n * c.groups() + g]) * c.s[n * c.groups() + g];
      }
    for (int64_t j : topk_indices(xb, c.K, k))
      for (int64_t n = 0; n < c.N; ++n)
        y[b * c.N + n] += xb[j] * (c.rq[j][n] - (1 << (c.rbits - 1))) * c.rs[n];
  }
  return y;
}

}  // namespace

TEST_CASE("every qdec schema is registered after linking the ops library") {
  REQUIRE(qdec::ops_registered());
  auto handle = c10::Dispatcher::singleton().findSchema({"qdec::compensated_linear", ""});
  REQUIRE(handle.has_value());
  REQUIRE(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU));
}

TEST_CASE("compensated_linear through the dispatcher matches an independent computation") {
  const Case c = make_case(7);
  const auto qweight = pack_bitwise(c.q, c.bits);
  const auto residual = pack_bitwise(c.rq, c.rbits);
  const auto scales = to_tensor(c.s, {c.N, c.groups()});
  const auto zeros = to_tensor(c.z, {c.N, c.groups()});
  const auto rscales = to_tensor(c.rs, {c.N});
  const auto x = to_tensor(c.x, {c.B, c.K});

  for (int64_t k : {int64_t{0}, c.k, c.K}) {
    const auto y = qdec::compensated_linear(x, qweight, scales, zeros, c.bits, c.G, residual,
                                            rscales, c.rbits, k);
    REQUIRE(y.sizes() == at::IntArrayRef({c.B, c.N}));
    const auto want = expected_output(c, k);
    const float* got = y.data_ptr<float>();
    for (int64_t i = 0; i < c.B * c.N; ++i) {
      INFO("k=" << k << " output " << i);
      // Inputs are dyadic with few bits: float32 sums are exact up to a
      // final rounding of a value of magnitude < 2^8, so 1e-5 relative is loose.
      REQUIRE(std::fabs(got[i] - want[i]) <= 1e-5 * (1.0 + std::fabs(want[i])));
    }
  }

  // k = 0 is exactly the base quantized matmul.
  const auto base = qdec::quantized_matmul(x, qweight, scales, zeros, c.bits, c.G);
  REQUIRE(at::equal(base, qdec::compensated_linear(x, qweight, scales, zeros, c.bits, c.G,
                                                   residual, rscales, c.rbits, 0)));
}

TEST_CASE("outlier_select orders by |x| and breaks ties by index") {
  const float vals[] = {1.f, -3.f, 3.f, 0.5f, -3.f, 2.f};
  const auto x = at::from_blob(const_cast<float*>(vals), {1, 6}, at::kFloat).clone();
  const auto idx = qdec::outlier_select(x, 4);
  const int64_t* p = idx.data_ptr<int64_t>();
  REQUIRE(std::vector<int64_t>(p, p + 4) == std::vector<int64_t>{1, 2, 4, 5});
}

TEST_CASE("residual_gather returns the dequantized residual rows") {
  const Case c = make_case(11);
  const auto residual = pack_bitwise(c.rq, c.rbits);
  const auto rscales = to_tensor(c.rs, {c.N});
  const auto channels = at::tensor({int64_t{4}, int64_t{0}, c.K - 1}, at::kLong).reshape({1, 3});
  const auto rows = qdec::residual_gather(residual, rscales, channels, c.rbits);
  REQUIRE(rows.sizes() == at::IntArrayRef({1, 3, c.N}));
  const int64_t want_rows[] = {4, 0, c.K - 1};
  for (int i = 0; i < 3; ++i)
    for (int64_t n = 0; n < c.N; ++n)
      REQUIRE(rows[0][i][n].item<float>() ==
              static_cast<float>((c.rq[want_rows[i]][n] - 8) * c.rs[n]));
}

TEST_CASE("bad arguments raise errors that name them") {
  const Case c = make_case(3);
  const auto qweight = pack_bitwise(c.q, c.bits);
  const auto scales = to_tensor(c.s, {c.N, c.groups()});
  const auto x = to_tensor(c.x, {c.B, c.K});
  auto message = [&](auto&& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  CHECK(message([&] { qdec::quantized_matmul(x, qweight, scales, std::nullopt, 9, c.G); })
            .find("bits must be in 2..8, got 9") != std::string::npos);
  CHECK(message([&] { qdec::outlier_select(x, c.K + 1); }).find("k must be in [0, K]") !=
        std::string::npos);
  CHECK(message([&] { qdec::dequantize(qweight, scales, std::nullopt, c.bits, 48, c.K); })
            .find("group_size must be a positive multiple of 32") != std::string::npos);
}

TEST_CASE("lowrank_linear through the dispatcher matches a hand computation") {
  // x [2, 5], L_B [2, 5], L_A [3, 2]: small dyadic values, so float32 is exact.
  const float xv[] = {1.f, -2.f, 0.5f, 3.f, 0.f,  //
                      -1.f, 0.25f, 2.f, 0.f, 1.f};
  const float bv[] = {1.f, 0.f, 2.f, -1.f, 0.5f,  //
                      0.f, 1.f, -1.f, 0.25f, 2.f};
  const float av[] = {1.f, 2.f,  //
                      -0.5f, 0.f,  //
                      0.f, -4.f};
  const auto x = at::from_blob(const_cast<float*>(xv), {2, 5}, at::kFloat).clone();
  const auto lb = at::from_blob(const_cast<float*>(bv), {2, 5}, at::kFloat).clone();
  const auto la = at::from_blob(const_cast<float*>(av), {3, 2}, at::kFloat).clone();
  // t = L_B x per row:
  //   row 0: t0 = 1 + 0 + 1 - 3 + 0 = -1,      t1 = 0 - 2 - 0.5 + 0.75 + 0 = -1.75
  //   row 1: t0 = -1 + 0 + 4 - 0 + 0.5 = 3.5,  t1 = 0 + 0.25 - 2 + 0 + 2 = 0.25
  // y = L_A t: row 0: [-1 - 3.5, 0.5, 7] ; row 1: [3.5 + 0.5, -1.75, -1]
  const float want[] = {-4.5f, 0.5f, 7.f, 4.f, -1.75f, -1.f};
  const auto y = qdec::lowrank_linear(x, la, lb);
  REQUIRE(y.sizes() == at::IntArrayRef({2, 3}));
  REQUIRE(y.scalar_type() == at::kFloat);
  for (int i = 0; i < 6; ++i) {
    INFO("output " << i);
    REQUIRE(y.data_ptr<float>()[i] == want[i]);
  }
  // A single row without a batch dim, and rank 0 (all zeros).
  const auto y0 = qdec::lowrank_linear(x[1], la, lb);
  REQUIRE(y0.sizes() == at::IntArrayRef({3}));
  REQUIRE(at::equal(y0, y[1]));
  const auto z = qdec::lowrank_linear(x, at::zeros({3, 0}), at::zeros({0, 5}));
  REQUIRE(at::equal(z, at::zeros({2, 3})));
}
