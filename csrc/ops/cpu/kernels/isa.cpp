// Run-time choice of the CPU decode kernels' instruction-set level, as ATen's
// DispatchStub and llama.cpp's ggml do: every level is compiled into the one
// binary (the level files switch their own target with a pragma, the rest of
// the build keeps the baseline flags), and the first call picks the best one
// this CPU supports, or the one QDEC_CPU_ISA names, so CI can test each level
// the machine has.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "qdec/cpu_decode.h"

namespace qdec::cpu {
namespace {

bool is_x86_64() {
#if defined(__x86_64__) || defined(_M_X64)
  return true;
#else
  return false;
#endif
}

// The CPU features a level needs that this CPU lacks ("" when none).
std::string missing_features(Isa level) {
  std::string missing;
  if (level == Isa::kScalar) return missing;
  if (!is_x86_64()) return "an x86-64 CPU";
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  auto need = [&](bool have, const char* name) {
    if (!have) missing += (missing.empty() ? "" : ", ") + std::string(name);
  };
  need(__builtin_cpu_supports("avx2"), "avx2");
  need(__builtin_cpu_supports("fma"), "fma");
  if (level == Isa::kAvx512) {
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
    need(__builtin_cpu_supports("avx512vbmi"), "avx512vbmi");
    need(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  }
#else
  missing = "a compiler with __builtin_cpu_supports";
#endif
  return missing;
}

Isa initial_isa() {
  const char* env = std::getenv("QDEC_CPU_ISA");
  if (env == nullptr || *env == '\0') return best_isa();
  Isa level;
  try {
    level = parse_isa(env);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("QDEC_CPU_ISA: ") + e.what());
  }
  const std::string missing = missing_features(level);
  if (!missing.empty())
    throw std::runtime_error(std::string("QDEC_CPU_ISA=") + env + " but this CPU lacks " +
                             missing);
  return level;
}

// -1 = not chosen yet. An atomic int: the first calls may race, and all of
// them compute the same value.
std::atomic<int> g_isa{-1};

}  // namespace

Isa best_isa() {
  if (missing_features(Isa::kAvx512).empty()) return Isa::kAvx512;
  if (missing_features(Isa::kAvx2).empty()) return Isa::kAvx2;
  return Isa::kScalar;
}

Isa parse_isa(const char* name) {
  const std::string s(name);
  if (s == "scalar") return Isa::kScalar;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "avx512") return Isa::kAvx512;
  if (s == "auto") return best_isa();
  throw std::invalid_argument("unknown CPU instruction-set level '" + s +
                              "'; expected one of scalar, avx2, avx512, auto");
}

const char* isa_name(Isa level) {
  switch (level) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

Isa active_isa() {
  int v = g_isa.load(std::memory_order_acquire);
  if (v < 0) {
    v = static_cast<int>(initial_isa());
    g_isa.store(v, std::memory_order_release);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa level) {
  const std::string missing = missing_features(level);
  if (!missing.empty())
    throw std::runtime_error(std::string("CPU instruction-set level ") + isa_name(level) +
                             " needs " + missing + ", which this CPU lacks");
  g_isa.store(static_cast<int>(level), std::memory_order_release);
}

const DecodeKernels& decode_kernels() {
  switch (active_isa()) {
    case Isa::kAvx512: return avx512::kKernels;
    case Isa::kAvx2: return avx2::kKernels;
    case Isa::kScalar: break;
  }
  return scalar::kKernels;
}

}  // namespace qdec::cpu
