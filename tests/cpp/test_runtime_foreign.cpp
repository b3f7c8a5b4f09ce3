// Other tools' checkpoints read by the runtime (runtime/foreign_checkpoint.h):
// the bit-packing building blocks, the committed real-tool checkpoints of
// tests/data/tools (each tool's own dequantized first-layer weights are
// reproduced exactly, and the last-position logits match the tool's own
// model to float16 rounding), and malformed inputs refused with errors that
// name the file, the tensor and what was expected. The parity of qdec_infer
// with the Python path on the same directories is in
// tests/python/test_cpp_parity.py.
#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "catch.h"
#include "runtime/checkpoint.h"
#include "runtime/foreign_checkpoint.h"
#include "runtime/json_util.h"
#include "runtime/model.h"
#include "test_runtime_util.h"

using namespace qdec::runtime;
using namespace qdec_test;

namespace {

#ifdef QDEC_SOURCE_DIR
const fs::path kTools = fs::path(QDEC_SOURCE_DIR) / "tests" / "data" / "tools";
#else
const fs::path kTools;
#endif

std::vector<fs::path> tool_dirs() {
  std::vector<fs::path> out;
  if (kTools.empty() || !fs::is_directory(kTools)) return out;
  for (const auto& e : fs::directory_iterator(kTools))
    if (e.is_directory() && e.path().filename() != "tiny-llama" && fs::exists(e.path() / "expected.safetensors"))
      out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

// A copy of a tool directory whose model.safetensors / config.json are changed.
struct BrokenCopy {
  TempDir tmp;
  fs::path dir;
  explicit BrokenCopy(const std::string& tool) : dir(tmp.path / tool) {
    fs::copy(kTools / tool, dir, fs::copy_options::recursive);
  }
  void tensors(const std::function<void(std::vector<std::pair<std::string, at::Tensor>>&)>& change) {
    std::vector<std::pair<std::string, at::Tensor>> t;
    {
      SafetensorsFile f((dir / "model.safetensors").string());
      for (const auto& n : f.names()) t.emplace_back(n, f.copy(n));
    }
    change(t);
    save_safetensors((dir / "model.safetensors").string(), t);
  }
  void replace(const std::string& name, const at::Tensor& value) {
    tensors([&](auto& t) {
      for (auto& [n, v] : t)
        if (n == name) v = value;
    });
  }
  void config(const std::string& file, const std::function<void(nlohmann::json&)>& change) {
    const std::string path = (dir / file).string();
    auto j = nlohmann::json::parse(read_text_file(path));
    change(j);
    write_bytes(path, j.dump());
  }
};

// what() of the exception f throws ("" if none): Catch2 v2 and v3 spell the
// substring matcher differently.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void expect_error(const fs::path& dir, const std::vector<std::string>& fragments) {
  try {
    Checkpoint c(dir.string());
    FAIL("no error for " << dir);
  } catch (const LoadError& e) {
    for (const auto& f : fragments) {
      INFO(e.what());
      CHECK(has(e.what(), f));
    }
  }
}

}  // namespace

TEST_CASE("foreign: dense and QDEC bit packing round-trip at 2..8 bits", "[foreign]") {
  at::manual_seed(0);
  for (int bits = 2; bits <= 8; ++bits)
    for (int64_t cols : {1, 10, 31, 32, 33, 100, 128}) {
      INFO("bits " << bits << ", cols " << cols);
      const at::Tensor codes = at::randint(0, 1 << bits, {3, cols}, at::kByte);
      const at::Tensor packed = pack_qdec_rows(codes, bits);
      REQUIRE(packed.sizes() == at::IntArrayRef({3, (cols + 31) / 32 * bits}));
      CHECK(at::equal(unpack_dense_rows(packed, bits, cols), codes));
      // The dense layout (GPTQ, compressed-tensors) is the QDEC one without the
      // padding of the last block.
      const int64_t dense_words = (cols * bits + 31) / 32;
      CHECK(at::equal(unpack_dense_rows(packed.narrow(1, 0, dense_words).contiguous(), bits, cols), codes));
    }
}

TEST_CASE("foreign: AutoAWQ nibble order", "[foreign]") {
  // Column 8c + j sits in nibble [0, 4, 1, 5, 2, 6, 3, 7][j] of word c.
  const int32_t word = static_cast<int32_t>(0x76543210u);  // nibble i holds i
  const at::Tensor cols = unpack_awq_rows(at::full({1, 1}, word, at::kInt));
  const std::vector<int> want = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int j = 0; j < 8; ++j) CHECK(cols[0][j].item<int>() == want[j]);
}

TEST_CASE("foreign: act-order g_idx becomes a stable input permutation", "[foreign]") {
  CHECK_FALSE(act_order_permutation(std::nullopt, 64, 32, "f", "g").has_value());
  CHECK_FALSE(act_order_permutation(at::arange(64, at::kInt).div(32, "floor"), 64, 32, "f", "g").has_value());
  const at::Tensor g = at::tensor(std::vector<int32_t>{1, 0, 1, 0}, at::kInt);
  const auto perm = act_order_permutation(g, 4, 2, "f", "g");
  REQUIRE(perm.has_value());
  CHECK(at::equal(*perm, at::tensor(std::vector<int64_t>{1, 3, 0, 2}, at::kLong)));
  const auto perm_error = [](std::vector<int32_t> g) {
    const int64_t n = static_cast<int64_t>(g.size());
    return error_of([&] { act_order_permutation(at::tensor(g, at::kInt), n == 3 ? 4 : n, 2, "f", "g"); });
  };
  const std::string counts = perm_error({0, 0, 0, 1});
  CHECK(has(counts, "f: tensor 'g': puts 3 channels in group 0"));
  CHECK(has(counts, "contiguous groups of G=2 (2 here)"));
  CHECK(has(perm_error({0, 0, 1, 2}), "values span [0, 2]; expected [0, 1]"));
  CHECK(has(perm_error({0, 0, 1}), "is I32 [3]; expected I32 [4]"));
}

TEST_CASE("foreign: the tools' checkpoints reproduce their weights exactly", "[foreign]") {
  const auto dirs = tool_dirs();
  if (dirs.empty()) {
    WARN("tests/data/tools not found (QDEC_SOURCE_DIR unset): skipped");
    return;
  }
  CHECK(dirs.size() >= 8);
  for (const auto& dir : dirs) {
    INFO(dir);
    Checkpoint ckpt(dir.string());
    REQUIRE(ckpt.foreign);
    CHECK(ckpt.layers.size() == 14);
    CHECK(!ckpt.residual);
    const std::string tool = dir.filename().string();
    CHECK(ckpt.qdec.method == (tool.rfind("autoawq", 0) == 0 ? "autoawq-gemm"
                               : tool.rfind("gptq", 0) == 0  ? "gptq-v1"
                                                             : "compressed-tensors"));
    SafetensorsFile expected((dir / "expected.safetensors").string());
    int compared = 0;
    for (const auto& key : expected.names()) {
      if (key.size() < 7 || key.compare(key.size() - 7, 7, ".weight") != 0) continue;
      const std::string name = key.substr(0, key.size() - 7);
      INFO(name);
      const ConvertedLinear& l = ckpt.foreign->linears.at(name);
      const int64_t N = l.meta.out_features, K = l.meta.in_features;
      const int64_t G = l.meta.group_size == -1 ? K : l.meta.group_size;
      // The dequantization of the Python reader: (q - z) * s in float32, cast to the scale dtype.
      const at::Tensor q = unpack_dense_rows(l.qweight, l.meta.bits, K).to(at::kFloat);
      const at::Tensor s = l.scales.to(at::kFloat).repeat_interleave(G, 1).narrow(1, 0, K);
      const at::Tensor z = l.zeros ? l.zeros->to(at::kFloat).repeat_interleave(G, 1).narrow(1, 0, K)
                                   : at::full({N, K}, static_cast<double>(1 << (l.meta.bits - 1)));
      const at::Tensor ours = ((q - z) * s).to(l.scales.scalar_type());
      at::Tensor theirs = expected.copy(key);
      if (l.input_perm) theirs = theirs.index_select(1, *l.input_perm);
      CHECK(at::equal(ours, theirs));
      CHECK(l.input_perm.has_value() == (tool.find("-act") != std::string::npos));
      ++compared;
    }
    CHECK(compared == 3);  // q_proj, k_proj, down_proj (make_tool_checkpoints.EXPECTED_WEIGHTS)
  }
}

TEST_CASE("foreign: the tools' checkpoints run, logits as the tools' own models", "[foreign]") {
  const auto dirs = tool_dirs();
  if (dirs.empty()) return;
  for (const auto& dir : dirs) {
    INFO(dir);
    Checkpoint ckpt(dir.string());
    LlamaModel model(ckpt, RuntimeOptions{});
    SafetensorsFile expected((dir / "expected.safetensors").string());
    const at::Tensor ids = expected.copy("input_ids").view({-1});
    KVCache cache = model.new_cache(ids.numel());
    const at::Tensor logits = model.forward(ids, cache);
    const at::Tensor want = expected.copy("logits").select(0, ids.numel() - 1);
    // The tools ran in float16, this model in float32 (the Python test's bound).
    CHECK((logits - want).abs().max().item<double>() <= 5e-3);
    // k > 0 needs a residual store, which these directories have none of.
    KPolicy k;
    k.all = KValue::parse("4");
    CHECK(has(error_of([&] { model.set_k(k); }), "needs a residual store"));
  }
}

TEST_CASE("foreign: malformed AutoAWQ and GPTQ directories are refused clearly", "[foreign]") {
  if (tool_dirs().empty()) return;
  const std::string layer = "model.layers.0.mlp.up_proj";
  {
    BrokenCopy b("autoawq-gemm-w4g64");
    b.replace(layer + ".scales", at::ones({2, 256}, at::kFloat));
    expect_error(b.dir, {"model.safetensors", "tensor '" + layer + ".scales'",
                         "is F32 [2, 256]; expected F16 [2, 256] (K=128, N=256, G=64)"});
  }
  {
    BrokenCopy b("autoawq-gemm-w4g64");
    b.config("config.json", [](auto& j) { j["quantization_config"]["version"] = "gemv"; });
    expect_error(b.dir, {"config.json", "AutoAWQ version 'gemv' is not supported"});
    b.config("config.json", [](auto& j) { j["quantization_config"]["version"] = "gemm"; j["quantization_config"]["w_bit"] = 3; });
    expect_error(b.dir, {"quantization_config gives conflicting {'bits': 4, 'w_bit': 3}"});
  }
  {
    BrokenCopy b("autoawq-gemm-w4g64");
    b.tensors([&](auto& t) { std::erase_if(t, [&](const auto& e) { return e.first == layer + ".qzeros"; }); });
    expect_error(b.dir, {"tensor '" + layer + ".qzeros'", "missing"});
  }
  {
    BrokenCopy b("gptqmodel-w4g64");
    b.replace(layer + ".qzeros", at::zeros({2, 16}, at::kInt));
    expect_error(b.dir, {"tensor '" + layer + ".qzeros'", "is I32 [2, 16]; expected I32 [2, 32]"});
  }
  {
    BrokenCopy b("gptqmodel-w4g64");
    b.config("config.json", [](auto& j) { j["quantization_config"]["bits"] = 5; });
    expect_error(b.dir, {"config.json", "GPTQ bits must be one of [2, 3, 4, 8], got 5"});
  }
  {
    BrokenCopy b("gptqmodel-w4g64");
    b.config("config.json", [](auto& j) { j["quantization_config"]["checkpoint_format"] = "marlin"; });
    expect_error(b.dir, {"checkpoint_format 'marlin' is not supported"});
  }
  {
    BrokenCopy b("gptqmodel-w3g64");
    b.config("quantize_config.json", [](auto& j) { j["bits"] = 4; });
    expect_error(b.dir, {"config.json", "disagrees with", "quantize_config.json on bits: 3 vs 4"});
  }
  {
    BrokenCopy b("gptqmodel-w4g64");
    write_bytes((b.dir / "model.safetensors.index.json").string(), "{}");
    fs::remove(b.dir / "model.safetensors");
    expect_error(b.dir, {"model.safetensors.index.json", "sharded weights are not read by qdec_infer yet"});
  }
}

TEST_CASE("foreign: malformed compressed-tensors directories are refused clearly", "[foreign]") {
  if (tool_dirs().empty()) return;
  const std::string layer = "model.layers.1.self_attn.o_proj";
  {
    BrokenCopy b("llmcompressor-w4a16-gptq");
    b.replace(layer + ".weight_shape", at::tensor(std::vector<int64_t>{128, 96}, at::kLong));
    expect_error(b.dir, {"tensor '" + layer + ".weight_packed'", "is I32 [128, 16]; expected I32 [128, 12]"});
  }
  {
    BrokenCopy b("llmcompressor-w4a16-gptq");
    b.tensors([&](auto& t) { t.emplace_back(layer + ".weight_g_idx", at::full({128}, 5, at::kInt)); });
    expect_error(b.dir, {"tensor '" + layer + ".weight_g_idx'", "values span [5, 5]; expected [0, 1]"});
  }
  {
    BrokenCopy b("llmcompressor-w4a16-gptq-w8-sym-channel");
    b.tensors([&](auto& t) { t.emplace_back(layer + ".weight_zero_point", at::ones({128, 1}, at::kInt)); });
    expect_error(b.dir, {"tensor '" + layer + ".weight_zero_point'", "nonzero but the scheme is symmetric"});
  }
  {
    BrokenCopy b("llmcompressor-w4a16-gptq");
    b.config("config.json", [](auto& j) {
      j["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {{"num_bits", 8}};
    });
    expect_error(b.dir, {"config group 'group_0' quantizes activations"});
    b.config("config.json", [](auto& j) {
      j["quantization_config"]["config_groups"]["group_0"]["input_activations"] = nullptr;
      j["quantization_config"]["format"] = "marlin-24";
      j["quantization_config"]["config_groups"]["group_0"].erase("format");
    });
    expect_error(b.dir, {"format 'marlin-24' is not supported"});
    b.config("config.json", [](auto& j) {
      j["quantization_config"]["format"] = "pack-quantized";
      j["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor";
      j["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = nullptr;
    });
    expect_error(b.dir, {"strategy 'tensor' is not supported; expected 'group' or 'channel'"});
  }
}
