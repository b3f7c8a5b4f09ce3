// A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in libtorch C++,
// computing exactly what transformers' LlamaForCausalLM computes, with every
// decoder linear going through the qdec operators:
//   embeddings -> N x [RMSNorm -> GQA attention (rotate_half RoPE, KV cache)
//   -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head
// (tied to the embeddings or not). A quantized linear runs
// qdec::quantized_matmul, or qdec::compensated_linear when its k > 0.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint.h"

namespace qdec::runtime {

// Channels compensated per token: a count, or a fraction of in_features
// (rounded half-to-even, as Python's round() in QDECLinear.k).
struct KValue {
  bool fraction = false;
  double value = 0.0;
  static KValue parse(const std::string& text);  // "16" count, "0.05" fraction
  int64_t resolve(int64_t in_features) const;
};

// A default k plus overrides; an override key matches a layer when it equals
// the full name or is a dot-separated suffix of it ("down_proj",
// "mlp.down_proj", "layers.3.mlp.down_proj").
struct KPolicy {
  KValue all;
  std::vector<std::pair<std::string, KValue>> overrides;  // later wins
  KValue for_layer(const std::string& name) const;
};

// The k a checkpoint's config.json sets: quantization_config.k (quant_method
// "qdec"), a count (16), a fraction (0.05), or an object mapping a projection
// (down_proj) or a full linear name to either -- e.g. the per-linear k map
// that `qdec allocate` writes. As qdec.formats.qdec_checkpoint.k_for_linear
// resolves it: a full name wins over a projection name; absent = 0.
// `file` only names the file in errors (std::invalid_argument).
KPolicy checkpoint_k_policy(const nlohmann::json& config, const std::string& file);

struct Linear {
  std::string name;
  int64_t in_features = 0, out_features = 0;
  bool quantized = false;
  at::Tensor weight;  // dense [N, K] when not quantized
  at::Tensor qweight, scales;
  std::optional<at::Tensor> zeros, bias, input_perm;
  int64_t bits = 0, group_size = 0;
  at::Tensor residual, residual_scales;  // undefined without a residual store
  int64_t residual_bits = 0;
  int64_t k = 0;
  int64_t sm_budget = 0;  // compensated_linear's thread-block cap on CUDA (0 = automatic)

  // x [*, K] -> [*, N]; `compensate` false forces k = 0 for this call.
  at::Tensor forward(const at::Tensor& x, bool compensate = true) const;
  size_t weight_bytes() const;
  size_t residual_bytes() const;
};

struct DecoderLayer {
  at::Tensor input_norm, post_norm;
  Linear q, k, v, o, gate, up, down;
  std::vector<Linear*> linears() { return {&q, &k, &v, &o, &gate, &up, &down}; }
  std::vector<const Linear*> linears() const { return {&q, &k, &v, &o, &gate, &up, &down}; }
};

// Buffers of the float32 CPU decode step (LlamaModel::decode), allocated
// once with the cache so a step allocates nothing vocabulary- or
// context-sized (the qdec ops still return their own [1, N] outputs).
struct DecodeWorkspace {
  at::Tensor h, x;      // [1, hidden]: the residual stream and a normed copy
  at::Tensor attn;      // [1, heads * head_dim]: attention output
  at::Tensor scores;    // [heads, capacity]: attention weights
  at::Tensor logits;    // [1, vocab]
};

struct KVCache {
  std::vector<at::Tensor> k, v;  // per layer [1, kv_heads, capacity, head_dim]
  int64_t length = 0, capacity = 0;
  // RoPE cos/sin of positions 0..capacity-1, [capacity, head_dim] in the
  // compute dtype, computed once as transformers computes them per call.
  at::Tensor rope_cos, rope_sin;
  DecodeWorkspace work;  // defined on the float32 CPU path only
};

struct RuntimeOptions {
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::kFloat;
  bool compensate_prefill = true;  // as QDECLinear's default
  // LM head as stored (0) or quantized at load to 8-bit symmetric codes with
  // one scale per kLmHeadGroup inputs (8): llama.cpp's GGUFs ship the head
  // as Q8_0, and in float32 it is the largest single read of a decode step
  // (SmolLM2: 113 MB of tied embeddings per token, a quarter of the step).
  int lm_head_bits = 0;
};

// Group size of the 8-bit LM head (RuntimeOptions::lm_head_bits).
constexpr int64_t kLmHeadGroup = 64;

class LlamaModel {
 public:
  LlamaModel(const Checkpoint& ckpt, const RuntimeOptions& options);

  const ModelConfig& config() const { return config_; }
  const RuntimeOptions& options() const { return options_; }
  void set_k(const KPolicy& policy);
  // sm_budget of every quantized linear a key matches (as KPolicy's
  // overrides: a projection, a dotted suffix or a full name; later wins);
  // unmatched layers keep theirs.
  void set_sm_budgets(const std::vector<std::pair<std::string, int64_t>>& budgets);
  // Every decoder linear, layer by layer, in HF order.
  std::vector<const Linear*> linears() const;
  bool has_residual() const { return has_residual_; }

  KVCache new_cache(int64_t capacity) const;
  // Appends ids [T] (int64) at positions cache.length..+T and returns the
  // float32 logits [vocab] of the last position (a new tensor).
  at::Tensor forward(const at::Tensor& ids, KVCache& cache) const;
  // One decode step: appends `id` and returns the float32 logits [vocab].
  // On the float32 CPU path they are a view of the cache's workspace, valid
  // until the next call with this cache (clone to keep them); elsewhere this
  // is forward() of one id.
  at::Tensor decode(int64_t id, KVCache& cache) const;

  size_t weight_bytes() const;    // everything on the compute device
  size_t residual_bytes() const;  // the host residual store

 private:
  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w) const;
  at::Tensor rope_inv_freq() const;
  // Float32 CPU: one token through preallocated buffers (decode_cpu.h).
  bool fast_decode() const;
  void decode_cpu(int64_t id, KVCache& cache) const;

  ModelConfig config_;
  RuntimeOptions options_;
  at::Tensor embed_, final_norm_, lm_head_;
  // The LM head as an 8-bit quantized linear when options_.lm_head_bits == 8
  // (quantized_head_), used instead of lm_head_ for the logits.
  Linear lm_head_q_;
  bool quantized_head_ = false;
  at::Tensor head_logits(const at::Tensor& x) const;  // [1, H] -> [1, vocab]
  std::vector<DecoderLayer> layers_;
  at::Tensor inv_freq_;  // float32 [head_dim / 2]
  bool has_residual_ = false;
};

}  // namespace qdec::runtime
