// The QDEC checkpoint directory (qdec/formats/qdec_checkpoint.py is the
// authoritative description; this is its C++ reader):
//   config.json           HF Llama-family config + a "qdec" section
//   model.safetensors     non-quantized tensors under HF names, and per quantized
//                         linear <name>.qweight/.scales[/.zeros][/.input_perm];
//                         __metadata__["qdec"] = {"format_version": 1,
//                         "layers": {name: {bits, group_size, in_features,
//                         out_features, symmetric, scale_dtype, input_permutation}}}
//   residual.safetensors  <name>.residual, <name>.residual_scales (optional)
//   tokenizer.json        HF tokenizer (optional)
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "safetensors.h"

namespace qdec::runtime {

constexpr int kCheckpointFormatVersion = 1;

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// The Llama-family fields qdec_infer needs, read from an HF config.json.
struct ModelConfig {
  std::string model_type;  // llama | mistral | qwen2
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  std::optional<int64_t> sliding_window;  // Mistral/Qwen2; not implemented: full attention
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;
};

// config.json's "qdec" section.
struct QdecSection {
  int format_version = 0;
  std::string method;
  std::optional<int> bits, group_size, residual_bits;
  std::optional<bool> symmetric;
  std::vector<std::string> quantized_modules;
};

// One quantized linear's entry of model.safetensors' metadata.
struct QuantLayerMeta {
  int bits = 0, group_size = 0;
  int64_t in_features = 0, out_features = 0;
  bool symmetric = false, input_permutation = false;
  std::string scale_dtype;
};

// Parses an HF config object; `file` only names it in errors.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& file);
QdecSection parse_qdec_section(const nlohmann::json& j, const std::string& file);

struct ForeignCheckpoint;  // foreign_checkpoint.h
enum class ForeignFormat;

class Checkpoint {
 public:
  // Reads config.json and maps model.safetensors (+ residual.safetensors when
  // the config declares one); validates the metadata. Throws LoadError.
  // Another tool's checkpoint (AutoAWQ / GPTQ / compressed-tensors, see
  // foreign_checkpoint.h) is read too: its quantized linears are converted to
  // the QDEC layout (`foreign`), `layers` and `qdec` describe them as a QDEC
  // checkpoint without a residual store would.
  explicit Checkpoint(const std::string& dir);

  std::string dir;
  nlohmann::json raw_config;
  ModelConfig config;
  QdecSection qdec;
  std::map<std::string, QuantLayerMeta> layers;
  std::shared_ptr<SafetensorsFile> model;
  std::shared_ptr<SafetensorsFile> residual;  // null without a residual store
  // Another tool's checkpoint, converted; null for a QDEC checkpoint.
  std::shared_ptr<const ForeignCheckpoint> foreign;

  bool is_quantized(const std::string& name) const { return layers.count(name) != 0; }
  std::string tokenizer_path() const;  // "" when the directory has none

 private:
  void load();
  void load_foreign(ForeignFormat kind, const std::string& config_path);
};

}  // namespace qdec::runtime
