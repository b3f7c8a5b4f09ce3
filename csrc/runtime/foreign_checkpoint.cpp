#include "foreign_checkpoint.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <set>

#include "json_util.h"
#include "qdec/bitpack.h"

namespace qdec::runtime {

namespace {

using K = LoadError::Kind;
using json = nlohmann::json;
namespace fs = std::filesystem;

[[noreturn]] void bad_config(const std::string& file, const std::string& what) {
  throw LoadError(K::BadConfig, file, "", what);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// Python's str() of a JSON value (the readers compare str(value).lower()).
std::string py_str(const json& v) { return v.is_string() ? v.get<std::string>() : py_repr(v); }

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string list_str(std::initializer_list<int64_t> v) {
  std::string s = "[";
  bool first = true;
  for (int64_t x : v) s += (first ? "" : ", ") + std::to_string(x), first = false;
  return s + "]";
}

// "I32 [4, 1]": a file tensor's dtype and shape, for "is ...; expected ..." messages.
std::string describe(const SafetensorsFile& f, const std::string& name) {
  const auto& i = f.info(name);
  return std::string(dtype_name(i.dtype)) + " " + shape_str(i.shape);
}

bool has_dtype(const SafetensorsFile& f, const std::string& name, std::initializer_list<DType> ok) {
  const DType d = f.info(name).dtype;
  return std::find(ok.begin(), ok.end(), d) != ok.end();
}

bool has_shape(const SafetensorsFile& f, const std::string& name, const std::vector<int64_t>& shape) {
  return f.info(name).shape == shape;
}

bool is_float_scale(const SafetensorsFile& f, const std::string& name) {
  return has_dtype(f, name, {DType::F16, DType::BF16, DType::F32});
}

// Dimensions read from a file stay far below int64 overflow in the products
// below (K * bits, N * K codes); a real model's are < 2^20.
constexpr int64_t kMaxDim = int64_t{1} << 40;

// Every tensor of the file whose name ends with `suffix`, without it, sorted.
std::vector<std::string> layer_names(const SafetensorsFile& f, const std::string& suffix) {
  std::vector<std::string> out;
  for (const auto& n : f.names())
    if (ends_with(n, suffix)) out.push_back(n.substr(0, n.size() - suffix.size()));
  std::sort(out.begin(), out.end());
  return out;
}

// The QDEC group size of a layer with G inputs per group: one group per row
// is -1; otherwise the packed layout needs a multiple of 32.
int project_group_size(int64_t G, int64_t groups, const SafetensorsFile& f, const std::string& name) {
  if (groups == 1) return -1;
  if (G % 32)
    throw LoadError(K::BadConfig, f.path(), name,
                    "group size " + std::to_string(G) +
                        " is not supported by the QDEC packed layout (a multiple of 32, or one group per row)");
  return static_cast<int>(G);
}

ConvertedLinear finish(const at::Tensor& codes, at::Tensor scales, std::optional<at::Tensor> zeros,
                       std::optional<at::Tensor> perm, int bits, int group_size, int64_t K) {
  ConvertedLinear c;
  c.meta.bits = bits;
  c.meta.group_size = group_size;
  c.meta.in_features = K;
  c.meta.out_features = codes.size(0);
  c.meta.symmetric = !zeros.has_value();
  c.meta.input_permutation = perm.has_value();
  const auto sdt = from_scalar_type(scales.scalar_type());
  c.meta.scale_dtype = sdt ? dtype_name(*sdt) : "F32";
  c.qweight = pack_qdec_rows(codes, bits);
  c.scales = std::move(scales);
  c.zeros = std::move(zeros);
  c.input_perm = std::move(perm);
  return c;
}

// ---- AutoAWQ GEMM (qdec/formats/autoawq.py) ---------------------------------

struct AwqConfig {
  int64_t group_size = 128;
  bool zero_point = true;
};

// _pick: one of several synonymous keys; the same value if more than one is given.
json pick(const json& cfg, std::initializer_list<const char*> keys, const std::string& source,
          const json& fallback = json()) {
  std::vector<std::pair<std::string, json>> found;
  for (const char* k : keys)
    if (cfg.contains(k)) found.emplace_back(k, cfg.at(k));
  for (const auto& entry : found)
    if (entry.second != found.front().second) {
      std::string s = "{";
      for (size_t i = 0; i < found.size(); ++i)
        s += (i ? ", '" : "'") + found[i].first + "': " + py_repr(found[i].second);
      bad_config(source, "quantization_config gives conflicting " + s + "}");
    }
  return found.empty() ? fallback : found.front().second;
}

AwqConfig parse_awq_config(const json& config, const std::string& source) {
  const json& cfg = config.at("quantization_config");
  if (!cfg.is_object()) bad_config(source, "quantization_config must be an object");
  const json bits = pick(cfg, {"bits", "w_bit"}, source);
  const json group_size = pick(cfg, {"group_size", "q_group_size"}, source);
  const json version = pick(cfg, {"version"}, source, "gemm");
  const json zero_point = pick(cfg, {"zero_point"}, source, true);
  if (!(bits.is_number() && !bits.is_boolean() && bits.get<double>() == 4.0))
    bad_config(source, "AutoAWQ checkpoints are 4-bit only (bits/w_bit), got " + py_repr(bits));
  if (!group_size.is_number_integer() || !(group_size.get<int64_t>() == -1 || group_size.get<int64_t>() > 0))
    bad_config(source, "group_size/q_group_size must be -1 or a positive int, got " + py_repr(group_size));
  const std::string v = lower(py_str(version));
  if (v != "gemm")
    bad_config(source, "AutoAWQ version '" + v +
                           "' is not supported; only 'gemm' (qweight [K, N/8]) is (gemv/gemv_fast/marlin/exllama "
                           "use other layouts)");
  if (!zero_point.is_boolean()) bad_config(source, "zero_point must be a bool, got " + py_repr(zero_point));
  return {group_size.get<int64_t>(), zero_point.get<bool>()};
}

ConvertedLinear convert_awq(const SafetensorsFile& f, const std::string& name, int64_t group_size) {
  const std::string qw = name + ".qweight", qz = name + ".qzeros", sc = name + ".scales";
  const auto& qinfo = f.info(qw);
  if (qinfo.dtype != DType::I32 || qinfo.shape.size() != 2 || qinfo.shape[0] <= 0 || qinfo.shape[1] <= 0 ||
      qinfo.shape[0] > kMaxDim || qinfo.shape[1] > kMaxDim)
    throw LoadError(K::WrongShape, f.path(), qw, "must be int32 [K, N/8], got " + describe(f, qw));
  const int64_t Kin = qinfo.shape[0], N = qinfo.shape[1] * 8;
  const int64_t G = group_size == -1 ? Kin : group_size;
  const int64_t groups = ceil_div(Kin, G);
  const std::string geom = " (K=" + std::to_string(Kin) + ", N=" + std::to_string(N) + ", G=" + std::to_string(G) + ")";
  if (!has_dtype(f, qz, {DType::I32}) || !has_shape(f, qz, {groups, N / 8}))
    throw LoadError(K::WrongShape, f.path(), qz,
                    "is " + describe(f, qz) + "; expected I32 " + list_str({groups, N / 8}) + geom);
  if (!has_dtype(f, sc, {DType::F16}) || !has_shape(f, sc, {groups, N}))
    throw LoadError(K::WrongShape, f.path(), sc, "is " + describe(f, sc) + "; expected F16 " + list_str({groups, N}) + geom);
  const at::Tensor codes = unpack_awq_rows(f.view(qw)).t().contiguous();  // [N, K]
  // Zero points become float16 copies of the integers (exact), as the Python reader does.
  at::Tensor zeros = unpack_awq_rows(f.view(qz)).t().to(at::kHalf).contiguous();  // [N, groups]
  const int gs = G >= Kin ? -1 : project_group_size(G, groups, f, name);
  return finish(codes, f.view(sc).t().contiguous(), zeros, std::nullopt, 4, gs, Kin);
}

ForeignCheckpoint read_autoawq(const json& config, const std::string& cfg_path, const SafetensorsFile& f) {
  const AwqConfig cfg = parse_awq_config(config, cfg_path);
  ForeignCheckpoint out;
  out.format = "autoawq-gemm";
  const auto names = layer_names(f, ".qweight");
  if (names.empty()) throw LoadError(K::MissingTensor, f.path(), "", "no '<name>.qweight' tensors found");
  for (const auto& name : names) {
    for (const char* suffix : {".qzeros", ".scales"}) {
      const std::string key = name + suffix;
      if (f.contains(key)) continue;
      if (std::string(suffix) == ".qzeros" && !cfg.zero_point)
        throw LoadError(K::MissingTensor, f.path(), key,
                        "missing; AutoAWQ gemm with zero_point=false has no defined code offset");
      throw LoadError(K::MissingTensor, f.path(), key, "missing");
    }
    out.linears.emplace(name, convert_awq(f, name, cfg.group_size));
  }
  return out;
}

// ---- GPTQ (qdec/formats/gptq.py) --------------------------------------------

struct GptqConfig {
  int bits = 0;
  int64_t group_size = 0;
  std::optional<std::string> checkpoint_format;  // gptq (v1 zeros) | gptq_v2 (v2); absent: v1
  std::string zero_convention() const { return checkpoint_format.value_or("gptq") == "gptq" ? "v1" : "v2"; }
};

GptqConfig parse_gptq_config(const json& cfg, const std::string& source) {
  if (!cfg.is_object()) bad_config(source, "quantization_config must be an object");
  const json method = cfg.contains("quant_method") ? cfg.at("quant_method") : json("gptq");
  if (lower(py_str(method)) != "gptq") bad_config(source, "quant_method is " + py_repr(method) + "; expected 'gptq'");
  const json bits = cfg.value("bits", json());
  if (!bits.is_number_integer() || !std::set<int64_t>{2, 3, 4, 8}.count(bits.get<int64_t>()))
    bad_config(source, "GPTQ bits must be one of [2, 3, 4, 8], got " + py_repr(bits));
  const json gs = cfg.value("group_size", json());
  if (!gs.is_number_integer() || !(gs.get<int64_t>() == -1 || gs.get<int64_t>() > 0))
    bad_config(source, "group_size must be -1 or a positive int, got " + py_repr(gs));
  GptqConfig c;
  c.bits = static_cast<int>(bits.get<int64_t>());
  c.group_size = gs.get<int64_t>();
  if (const auto it = cfg.find("checkpoint_format"); it != cfg.end() && !it->is_null()) {
    if (!it->is_string() || (*it != "gptq" && *it != "gptq_v2"))
      bad_config(source, "checkpoint_format " + py_repr(*it) +
                             " is not supported; expected one of ['gptq', 'gptq_v2'] (marlin/bitblas layouts differ)");
    c.checkpoint_format = it->get<std::string>();
  }
  return c;
}

ConvertedLinear convert_gptq(const SafetensorsFile& f, const std::string& name, int bits, int64_t group_size,
                             int zero_offset) {
  const std::string qw = name + ".qweight", qz = name + ".qzeros", sc = name + ".scales", gi = name + ".g_idx";
  const auto& qinfo = f.info(qw);
  if (qinfo.dtype != DType::I32 || qinfo.shape.size() != 2 || qinfo.shape[0] <= 0 || qinfo.shape[1] <= 0 ||
      qinfo.shape[0] > kMaxDim || qinfo.shape[1] > kMaxDim)
    throw LoadError(K::WrongShape, f.path(), qw, "must be int32 [K*b/32, N], got " + describe(f, qw));
  const int64_t rows = qinfo.shape[0], N = qinfo.shape[1];
  if ((rows * 32) % bits)
    throw LoadError(K::WrongShape, f.path(), qw,
                    "has " + std::to_string(rows) + " rows, not a whole number of " + std::to_string(bits) +
                        "-bit values per column");
  const int64_t Kin = rows * 32 / bits;
  std::optional<at::Tensor> g_idx;
  if (f.contains(gi)) {
    g_idx = f.view(gi);
    if (g_idx->dim() == 1 && g_idx->size(0) != Kin)
      throw LoadError(K::WrongShape, f.path(), qw,
                      "has shape " + shape_str(qinfo.shape) + ", i.e. K=" + std::to_string(Kin) + " at " +
                          std::to_string(bits) + " bits; expected K=" + std::to_string(g_idx->size(0)) + " (" +
                          std::to_string(g_idx->size(0) * bits / 32) + " rows, from " + gi + ")");
  }
  const int64_t G = group_size == -1 ? Kin : group_size;
  const int64_t groups = ceil_div(Kin, G);
  const std::string geom = " (K=" + std::to_string(Kin) + ", N=" + std::to_string(N) + ", G=" + std::to_string(G) + ")";
  if (!is_float_scale(f, sc) || !has_shape(f, sc, {groups, N}))
    throw LoadError(K::WrongShape, f.path(), sc,
                    "is " + describe(f, sc) + "; expected a float tensor " + list_str({groups, N}) + geom);
  if ((N * bits) % 32)
    throw LoadError(K::WrongShape, f.path(), name,
                    "N=" + std::to_string(N) + " outputs at " + std::to_string(bits) +
                        " bits do not fill whole qzeros words");
  if (!has_dtype(f, qz, {DType::I32}) || !has_shape(f, qz, {groups, N * bits / 32}))
    throw LoadError(K::WrongShape, f.path(), qz,
                    "is " + describe(f, qz) + "; expected I32 " + list_str({groups, N * bits / 32}));
  at::Tensor codes = unpack_dense_rows(f.view(qw).t().contiguous(), bits, Kin);  // [N, K], file channel order
  const at::Tensor scales = f.view(sc);
  // v1 stores z - 1 (AutoGPTQ), v2 stores z; float copies in the scale dtype (exact).
  at::Tensor zeros = (unpack_dense_rows(f.view(qz), bits, N).to(at::kInt) + zero_offset)
                         .t()
                         .to(scales.scalar_type())
                         .contiguous();  // [N, groups]
  auto perm = act_order_permutation(g_idx, Kin, G, f.path(), gi);
  if (perm) codes = codes.index_select(1, *perm).contiguous();
  const int gs = project_group_size(G, groups, f, name);
  // GPTQ's symmetric mode stores 2^(bits-1) everywhere: the same weights as a
  // symmetric QDEC layer (zeros none), which is what the Python reader makes.
  std::optional<at::Tensor> z = zeros;
  if (zeros.to(at::kFloat).eq(static_cast<double>(1 << (bits - 1))).all().item<bool>()) z.reset();
  return finish(codes, scales.t().contiguous(), z, perm, bits, gs, Kin);
}

ForeignCheckpoint read_gptq(const std::string& dir, const json& config, const std::string& cfg_path,
                            const SafetensorsFile& f) {
  // The config in config.json and/or quantize_config.json; both must agree.
  std::vector<std::pair<GptqConfig, std::string>> found;
  if (config.contains("quantization_config")) found.emplace_back(parse_gptq_config(config.at("quantization_config"), cfg_path), cfg_path);
  const std::string qpath = (fs::path(dir) / "quantize_config.json").string();
  if (fs::is_regular_file(qpath))
    found.emplace_back(parse_gptq_config(parse_json_limited(read_text_file(qpath), qpath, 64), qpath), qpath);
  if (found.empty())  // detect_foreign_format found one of them: unreachable unless the files changed
    bad_config(dir, "no GPTQ quantization config (quantize_config.json or config.json quantization_config)");
  if (found.size() == 2) {
    const auto& [a, sa] = found[0];
    const auto& [b, sb] = found[1];
    const auto disagree = [&](const char* key, const std::string& x, const std::string& y) {
      bad_config(sa, "disagrees with " + sb + " on " + key + ": " + x + " vs " + y);
    };
    if (a.bits != b.bits) disagree("bits", std::to_string(a.bits), std::to_string(b.bits));
    if (a.group_size != b.group_size) disagree("group_size", std::to_string(a.group_size), std::to_string(b.group_size));
    if (a.zero_convention() != b.zero_convention())
      disagree("zero_convention", "'" + a.zero_convention() + "'", "'" + b.zero_convention() + "'");
  }
  const auto& [cfg, source] = found.front();
  ForeignCheckpoint out;
  out.format = "gptq-" + cfg.zero_convention();
  if (!cfg.checkpoint_format)
    out.notes.push_back(source + ": the GPTQ config has no checkpoint_format; reading zero points as v1 "
                                 "(AutoGPTQ's 'gptq': stored z - 1), as every GPTQ loader does");
  const int offset = cfg.zero_convention() == "v1" ? 1 : 0;
  const auto names = layer_names(f, ".qweight");
  if (names.empty()) throw LoadError(K::MissingTensor, f.path(), "", "no '<name>.qweight' tensors found");
  for (const auto& name : names) {
    for (const char* suffix : {".qzeros", ".scales"})
      if (!f.contains(name + suffix)) throw LoadError(K::MissingTensor, f.path(), name + suffix, "missing");
    out.linears.emplace(name, convert_gptq(f, name, cfg.bits, cfg.group_size, offset));
  }
  return out;
}

// ---- compressed-tensors pack-quantized (qdec/formats/compressed_tensors.py) --

struct CtArgs {
  int bits = 8;
  bool symmetric = true;
  bool channel = false;      // strategy "channel": one group per row
  int64_t group_size = 0;    // strategy "group"
};

// The checks of parse_compressed_tensors_config, on the JSON itself (the
// Python side validates it with the library's pydantic model first). The
// config groups must agree on the fields that decide the layout (bits, type,
// symmetric, strategy, group size, dynamic).
CtArgs parse_ct_config(const json& config, const std::string& source) {
  const json& qc = config.at("quantization_config");
  if (!qc.is_object()) bad_config(source, "quantization_config must be an object");
  const json method = qc.value("quant_method", json());
  if (method != "compressed-tensors")
    bad_config(source, "quant_method is " + py_repr(method) + "; expected 'compressed-tensors'");
  std::set<std::string> formats;
  if (qc.contains("format") && !qc.at("format").is_null()) formats.insert(py_str(qc.at("format")));
  const json groups = qc.value("config_groups", json());
  if (!groups.is_object() || groups.empty()) bad_config(source, "quantization_config has no config_groups");
  std::vector<std::pair<std::string, json>> weights;
  for (const auto& [gname, scheme] : groups.items()) {
    if (!scheme.is_object())
      bad_config(source, "config group '" + gname + "' must be a scheme object, got " + scheme.dump());
    for (const char* act : {"input_activations", "output_activations"})
      if (scheme.contains(act) && !scheme.at(act).is_null())
        bad_config(source, "config group '" + gname +
                               "' quantizes activations; only weight-only schemes (e.g. W4A16) can be read");
    if (!scheme.contains("weights") || !scheme.at("weights").is_object())
      bad_config(source, "config group '" + gname + "' has no weight scheme");
    if (scheme.contains("format") && scheme.at("format").is_string() && !scheme.at("format").get<std::string>().empty())
      formats.insert(scheme.at("format").get<std::string>());
    weights.emplace_back(gname, scheme.at("weights"));
  }
  if (formats.empty()) bad_config(source, "quantization_config gives no format; only 'pack-quantized' is supported");
  for (const auto& fmt : formats)
    if (fmt != "pack-quantized")
      bad_config(source, "format '" + fmt + "' is not supported; only 'pack-quantized' (int weights packed in int32) is");

  // QuantizationArgs with the library's defaults and strategy inference.
  struct Parsed {
    json bits, type, symmetric, strategy, group_size, dynamic;
    bool operator==(const Parsed&) const = default;
  };
  const auto parse = [&](const json& w) {
    Parsed p;
    p.bits = w.value("num_bits", json(8));
    p.type = w.value("type", json("int"));
    p.symmetric = w.value("symmetric", json(true));
    p.group_size = w.value("group_size", json());
    p.dynamic = w.value("dynamic", json(false));
    p.strategy = w.value("strategy", json());
    if (p.strategy.is_null()) {
      if (p.group_size.is_null()) p.strategy = "tensor";
      else if (p.group_size.is_number_integer() && p.group_size.get<int64_t>() > 0) p.strategy = "group";
      else if (p.group_size == -1) p.strategy = "channel";
    }
    return p;
  };
  const Parsed args = parse(weights.front().second);
  for (size_t i = 1; i < weights.size(); ++i)
    if (!(parse(weights[i].second) == args))
      bad_config(source, "config groups '" + weights.front().first + "' and '" + weights[i].first +
                             "' use different weight schemes; mixed schemes are not supported");
  const std::string where = "config group '" + weights.front().first + "' weights";
  if (args.type != "int") bad_config(source, where + ": type " + py_repr(args.type) + " is not supported; expected 'int'");
  if (!args.bits.is_number_integer() || !std::set<int64_t>{2, 3, 4, 8}.count(args.bits.get<int64_t>()))
    bad_config(source, where + ": num_bits " + py_str(args.bits) + " is not supported; expected one of [2, 3, 4, 8]");
  if (args.strategy != "group" && args.strategy != "channel")
    bad_config(source, where + ": strategy " + py_repr(args.strategy) + " is not supported; expected 'group' or 'channel'");
  if (!(args.dynamic.is_boolean() && !args.dynamic.get<bool>()))
    bad_config(source, where + ": dynamic weight quantization has no stored scales");
  if (!args.symmetric.is_boolean()) bad_config(source, where + ": symmetric must be a bool, got " + py_repr(args.symmetric));
  CtArgs a;
  a.bits = static_cast<int>(args.bits.get<int64_t>());
  a.symmetric = args.symmetric.get<bool>();
  a.channel = args.strategy == "channel";
  if (!a.channel) {
    if (!args.group_size.is_number_integer() || args.group_size.get<int64_t>() <= 0)
      bad_config(source, where + ": group strategy with group_size " + py_str(args.group_size));
    a.group_size = args.group_size.get<int64_t>();
  }
  return a;
}

ConvertedLinear convert_ct(const SafetensorsFile& f, const std::string& name, const CtArgs& args) {
  const std::string pk = name + ".weight_packed", sc = name + ".weight_scale", sh = name + ".weight_shape",
                    zp = name + ".weight_zero_point", gi = name + ".weight_g_idx";
  for (const auto& t : {pk, sc, sh})
    if (!f.contains(t)) throw LoadError(K::MissingTensor, f.path(), t, "missing");
  const int bits = args.bits;
  const at::Tensor shape = f.view(sh);
  if (shape.dim() != 1 || shape.numel() != 2 || at::isFloatingType(shape.scalar_type()) ||
      shape.scalar_type() == at::kBool)
    throw LoadError(K::WrongShape, f.path(), sh, "is " + describe(f, sh) + "; expected an integer [2] = [N, K]");
  const at::Tensor nk = shape.to(at::kLong);
  const int64_t N = nk[0].item<int64_t>(), Kin = nk[1].item<int64_t>();
  if (N <= 0 || Kin <= 0 || N > kMaxDim || Kin > kMaxDim)
    throw LoadError(K::BadShape, f.path(), sh, "says [N, K] = " + list_str({N, Kin}) + "; expected positive sizes");
  const int64_t words = ceil_div(Kin * bits, 32);
  if (!has_dtype(f, pk, {DType::I32}) || !has_shape(f, pk, {N, words}))
    throw LoadError(K::WrongShape, f.path(), pk,
                    "is " + describe(f, pk) + "; expected I32 " + list_str({N, words}) + " (N=" + std::to_string(N) +
                        ", K=" + std::to_string(Kin) + ", " + std::to_string(bits) + " bits)");
  const int64_t G = args.channel ? Kin : args.group_size;
  const int64_t groups = ceil_div(Kin, G);
  if (!is_float_scale(f, sc) || !has_shape(f, sc, {N, groups}))
    throw LoadError(K::WrongShape, f.path(), sc,
                    "is " + describe(f, sc) + "; expected a float tensor " + list_str({N, groups}) + " (N=" +
                        std::to_string(N) + ", K=" + std::to_string(Kin) + ", G=" + std::to_string(G) + ")");
  if (groups > 1 && G % 32) project_group_size(G, groups, f, name);  // throws
  const at::Tensor scales = f.view(sc);
  // Codes are stored as q + 2^(bits-1) (q signed): the unsigned field is the
  // QDEC code, and the same holds for the zero points, so (c - z) * s is unchanged.
  at::Tensor codes = unpack_dense_rows(f.view(pk), bits, Kin);  // [N, K]
  std::optional<at::Tensor> zeros;
  if (!args.symmetric) {
    if (!f.contains(zp)) throw LoadError(K::MissingTensor, f.path(), zp, "missing (the scheme is asymmetric)");
    const int64_t zwords = ceil_div(N * bits, 32);
    if (!has_dtype(f, zp, {DType::I32}) || !has_shape(f, zp, {zwords, groups}))
      throw LoadError(K::WrongShape, f.path(), zp,
                      "is " + describe(f, zp) + "; expected I32 " + list_str({zwords, groups}) + " (packed along N)");
    zeros = unpack_dense_rows(f.view(zp).t().contiguous(), bits, N).t().to(scales.scalar_type()).contiguous();
  } else if (f.contains(zp) && f.view(zp).ne(0).any().item<bool>()) {
    throw LoadError(K::BadHeader, f.path(), zp, "is nonzero but the scheme is symmetric");
  }
  std::optional<at::Tensor> g_idx;
  if (f.contains(gi)) g_idx = f.view(gi);
  auto perm = act_order_permutation(g_idx, Kin, G, f.path(), gi);
  if (perm) codes = codes.index_select(1, *perm).contiguous();
  return finish(codes, scales.contiguous(), zeros, perm, bits, groups == 1 ? -1 : static_cast<int>(G), Kin);
}

ForeignCheckpoint read_compressed_tensors(const json& config, const std::string& cfg_path, const SafetensorsFile& f) {
  const CtArgs args = parse_ct_config(config, cfg_path);
  ForeignCheckpoint out;
  out.format = "compressed-tensors";
  const auto names = layer_names(f, ".weight_packed");
  if (names.empty()) throw LoadError(K::MissingTensor, f.path(), "", "no '<name>.weight_packed' tensors found");
  for (const auto& name : names) out.linears.emplace(name, convert_ct(f, name, args));
  return out;
}

}  // namespace

// ---- building blocks ----------------------------------------------------------

at::Tensor unpack_dense_rows(const at::Tensor& words_in, int bits, int64_t cols) {
  TORCH_CHECK(words_in.scalar_type() == at::kInt && words_in.dim() == 2, "unpack_dense_rows: int32 [rows, W] expected");
  TORCH_CHECK(bits >= 1 && bits <= 8, "unpack_dense_rows: bits must be in 1..8");
  const at::Tensor words = words_in.contiguous();
  const int64_t rows = words.size(0), W = words.size(1);
  TORCH_CHECK(cols >= 0 && W * 32 >= cols * bits, "unpack_dense_rows: ", W, " words hold fewer than ", cols,
              " values of ", bits, " bits");
  at::Tensor out = at::empty({rows, cols}, at::kByte);
  const auto* src = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint32_t mask = (1u << bits) - 1u;
  // Rows are independent: split them over threads (a 7B model converts a few
  // billion codes at load).
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* row = src + r * W;
      for (int64_t i = 0; i < cols; ++i) {
        const int64_t bit = i * bits;
        const int64_t w = bit >> 5;
        const int sh = static_cast<int>(bit & 31);
        uint32_t v = row[w] >> sh;
        if (sh + bits > 32) v |= row[w + 1] << (32 - sh);  // straddles into the next word
        dst[r * cols + i] = static_cast<uint8_t>(v & mask);
      }
    }
  });
  return out;
}

at::Tensor pack_qdec_rows(const at::Tensor& codes_in, int bits) {
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && codes_in.dim() == 2, "pack_qdec_rows: uint8 [rows, cols] expected");
  TORCH_CHECK(bits >= 2 && bits <= 8, "pack_qdec_rows: bits must be in 2..8");
  const at::Tensor codes = codes_in.contiguous();
  const int64_t rows = codes.size(0), cols = codes.size(1), W = packed_row_words(cols, bits);
  // A block of 32 values is `bits` words with value i at bit bits*i (bitpack.h),
  // so a whole row is one dense bit string, zero-padded to whole blocks.
  at::Tensor out = at::zeros({rows, W}, at::kInt);
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  const uint32_t mask = (1u << bits) - 1u;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint32_t* row = dst + r * W;
      for (int64_t i = 0; i < cols; ++i) {
        const uint32_t v = src[r * cols + i] & mask;
        const int64_t bit = i * bits;
        const int sh = static_cast<int>(bit & 31);
        row[bit >> 5] |= v << sh;
        if (sh + bits > 32) row[(bit >> 5) + 1] |= v >> (32 - sh);
      }
    }
  });
  return out;
}

at::Tensor unpack_awq_rows(const at::Tensor& words_in) {
  TORCH_CHECK(words_in.scalar_type() == at::kInt && words_in.dim() == 2, "unpack_awq_rows: int32 [rows, W] expected");
  // Nibble i of word c holds column 8c + kOrder[i] (AutoAWQ's GEMM kernel
  // dequantizes nibble pairs at once, hence the interleave).
  static constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  const at::Tensor words = words_in.contiguous();
  const int64_t rows = words.size(0), W = words.size(1);
  at::Tensor out = at::empty({rows, W * 8}, at::kByte);
  const auto* src = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < W; ++c) {
        const uint32_t w = src[r * W + c];
        for (int i = 0; i < 8; ++i) dst[r * W * 8 + 8 * c + kOrder[i]] = static_cast<uint8_t>((w >> (4 * i)) & 0xF);
      }
  });
  return out;
}

std::optional<at::Tensor> act_order_permutation(const std::optional<at::Tensor>& g_idx, int64_t Kin, int64_t G,
                                                const std::string& file, const std::string& tensor) {
  if (!g_idx) return std::nullopt;
  const int64_t groups = ceil_div(Kin, G);
  const auto st = g_idx->scalar_type();
  if ((st != at::kInt && st != at::kLong) || g_idx->dim() != 1 || g_idx->size(0) != Kin)
    throw LoadError(K::WrongShape, file, tensor,
                    "is " + std::string(from_scalar_type(st) ? dtype_name(*from_scalar_type(st)) : c10::toString(st)) +
                        " " + shape_str(g_idx->sizes()) + "; expected I32 [" +
                        std::to_string(Kin) + "]");
  const at::Tensor gi = g_idx->to(at::kLong);
  if (Kin == 0) return std::nullopt;
  const int64_t lo = gi.min().item<int64_t>(), hi = gi.max().item<int64_t>();
  if (lo < 0 || hi >= groups)
    throw LoadError(K::BadHeader, file, tensor,
                    "values span [" + std::to_string(lo) + ", " + std::to_string(hi) + "]; expected [0, " +
                        std::to_string(groups - 1) + "]");
  const at::Tensor natural = at::arange(Kin, at::kLong).div(G, "floor");
  if (gi.equal(natural)) return std::nullopt;
  const at::Tensor counts = at::bincount(gi, {}, groups), expected = at::bincount(natural, {}, groups);
  if (!counts.equal(expected)) {
    const int64_t b = counts.ne(expected).nonzero()[0][0].item<int64_t>();
    throw LoadError(K::BadHeader, file, tensor,
                    "puts " + std::to_string(counts[b].item<int64_t>()) + " channels in group " + std::to_string(b) +
                        "; the QDEC layout needs contiguous groups of G=" + std::to_string(G) + " (" +
                        std::to_string(expected[b].item<int64_t>()) +
                        " here), so this g_idx cannot be turned into an input permutation");
  }
  return std::get<1>(at::sort(gi, /*stable=*/true, /*dim=*/0, /*descending=*/false));
}

// ---- the directory ------------------------------------------------------------

ForeignFormat detect_foreign_format(const json& config, const std::string& dir) {
  if (!config.is_object() || config.contains("qdec")) return ForeignFormat::None;
  const auto qc = config.find("quantization_config");
  const bool has_qc = qc != config.end() && !qc->is_null() && !(qc->is_object() && qc->empty());
  std::string method;
  if (has_qc && qc->is_object() && qc->contains("quant_method")) method = lower(py_str(qc->at("quant_method")));
  if (method == "awq") return ForeignFormat::AutoAWQ;
  if (method == "gptq" || (!has_qc && fs::is_regular_file(fs::path(dir) / "quantize_config.json")))
    return ForeignFormat::GPTQ;
  if (method == "compressed-tensors") return ForeignFormat::CompressedTensors;
  return ForeignFormat::None;
}

const char* foreign_tool_name(ForeignFormat kind) {
  switch (kind) {
    case ForeignFormat::AutoAWQ: return "AutoAWQ";
    case ForeignFormat::GPTQ: return "GPTQ";
    case ForeignFormat::CompressedTensors: return "compressed-tensors";
    case ForeignFormat::None: break;
  }
  return "QDEC";
}

ForeignCheckpoint read_foreign_checkpoint(ForeignFormat kind, const std::string& dir, const json& config,
                                          const std::string& config_path, const SafetensorsFile& weights) {
  ForeignCheckpoint out;
  try {
    switch (kind) {
      case ForeignFormat::AutoAWQ: out = read_autoawq(config, config_path, weights); break;
      case ForeignFormat::GPTQ: out = read_gptq(dir, config, config_path, weights); break;
      case ForeignFormat::CompressedTensors: out = read_compressed_tensors(config, config_path, weights); break;
      case ForeignFormat::None: throw std::invalid_argument("read_foreign_checkpoint: not another tool's checkpoint");
    }
  } catch (const json::exception& e) {
    bad_config(config_path, std::string("unexpected JSON structure in quantization_config: ") + e.what());
  }
  out.kind = kind;
  return out;
}

std::string foreign_k0_message(const std::string& dir, ForeignFormat kind) {
  return dir + ": " + foreign_tool_name(kind) +
         " checkpoint, no residual store; running the quantized model alone (k = 0). To compensate, add a "
         "residual store from the original weights: qdec residual --quantized " +
         dir + " --reference <original HF model dir> --out <dir>, then qdec_infer --model <dir>";
}

}  // namespace qdec::runtime
