// The float32 CPU decode step's own arithmetic (runtime/decode_cpu.h) against
// the ATen ops the prefill path uses, and LlamaModel::decode against
// forward(): same logits, buffers reused, view semantics. The model-level
// comparison with a double-precision reference is in test_runtime_model.cpp
// (its token-by-token steps run this decode path).
//
// Tolerances: the hand-written loops sum in a different order than ATen's
// reductions (float32), so results agree to a few ulps of the values
// involved, not bit for bit; 1e-5 relative covers sums of up to a few
// thousand float32 terms of O(1).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "catch.h"
#include "runtime/decode_cpu.h"
#include "runtime/model.h"
#include "test_runtime_util.h"

using namespace qdec::runtime;
using namespace qdec_test;

namespace {

bool close(const at::Tensor& got, const at::Tensor& want, double rtol = 1e-5, double atol = 1e-6) {
  return at::allclose(got, want, rtol, atol);
}

}  // namespace

TEST_CASE("decode_cpu: RMSNorm equals the ATen formula", "[decode_cpu]") {
  at::manual_seed(0);
  for (int64_t n : {1, 7, 64, 576}) {
    auto x = at::randn({n}) * 3;
    auto w = at::randn({n});
    const double eps = 1e-5;
    auto want = w * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
    auto got = at::empty({n});
    decode_cpu::rms_norm(x.data_ptr<float>(), w.data_ptr<float>(), n, eps, got.data_ptr<float>());
    INFO("n = " << n);
    CHECK(close(got, want));
    decode_cpu::rms_norm(x.data_ptr<float>(), w.data_ptr<float>(), n, eps, x.data_ptr<float>());  // in place
    CHECK(close(x, want));
  }
}

TEST_CASE("decode_cpu: RoPE equals x*cos + rotate_half(x)*sin", "[decode_cpu]") {
  at::manual_seed(1);
  const int64_t heads = 3, d = 16;
  auto x = at::randn({heads, d});
  auto angle = at::rand({d / 2}) * 10;
  auto emb = at::cat({angle, angle});
  auto cos = emb.cos(), sin = emb.sin();
  auto rot = at::cat({-x.slice(-1, d / 2), x.slice(-1, 0, d / 2)}, -1);
  auto want = x * cos + rot * sin;
  decode_cpu::rope(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), heads, d);
  CHECK(close(x, want));
}

TEST_CASE("decode_cpu: attention over the cache equals SDPA with GQA", "[decode_cpu]") {
  at::manual_seed(2);
  struct Shape {
    int64_t heads, kv_heads, d, capacity, len;
  };
  // MHA, GQA, MQA; one position; a context long enough to run in parallel.
  for (const Shape s : {Shape{4, 4, 16, 9, 5}, Shape{9, 3, 64, 40, 33}, Shape{4, 1, 8, 3, 1},
                        Shape{8, 2, 64, 700, 650}}) {
    auto q = at::randn({s.heads, s.d});
    auto keys = at::randn({s.kv_heads, s.capacity, s.d});
    auto values = at::randn({s.kv_heads, s.capacity, s.d});
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
    auto want = at::scaled_dot_product_attention(q.view({1, s.heads, 1, s.d}),
                                                 keys.slice(1, 0, s.len).unsqueeze(0),
                                                 values.slice(1, 0, s.len).unsqueeze(0), std::nullopt, 0.0,
                                                 false, scale, /*enable_gqa=*/s.heads != s.kv_heads)
                    .view({s.heads, s.d});
    std::vector<float> scores(s.heads * s.len);
    auto got = at::empty({s.heads, s.d});
    for (int threads : {1, 2}) {
      at::set_num_threads(threads);
      decode_cpu::attend(q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), s.heads,
                         s.kv_heads, s.d, s.capacity, s.len, scale, scores.data(), got.data_ptr<float>());
      INFO("heads " << s.heads << "/" << s.kv_heads << ", len " << s.len << ", threads " << threads);
      CHECK(close(got, want));
    }
  }
}

TEST_CASE("decode_cpu: SwiGLU and the residual add", "[decode_cpu]") {
  at::manual_seed(3);
  auto g = at::randn({37}) * 4, u = at::randn({37});
  auto want = at::silu(g) * u;
  decode_cpu::silu_mul(g.data_ptr<float>(), u.data_ptr<float>(), 37);
  CHECK(close(g, want));
  auto a = at::randn({37}), b = at::randn({37});
  auto sum = a + b;
  decode_cpu::add_inplace(a.data_ptr<float>(), b.data_ptr<float>(), 37);
  CHECK(at::equal(a, sum));
}

TEST_CASE("LlamaModel::decode equals forward of one id and reuses its buffers", "[model][decode_cpu]") {
  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  write_tiny_checkpoint(dir, TinySpec{});
  Checkpoint ckpt(dir);
  LlamaModel model(ckpt, RuntimeOptions{});
  for (const char* k : {"0", "5"}) {
    KPolicy policy;
    policy.all = KValue::parse(k);
    model.set_k(policy);
    const std::vector<int64_t> prompt = {3, 14, 15}, steps = {92, 65, 35};
    auto a = model.new_cache(6), b = model.new_cache(6);
    model.forward(at::tensor(prompt, at::kLong), a);
    model.forward(at::tensor(prompt, at::kLong), b);
    const float* buffer = nullptr;
    for (const int64_t id : steps) {
      const auto want = model.forward(at::tensor(std::vector<int64_t>{id}, at::kLong), a);
      const auto got = model.decode(id, b);
      INFO("k = " << k << ", id " << id);
      CHECK(at::equal(got, want));  // the same step, the same arithmetic
      if (buffer) CHECK(got.data_ptr<float>() == buffer);  // written in place, not reallocated
      buffer = got.data_ptr<float>();
    }
    CHECK(b.length == 6);
    CHECK_THROWS_AS(model.decode(1, b), std::invalid_argument);  // cache full
  }
  auto c = model.new_cache(2);
  CHECK_THROWS_AS(model.decode(97, c), std::invalid_argument);  // outside the vocabulary
}
