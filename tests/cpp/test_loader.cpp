// The safetensors / config.json / checkpoint loaders on valid and malformed
// files. Every malformed file must give a LoadError of the right kind whose
// message names the file (and the tensor, where one is at fault) and says what
// was expected; nothing may crash (these tests also run under ASan+UBSan:
// target check_runtime_sanitize).
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "catch.h"
#include "runtime/checkpoint.h"
#include "runtime/json_util.h"
#include "runtime/safetensors.h"
#include "test_runtime_util.h"

using namespace qdec::runtime;
using namespace qdec_test;
using Kind = LoadError::Kind;

namespace {

// Opens `path` and requires a LoadError of `kind` whose message contains the
// file name and every fragment.
void expect_load_error(const std::string& path, Kind kind, const std::vector<std::string>& fragments) {
  try {
    SafetensorsFile f(path);
    FAIL("no error for " << path);
  } catch (const LoadError& e) {
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(std::string(kind_name(e.kind())) == kind_name(kind));
    CHECK(msg.find(path) == 0);
    CHECK(e.file() == path);
    for (const auto& f : fragments) {
      INFO("fragment: " << f);
      CHECK(msg.find(f) != std::string::npos);
    }
  }
}

std::string entry(const std::string& dtype, const std::string& shape, uint64_t b, uint64_t e) {
  return "{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" + std::to_string(b) + "," +
         std::to_string(e) + "]}";
}

}  // namespace

TEST_CASE("valid file: round trip, zero-copy views that outlive the file object", "[loader]") {
  TempDir dir;
  const auto path = dir.file("ok.safetensors");
  auto a = at::arange(12, at::kFloat).reshape({3, 4});
  auto b = at::arange(5, at::kLong);
  auto c = at::tensor({1.5, -2.0}).to(at::kHalf);
  auto empty = at::empty({0, 7}, at::kInt);
  save_safetensors(path, {{"a", a}, {"b", b}, {"c", c}, {"empty", empty}}, {{"note", "hi"}});

  at::Tensor view;
  {
    SafetensorsFile f(path);
    CHECK(f.names().size() == 4);
    CHECK(f.metadata().at("note") == "hi");
    CHECK(f.contains("a"));
    CHECK_FALSE(f.contains("z"));
    view = f.view("a");
    CHECK(view.equal(a));
    CHECK(f.get("b", at::kLong, std::vector<int64_t>{5}).equal(b));
    CHECK(f.copy("c").equal(c));
    CHECK(f.view("empty").sizes() == empty.sizes());
    // zero-copy: the view's bytes lie inside the mapped file image
    CHECK(f.header().data_offset % 8 == 0);
  }
  // the mapping is still alive through the view's deleter
  CHECK(view.equal(a));
  view.add_(1);  // copy-on-write: the file itself is unchanged
  SafetensorsFile again(path);
  CHECK(again.view("a").equal(a));
}

TEST_CASE("misaligned data is copied, not viewed through a misaligned pointer", "[loader]") {
  TempDir dir;
  const auto path = dir.file("misaligned.safetensors");
  // 1 byte of U8 first, then a F32 tensor at data offset 1; header length 3 mod 8.
  std::string header = "{\"u\":" + entry("U8", "[1]", 0, 1) + ",\"f\":" + entry("F32", "[2]", 1, 9) + "}";
  header += " ";  // make 8 + header length odd-aligned relative to 4
  while ((8 + header.size()) % 4 != 1) header += " ";
  float vals[2] = {3.25f, -7.5f};
  std::string data(1, '\x2a');
  data.append(reinterpret_cast<const char*>(vals), 8);
  write_bytes(path, safetensors_image(header, data));
  SafetensorsFile f(path);
  auto t = f.view("f");
  CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0);
  CHECK(t[0].item<float>() == 3.25f);
  CHECK(t[1].item<float>() == -7.5f);
  CHECK(f.view("u")[0].item<uint8_t>() == 42);
}

TEST_CASE("truncated and oversized headers", "[loader]") {
  TempDir dir;
  SECTION("empty file") {
    write_bytes(dir.file("x"), "");
    expect_load_error(dir.file("x"), Kind::Truncated, {"0 bytes", "8-byte header length"});
  }
  SECTION("shorter than the length prefix") {
    write_bytes(dir.file("x"), "abcde");
    expect_load_error(dir.file("x"), Kind::Truncated, {"5 bytes"});
  }
  SECTION("header length larger than the file") {
    write_bytes(dir.file("x"), safetensors_image("{}", "", 1000));
    expect_load_error(dir.file("x"), Kind::HeaderTooLarge, {"header length 1000", "exceeds the 2 bytes"});
  }
  SECTION("header length near 2^64 does not overflow") {
    write_bytes(dir.file("x"), safetensors_image("{}", "", ~0ull));
    expect_load_error(dir.file("x"), Kind::HeaderTooLarge, {"18446744073709551615"});
  }
  SECTION("header over the sanity limit") {
    const std::string big = "{\"__metadata__\":{\"k\":\"" + std::string(200, 'x') + "\"}}";
    write_bytes(dir.file("x"), safetensors_image(big, ""));
    ParseLimits limits;
    limits.max_header_bytes = 64;
    try {
      SafetensorsFile f(dir.file("x"), limits);
      FAIL("no error");
    } catch (const LoadError& e) {
      CHECK(e.kind() == Kind::HeaderTooLarge);
      CHECK(std::string(e.what()).find("limit of 64") != std::string::npos);
    }
  }
  SECTION("data cut short after a valid header") {
    const std::string h = "{\"w\":" + entry("F32", "[4]", 0, 16) + "}";
    write_bytes(dir.file("x"), safetensors_image(h, std::string(10, '\0')));
    expect_load_error(dir.file("x"), Kind::OffsetsOutOfRange, {"tensor 'w'", "[0, 16)", "data section of 10 bytes"});
  }
}

TEST_CASE("header JSON problems", "[loader]") {
  TempDir dir;
  const auto p = dir.file("x");
  SECTION("not JSON") {
    write_bytes(p, safetensors_image("{\"a\": ", ""));
    expect_load_error(p, Kind::BadJson, {"invalid JSON"});
  }
  SECTION("zero-length header") {
    write_bytes(p, safetensors_image("", ""));
    expect_load_error(p, Kind::BadJson, {});
  }
  SECTION("an array, not an object") {
    write_bytes(p, safetensors_image("[1, 2]", ""));
    expect_load_error(p, Kind::BadHeader, {"must be a JSON object", "array"});
  }
  SECTION("a number") {
    write_bytes(p, safetensors_image("42      ", ""));
    expect_load_error(p, Kind::BadHeader, {"number"});
  }
  SECTION("invalid UTF-8 inside a string") {
    write_bytes(p, safetensors_image("{\"__metadata__\":{\"k\":\"\xff\xfe\"}}", ""));
    expect_load_error(p, Kind::BadUtf8, {"not valid UTF-8"});
  }
  SECTION("overlong UTF-8 encoding of '/'") {
    write_bytes(p, safetensors_image("{\"\xc0\xaf\":1}", ""));
    expect_load_error(p, Kind::BadUtf8, {});
  }
  SECTION("UTF-16 surrogate encoded in UTF-8") {
    write_bytes(p, safetensors_image("{\"\xed\xa0\x80\":1}", ""));
    expect_load_error(p, Kind::BadUtf8, {});
  }
  SECTION("deeply nested arrays are rejected at the limit, not parsed") {
    const int depth = 200000;
    write_bytes(p, safetensors_image(std::string(depth, '[') + std::string(depth, ']'), ""));
    expect_load_error(p, Kind::TooDeep, {"deeper than 8"});
  }
  SECTION("deeply nested objects inside an entry") {
    std::string h = "{\"w\":";
    for (int i = 0; i < 50; ++i) h += "{\"a\":";
    h += "1";
    for (int i = 0; i < 50; ++i) h += "}";
    h += "}";
    write_bytes(p, safetensors_image(h, ""));
    expect_load_error(p, Kind::TooDeep, {});
  }
  SECTION("duplicate tensor name") {
    const std::string h = "{\"w\":" + entry("U8", "[1]", 0, 1) + ",\"w\":" + entry("U8", "[1]", 1, 2) + "}";
    write_bytes(p, safetensors_image(h, "ab"));
    expect_load_error(p, Kind::BadHeader, {"tensor 'w'", "twice"});
  }
  SECTION("metadata values must be strings") {
    write_bytes(p, safetensors_image("{\"__metadata__\":{\"n\":3}}", ""));
    expect_load_error(p, Kind::BadHeader, {"__metadata__[\"n\"]", "must be a string"});
  }
  SECTION("metadata must be an object") {
    write_bytes(p, safetensors_image("{\"__metadata__\":\"x\"}", ""));
    expect_load_error(p, Kind::BadHeader, {"__metadata__ must be an object"});
  }
}

TEST_CASE("tensor entry problems", "[loader]") {
  TempDir dir;
  const auto p = dir.file("x");
  auto one = [&](const std::string& e, const std::string& data) {
    write_bytes(p, safetensors_image("{\"w\":" + e + "}", data));
  };
  SECTION("unknown dtype") {
    one(entry("F17", "[2]", 0, 8), std::string(8, '\0'));
    expect_load_error(p, Kind::BadDtype, {"tensor 'w'", "unknown dtype \"F17\"", "expected one of"});
  }
  SECTION("dtype not a string") {
    one("{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,1]}", "a");
    expect_load_error(p, Kind::BadHeader, {"tensor 'w'", "\"dtype\""});
  }
  SECTION("entry not an object") {
    one("[1,2,3]", "");
    expect_load_error(p, Kind::BadHeader, {"tensor 'w'", "must be an object"});
  }
  SECTION("unknown field") {
    one("{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"extra\":0}", "a");
    expect_load_error(p, Kind::BadHeader, {"unknown field \"extra\""});
  }
  SECTION("missing data_offsets") {
    one("{\"dtype\":\"U8\",\"shape\":[1]}", "a");
    expect_load_error(p, Kind::BadHeader, {"data_offsets"});
  }
  SECTION("negative dimension") {
    one(entry("F32", "[-1, 2]", 0, 0), "");
    expect_load_error(p, Kind::BadShape, {"tensor 'w'", "not a non-negative integer"});
  }
  SECTION("fractional dimension") {
    one(entry("F32", "[1.5]", 0, 4), std::string(4, '\0'));
    expect_load_error(p, Kind::BadShape, {});
  }
  SECTION("numel overflows 64 bits") {
    one(entry("F32", "[4294967296, 4294967296, 4]", 0, 0), "");
    expect_load_error(p, Kind::BadShape, {"overflows"});
  }
  SECTION("bytes overflow 64 bits even though numel fits") {
    one(entry("F64", "[2305843009213693952, 2]", 0, 0), "");
    expect_load_error(p, Kind::SizeMismatch, {"more than 2^64"});
  }
  SECTION("size does not match numel * itemsize") {
    one(entry("F32", "[3]", 0, 8), std::string(8, '\0'));
    expect_load_error(p, Kind::SizeMismatch, {"tensor 'w'", "holds 8 bytes", "needs 12", "numel 3 x itemsize 4"});
  }
  SECTION("offsets past the data section") {
    one(entry("U8", "[4]", 4, 8), std::string(6, '\0'));
    expect_load_error(p, Kind::OffsetsOutOfRange, {"[4, 8)", "data section of 6 bytes"});
  }
  SECTION("end before begin") {
    one(entry("U8", "[0]", 5, 2), std::string(6, '\0'));
    expect_load_error(p, Kind::OffsetsOutOfRange, {"end before they begin"});
  }
  SECTION("negative offset") {
    one("{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}", "a");
    expect_load_error(p, Kind::OffsetsOutOfRange, {"non-negative integers"});
  }
  SECTION("offsets near 2^64") {
    one(entry("U8", "[1]", 18446744073709551615ull, 18446744073709551615ull), "");
    expect_load_error(p, Kind::OffsetsOutOfRange, {});
  }
}

TEST_CASE("overlaps, gaps and trailing bytes", "[loader]") {
  TempDir dir;
  const auto p = dir.file("x");
  SECTION("overlapping tensors") {
    const std::string h = "{\"a\":" + entry("U8", "[4]", 0, 4) + ",\"b\":" + entry("U8", "[4]", 2, 6) + "}";
    write_bytes(p, safetensors_image(h, std::string(6, 'x')));
    expect_load_error(p, Kind::Overlap, {"tensor 'b'", "[2, 6)", "overlap tensor 'a'", "[0, 4)"});
  }
  SECTION("the same range twice") {
    const std::string h = "{\"a\":" + entry("U8", "[4]", 0, 4) + ",\"b\":" + entry("I32", "[1]", 0, 4) + "}";
    write_bytes(p, safetensors_image(h, std::string(4, 'x')));
    expect_load_error(p, Kind::Overlap, {});
  }
  SECTION("a hole between tensors") {
    const std::string h = "{\"a\":" + entry("U8", "[2]", 0, 2) + ",\"b\":" + entry("U8", "[2]", 4, 6) + "}";
    write_bytes(p, safetensors_image(h, std::string(6, 'x')));
    expect_load_error(p, Kind::Gap, {"tensor 'b'", "starts at byte 4", "ends at 2"});
  }
  SECTION("trailing bytes after the last tensor") {
    const std::string h = "{\"a\":" + entry("U8", "[2]", 0, 2) + "}";
    write_bytes(p, safetensors_image(h, std::string(5, 'x')));
    expect_load_error(p, Kind::Gap, {"cover 2 bytes of a 5-byte data section"});
  }
  SECTION("zero-size tensors may share an offset") {
    const std::string h = "{\"a\":" + entry("U8", "[0]", 0, 0) + ",\"b\":" + entry("F32", "[0, 3]", 0, 0) +
                          ",\"c\":" + entry("U8", "[1]", 0, 1) + "}";
    write_bytes(p, safetensors_image(h, "z"));
    SafetensorsFile f(p);
    CHECK(f.view("b").sizes() == at::IntArrayRef({0, 3}));
  }
}

TEST_CASE("missing files, missing tensors, wrong dtype or shape", "[loader]") {
  TempDir dir;
  SECTION("no such file") {
    expect_load_error(dir.file("nope.safetensors"), Kind::Io, {"cannot open"});
  }
  SECTION("a directory") {
    expect_load_error(dir.path.string(), Kind::Io, {"not a regular file"});
  }
  const auto p = dir.file("ok.safetensors");
  save_safetensors(p, {{"w", at::zeros({2, 3}, at::kFloat)}});
  SafetensorsFile f(p);
  SECTION("missing tensor") {
    try {
      f.view("model.norm.weight");
      FAIL("no error");
    } catch (const LoadError& e) {
      CHECK(e.kind() == Kind::MissingTensor);
      CHECK(e.tensor() == "model.norm.weight");
      CHECK(std::string(e.what()) == p + ": tensor 'model.norm.weight': not in this file");
    }
  }
  SECTION("wrong dtype") {
    try {
      f.get("w", at::kInt, std::nullopt, "packed codes");
      FAIL("no error");
    } catch (const LoadError& e) {
      CHECK(e.kind() == Kind::WrongDtype);
      CHECK(std::string(e.what()).find("expected dtype I32, got F32 (packed codes)") != std::string::npos);
    }
  }
  SECTION("wrong shape") {
    try {
      f.get("w", at::kFloat, std::vector<int64_t>{3, 2});
      FAIL("no error");
    } catch (const LoadError& e) {
      CHECK(e.kind() == Kind::WrongShape);
      CHECK(std::string(e.what()).find("expected shape [3, 2], got [2, 3]") != std::string::npos);
    }
  }
}

TEST_CASE("every byte-prefix of a valid file fails cleanly", "[loader]") {
  TempDir dir;
  const auto good = dir.file("good.safetensors");
  save_safetensors(good, {{"a", at::arange(6, at::kFloat)}, {"b", at::ones({3}, at::kHalf)}}, {{"k", "v"}});
  std::ifstream in(good, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (size_t n = 0; n < bytes.size(); ++n) {
    const auto p = dir.file("cut");
    write_bytes(p, bytes.substr(0, n));
    try {
      SafetensorsFile f(p);
      FAIL("prefix of " << n << " bytes loaded");
    } catch (const LoadError&) {
    }
  }
  // and single-byte corruptions of the header never crash
  const uint64_t hlen = bytes.size() - 6 * 4 - 3 * 2 - 8;
  for (size_t i = 8; i < 8 + hlen; ++i) {
    std::string corrupt = bytes;
    corrupt[i] = static_cast<char>(corrupt[i] ^ 0x5A);
    write_bytes(dir.file("corrupt"), corrupt);
    try {
      SafetensorsFile f(dir.file("corrupt"));
    } catch (const LoadError&) {
    }
  }
}

TEST_CASE("parse_json_limited", "[loader][json]") {
  CHECK(parse_json_limited("{\"a\":[1,{\"b\":2}]}", "f", 3)["a"][1]["b"] == 2);
  CHECK_THROWS_AS(parse_json_limited("{\"a\":[1,{\"b\":2}]}", "f", 2), LoadError);
  CHECK_THROWS_AS(parse_json_limited("{\"a\":1,}", "f", 8), LoadError);
  CHECK(is_valid_utf8("caf\xc3\xa9 \xf0\x9f\x98\x80"));
  CHECK_FALSE(is_valid_utf8("\xc3"));
  CHECK_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // > U+10FFFF
}

// ---- config.json and the checkpoint directory ---------------------------------

namespace {

void expect_checkpoint_error(const std::string& dir, Kind kind, const std::vector<std::string>& fragments) {
  try {
    Checkpoint c(dir);
    FAIL("no error for checkpoint " << dir);
  } catch (const LoadError& e) {
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(std::string(kind_name(e.kind())) == kind_name(kind));
    for (const auto& f : fragments) {
      INFO("fragment: " << f);
      CHECK(msg.find(f) != std::string::npos);
    }
  }
}

}  // namespace

TEST_CASE("config.json validation", "[loader][config]") {
  const json base = {{"model_type", "llama"}, {"vocab_size", 10}, {"hidden_size", 8}, {"intermediate_size", 16},
                     {"num_hidden_layers", 1}, {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                     {"rope_theta", 500000.0}};
  const auto c = parse_model_config(base, "config.json");
  CHECK(c.head_dim == 4);
  CHECK(c.rope.theta == 500000.0);
  CHECK_FALSE(c.tie_word_embeddings);

  auto fails = [&](json j, const std::string& fragment) {
    try {
      parse_model_config(j, "cfg.json");
      FAIL("no error; expected " << fragment);
    } catch (const LoadError& e) {
      INFO(e.what());
      CHECK(e.kind() == Kind::BadConfig);
      CHECK(std::string(e.what()).find("cfg.json: ") == 0);
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
    }
  };
  fails(json::array(), "must be a JSON object");
  {
    json j = base;
    j.erase("hidden_size");
    fails(j, "missing integer field \"hidden_size\"");
  }
  {
    json j = base;
    j["hidden_size"] = "8";
    fails(j, "\"hidden_size\" must be an integer");
  }
  {
    json j = base;
    j["model_type"] = 5;  // a number where a string belongs
    fails(j, "unexpected JSON structure");
  }
  {
    json j = base;
    j["model_type"] = "gpt2";
    fails(j, "model_type \"gpt2\" is not a supported");
  }
  {
    json j = base;
    j["num_key_value_heads"] = 3;
    fails(j, "not a multiple of num_key_value_heads");
  }
  {
    json j = base;
    j["hidden_act"] = "gelu";
    fails(j, "hidden_act");
  }
  {
    json j = base;
    j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1e4}};
    fails(j, "rope type \"yarn\" is not supported");
  }
  {
    json j = base;
    j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 5e5}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
    CHECK(parse_model_config(j, "c").rope.type == "llama3");
  }
}

TEST_CASE("checkpoint directory validation", "[loader][checkpoint]") {
  TempDir tmp;
  TinySpec spec;
  spec.layers = 1;
  const auto dir = tmp.file("ckpt");

  SECTION("a valid tiny checkpoint opens") {
    write_tiny_checkpoint(dir, spec);
    Checkpoint c(dir);
    CHECK(c.layers.size() == 7);
    CHECK(c.residual != nullptr);
    CHECK(c.qdec.residual_bits == 4);
  }
  SECTION("not a directory") { expect_checkpoint_error(tmp.file("none"), Kind::Io, {"not a checkpoint directory"}); }
  SECTION("config without a qdec section") {
    Mutators m;
    m.config = [](json& c) { c.erase("qdec"); };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadConfig, {"config.json", "no 'qdec' section; not a QDEC checkpoint"});
  }
  SECTION("config.json not JSON") {
    write_tiny_checkpoint(dir, spec);
    write_bytes(dir + "/config.json", "{\"model_type\": ");
    expect_checkpoint_error(dir, Kind::BadJson, {"config.json"});
  }
  SECTION("unknown format version") {
    Mutators m;
    m.config = [](json& c) { c["qdec"]["format_version"] = 7; };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadConfig, {"format_version is 7"});
  }
  SECTION("a listed module without layer metadata") {
    Mutators m;
    m.layer_meta = [](json& lm) { lm.erase("model.layers.0.mlp.up_proj"); };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadHeader, {"model.safetensors", "model.layers.0.mlp.up_proj", "no layer metadata"});
  }
  SECTION("bad bits in the layer metadata") {
    Mutators m;
    m.layer_meta = [](json& lm) { lm["model.layers.0.mlp.up_proj"]["bits"] = 9; };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadConfig, {"model.layers.0.mlp.up_proj", "bits must be in 2..8"});
  }
  SECTION("config.json qdec.bits disagrees with the layers (bits = 9 over 3-bit tensors)") {
    Mutators m;
    m.config = [](json& c) { c["qdec"]["bits"] = 9; };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadConfig,
                            {"model.safetensors", "has bits=3 but", "config.json says 9 for every layer"});
  }
  SECTION("config.json qdec.group_size disagrees with the layers") {
    Mutators m;
    m.config = [](json& c) { c["qdec"]["group_size"] = 128; };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadConfig, {"has group_size=", "says 128 for every layer"});
  }
  SECTION("quantization_config block disagrees with the qdec section") {
    Mutators m;
    m.config = [](json& c) {
      c["quantization_config"] = c["qdec"];
      c["quantization_config"].erase("quantized_modules");
      c["quantization_config"].erase("method");
      c["quantization_config"]["quant_method"] = "qdec";
      c["qdec"]["bits"] = 9;
    };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadConfig, {"config.json", "quantization_config.bits is 3 but qdec.bits is 9"});
  }
  SECTION("quantization_config block that agrees opens") {
    Mutators m;
    m.config = [](json& c) {
      c["quantization_config"] = c["qdec"];
      c["quantization_config"]["quant_method"] = "qdec";
    };
    write_tiny_checkpoint(dir, spec, m);
    CHECK(Checkpoint(dir).layers.size() == 7);
  }
  SECTION("residual store declared but missing") {
    write_tiny_checkpoint(dir, spec);
    fs::remove(dir + "/residual.safetensors");
    expect_checkpoint_error(dir, Kind::Io, {"residual.safetensors", "missing"});
  }
  SECTION("residual store with another width than the config") {
    Mutators m;
    m.config = [](json& c) { c["qdec"]["residual_bits"] = 3; };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadHeader, {"residual.safetensors", "residual_bits"});
  }
  SECTION("residual tensor of an unknown layer") {
    Mutators m;
    m.residual_tensors = [](auto& t) { t.emplace_back("model.layers.9.mlp.up_proj.residual", at::zeros({1}, at::kInt)); };
    write_tiny_checkpoint(dir, spec, m);
    expect_checkpoint_error(dir, Kind::BadHeader, {"model.layers.9.mlp.up_proj.residual"});
  }
}

#ifdef QDEC_SOURCE_DIR
TEST_CASE("fuzz seed corpus: valid_* files load, every other file is rejected", "[loader][corpus]") {
  // The same verdicts as the reference `safetensors` reader gives these files.
  const fs::path dir = fs::path(QDEC_SOURCE_DIR) / "tests" / "fuzz" / "corpus" / "safetensors_header";
  REQUIRE(fs::is_directory(dir));
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    INFO(name);
    ++n;
    if (name.rfind("valid_", 0) == 0) {
      SafetensorsFile f(e.path().string());
      for (const auto& t : f.names()) CHECK(f.view(t).numel() >= 0);
    } else {
      CHECK_THROWS_AS(SafetensorsFile(e.path().string()), LoadError);
    }
  }
  CHECK(n >= 20);
}
#endif
