// Reads a `qdec tune` config (configs/*.json, format "qdec-tune/1", described
// in configs/README.md; written by qdec/tune.py) for one target slowdown, so
// qdec_infer applies the same k and SM budget per projection that
// `qdec generate --tune-config` does. Torch-free.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qdec::runtime {

struct TuneChoice {
  std::string target;  // the key in the file, e.g. "2.5%"
  // Projection name ("down_proj") -> k as a share of its input channels.
  std::vector<std::pair<std::string, double>> fractions;
  // Projection name -> compensated_linear's sm_budget (0 = automatic); empty
  // for a config written before budgets were tuned.
  std::vector<std::pair<std::string, int64_t>> sm_budgets;
};

// `target`: "" for the smallest target in the file, else "2.5%" or "0.025"
// (as qdec.tune.load_config). Throws LoadError(BadConfig / Io / BadJson)
// naming the file and what is wrong (wrong format, no such target with the
// targets present, fractions outside [0, 1], negative budgets).
TuneChoice read_tune_config(const std::string& path, const std::string& target = "");

}  // namespace qdec::runtime
