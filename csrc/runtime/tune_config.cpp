// Twin of qdec/tune.py's load_config / load_sm_budgets: the same target keys
// ("%g" of the percentage, so "2.5%" and 0.025 name one target), the same
// default (the smallest target) and the same checks.
#include "runtime/tune_config.h"

#include <cmath>
#include <cstdio>
#include <limits>

#include "runtime/errors.h"
#include "runtime/json_util.h"

namespace qdec::runtime {
namespace {

constexpr const char* kFormat = "qdec-tune/1";

[[noreturn]] void fail(const std::string& path, const std::string& detail) {
  throw LoadError(LoadError::Kind::BadConfig, path, "", detail);
}

// "2.5%" -> 0.025, "0.025" -> 0.025; NaN when not a number.
double parse_target(const std::string& text) {
  const bool percent = !text.empty() && text.back() == '%';
  const std::string number = percent ? text.substr(0, text.size() - 1) : text;
  size_t used = 0;
  double v = std::numeric_limits<double>::quiet_NaN();
  try {
    v = std::stod(number, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (number.empty() || used != number.size()) return std::numeric_limits<double>::quiet_NaN();
  return percent ? v / 100 : v;
}

// 0.025 -> "2.5%", as Python's f"{100 * t:g}%".
std::string target_key(double target) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g%%", 100 * target);
  return buf;
}

}  // namespace

TuneChoice read_tune_config(const std::string& path, const std::string& target) {
  const auto config = parse_json_limited(read_text_file(path), path, /*max_depth=*/16);
  if (!config.is_object() || !config.contains("format_version") ||
      config["format_version"] != kFormat)
    fail(path, std::string("not a qdec tune config (format_version ") +
                   (config.is_object() && config.contains("format_version")
                        ? config["format_version"].dump()
                        : std::string("missing")) +
                   ", expected \"" + kFormat + "\")");
  const auto targets = config.value("targets", nlohmann::json::object());
  if (!targets.is_object() || targets.empty()) fail(path, "has no targets");

  std::string key;
  std::string present;
  double smallest = std::numeric_limits<double>::infinity();
  for (const auto& [name, _] : targets.items()) {
    present += (present.empty() ? "" : ", ") + name;
    const double t = parse_target(name);
    if (std::isnan(t)) fail(path, "target key \"" + name + "\" is not a percentage");
    if (t < smallest) smallest = t, key = name;
  }
  if (!target.empty()) {
    const double t = parse_target(target);
    if (std::isnan(t)) fail(path, "target \"" + target + "\" is not a number or percentage");
    key = target_key(t);
    if (!targets.contains(key)) fail(path, "no target " + key + "; the file has [" + present + "]");
  }
  const auto& choice = targets[key];

  TuneChoice out;
  out.target = key;
  const auto fractions = choice.is_object() ? choice.value("fraction", nlohmann::json()) : nlohmann::json();
  if (!fractions.is_object())
    fail(path, "target " + key + " has no valid 'fraction' mapping (projection -> share of input channels in [0, 1])");
  for (const auto& [name, v] : fractions.items()) {
    if (!v.is_number() || v.get<double>() < 0 || v.get<double>() > 1)
      fail(path, "target " + key + " has no valid 'fraction' mapping (projection -> share of input channels in [0, 1]; " +
                     name + " is " + v.dump() + ")");
    out.fractions.emplace_back(name, v.get<double>());
  }
  if (choice.contains("sm_budget") && !choice["sm_budget"].is_null()) {
    const auto& budgets = choice["sm_budget"];
    if (!budgets.is_object()) fail(path, "target " + key + " has an invalid 'sm_budget' mapping (projection -> integer >= 0)");
    for (const auto& [name, v] : budgets.items()) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0)
        fail(path, "target " + key + " has an invalid 'sm_budget' mapping (projection -> integer >= 0; " + name +
                       " is " + v.dump() + ")");
      out.sm_budgets.emplace_back(name, v.get<int64_t>());
    }
  }
  return out;
}

}  // namespace qdec::runtime
