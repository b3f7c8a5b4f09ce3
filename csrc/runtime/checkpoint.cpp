#include "checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <set>

#include "foreign_checkpoint.h"
#include "json_util.h"

namespace qdec::runtime {

namespace {

using K = LoadError::Kind;
using json = nlohmann::json;

[[noreturn]] void bad(const std::string& file, const std::string& what) {
  throw LoadError(K::BadConfig, file, "", what);
}

bool is_int(const json& v) { return v.is_number_integer(); }  // excludes bool and floats

int64_t get_int(const json& j, const char* key, const std::string& file,
                std::optional<int64_t> fallback = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    bad(file, std::string("missing integer field \"") + key + "\"");
  }
  if (!is_int(*it)) bad(file, std::string("\"") + key + "\" must be an integer, got " + it->dump());
  return it->get<int64_t>();
}

double get_num(const json& j, const char* key, const std::string& file,
               std::optional<double> fallback = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    bad(file, std::string("missing number field \"") + key + "\"");
  }
  if (!it->is_number()) bad(file, std::string("\"") + key + "\" must be a number, got " + it->dump());
  return it->get<double>();
}

bool get_bool(const json& j, const char* key, const std::string& file, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) bad(file, std::string("\"") + key + "\" must be true/false, got " + it->dump());
  return it->get<bool>();
}

std::optional<int> opt_int(const json& j, const char* key, const std::string& file) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!is_int(*it)) bad(file, std::string("qdec.") + key + " must be an integer or null, got " + it->dump());
  return it->get<int>();
}

RopeConfig parse_rope(const json& j, const std::string& file) {
  RopeConfig r;
  // transformers >= 5: "rope_parameters": {"rope_theta", "rope_type", ...};
  // earlier: "rope_theta" plus an optional "rope_scaling" object.
  json params = json::object();
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) params = *it;
  else if (auto s = j.find("rope_scaling"); s != j.end() && s->is_object()) params = *s;
  r.theta = params.contains("rope_theta") ? get_num(params, "rope_theta", file)
                                          : get_num(j, "rope_theta", file, 10000.0);
  std::string type = "default";
  for (const char* key : {"rope_type", "type"})
    if (auto it = params.find(key); it != params.end() && it->is_string()) {
      type = it->get<std::string>();
      break;
    }
  r.type = type;
  if (type == "default") return r;
  if (type == "linear") {
    r.factor = get_num(params, "factor", file);
    return r;
  }
  if (type == "llama3") {
    r.factor = get_num(params, "factor", file);
    r.low_freq_factor = get_num(params, "low_freq_factor", file);
    r.high_freq_factor = get_num(params, "high_freq_factor", file);
    r.original_max_position_embeddings = get_int(params, "original_max_position_embeddings", file);
    return r;
  }
  bad(file, "rope type \"" + type + "\" is not supported (default, linear, llama3 are)");
}

}  // namespace

namespace {
ModelConfig parse_model_config_unchecked(const json& j, const std::string& file);
QdecSection parse_qdec_section_unchecked(const json& j, const std::string& file);
}  // namespace

// nlohmann raises type errors for fields of an unexpected JSON type (e.g.
// value("model_type", ...) on a number): they become this file's BadConfig.
ModelConfig parse_model_config(const json& j, const std::string& file) {
  try {
    return parse_model_config_unchecked(j, file);
  } catch (const json::exception& e) {
    bad(file, std::string("unexpected JSON structure: ") + e.what());
  }
}

QdecSection parse_qdec_section(const json& j, const std::string& file) {
  try {
    return parse_qdec_section_unchecked(j, file);
  } catch (const json::exception& e) {
    bad(file, std::string("unexpected JSON structure in the qdec section: ") + e.what());
  }
}

namespace {

ModelConfig parse_model_config_unchecked(const json& j, const std::string& file) {
  if (!j.is_object()) bad(file, std::string("config must be a JSON object, got ") + j.type_name());
  ModelConfig c;
  c.model_type = j.value("model_type", std::string());
  static const std::set<std::string> kTypes = {"llama", "mistral", "qwen2"};
  if (!kTypes.count(c.model_type))
    bad(file, "model_type \"" + c.model_type +
                  "\" is not a supported Llama-family decoder (llama, mistral, qwen2)");
  const std::string act = j.value("hidden_act", std::string("silu"));
  if (act != "silu") bad(file, "hidden_act \"" + act + "\" is not supported (only silu)");
  c.vocab_size = get_int(j, "vocab_size", file);
  c.hidden_size = get_int(j, "hidden_size", file);
  c.intermediate_size = get_int(j, "intermediate_size", file);
  c.num_layers = get_int(j, "num_hidden_layers", file);
  c.num_heads = get_int(j, "num_attention_heads", file);
  c.num_kv_heads = get_int(j, "num_key_value_heads", file, c.num_heads);
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_layers <= 0 ||
      c.num_heads <= 0 || c.num_kv_heads <= 0)
    bad(file, "vocab_size, hidden_size, intermediate_size, num_hidden_layers and head counts "
              "must be positive");
  if (c.num_heads % c.num_kv_heads != 0)
    bad(file, "num_attention_heads (" + std::to_string(c.num_heads) +
                  ") is not a multiple of num_key_value_heads (" + std::to_string(c.num_kv_heads) + ")");
  c.head_dim = get_int(j, "head_dim", file, c.hidden_size / c.num_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) bad(file, "head_dim must be positive and even");
  c.max_position_embeddings = get_int(j, "max_position_embeddings", file, 2048);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", file, 1e-6);
  c.rope = parse_rope(j, file);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", file, false);
  if (auto it = j.find("sliding_window"); it != j.end() && is_int(*it) &&
      get_bool(j, "use_sliding_window", file, true))
    c.sliding_window = it->get<int64_t>();
  if (auto it = j.find("bos_token_id"); it != j.end() && is_int(*it)) c.bos_token_id = it->get<int64_t>();
  if (auto it = j.find("eos_token_id"); it != j.end()) {
    if (is_int(*it)) c.eos_token_ids.push_back(it->get<int64_t>());
    else if (it->is_array())
      for (const auto& e : *it)
        if (is_int(e)) c.eos_token_ids.push_back(e.get<int64_t>());
  }
  return c;
}

QdecSection parse_qdec_section_unchecked(const json& j, const std::string& file) {
  auto it = j.find("qdec");
  // (Another tool's checkpoint never gets here: Checkpoint::load reads it
  // with foreign_checkpoint.h.)
  if (it == j.end() || !it->is_object()) bad(file, "no 'qdec' section; not a QDEC checkpoint");  // the Python reader's words
  const json& s = *it;
  QdecSection q;
  q.format_version = static_cast<int>(get_int(s, "format_version", file));
  if (q.format_version != kCheckpointFormatVersion)
    bad(file, "qdec.format_version is " + std::to_string(q.format_version) +
                  "; this reader knows version " + std::to_string(kCheckpointFormatVersion));
  if (!s.contains("method") || !s["method"].is_string()) bad(file, "qdec.method must be a string");
  q.method = s["method"].get<std::string>();
  q.bits = opt_int(s, "bits", file);
  q.group_size = opt_int(s, "group_size", file);
  q.residual_bits = opt_int(s, "residual_bits", file);
  if (q.residual_bits && (*q.residual_bits < 2 || *q.residual_bits > 8))
    bad(file, "qdec.residual_bits must be null or in 2..8, got " + std::to_string(*q.residual_bits));
  if (auto sym = s.find("symmetric"); sym != s.end() && sym->is_boolean()) q.symmetric = sym->get<bool>();
  auto mods = s.find("quantized_modules");
  if (mods == s.end() || !mods->is_array()) bad(file, "qdec.quantized_modules must be a list of names");
  std::set<std::string> seen;
  for (const auto& m : *mods) {
    if (!m.is_string() || m.get<std::string>().empty())
      bad(file, "qdec.quantized_modules must hold non-empty strings, got " + m.dump());
    if (!seen.insert(m.get<std::string>()).second)
      bad(file, "qdec.quantized_modules lists " + m.dump() + " twice");
    q.quantized_modules.push_back(m.get<std::string>());
  }
  return q;
}

// config.json's quantization_config block with quant_method "qdec" (what vLLM
// and transformers read) must agree with the qdec section this loader uses: the
// checks and messages of the Python reader's read_quantization_config and
// _parse_section, so both loaders refuse the same files.
void check_quantization_config_block(const json& config, const std::string& file) {
  const auto b = config.find("quantization_config");
  if (b == config.end() || !b->is_object() || b->value("quant_method", json()) != "qdec") return;
  const json& s = config.at("qdec");
  const json version = b->value("format_version", json());
  if (version != kCheckpointFormatVersion)
    bad(file, "quantization_config.format_version is " + py_repr(version) + "; this reader knows version " +
                  std::to_string(kCheckpointFormatVersion));
  for (const std::string key : {"bits", "residual_bits"}) {
    const json v = b->value(key, json());
    if (!v.is_null() && !(is_int(v) && v.get<int64_t>() >= 2 && v.get<int64_t>() <= 8))
      bad(file, "quantization_config." + key + " must be null or an int in 2..8, got " + py_repr(v));
  }
  for (const std::string key : {"format_version", "bits", "group_size", "symmetric", "residual_bits"}) {
    const json bv = b->value(key, json()), sv = s.value(key, json());
    if (bv != sv)
      bad(file, "quantization_config." + key + " is " + py_repr(bv) + " but qdec." + key + " is " + py_repr(sv));
  }
}

}  // namespace

Checkpoint::Checkpoint(const std::string& dir_) : dir(dir_) {
  try {
    load();
  } catch (const json::exception& e) {
    throw LoadError(K::BadHeader, dir, "", std::string("unexpected JSON structure in the metadata: ") + e.what());
  }
}

void Checkpoint::load() {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw LoadError(K::Io, dir, "", "not a checkpoint directory");
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  raw_config = parse_json_limited(read_text_file(cfg_path), cfg_path, 64);
  config = parse_model_config(raw_config, cfg_path);
  if (const ForeignFormat kind = detect_foreign_format(raw_config, dir); kind != ForeignFormat::None)
    return load_foreign(kind, cfg_path);
  qdec = parse_qdec_section(raw_config, cfg_path);
  check_quantization_config_block(raw_config, cfg_path);

  model = std::make_shared<SafetensorsFile>((fs::path(dir) / "model.safetensors").string());
  const std::string& mpath = model->path();
  auto meta_it = model->metadata().find("qdec");
  if (meta_it == model->metadata().end())
    throw LoadError(K::BadHeader, mpath, "", "__metadata__ has no \"qdec\" entry");
  const json meta = parse_json_limited(meta_it->second, mpath + " (__metadata__.qdec)", 16);
  if (!meta.is_object() || !meta.contains("format_version") || meta["format_version"] != kCheckpointFormatVersion ||
      !meta.contains("layers") || !meta["layers"].is_object())
    throw LoadError(K::BadHeader, mpath, "",
                    "__metadata__.qdec must be {\"format_version\": 1, \"layers\": {...}}");
  const auto& lm = meta["layers"];
  for (const auto& name : qdec.quantized_modules) {
    auto e = lm.find(name);
    if (e == lm.end() || !e->is_object())
      throw LoadError(K::BadHeader, mpath, name,
                      "listed in config.json qdec.quantized_modules but has no layer metadata");
    const std::string where = mpath + " (metadata of " + name + ")";
    QuantLayerMeta m;
    m.bits = static_cast<int>(get_int(*e, "bits", where));
    m.group_size = static_cast<int>(get_int(*e, "group_size", where));
    m.in_features = get_int(*e, "in_features", where);
    m.out_features = get_int(*e, "out_features", where);
    m.symmetric = get_bool(*e, "symmetric", where, false);
    m.input_permutation = get_bool(*e, "input_permutation", where, false);
    m.scale_dtype = e->value("scale_dtype", std::string("F16"));
    if (m.bits < 2 || m.bits > 8) bad(where, "bits must be in 2..8, got " + std::to_string(m.bits));
    if (!(m.group_size == -1 || (m.group_size > 0 && m.group_size % 32 == 0)))
      bad(where, "group_size must be -1 or a positive multiple of 32, got " +
                     std::to_string(m.group_size));
    if (m.in_features <= 0 || m.out_features <= 0)
      bad(where, "in_features and out_features must be positive");
    if (m.scale_dtype != "F16" && m.scale_dtype != "BF16" && m.scale_dtype != "F32")
      bad(where, "scale_dtype must be F16, BF16 or F32, got \"" + m.scale_dtype + "\"");
    // The same check as the Python reader (qdec.formats.qdec_checkpoint), with its
    // message: a config.json that says bits = 9 over 3-bit tensors is refused by both.
    const auto disagree = [&](const char* key, const std::string& layer_value, const std::string& config_value) {
      bad(mpath, "layer '" + name + "' has " + key + "=" + layer_value + " but " + cfg_path + " says " +
                     config_value + " for every layer");
    };
    if (qdec.bits && *qdec.bits != m.bits) disagree("bits", std::to_string(m.bits), std::to_string(*qdec.bits));
    if (qdec.group_size && *qdec.group_size != m.group_size)
      disagree("group_size", std::to_string(m.group_size), std::to_string(*qdec.group_size));
    if (qdec.symmetric && *qdec.symmetric != m.symmetric)
      disagree("symmetric", m.symmetric ? "True" : "False", *qdec.symmetric ? "True" : "False");
    layers.emplace(name, m);
  }
  if (lm.size() != layers.size())
    throw LoadError(K::BadHeader, mpath, "",
                    "layer metadata lists " + std::to_string(lm.size()) +
                        " layers but config.json qdec.quantized_modules lists " +
                        std::to_string(layers.size()));

  const auto res_path = fs::path(dir) / "residual.safetensors";
  if (qdec.residual_bits) {
    if (!fs::exists(res_path))
      throw LoadError(K::Io, res_path.string(), "",
                      "missing, but config.json declares qdec.residual_bits");
    residual = std::make_shared<SafetensorsFile>(res_path.string());
    const std::string& rpath = residual->path();
    auto rm = residual->metadata().find("qdec");
    if (rm == residual->metadata().end())
      throw LoadError(K::BadHeader, rpath, "", "__metadata__ has no \"qdec\" entry; not a QDEC residual store");
    const json rmeta = parse_json_limited(rm->second, rpath + " (__metadata__.qdec)", 16);
    if (!rmeta.is_object() || !rmeta.contains("residual_bits") || rmeta["residual_bits"] != *qdec.residual_bits)
      throw LoadError(K::BadHeader, rpath, "",
                      "__metadata__.qdec.residual_bits must equal config.json qdec.residual_bits = " +
                          std::to_string(*qdec.residual_bits));
    for (const auto& t : residual->names()) {
      const auto dot = t.rfind('.');
      const std::string owner = dot == std::string::npos ? t : t.substr(0, dot);
      const std::string suffix = dot == std::string::npos ? "" : t.substr(dot + 1);
      if ((suffix != "residual" && suffix != "residual_scales") || !layers.count(owner))
        throw LoadError(K::BadHeader, rpath, t,
                        "is not <quantized module>.residual or .residual_scales of this checkpoint");
    }
  } else if (fs::exists(res_path)) {
    throw LoadError(K::BadConfig, cfg_path, "",
                    "residual.safetensors is present but qdec.residual_bits is null");
  }
}

namespace {
// The weights of another tool's directory, found as the Python readers find
// them (safetensors_io.load_state_dict_dir): model.safetensors, else the
// directory's only .safetensors file. Sharded weights are not read here yet.
std::string foreign_weights_path(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::is_regular_file(single)) return single.string();
  if (fs::exists(fs::path(dir) / "model.safetensors.index.json"))
    throw LoadError(K::Io, (fs::path(dir) / "model.safetensors.index.json").string(), "",
                    "sharded weights are not read by qdec_infer yet; merge the shards into one "
                    "model.safetensors (or run the directory with qdec generate)");
  std::vector<std::string> found;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") found.push_back(e.path().filename().string());
  std::sort(found.begin(), found.end());
  if (found.size() == 1) return (fs::path(dir) / found.front()).string();
  std::string list;
  for (const auto& f : found) list += (list.empty() ? "" : ", ") + f;
  throw LoadError(K::Io, dir, "", "no model.safetensors (safetensors files present: " +
                                      (list.empty() ? std::string("none") : list) + ")");
}
}  // namespace

void Checkpoint::load_foreign(ForeignFormat kind, const std::string& config_path) {
  model = std::make_shared<SafetensorsFile>(foreign_weights_path(dir));
  auto converted = std::make_shared<ForeignCheckpoint>(read_foreign_checkpoint(kind, dir, raw_config, config_path, *model));
  // Described as a QDEC checkpoint without a residual store (k = 0 only).
  qdec.format_version = kCheckpointFormatVersion;
  qdec.method = converted->format;
  for (const auto& [name, linear] : converted->linears) {
    layers.emplace(name, linear.meta);
    qdec.quantized_modules.push_back(name);
  }
  foreign = std::move(converted);
}

std::string Checkpoint::tokenizer_path() const {
  const auto p = std::filesystem::path(dir) / "tokenizer.json";
  return std::filesystem::exists(p) ? p.string() : std::string();
}

}  // namespace qdec::runtime
