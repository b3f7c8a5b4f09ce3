#include "model.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "decode_cpu.h"
#include "foreign_checkpoint.h"
#include "qdec/ops.h"

namespace qdec::runtime {

namespace {

using K = LoadError::Kind;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::ScalarType scale_dtype(const std::string& name) {
  if (name == "BF16") return at::kBFloat16;
  if (name == "F32") return at::kFloat;
  return at::kHalf;
}

bool suffix_match(const std::string& name, const std::string& key) {
  if (key == name) return true;
  return name.size() > key.size() && name.compare(name.size() - key.size(), key.size(), key) == 0 &&
         name[name.size() - key.size() - 1] == '.';
}

}  // namespace

KValue KValue::parse(const std::string& text) {
  KValue k;
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || !std::isfinite(v) || v < 0)
    throw std::invalid_argument("k must be a non-negative count (16) or fraction (0.05), got \"" + text + "\"");
  k.fraction = text.find_first_of(".eE") != std::string::npos;
  if (k.fraction && v > 1.0)
    throw std::invalid_argument("k as a fraction must be in [0, 1], got " + text);
  if (!k.fraction && v != std::floor(v)) throw std::invalid_argument("k count must be an integer: " + text);
  k.value = v;
  return k;
}

int64_t KValue::resolve(int64_t in_features) const {
  // std::nearbyint rounds half to even in the default rounding mode, as
  // Python's round() does for QDECLinear's fraction k.
  const int64_t k = fraction ? static_cast<int64_t>(std::nearbyint(value * static_cast<double>(in_features)))
                             : static_cast<int64_t>(value);
  if (k > in_features)
    throw std::invalid_argument("k = " + std::to_string(k) + " exceeds in_features = " + std::to_string(in_features));
  return k;
}

KValue KPolicy::for_layer(const std::string& name) const {
  KValue k = all;
  for (const auto& [key, value] : overrides)
    if (suffix_match(name, key)) k = value;
  return k;
}

namespace {
KValue k_value_from_json(const nlohmann::json& v, const std::string& file, const std::string& what) {
  if (!v.is_number() || v.is_boolean())
    throw std::invalid_argument(file + ": " + what + " must be a number, got " + v.dump());
  KValue k;
  k.fraction = v.is_number_float();
  k.value = v.get<double>();
  if (!std::isfinite(k.value) || k.value < 0 || (k.fraction && k.value > 1.0))
    throw std::invalid_argument(file + ": " + what + " must be a count >= 0 or a fraction in [0, 1], got " +
                                v.dump());
  return k;
}
}  // namespace

KPolicy checkpoint_k_policy(const nlohmann::json& config, const std::string& file) {
  KPolicy policy;
  const auto qc = config.find("quantization_config");
  if (qc == config.end() || !qc->is_object() || qc->value("quant_method", std::string()) != "qdec")
    return policy;
  const auto k = qc->find("k");
  if (k == qc->end() || k->is_null()) return policy;
  if (!k->is_object()) {
    policy.all = k_value_from_json(*k, file, "quantization_config.k");
    return policy;
  }
  // Later overrides win: projection names first, then full linear names.
  std::vector<std::pair<std::string, KValue>> short_names, full_names;
  for (const auto& [name, v] : k->items()) {
    auto entry = std::make_pair(name, k_value_from_json(v, file, "quantization_config.k[\"" + name + "\"]"));
    (name.find('.') == std::string::npos ? short_names : full_names).push_back(std::move(entry));
  }
  policy.overrides = std::move(short_names);
  policy.overrides.insert(policy.overrides.end(), full_names.begin(), full_names.end());
  return policy;
}

at::Tensor Linear::forward(const at::Tensor& x_in, bool compensate) const {
  if (!quantized) return at::linear(x_in, weight, bias);
  const at::Tensor x = input_perm ? x_in.index_select(-1, *input_perm) : x_in;
  const int64_t kk = compensate ? k : 0;
  at::Tensor y = (kk == 0 || !residual.defined())
                     ? qdec::quantized_matmul(x, qweight, scales, zeros, bits, group_size)
                     : qdec::compensated_linear(x, qweight, scales, zeros, bits, group_size, residual,
                                                residual_scales, residual_bits, kk, std::nullopt,
                                                sm_budget);
  return bias ? y + bias->to(y.scalar_type()) : y;
}

size_t Linear::weight_bytes() const {
  size_t n = 0;
  for (const at::Tensor* t : {&weight, &qweight, &scales})
    if (t->defined()) n += t->nbytes();
  for (const auto* t : {&zeros, &bias, &input_perm})
    if (*t) n += (*t)->nbytes();
  return n;
}

size_t Linear::residual_bytes() const {
  return residual.defined() ? residual.nbytes() + residual_scales.nbytes() : 0;
}

namespace {

// W[V, H] (float32, CPU) -> an 8-bit symmetric quantized Linear: per group of
// kLmHeadGroup inputs s = max|w| / 127 and q = round(w / s) + 128 in [1, 255],
// so w ~ (q - 128) s (the qdec symmetric convention: zero = 2^(bits-1)). At
// 8 bits the packed layout (bitpack.h) is one code per byte, in order.
Linear quantize_lm_head(const at::Tensor& w, at::ScalarType dt, c10::Device dev) {
  const int64_t V = w.size(0), H = w.size(1), G = kLmHeadGroup;
  const int64_t groups = ceil_div(H, G), padded = ceil_div(H, 32) * 32;
  at::Tensor wp = at::zeros({V, groups * G}, at::kFloat);
  wp.narrow(1, 0, H).copy_(w);
  at::Tensor wg = wp.view({V, groups, G});
  at::Tensor scale = std::get<0>(wg.abs().max(-1)).div_(127.0);
  scale.masked_fill_(scale == 0, 1.0);  // an all-zero group: any scale decodes it exactly
  at::Tensor q = wg.div(scale.unsqueeze(-1)).round_().clamp_(-127, 127).add_(128).view({V, groups * G});
  at::Tensor codes = at::zeros({V, padded}, at::kByte);
  codes.narrow(1, 0, H).copy_(q.narrow(1, 0, H).to(at::kByte));
  Linear l;
  l.name = "lm_head";
  l.in_features = H;
  l.out_features = V;
  l.quantized = true;
  l.bits = 8;
  l.group_size = G;
  l.qweight = codes.view(at::kInt).to(dev);  // [V, padded / 4] = [V, ceil(H/32) * 8]
  l.scales = scale.to(dev, dt);
  return l;
}

}  // namespace

at::Tensor LlamaModel::head_logits(const at::Tensor& x) const {
  return quantized_head_ ? lm_head_q_.forward(x, /*compensate=*/false) : at::linear(x, lm_head_);
}

LlamaModel::LlamaModel(const Checkpoint& ckpt, const RuntimeOptions& options)
    : config_(ckpt.config), options_(options) {
  const auto& c = config_;
  const auto& f = *ckpt.model;
  const auto dev = options.device;
  const auto dt = options.dtype;
  // A float tensor of the model on the compute device in the compute dtype
  // (zero-copy from the mapping when it already is one: CPU, same dtype).
  auto dense = [&](const std::string& name, std::vector<int64_t> shape) {
    const auto& info = f.info(name);
    const auto st = to_scalar_type(info.dtype);
    if (!at::isFloatingType(st))
      throw LoadError(K::WrongDtype, f.path(), name,
                      std::string("expected a floating dtype (F32, F16, BF16), got ") + dtype_name(info.dtype));
    return f.get(name, std::nullopt, shape).to(dev, dt);
  };
  auto opt_bias = [&](const std::string& name, int64_t n) -> std::optional<at::Tensor> {
    if (!f.contains(name + ".bias")) return std::nullopt;
    return dense(name + ".bias", {n});
  };

  embed_ = dense("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  final_norm_ = dense("model.norm.weight", {c.hidden_size});
  if (f.contains("lm_head.weight")) lm_head_ = dense("lm_head.weight", {c.vocab_size, c.hidden_size});
  else if (c.tie_word_embeddings) lm_head_ = embed_;
  else
    throw LoadError(K::MissingTensor, f.path(), "lm_head.weight",
                    "not in the file, and config.json has tie_word_embeddings false");

  if (options.lm_head_bits != 0) {
    if (options.lm_head_bits != 8)
      throw std::invalid_argument("lm_head_bits must be 0 (as stored) or 8, got " +
                                  std::to_string(options.lm_head_bits));
    lm_head_q_ = quantize_lm_head(lm_head_.to(at::kFloat).cpu(), dt, dev);
    quantized_head_ = true;
  }

  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  auto make_linear = [&](const std::string& name, int64_t in, int64_t out) {
    Linear l;
    l.name = name;
    l.in_features = in;
    l.out_features = out;
    l.bias = opt_bias(name, out);
    auto meta_it = ckpt.layers.find(name);
    if (meta_it == ckpt.layers.end()) {
      l.weight = dense(name + ".weight", {out, in});
      return l;
    }
    const auto& m = meta_it->second;
    if (m.in_features != in || m.out_features != out)
      throw LoadError(K::WrongShape, f.path(), name,
                      std::string(ckpt.foreign ? "the quantized tensors say [" : "metadata says [") +
                          std::to_string(m.out_features) + ", " + std::to_string(m.in_features) + "] but the model config needs [" + std::to_string(out) + ", " + std::to_string(in) + "]");
    l.quantized = true;
    l.bits = m.bits;
    l.group_size = m.group_size;
    if (ckpt.foreign) {
      // Another tool's layer, converted at load (foreign_checkpoint.h) into the
      // tensors a QDEC checkpoint would hold; no residual store.
      const ConvertedLinear& cl = ckpt.foreign->linears.at(name);
      l.qweight = cl.qweight.to(dev);
      l.scales = cl.scales.to(dev, dt);  // scales/zeros in the activation dtype, as below
      if (cl.zeros) l.zeros = cl.zeros->to(dev, dt);
      if (cl.input_perm) l.input_perm = cl.input_perm->to(dev);
      return l;
    }
    const int64_t groups = m.group_size == -1 ? 1 : ceil_div(in, m.group_size);
    const std::string geom = "N=" + std::to_string(out) + ", K=" + std::to_string(in) +
                             ", bits=" + std::to_string(m.bits) + ", group_size=" + std::to_string(m.group_size);
    l.qweight = f.get(name + ".qweight", at::kInt, std::vector<int64_t>{out, ceil_div(in, 32) * m.bits},
                      "[N, ceil(K/32)*bits] with " + geom)
                    .to(dev);
    const auto sdt = scale_dtype(m.scale_dtype);
    // Scales/zeros in the activation dtype, as QDECLinear converts them.
    l.scales = f.get(name + ".scales", sdt, std::vector<int64_t>{out, groups}, "[N, ceil(K/G)] with " + geom)
                   .to(dev, dt);
    if (!m.symmetric)
      l.zeros = f.get(name + ".zeros", sdt, std::vector<int64_t>{out, groups}, "[N, ceil(K/G)] with " + geom)
                    .to(dev, dt);
    else if (f.contains(name + ".zeros"))
      throw LoadError(K::BadHeader, f.path(), name + ".zeros", "present, but the layer metadata says symmetric");
    if (m.input_permutation) {
      auto perm = f.get(name + ".input_perm", at::kInt, std::vector<int64_t>{in}, "[K]").to(at::kLong);
      auto sorted = std::get<0>(perm.sort());
      if (!sorted.equal(at::arange(in, at::kLong)))
        throw LoadError(K::BadHeader, f.path(), name + ".input_perm", "is not a permutation of 0..K-1");
      l.input_perm = perm.to(dev);
    }
    if (ckpt.residual && ckpt.residual->contains(name + ".residual")) {
      const auto& r = *ckpt.residual;
      const int64_t rb = *ckpt.qdec.residual_bits;
      l.residual_bits = rb;
      l.residual = place_residual(
          r.get(name + ".residual", at::kInt, std::vector<int64_t>{in, ceil_div(out, 32) * rb},
                "[K, ceil(N/32)*residual_bits] with K=" + std::to_string(in) + ", N=" + std::to_string(out) +
                    ", residual_bits=" + std::to_string(rb)),
          dev);
      // Scales follow the module onto the device, as in QDECLinear.
      l.residual_scales = r.get(name + ".residual_scales", at::kFloat, std::vector<int64_t>{out}, "[N]").to(dev);
      if (!dev.is_cuda()) l.residual_scales = l.residual_scales.clone();
    }
    return l;
  };

  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    DecoderLayer L;
    L.input_norm = dense(p + "input_layernorm.weight", {H});
    L.post_norm = dense(p + "post_attention_layernorm.weight", {H});
    L.q = make_linear(p + "self_attn.q_proj", H, q_out);
    L.k = make_linear(p + "self_attn.k_proj", H, kv_out);
    L.v = make_linear(p + "self_attn.v_proj", H, kv_out);
    L.o = make_linear(p + "self_attn.o_proj", q_out, H);
    L.gate = make_linear(p + "mlp.gate_proj", H, I);
    L.up = make_linear(p + "mlp.up_proj", H, I);
    L.down = make_linear(p + "mlp.down_proj", I, H);
    for (const auto* l : L.linears()) has_residual_ |= l->residual.defined();
    layers_.push_back(std::move(L));
  }
  // Quantized modules the model does not use would be silently ignored.
  for (const auto& [name, meta] : ckpt.layers) {
    bool found = false;
    for (const auto* l : linears()) found |= l->name == name;
    if (!found)
      throw LoadError(K::BadHeader, ckpt.model->path(), name,
                      "quantized module is not a decoder linear of this " + c.model_type + " model");
  }
  inv_freq_ = rope_inv_freq();
}

at::Tensor LlamaModel::rope_inv_freq() const {
  const auto& r = config_.rope;
  const int64_t dim = config_.head_dim;
  // As transformers: 1 / base ** (arange(0, dim, 2).float() / dim), float32.
  auto exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(dim);
  auto inv = 1.0 / at::pow(r.theta, exponent);
  if (r.type == "linear") return inv / r.factor;
  if (r.type == "llama3") {
    const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
    const double low_wavelen = old_ctx / r.low_freq_factor, high_wavelen = old_ctx / r.high_freq_factor;
    auto wavelen = 2 * M_PI / inv;
    auto scaled = at::where(wavelen > low_wavelen, inv / r.factor, inv);
    auto smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    auto smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
    auto medium = at::logical_not(wavelen < high_wavelen).logical_and(at::logical_not(wavelen > low_wavelen));
    return at::where(medium, smoothed, scaled);
  }
  return inv;
}

void LlamaModel::set_k(const KPolicy& policy) {
  for (auto& L : layers_)
    for (auto* l : L.linears()) {
      if (!l->quantized) continue;
      const int64_t k = policy.for_layer(l->name).resolve(l->in_features);
      if (k > 0 && !l->residual.defined())
        throw std::invalid_argument(l->name + ": k = " + std::to_string(k) +
                                    " needs a residual store, and this layer has none");
      l->k = k;
    }
}

void LlamaModel::set_sm_budgets(const std::vector<std::pair<std::string, int64_t>>& budgets) {
  for (const auto& [key, budget] : budgets)
    if (budget < 0)
      throw std::invalid_argument("sm_budget for " + key + " must be >= 0 (0 = automatic), got " +
                                  std::to_string(budget));
  for (auto& L : layers_)
    for (auto* l : L.linears())
      for (const auto& [key, budget] : budgets)
        if (l->quantized && suffix_match(l->name, key)) l->sm_budget = budget;
}

std::vector<const Linear*> LlamaModel::linears() const {
  std::vector<const Linear*> out;
  for (const auto& L : layers_)
    for (const auto* l : L.linears()) out.push_back(l);
  return out;
}

KVCache LlamaModel::new_cache(int64_t capacity) const {
  KVCache cache;
  cache.capacity = capacity;
  const auto opts = at::TensorOptions().dtype(options_.dtype).device(options_.device);
  for (size_t i = 0; i < layers_.size(); ++i) {
    cache.k.push_back(at::zeros({1, config_.num_kv_heads, capacity, config_.head_dim}, opts));
    cache.v.push_back(at::zeros({1, config_.num_kv_heads, capacity, config_.head_dim}, opts));
  }
  // RoPE as transformers computes it (float32 positions x inv_freq, both
  // halves, cos/sin, then the compute dtype), for every position at once:
  // each entry depends only on its own position.
  auto pos = at::arange(capacity, at::TensorOptions().dtype(at::kLong).device(options_.device)).to(at::kFloat);
  auto freqs = pos.unsqueeze(-1) * inv_freq_.to(options_.device).unsqueeze(0);  // [capacity, hd/2]
  auto emb = at::cat({freqs, freqs}, -1);
  cache.rope_cos = emb.cos().to(options_.dtype).contiguous();
  cache.rope_sin = emb.sin().to(options_.dtype).contiguous();
  if (fast_decode()) {
    auto& w = cache.work;
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    w.h = at::empty({1, config_.hidden_size}, f32);
    w.x = at::empty({1, config_.hidden_size}, f32);
    w.attn = at::empty({1, config_.num_heads * config_.head_dim}, f32);
    w.scores = at::empty({config_.num_heads, capacity}, f32);
    w.logits = at::empty({1, config_.vocab_size}, f32);
  }
  return cache;
}

bool LlamaModel::fast_decode() const {
  return options_.device.is_cpu() && options_.dtype == at::kFloat;
}

at::Tensor LlamaModel::rms_norm(const at::Tensor& x, const at::Tensor& w) const {
  // transformers' LlamaRMSNorm: float32 statistics, weight applied after the
  // cast back to the input dtype.
  auto h = x.to(at::kFloat);
  auto var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + config_.rms_norm_eps);
  return w * h.to(x.scalar_type());
}

namespace {
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}
}  // namespace

at::Tensor LlamaModel::forward(const at::Tensor& ids, KVCache& cache) const {
  const auto& c = config_;
  const int64_t T = ids.numel();
  const int64_t pos0 = cache.length;
  if (T == 0) throw std::invalid_argument("forward: no tokens");
  if (pos0 + T > cache.capacity)
    throw std::invalid_argument("forward: KV cache holds " + std::to_string(cache.capacity) + " positions, " +
                                std::to_string(pos0 + T) + " needed");
  const auto dev = options_.device;
  const auto ids_cpu = ids.to(at::kCPU, at::kLong);  // checked on the host: no device sync per step
  if (ids_cpu.min().item<int64_t>() < 0 || ids_cpu.max().item<int64_t>() >= c.vocab_size)
    throw std::invalid_argument("forward: token id outside the vocabulary of " + std::to_string(c.vocab_size));
  if (T == 1 && fast_decode()) {
    decode_cpu(ids_cpu.item<int64_t>(), cache);
    return cache.work.logits.view({c.vocab_size}).clone();
  }
  const auto ids_dev = ids_cpu.reshape({1, T}).to(dev);

  at::Tensor h = at::embedding(embed_, ids_dev);  // [1, T, H]

  const auto cos = cache.rope_cos.slice(0, pos0, pos0 + T).view({1, 1, T, c.head_dim});
  const auto sin = cache.rope_sin.slice(0, pos0, pos0 + T).view({1, 1, T, c.head_dim});

  // Causal masking: a fresh prefill uses is_causal; a chunk appended to a
  // non-empty cache needs an explicit mask (query i sees keys <= pos0 + i).
  std::optional<at::Tensor> mask;
  const bool causal = T > 1 && pos0 == 0;
  if (T > 1 && pos0 > 0) {
    auto qi = at::arange(T, at::TensorOptions().dtype(at::kLong).device(dev)).unsqueeze(1) + pos0;
    auto kj = at::arange(pos0 + T, at::TensorOptions().dtype(at::kLong).device(dev)).unsqueeze(0);
    mask = kj.le(qi);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const bool comp = T == 1 || options_.compensate_prefill;

  for (size_t li = 0; li < layers_.size(); ++li) {
    const auto& L = layers_[li];
    auto x = rms_norm(h, L.input_norm);
    auto q = L.q.forward(x, comp).view({1, T, c.num_heads, c.head_dim}).transpose(1, 2);
    auto k = L.k.forward(x, comp).view({1, T, c.num_kv_heads, c.head_dim}).transpose(1, 2);
    auto v = L.v.forward(x, comp).view({1, T, c.num_kv_heads, c.head_dim}).transpose(1, 2);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    cache.k[li].slice(2, pos0, pos0 + T).copy_(k);
    cache.v[li].slice(2, pos0, pos0 + T).copy_(v);
    auto keys = cache.k[li].slice(2, 0, pos0 + T);
    auto values = cache.v[li].slice(2, 0, pos0 + T);
    auto attn = at::scaled_dot_product_attention(q, keys, values, mask, 0.0, causal, scale,
                                                 /*enable_gqa=*/c.num_heads != c.num_kv_heads);
    attn = attn.transpose(1, 2).reshape({1, T, c.num_heads * c.head_dim});
    h = h + L.o.forward(attn, comp);
    x = rms_norm(h, L.post_norm);
    h = h + L.down.forward(at::silu(L.gate.forward(x, comp)) * L.up.forward(x, comp), comp);
  }
  cache.length += T;
  auto last = rms_norm(h.select(1, T - 1), final_norm_);  // [1, H]
  return head_logits(last).to(at::kFloat).reshape({c.vocab_size});
}

at::Tensor LlamaModel::decode(int64_t id, KVCache& cache) const {
  if (!fast_decode()) return forward(at::tensor(std::vector<int64_t>{id}, at::kLong), cache);
  if (id < 0 || id >= config_.vocab_size)
    throw std::invalid_argument("decode: token id " + std::to_string(id) + " outside the vocabulary of " +
                                std::to_string(config_.vocab_size));
  if (cache.length + 1 > cache.capacity)
    throw std::invalid_argument("decode: KV cache holds " + std::to_string(cache.capacity) + " positions, " +
                                std::to_string(cache.length + 1) + " needed");
  decode_cpu(id, cache);
  return cache.work.logits.view({config_.vocab_size});
}

void LlamaModel::decode_cpu(int64_t id, KVCache& cache) const {
  namespace dc = decode_cpu;
  const auto& c = config_;
  auto& w = cache.work;
  if (!w.h.defined())
    throw std::logic_error("decode: this KVCache has no CPU workspace (made by another model's new_cache?)");
  const int64_t H = c.hidden_size, hd = c.head_dim, pos = cache.length;
  const double eps = c.rms_norm_eps;
  float* h = w.h.data_ptr<float>();
  float* x = w.x.data_ptr<float>();
  float* attn = w.attn.data_ptr<float>();
  const float* cos = cache.rope_cos.data_ptr<float>() + pos * hd;
  const float* sin = cache.rope_sin.data_ptr<float>() + pos * hd;
  std::copy_n(embed_.data_ptr<float>() + id * H, H, h);

  // The qdec ops return fresh contiguous [1, N] float32 tensors; the rest of
  // the step works in place on them and on the workspace.
  auto out = [](const at::Tensor& y) { return y.contiguous(); };
  for (size_t li = 0; li < layers_.size(); ++li) {
    const auto& L = layers_[li];
    dc::rms_norm(h, L.input_norm.data_ptr<float>(), H, eps, x);
    at::Tensor q = out(L.q.forward(w.x));
    const at::Tensor k = out(L.k.forward(w.x));
    const at::Tensor v = out(L.v.forward(w.x));
    dc::rope(q.data_ptr<float>(), cos, sin, c.num_heads, hd);
    // K and V go straight into this position's cache rows, K rotated there.
    float* kc = cache.k[li].data_ptr<float>();
    float* vc = cache.v[li].data_ptr<float>();
    for (int64_t g = 0; g < c.num_kv_heads; ++g) {
      float* krow = kc + (g * cache.capacity + pos) * hd;
      std::copy_n(k.data_ptr<float>() + g * hd, hd, krow);
      dc::rope(krow, cos, sin, 1, hd);
      std::copy_n(v.data_ptr<float>() + g * hd, hd, vc + (g * cache.capacity + pos) * hd);
    }
    dc::attend(q.data_ptr<float>(), kc, vc, c.num_heads, c.num_kv_heads, hd, cache.capacity, pos + 1,
               1.0 / std::sqrt(static_cast<double>(hd)), w.scores.data_ptr<float>(), attn);
    dc::add_inplace(h, out(L.o.forward(w.attn)).data_ptr<float>(), H);
    dc::rms_norm(h, L.post_norm.data_ptr<float>(), H, eps, x);
    at::Tensor gate = out(L.gate.forward(w.x));
    const at::Tensor up = out(L.up.forward(w.x));
    dc::silu_mul(gate.data_ptr<float>(), up.data_ptr<float>(), c.intermediate_size);
    dc::add_inplace(h, out(L.down.forward(gate)).data_ptr<float>(), H);
  }
  dc::rms_norm(h, final_norm_.data_ptr<float>(), H, eps, x);
  if (quantized_head_) {
    w.logits.copy_(lm_head_q_.forward(w.x, /*compensate=*/false));
  } else {
    // Same BLAS call as at::linear(x, lm_head) (matmul -> mm), written in place.
    at::mm_out(w.logits, w.x, lm_head_.t());
  }
  cache.length += 1;
}

size_t LlamaModel::weight_bytes() const {
  size_t n = embed_.nbytes() + final_norm_.nbytes();
  if (!lm_head_.is_same(embed_)) n += lm_head_.nbytes();
  if (quantized_head_) n += lm_head_q_.weight_bytes();
  for (const auto& L : layers_) {
    n += L.input_norm.nbytes() + L.post_norm.nbytes();
    for (const auto* l : L.linears()) n += l->weight_bytes();
  }
  return n;
}

size_t LlamaModel::residual_bytes() const {
  size_t n = 0;
  for (const auto* l : linears()) n += l->residual_bytes();
  return n;
}

}  // namespace qdec::runtime
