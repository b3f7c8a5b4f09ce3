// qdec_infer's reader of `qdec tune` configs (runtime/tune_config.h) and the
// model's per-projection SM budgets. The reader is the twin of
// qdec.tune.load_config / load_sm_budgets: tests/python/test_tune.py checks
// the Python side on the same format.
#include <ATen/ATen.h>  // before catch.h: c10 has a CHECK macro of its own (see catch.h)

#include <string>

#include "catch.h"
#include "runtime/errors.h"
#include "runtime/model.h"
#include "runtime/tune_config.h"
#include "test_runtime_util.h"

using namespace qdec::runtime;
using namespace qdec_test;

namespace {

// A config as qdec tune writes it, trimmed to what the reader looks at.
json two_targets() {
  return json::parse(R"({
    "format_version": "qdec-tune/1",
    "meta": {"device": "test GPU"},
    "targets": {
      "5%":   {"k": {"q_proj": 32, "down_proj": 112},
               "fraction": {"q_proj": 0.0078125, "down_proj": 0.0078125},
               "sm_budget": {"q_proj": 8, "down_proj": 16}},
      "2.5%": {"k": {"q_proj": 0, "down_proj": 56},
               "fraction": {"q_proj": 0.0, "down_proj": 0.00390625},
               "sm_budget": {"q_proj": 0, "down_proj": 4}}
    }})");
}

std::string write_config(const TempDir& tmp, const json& j, const std::string& name = "c.json") {
  const auto path = tmp.file(name);
  write_bytes(path, j.dump());
  return path;
}

std::string error_of(const std::string& path, const std::string& target = "") {
  try {
    read_tune_config(path, target);
  } catch (const LoadError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("tune config: targets, default and the two spellings", "[tune]") {
  TempDir tmp;
  const auto path = write_config(tmp, two_targets());
  const auto smallest = read_tune_config(path);
  CHECK(smallest.target == "2.5%");
  REQUIRE(smallest.fractions.size() == 2);
  for (const auto& [name, f] : smallest.fractions)
    CHECK(f == (name == "down_proj" ? 0.00390625 : 0.0));
  CHECK(read_tune_config(path, "0.025").target == "2.5%");
  const auto five = read_tune_config(path, "5%");
  CHECK(five.target == "5%");
  REQUIRE(five.sm_budgets.size() == 2);
  for (const auto& [name, b] : five.sm_budgets) CHECK(b == (name == "down_proj" ? 16 : 8));
  // A config from before budgets were tuned: automatic everywhere.
  auto old = two_targets();
  old["targets"]["5%"].erase("sm_budget");
  CHECK(read_tune_config(write_config(tmp, old, "old.json"), "5%").sm_budgets.empty());
}

TEST_CASE("tune config: errors name the file and the problem", "[tune]") {
  TempDir tmp;
  CHECK(error_of(tmp.file("missing.json")).find("missing.json") != std::string::npos);
  write_bytes(tmp.file("bad.json"), "{not json");
  CHECK(error_of(tmp.file("bad.json")).find("bad.json") != std::string::npos);
  auto j = two_targets();
  j["format_version"] = "qdec-tune/0";
  CHECK(error_of(write_config(tmp, j)).find("not a qdec tune config") != std::string::npos);
  j = two_targets();
  j["targets"] = json::object();
  CHECK(error_of(write_config(tmp, j)).find("has no targets") != std::string::npos);
  const auto good = write_config(tmp, two_targets(), "good.json");
  CHECK(error_of(good, "10%").find("no target 10%; the file has [") != std::string::npos);
  CHECK(error_of(good, "fast").find("not a number or percentage") != std::string::npos);
  j = two_targets();
  j["targets"]["5%"]["fraction"]["q_proj"] = 1.5;
  CHECK(error_of(write_config(tmp, j), "5%").find("valid 'fraction'") != std::string::npos);
  j = two_targets();
  j["targets"]["5%"]["sm_budget"]["q_proj"] = -2;
  CHECK(error_of(write_config(tmp, j), "5%").find("invalid 'sm_budget'") != std::string::npos);
}

TEST_CASE("sm_budget per projection on the model", "[tune][model]") {
  TempDir tmp;
  const auto dir = tmp.file("ckpt");
  TinySpec s;
  s.layers = 2;
  write_tiny_checkpoint(dir, s);
  Checkpoint ckpt(dir);
  LlamaModel model(ckpt, RuntimeOptions{});
  model.set_sm_budgets({{"down_proj", 8}, {"layers.1.mlp.down_proj", 2}});
  for (const auto* l : model.linears()) {
    if (!l->quantized) continue;
    const bool down = l->name.size() >= 9 && l->name.compare(l->name.size() - 9, 9, "down_proj") == 0;
    const bool layer1 = l->name.find("layers.1.") != std::string::npos;
    CHECK(l->sm_budget == (down ? (layer1 ? 2 : 8) : 0));
  }
  CHECK_THROWS_AS(model.set_sm_budgets({{"q_proj", -1}}), std::invalid_argument);
}
