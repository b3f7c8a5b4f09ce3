// The C++ Llama decoder against an independent double-precision reference
// written here (explicit per-head attention, RoPE from the formula, dense
// dequantized weights, compensation by a plain sort), on tiny random
// checkpoints; KV-cache consistency; k policies; model-level load errors.
// (Equality with transformers' LlamaForCausalLM is checked by
// tests/python/test_cpp_parity.py.)
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "catch.h"
#include "qdec/ops.h"
#include "runtime/model.h"
#include "runtime/sampling.h"
#include "test_runtime_util.h"

using namespace qdec::runtime;
using namespace qdec_test;

namespace {

// ---------------------------------------------------------------- reference ---

struct RefLinear {
  at::Tensor w;                    // double [N, K]
  at::Tensor r;                    // double [N, K] residual, or undefined
  std::optional<at::Tensor> bias;  // double [N]
  std::optional<at::Tensor> perm;  // int64 [K]
  int64_t k = 0;
};

struct RefModel {
  TinySpec spec;
  at::Tensor embed, norm, head;
  struct Layer {
    at::Tensor in_norm, post_norm;
    std::map<std::string, RefLinear> lin;
  };
  std::vector<Layer> layers;
};

RefModel load_ref(const std::string& dir, const TinySpec& s, const std::function<int64_t(const std::string&, int64_t)>& k_of) {
  RefModel m;
  m.spec = s;
  SafetensorsFile f(dir + "/model.safetensors");
  std::unique_ptr<SafetensorsFile> r;
  if (s.with_residual) r = std::make_unique<SafetensorsFile>(dir + "/residual.safetensors");
  auto d = [](const at::Tensor& t) { return t.to(at::kDouble); };
  m.embed = d(f.view("model.embed_tokens.weight"));
  m.norm = d(f.view("model.norm.weight"));
  m.head = s.tie ? m.embed : d(f.view("lm_head.weight"));
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    RefModel::Layer L;
    L.in_norm = d(f.view(p + "input_layernorm.weight"));
    L.post_norm = d(f.view(p + "post_attention_layernorm.weight"));
    for (const auto& name : decoder_linears(l)) {
      const auto [N, K] = linear_shape(s, name);
      RefLinear rl;
      std::optional<at::Tensor> zeros;
      if (f.contains(name + ".zeros")) zeros = f.view(name + ".zeros").to(at::kFloat);
      rl.w = d(qdec::dequantize(f.view(name + ".qweight"), f.view(name + ".scales").to(at::kFloat), zeros, s.bits,
                                s.group_size, K));
      if (f.contains(name + ".bias")) rl.bias = d(f.view(name + ".bias"));
      if (f.contains(name + ".input_perm")) rl.perm = f.view(name + ".input_perm").to(at::kLong);
      if (r) {
        auto all = at::arange(K, at::kLong).unsqueeze(0);
        rl.r = d(qdec::residual_gather(r->view(name + ".residual"), r->view(name + ".residual_scales"), all,
                                       s.residual_bits)[0].t());  // [N, K]
      }
      rl.k = k_of(name, K);
      L.lin.emplace(name.substr(p.size()), rl);
    }
    m.layers.push_back(L);
  }
  return m;
}

at::Tensor ref_linear(const RefLinear& l, const at::Tensor& x_in) {  // x [T, K]
  const at::Tensor x = l.perm ? x_in.index_select(1, *l.perm) : x_in;
  at::Tensor y = at::matmul(x, l.w.t());
  if (l.k > 0) {
    const int64_t T = x.size(0), K = x.size(1);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int64_t> order(K);
      std::iota(order.begin(), order.end(), 0);
      auto row = x[t].contiguous();
      const double* xv = row.data_ptr<double>();
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return std::abs(xv[a]) > std::abs(xv[b]); });
      for (int64_t i = 0; i < l.k; ++i) y[t] += l.r.select(1, order[i]) * xv[order[i]];
    }
  }
  if (l.bias) y = y + *l.bias;
  return y;
}

at::Tensor ref_rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x * at::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
}

// Logits [T, vocab] of every position of `ids`, recomputed from scratch.
at::Tensor ref_forward(const RefModel& m, const std::vector<int64_t>& ids) {
  const auto& s = m.spec;
  const int64_t T = ids.size(), hd = s.head_dim, groups = s.heads / s.kv_heads;
  at::Tensor h = m.embed.index_select(0, at::tensor(ids, at::kLong));  // [T, H]
  // RoPE angles from the formula, in double
  auto cos = at::empty({T, hd}, at::kDouble), sin = at::empty({T, hd}, at::kDouble);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < hd / 2; ++i) {
      const double a = t * std::pow(s.rope_theta, -2.0 * i / hd);
      cos[t][i] = cos[t][i + hd / 2] = std::cos(a);
      sin[t][i] = sin[t][i + hd / 2] = std::sin(a);
    }
  auto rope = [&](at::Tensor x) {  // [T, hd]
    auto rot = at::cat({-x.slice(1, hd / 2), x.slice(1, 0, hd / 2)}, 1);
    return x * cos + rot * sin;
  };
  for (const auto& L : m.layers) {
    auto x = ref_rms(h, L.in_norm, s.rms_eps);
    auto q = ref_linear(L.lin.at("self_attn.q_proj"), x);
    auto k = ref_linear(L.lin.at("self_attn.k_proj"), x);
    auto v = ref_linear(L.lin.at("self_attn.v_proj"), x);
    auto out = at::zeros({T, s.heads * hd}, at::kDouble);
    for (int64_t head = 0; head < s.heads; ++head) {
      const int64_t kvh = head / groups;
      auto qh = rope(q.slice(1, head * hd, (head + 1) * hd));
      auto kh = rope(k.slice(1, kvh * hd, (kvh + 1) * hd));
      auto vh = v.slice(1, kvh * hd, (kvh + 1) * hd);
      for (int64_t t = 0; t < T; ++t) {
        auto scores = at::matmul(kh.slice(0, 0, t + 1), qh[t]) / std::sqrt(static_cast<double>(hd));
        auto p = at::softmax(scores, 0);
        out.slice(1, head * hd, (head + 1) * hd)[t] = at::matmul(p, vh.slice(0, 0, t + 1));
      }
    }
    h = h + ref_linear(L.lin.at("self_attn.o_proj"), out);
    x = ref_rms(h, L.post_norm, s.rms_eps);
    auto g = ref_linear(L.lin.at("mlp.gate_proj"), x);
    auto u = ref_linear(L.lin.at("mlp.up_proj"), x);
    h = h + ref_linear(L.lin.at("mlp.down_proj"), g * at::sigmoid(g) * u);
  }
  return at::matmul(ref_rms(h, m.norm, s.rms_eps), m.head.t());
}

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want).abs().max().item<double>() / std::max(1.0, want.abs().max().item<double>());
}

// Runs the C++ model: prefill of the first `prefill` ids, then one id per step.
std::vector<at::Tensor> run_model(const LlamaModel& model, const std::vector<int64_t>& ids, int64_t prefill) {
  auto cache = model.new_cache(static_cast<int64_t>(ids.size()));
  std::vector<at::Tensor> out;
  out.push_back(model.forward(at::tensor(std::vector<int64_t>(ids.begin(), ids.begin() + prefill), at::kLong), cache));
  for (size_t i = prefill; i < ids.size(); ++i)
    out.push_back(model.forward(at::tensor(std::vector<int64_t>{ids[i]}, at::kLong), cache));
  return out;
}

}  // namespace

TEST_CASE("decoder matches the double-precision reference", "[model]") {
  struct Variant {
    const char* name;
    TinySpec spec;
    std::string k;  // for every layer
  };
  std::vector<Variant> variants;
  {
    Variant v{"asym 3-bit g32, untied, k=0", TinySpec{}, "0"};
    variants.push_back(v);
    v.name = "asym 3-bit g32, untied, k=8";
    v.k = "8";
    variants.push_back(v);
    v.name = "asym 3-bit g32, untied, k=0.25 of inputs";
    v.k = "0.25";
    variants.push_back(v);
  }
  {
    TinySpec s;
    s.symmetric = true;
    s.bits = 4;
    s.group_size = -1;
    s.tie = true;
    s.qkv_bias = true;
    s.rope_theta = 500000.0;
    s.heads = 4;
    s.kv_heads = 1;
    s.seed = 7;
    variants.push_back({"sym 4-bit per-row, tied, qkv bias, MQA, k=5", s, "5"});
  }
  {
    TinySpec s;
    s.bits = 2;
    s.group_size = 64;
    s.hidden = 48;  // ragged last group: K = 48 < G, K = 96 = 64 + 32
    s.heads = 3;
    s.kv_heads = 3;
    s.residual_bits = 3;
    s.seed = 11;
    variants.push_back({"asym 2-bit g64 ragged, MHA, 3-bit residual, k=all", s, "1.0"});
  }

  const std::vector<int64_t> ids = {1, 17, 42, 5, 96, 33, 8, 61};
  for (const auto& v : variants) {
    DYNAMIC_SECTION(v.name) {
      TempDir tmp;
      const auto dir = tmp.file("ckpt");
      write_tiny_checkpoint(dir, v.spec);
      Checkpoint ckpt(dir);
      LlamaModel model(ckpt, RuntimeOptions{});
      KPolicy policy;
      policy.all = KValue::parse(v.k);
      model.set_k(policy);
      const auto ref = ref_forward(load_ref(dir, v.spec, [&](const std::string&, int64_t K) { return policy.all.resolve(K); }), ids);
      const auto got = run_model(model, ids, 5);
      REQUIRE(got.size() == 4);
      for (size_t i = 0; i < got.size(); ++i) {
        const double err = rel_err(got[i], ref[4 + i]);
        INFO("step " << i << ": max |logit error| / max|logit| = " << err);
        CHECK(err < 2e-5);
      }
    }
  }
}

TEST_CASE("input permutation (act-order) is applied before the product", "[model]") {
  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  TinySpec s;
  s.layers = 1;
  const std::string target = "model.layers.0.mlp.down_proj";
  auto perm = at::randperm(s.intermediate, at::kLong).to(at::kInt);
  Mutators m;
  m.model_tensors = [&](auto& t) { t.emplace_back(target + ".input_perm", perm); };
  m.layer_meta = [&](json& lm) { lm[target]["input_permutation"] = true; };
  write_tiny_checkpoint(dir, s, m);
  Checkpoint ckpt(dir);
  LlamaModel model(ckpt, RuntimeOptions{});
  KPolicy policy;
  policy.all = KValue::parse("6");
  model.set_k(policy);
  const std::vector<int64_t> ids = {3, 9, 27};
  const auto ref = ref_forward(load_ref(dir, s, [](const std::string&, int64_t) { return 6; }), ids);
  const auto got = run_model(model, ids, 3);
  CHECK(rel_err(got[0], ref[2]) < 2e-5);
}

TEST_CASE("KV cache: one prefill == chunks == token by token", "[model]") {
  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  write_tiny_checkpoint(dir, TinySpec{});
  Checkpoint ckpt(dir);
  LlamaModel model(ckpt, RuntimeOptions{});
  for (const char* k : {"0", "7"}) {
    KPolicy policy;
    policy.all = KValue::parse(k);
    model.set_k(policy);
    const std::vector<int64_t> ids = {4, 8, 15, 16, 23, 42, 7};
    auto whole = run_model(model, ids, 7).back();
    auto stepwise = run_model(model, ids, 1).back();
    auto cache = model.new_cache(7);
    model.forward(at::tensor(std::vector<int64_t>{4, 8, 15}, at::kLong), cache);
    auto chunked = model.forward(at::tensor(std::vector<int64_t>{16, 23, 42, 7}, at::kLong), cache);
    INFO("k = " << k);
    CHECK(at::allclose(whole, stepwise, 1e-4, 1e-4));
    CHECK(at::allclose(whole, chunked, 1e-4, 1e-4));
    CHECK(cache.length == 7);
  }
}

TEST_CASE("compensation changes the output and k=all beats k=0", "[model]") {
  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  TinySpec s;
  write_tiny_checkpoint(dir, s);
  Checkpoint ckpt(dir);
  LlamaModel model(ckpt, RuntimeOptions{});
  const std::vector<int64_t> ids = {10, 20, 30};
  KPolicy p0, p1;
  p1.all = KValue::parse("0.1");
  model.set_k(p0);
  auto a = run_model(model, ids, 3)[0];
  model.set_k(p1);
  auto b = run_model(model, ids, 3)[0];
  CHECK_FALSE(at::allclose(a, b));
}

TEST_CASE("k from the checkpoint's quantization_config.k", "[model][k]") {
  const std::string f = "ckpt/config.json";
  // a per-linear k map (qdec allocate) beside a projection default: full names win
  const auto j = nlohmann::json::parse(R"({"quantization_config": {"quant_method": "qdec",
      "k": {"model.layers.0.self_attn.q_proj": 7, "q_proj": 0.5, "down_proj": 3}}})");
  const KPolicy p = checkpoint_k_policy(j, f);
  CHECK(p.for_layer("model.layers.0.self_attn.q_proj").resolve(64) == 7);
  CHECK(p.for_layer("model.layers.1.self_attn.q_proj").resolve(64) == 32);
  CHECK(p.for_layer("model.layers.1.mlp.down_proj").resolve(96) == 3);
  CHECK(p.for_layer("model.layers.1.mlp.up_proj").resolve(64) == 0);  // absent = 0
  CHECK(checkpoint_k_policy(nlohmann::json::parse(R"({"quantization_config": {"quant_method": "qdec",
      "k": 0.05}})"), f).for_layer("x").resolve(576) == 29);
  CHECK(checkpoint_k_policy(nlohmann::json::parse(R"({"quantization_config": {"quant_method": "qdec",
      "k": 16}})"), f).for_layer("x").resolve(576) == 16);
  // no block, another method, no k: 0 everywhere
  for (const char* text : {R"({})", R"({"quantization_config": {"quant_method": "awq", "k": 5}})",
                           R"({"quantization_config": {"quant_method": "qdec"}})"})
    CHECK(checkpoint_k_policy(nlohmann::json::parse(text), f).for_layer("a.q_proj").resolve(64) == 0);
  for (const char* text : {R"({"quantization_config": {"quant_method": "qdec", "k": 1.5}})",
                           R"({"quantization_config": {"quant_method": "qdec", "k": -2}})",
                           R"({"quantization_config": {"quant_method": "qdec", "k": "x"}})",
                           R"({"quantization_config": {"quant_method": "qdec", "k": {"q_proj": true}}})"})
    CHECK_THROWS_WITH(checkpoint_k_policy(nlohmann::json::parse(text), f),
                      Catch::Matchers::StartsWith("ckpt/config.json: quantization_config.k"));
}

TEST_CASE("k values and per-layer overrides", "[model][k]") {
  CHECK(KValue::parse("16").resolve(576) == 16);
  CHECK(KValue::parse("0.05").resolve(576) == 29);  // 28.8
  CHECK(KValue::parse("0.5").resolve(5) == 2);      // 2.5 rounds half to even, as Python round()
  CHECK(KValue::parse("0.5").resolve(7) == 4);      // 3.5 -> 4
  CHECK(KValue::parse("1.0").resolve(1536) == 1536);
  CHECK(KValue::parse("0").resolve(64) == 0);
  CHECK_THROWS_AS(KValue::parse("-1"), std::invalid_argument);
  CHECK_THROWS_AS(KValue::parse("1.5"), std::invalid_argument);
  CHECK_THROWS_AS(KValue::parse("abc"), std::invalid_argument);
  CHECK_THROWS_AS(KValue::parse("3x"), std::invalid_argument);
  CHECK_THROWS_AS(KValue::parse("100").resolve(64), std::invalid_argument);

  KPolicy p;
  p.all = KValue::parse("4");
  p.overrides = {{"down_proj", KValue::parse("0.5")}, {"layers.1.mlp.down_proj", KValue::parse("0")},
                 {"model.layers.0.self_attn.q_proj", KValue::parse("9")}};
  CHECK(p.for_layer("model.layers.0.mlp.down_proj").resolve(96) == 48);
  CHECK(p.for_layer("model.layers.1.mlp.down_proj").resolve(96) == 0);
  CHECK(p.for_layer("model.layers.11.mlp.down_proj").resolve(96) == 48);  // "layers.1." is not a suffix of it
  CHECK(p.for_layer("model.layers.0.self_attn.q_proj").resolve(64) == 9);
  CHECK(p.for_layer("model.layers.0.self_attn.k_proj").resolve(64) == 4);
  CHECK(p.for_layer("model.layers.0.mlp.xdown_proj").resolve(64) == 4);  // whole components only

  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  TinySpec s;
  s.with_residual = false;
  s.layers = 1;
  write_tiny_checkpoint(dir, s);
  Checkpoint ckpt(dir);
  LlamaModel model(ckpt, RuntimeOptions{});
  CHECK_FALSE(model.has_residual());
  KPolicy none;
  model.set_k(none);
  KPolicy some;
  some.all = KValue::parse("1");
  try {
    model.set_k(some);
    FAIL("no error");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("needs a residual store") != std::string::npos);
  }
}

TEST_CASE("model-level load errors name the tensor and the expectation", "[model][loader]") {
  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  TinySpec s;
  s.layers = 1;
  auto load_error = [&](const Mutators& m) -> std::string {
    std::error_code ec;
    fs::remove_all(dir, ec);
    write_tiny_checkpoint(dir, s, m);
    try {
      Checkpoint ckpt(dir);
      LlamaModel model(ckpt, RuntimeOptions{});
    } catch (const LoadError& e) {
      return e.what();
    }
    return "no error";
  };
  SECTION("qweight of the wrong shape") {
    Mutators m;
    m.model_tensors = [](auto& t) {
      for (auto& [n, v] : t)
        if (n == "model.layers.0.mlp.up_proj.qweight") v = v.slice(1, 0, v.size(1) - 1).contiguous();
    };
    const auto msg = load_error(m);
    CHECK(msg.find("model.layers.0.mlp.up_proj.qweight") != std::string::npos);
    CHECK(msg.find("expected shape [96, 6], got [96, 5]") != std::string::npos);
    CHECK(msg.find("bits=3") != std::string::npos);
  }
  SECTION("scales of the wrong dtype") {
    Mutators m;
    m.model_tensors = [](auto& t) {
      for (auto& [n, v] : t)
        if (n == "model.layers.0.self_attn.o_proj.scales") v = v.to(at::kFloat);
    };
    CHECK(load_error(m).find("expected dtype F16, got F32") != std::string::npos);
  }
  SECTION("a norm weight missing") {
    Mutators m;
    m.model_tensors = [](auto& t) {
      t.erase(std::remove_if(t.begin(), t.end(), [](auto& p) { return p.first == "model.layers.0.input_layernorm.weight"; }),
              t.end());
    };
    CHECK(load_error(m).find("tensor 'model.layers.0.input_layernorm.weight': not in this file") != std::string::npos);
  }
  SECTION("untied model without lm_head") {
    Mutators m;
    m.model_tensors = [](auto& t) {
      t.erase(std::remove_if(t.begin(), t.end(), [](auto& p) { return p.first == "lm_head.weight"; }), t.end());
    };
    CHECK(load_error(m).find("lm_head.weight") != std::string::npos);
  }
  SECTION("residual of the wrong width") {
    Mutators m;
    m.residual_tensors = [](auto& t) {
      for (auto& [n, v] : t)
        if (n == "model.layers.0.mlp.down_proj.residual") v = at::zeros({96, 1}, at::kInt);
    };
    const auto msg = load_error(m);
    CHECK(msg.find("residual.safetensors: tensor 'model.layers.0.mlp.down_proj.residual'") != std::string::npos);
    CHECK(msg.find("expected shape [96, 8], got [96, 1]") != std::string::npos);
  }
  SECTION("a quantized module the model does not have") {
    Mutators m;
    m.config = [](json& c) { c["qdec"]["quantized_modules"].push_back("model.layers.5.mlp.up_proj"); };
    m.layer_meta = [](json& lm) {
      lm["model.layers.5.mlp.up_proj"] = lm["model.layers.0.mlp.up_proj"];
    };
    CHECK(load_error(m).find("model.layers.5.mlp.up_proj") != std::string::npos);
  }
  SECTION("metadata shape disagrees with the config") {
    Mutators m;
    m.layer_meta = [](json& lm) { lm["model.layers.0.mlp.up_proj"]["out_features"] = 95; };
    CHECK(load_error(m).find("metadata says [95, 64]") != std::string::npos);
  }
}

TEST_CASE("forward argument checks", "[model]") {
  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  TinySpec s;
  s.layers = 1;
  write_tiny_checkpoint(dir, s);
  Checkpoint ckpt(dir);
  LlamaModel model(ckpt, RuntimeOptions{});
  auto cache = model.new_cache(2);
  CHECK_THROWS_AS(model.forward(at::tensor(std::vector<int64_t>{1, 2, 3}, at::kLong), cache), std::invalid_argument);
  CHECK_THROWS_AS(model.forward(at::tensor(std::vector<int64_t>{97}, at::kLong), cache), std::invalid_argument);
  CHECK_THROWS_AS(model.forward(at::tensor(std::vector<int64_t>{-1}, at::kLong), cache), std::invalid_argument);
  CHECK(cache.length == 0);
}

TEST_CASE("sampler", "[sampling]") {
  auto logits = at::tensor(std::vector<float>{0.5f, 2.0f, 2.0f, -1.0f});
  Sampler greedy(SamplingOptions{});
  CHECK(greedy.next(logits) == 1);  // ties go to the smaller id
  SamplingOptions top1;
  top1.temperature = 0.7;
  top1.top_k = 1;
  top1.seed = 3;
  CHECK(Sampler(top1).next(logits) == 1);

  SamplingOptions o;
  o.temperature = 1.0;
  o.seed = 42;
  Sampler a(o), b(o);
  auto two = at::tensor(std::vector<float>{0.0f, static_cast<float>(std::log(3.0))});
  int ones = 0;
  for (int i = 0; i < 4000; ++i) {
    const auto x = a.next(two);
    CHECK(x == b.next(two));  // same seed, same stream
    ones += x == 1;
  }
  CHECK(std::abs(ones / 4000.0 - 0.75) < 0.03);
  o.top_k = 2;
  Sampler c(o);
  for (int i = 0; i < 200; ++i) {
    const auto x = c.next(logits);
    CHECK((x == 1 || x == 2));  // the two largest logits
  }
}
