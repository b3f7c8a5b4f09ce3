// Helpers shared by the runtime's Catch2 tests: scratch directories, raw file
// writing, and a tiny random QDEC checkpoint written the way
// qdec/formats/qdec_checkpoint.py writes one.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/safetensors.h"

namespace qdec_test {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A fresh directory under the system temp dir, removed with its contents.
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path = fs::temp_directory_path() /
           ("qdec_rt_test_" + std::to_string(rd()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// A safetensors image: length prefix (the header's size unless overridden),
// header text, data bytes.
inline std::string safetensors_image(const std::string& header, const std::string& data,
                                     std::optional<uint64_t> length = std::nullopt) {
  return le64(length.value_or(header.size())) + header + data;
}

struct TinySpec {
  int64_t vocab = 97, hidden = 64, intermediate = 96, layers = 2, heads = 4, kv_heads = 2, head_dim = 16;
  int bits = 3, group_size = 32, residual_bits = 4;
  bool symmetric = false, tie = false, with_residual = true, qkv_bias = false;
  double rope_theta = 10000.0, rms_eps = 1e-6;
  uint64_t seed = 1;
};

// Hooks to break a checkpoint on purpose before it is written.
struct Mutators {
  std::function<void(std::vector<std::pair<std::string, at::Tensor>>&)> model_tensors;
  std::function<void(std::vector<std::pair<std::string, at::Tensor>>&)> residual_tensors;
  std::function<void(json& config)> config;
  std::function<void(json& layer_meta)> layer_meta;
};

inline std::vector<std::string> decoder_linears(int64_t layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  return {p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj", p + "self_attn.o_proj",
          p + "mlp.gate_proj",    p + "mlp.up_proj",      p + "mlp.down_proj"};
}

inline std::pair<int64_t, int64_t> linear_shape(const TinySpec& s, const std::string& name) {  // (N, K)
  const int64_t q = s.heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  auto ends = [&](const char* suffix) { return name.size() >= std::strlen(suffix) &&
                                               name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) == 0; };
  if (ends("q_proj")) return {q, s.hidden};
  if (ends("k_proj") || ends("v_proj")) return {kv, s.hidden};
  if (ends("o_proj")) return {s.hidden, q};
  if (ends("down_proj")) return {s.hidden, s.intermediate};
  return {s.intermediate, s.hidden};  // gate, up
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Writes config.json, model.safetensors and (optionally) residual.safetensors.
inline void write_tiny_checkpoint(const std::string& dir, const TinySpec& s, const Mutators& mut = {}) {
  fs::create_directories(dir);
  at::manual_seed(s.seed);
  std::vector<std::pair<std::string, at::Tensor>> model, residual;
  json layer_meta = json::object(), residual_layers = json::object();
  json modules = json::array();
  auto randn = [](std::vector<int64_t> shape, double std) { return at::randn(shape, at::kFloat) * std; };
  model.emplace_back("model.embed_tokens.weight", randn({s.vocab, s.hidden}, 1.0));
  model.emplace_back("model.norm.weight", 1.0 + randn({s.hidden}, 0.1));
  if (!s.tie) model.emplace_back("lm_head.weight", randn({s.vocab, s.hidden}, 0.2));
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    model.emplace_back(p + "input_layernorm.weight", 1.0 + randn({s.hidden}, 0.1));
    model.emplace_back(p + "post_attention_layernorm.weight", 1.0 + randn({s.hidden}, 0.1));
    for (const auto& name : decoder_linears(l)) {
      const auto [N, K] = linear_shape(s, name);
      const int64_t groups = s.group_size == -1 ? 1 : ceil_div(K, s.group_size);
      // Any bit pattern is a valid code; scales ~ 1/sqrt(K) keep activations O(1).
      model.emplace_back(name + ".qweight", at::randint(INT32_MIN, INT32_MAX, {N, ceil_div(K, 32) * s.bits}, at::kInt));
      const double base = 2.0 / std::sqrt(static_cast<double>(K)) / (1 << s.bits);
      model.emplace_back(name + ".scales", (base * (0.5 + at::rand({N, groups}))).to(at::kHalf));
      if (!s.symmetric)
        model.emplace_back(name + ".zeros",
                           ((1 << (s.bits - 1)) + at::randint(-1, 2, {N, groups})).to(at::kHalf));
      if (s.qkv_bias && (name.find("q_proj") != std::string::npos || name.find("k_proj") != std::string::npos ||
                         name.find("v_proj") != std::string::npos))
        model.emplace_back(name + ".bias", randn({N}, 0.1));
      layer_meta[name] = {{"bits", s.bits},           {"group_size", s.group_size}, {"in_features", K},
                          {"out_features", N},        {"symmetric", s.symmetric},   {"scale_dtype", "F16"},
                          {"input_permutation", false}};
      modules.push_back(name);
      if (s.with_residual) {
        residual.emplace_back(name + ".residual",
                              at::randint(INT32_MIN, INT32_MAX, {K, ceil_div(N, 32) * s.residual_bits}, at::kInt));
        residual.emplace_back(name + ".residual_scales", base * 0.3 * (0.5 + at::rand({N})));
        residual_layers[name] = {{"in_features", K}, {"out_features", N}};
      }
    }
  }
  json config = {{"model_type", "llama"},
                 {"architectures", {"LlamaForCausalLM"}},
                 {"vocab_size", s.vocab},
                 {"hidden_size", s.hidden},
                 {"intermediate_size", s.intermediate},
                 {"num_hidden_layers", s.layers},
                 {"num_attention_heads", s.heads},
                 {"num_key_value_heads", s.kv_heads},
                 {"head_dim", s.head_dim},
                 {"hidden_act", "silu"},
                 {"max_position_embeddings", 256},
                 {"rms_norm_eps", s.rms_eps},
                 {"rope_parameters", {{"rope_theta", s.rope_theta}, {"rope_type", "default"}}},
                 {"tie_word_embeddings", s.tie},
                 {"bos_token_id", 1},
                 {"eos_token_id", 2},
                 {"qdec",
                  {{"format_version", 1},
                   {"method", "random"},
                   {"bits", s.bits},
                   {"group_size", s.group_size},
                   {"symmetric", s.symmetric},
                   {"residual_bits", s.with_residual ? json(s.residual_bits) : json(nullptr)},
                   {"quantized_modules", modules}}}};
  if (mut.model_tensors) mut.model_tensors(model);
  if (mut.residual_tensors) mut.residual_tensors(residual);
  if (mut.config) mut.config(config);
  if (mut.layer_meta) mut.layer_meta(layer_meta);
  std::ofstream(dir + "/config.json") << config.dump(2);
  qdec::runtime::save_safetensors(
      dir + "/model.safetensors", model,
      {{"format", "pt"}, {"qdec", json{{"format_version", 1}, {"layers", layer_meta}}.dump()}});
  if (s.with_residual)
    qdec::runtime::save_safetensors(
        dir + "/residual.safetensors", residual,
        {{"qdec", json{{"format_version", 1}, {"kind", "residual"}, {"residual_bits", s.residual_bits},
                       {"layers", residual_layers}}
                      .dump()}});
}

}  // namespace qdec_test
