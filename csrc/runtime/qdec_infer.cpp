// qdec_infer: text generation from a QDEC checkpoint directory with libtorch
// and the qdec operators only (no Python). See --help.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifdef QDEC_RUNTIME_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "qdec/ops.h"
#include "runtime/checkpoint.h"
#include "runtime/foreign_checkpoint.h"
#include "runtime/model.h"
#include "runtime/sampling.h"
#include "runtime/tokenizer.h"
#include "runtime/tune_config.h"

namespace {

using namespace qdec::runtime;
using Clock = std::chrono::steady_clock;

const char* kUsage = R"(usage: qdec_infer --model DIR (--prompt TEXT | --prompt-file FILE | --ids 1,2,3) [options]

Generates text from a QDEC checkpoint directory (config.json, model.safetensors,
residual.safetensors, tokenizer.json) with libtorch and the qdec operators.
Another tool's directory (AutoAWQ GEMM, GPTQ, compressed-tensors pack-quantized)
runs too, at k = 0: it has no residual store (qdec residual adds one).

input
  --model DIR            checkpoint directory
  --prompt TEXT          prompt, tokenized with DIR/tokenizer.json
  --prompt-file FILE     prompt read from a file
  --ids LIST             prompt as token ids, e.g. 1,2,3 (no tokenizer needed)
  --tokenizer FILE       tokenizer.json to use instead of DIR/tokenizer.json
  --tokenize             print the prompt's token ids and exit
generation
  --max-new-tokens N     tokens to generate (default 64)
  --temperature T        0 = greedy (default); > 0 samples
  --top-k N              sample among the N most likely tokens (default 0 = all)
  --seed S               sampling seed (default 0)
  --ignore-eos           do not stop at an end-of-sequence token
compensation
  --k VALUE              channels compensated per token in every quantized linear:
                         an integer is a count (16; 1 = one channel), a number with
                         a decimal point or exponent a fraction of its inputs in
                         [0, 1] (0.05; 1.0 = all), as in every qdec command; default
                         the checkpoint's quantization_config.k (e.g. the per-linear
                         k map of `qdec allocate`), else 0; --k/--k-for replace it
  --k-for NAME=VALUE     per-layer override, NAME a projection (down_proj), a
                         suffix (mlp.down_proj, layers.3.mlp.down_proj) or a full
                         name; repeatable, later ones win
  --no-compensate-prefill  compensate decode steps only (prefill uses k = 0)
  --tune-config FILE     k (and the CUDA compensation's SM budget) per projection
                         from a `qdec tune` config (configs/*.json); applied after
                         --k/--k-for, so it wins for the projections it names
  --tune-target T        which of the config's targets, e.g. 2.5% (default: the
                         smallest)
runtime
  --device DEV           cpu (default) or cuda[:i]
  --dtype T              float32 (default), float16, bfloat16
  --threads N            CPU threads for every parallel part of a step (the qdec
                         ops, attention, BLAS; at::set_num_threads, which also
                         caps OpenMP and MKL); default: libtorch's choice
  --cpu-activations P    int16x2 (default): the CPU GEMV's x as two int16 terms,
                         float-grade; int16: one term, faster (error <= max|x|/65534
                         per span, about bfloat16's; near-tied outlier choices can
                         differ from the float reference); as QDEC_CPU_ACTIVATIONS
  --lm-head-bits B       0 (default): the LM head as stored; 8: quantized at load
                         to 8-bit symmetric codes, one scale per 64 inputs (as
                         llama.cpp's Q8_0 head), read by the qdec GEMV: 4x fewer
                         bytes per token; SmolLM2's logits move by up to 0.16
output
  --dump-logits FILE     write float32 logits [steps, vocab] (step 0: the prompt's
                         last position, then each generated step) and the chosen
                         tokens as a safetensors file
  --no-stream            print the text at the end instead of token by token
  --quiet                no statistics on stderr
  --stats-json FILE      write the timings as JSON: prompt/generated tokens,
                         prefill and decode seconds (wall), decode CPU seconds
                         (the process, all threads), threads, peak RSS
)";

[[noreturn]] void usage_error(const std::string& msg) {
  std::cerr << "qdec_infer: " << msg << "\n(run qdec_infer --help for usage)\n";
  std::exit(2);
}

struct Args {
  std::string model, prompt, tokenizer, dump_logits, stats_json;
  bool have_prompt = false, have_ids = false, tokenize_only = false;
  std::vector<int64_t> ids;
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;
  bool ignore_eos = false, stream = true, quiet = false, compensate_prefill = true;
  KPolicy k;
  bool k_given = false;  // --k or --k-for: replaces the checkpoint's quantization_config.k
  std::string tune_config, tune_target;
  std::string device = "cpu", dtype = "float32";
  int threads = 0;
  int lm_head_bits = 0;
  std::string cpu_activations;  // empty: QDEC_CPU_ACTIVATIONS or the default
};

int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo) {
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty() || x < lo) usage_error(flag + " expects an integer >= " + std::to_string(lo) + ", got \"" + v + "\"");
  return x;
}

double parse_double(const std::string& flag, const std::string& v) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty()) usage_error(flag + " expects a number, got \"" + v + "\"");
  return x;
}

std::vector<int64_t> parse_ids(const std::string& v) {
  std::vector<int64_t> ids;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty()) ids.push_back(parse_int("--ids", item, 0));
  }
  if (ids.empty()) usage_error("--ids needs at least one token id");
  return ids;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(f + " needs a value");
      return argv[++i];
    };
    try {
      if (f == "--help" || f == "-h") {
        std::cout << kUsage;
        std::exit(0);
      } else if (f == "--model") a.model = value();
      else if (f == "--prompt") a.prompt = value(), a.have_prompt = true;
      else if (f == "--prompt-file") {
        const auto path = value();
        std::ifstream in(path, std::ios::binary);
        if (!in) usage_error("cannot read --prompt-file " + path);
        std::stringstream ss;
        ss << in.rdbuf();
        a.prompt = ss.str();
        a.have_prompt = true;
      } else if (f == "--ids") a.ids = parse_ids(value()), a.have_ids = true;
      else if (f == "--tokenizer") a.tokenizer = value();
      else if (f == "--tokenize") a.tokenize_only = true;
      else if (f == "--max-new-tokens") a.max_new_tokens = parse_int(f, value(), 0);
      else if (f == "--temperature") a.sampling.temperature = parse_double(f, value());
      else if (f == "--top-k") a.sampling.top_k = parse_int(f, value(), 0);
      else if (f == "--seed") a.sampling.seed = static_cast<uint64_t>(parse_int(f, value(), 0));
      else if (f == "--ignore-eos") a.ignore_eos = true;
      else if (f == "--k") a.k.all = KValue::parse(value()), a.k_given = true;
      else if (f == "--k-for") {
        a.k_given = true;
        const auto v = value();
        const auto eq = v.find('=');
        if (eq == std::string::npos || eq == 0) usage_error("--k-for expects NAME=VALUE, got \"" + v + "\"");
        a.k.overrides.emplace_back(v.substr(0, eq), KValue::parse(v.substr(eq + 1)));
      } else if (f == "--no-compensate-prefill") a.compensate_prefill = false;
      else if (f == "--tune-config") a.tune_config = value();
      else if (f == "--tune-target") a.tune_target = value();
      else if (f == "--device") a.device = value();
      else if (f == "--dtype") a.dtype = value();
      else if (f == "--threads") a.threads = static_cast<int>(parse_int(f, value(), 1));
      else if (f == "--lm-head-bits") {
        a.lm_head_bits = static_cast<int>(parse_int(f, value(), 0));
        if (a.lm_head_bits != 0 && a.lm_head_bits != 8)
          usage_error("--lm-head-bits expects 0 (as stored) or 8, got " + std::to_string(a.lm_head_bits));
      }
      else if (f == "--cpu-activations") {
        a.cpu_activations = value();
        if (a.cpu_activations != "int16x2" && a.cpu_activations != "int16")
          usage_error("--cpu-activations expects int16x2 or int16, got \"" + a.cpu_activations + "\"");
      }
      else if (f == "--dump-logits") a.dump_logits = value();
      else if (f == "--no-stream") a.stream = false;
      else if (f == "--quiet") a.quiet = true;
      else if (f == "--stats-json") a.stats_json = value();
      else usage_error("unknown option " + f);
    } catch (const std::invalid_argument& e) {
      usage_error(f + ": " + e.what());
    }
  }
  if (a.model.empty()) usage_error("--model DIR is required");
  if (a.have_prompt == a.have_ids) usage_error("give exactly one of --prompt/--prompt-file and --ids");
  if (!a.tune_target.empty() && a.tune_config.empty()) usage_error("--tune-target needs --tune-config");
  return a;
}

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32") return at::kFloat;
  if (s == "float16" || s == "fp16") return at::kHalf;
  if (s == "bfloat16" || s == "bf16") return at::kBFloat16;
  usage_error("--dtype must be float32, float16 or bfloat16, got \"" + s + "\"");
}

// Resident set size (now, peak) in bytes, from /proc/self/status.
std::pair<size_t, size_t> rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  size_t now = 0, peak = 0;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) now = std::stoull(line.substr(6)) * 1024;
    if (line.rfind("VmHWM:", 0) == 0) peak = std::stoull(line.substr(6)) * 1024;
  }
  return {now, peak};
}

double mib(size_t b) { return static_cast<double>(b) / (1 << 20); }

// CPU time of the whole process (every thread) in seconds.
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Threads the process has now (/proc/self/status), to check --threads.
int64_t os_thread_count() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("Threads:", 0) == 0) return std::stoll(line.substr(8));
  return -1;
}

// Length of the longest prefix of s that ends on a UTF-8 character boundary.
size_t complete_utf8_prefix(const std::string& s) {
  size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char c = s[n - back];
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
    return len > back ? n - back : n;
  }
  return n;
}

int run(const Args& args) {
  if (args.threads > 0) at::set_num_threads(args.threads);
  if (!qdec::ops_registered())
    throw std::runtime_error("the qdec operators are not registered (libqdec_ops linked without --no-as-needed?)");
  if (!args.cpu_activations.empty()) qdec::set_cpu_activations(args.cpu_activations);
  const auto& d = args.device;
  const bool cuda_like = d == "cuda" || (d.rfind("cuda:", 0) == 0 && d.size() > 5 &&
                                         d.find_first_not_of("0123456789", 5) == std::string::npos);
  if (d != "cpu" && !cuda_like) usage_error("--device must be cpu, cuda or cuda:<index>, got \"" + d + "\"");
  const c10::Device device(d);
  if (device.is_cuda() && !at::hasCUDA())
    throw std::runtime_error("--device " + d + ": this libtorch has no CUDA support or sees no GPU");

  std::optional<Tokenizer> tok;
  const auto t_load0 = Clock::now();
  Checkpoint ckpt(args.model);
  if (ckpt.foreign) {
    // No residual store: k = 0 only, as `qdec generate DIR` runs it. A k > 0
    // asked for is refused rather than silently dropped.
    bool wants_k = args.k.all.value > 0 || !args.tune_config.empty();
    for (const auto& [name, value] : args.k.overrides) wants_k |= value.value > 0;
    if (wants_k)
      throw std::runtime_error("--k/--k-for/--tune-config ask for k > 0, but " + args.model + " is a " +
                               foreign_tool_name(ckpt.foreign->kind) +
                               " checkpoint with no residual store, so only k = 0 runs; add one with qdec residual "
                               "--quantized " + args.model + " --reference <original HF model dir> --out <dir>");
    for (const auto& note : ckpt.foreign->notes) std::cerr << "qdec_infer: warning: " << note << "\n";
    std::cerr << "qdec_infer: " << foreign_k0_message(args.model, ckpt.foreign->kind) << "\n";
  }
  std::string tok_path = args.tokenizer.empty() ? ckpt.tokenizer_path() : args.tokenizer;
  if (!tok_path.empty()) {
    if (args.have_ids && args.tokenizer.empty()) {
      // With --ids the directory's tokenizer only turns the output into text:
      // one this runtime cannot read (e.g. a word-level one) is no reason to
      // refuse the run; the token ids are printed instead.
      try {
        tok = Tokenizer::from_file(tok_path);
      } catch (const LoadError& e) {
        if (!args.quiet) std::cerr << "qdec_infer: warning: " << e.what() << "; printing token ids instead of text\n";
      }
    } else {
      tok = Tokenizer::from_file(tok_path);
    }
  }
  if (args.have_prompt && !tok)
    throw std::runtime_error(args.model + ": no tokenizer.json; pass --tokenizer FILE or --ids");

  std::vector<int64_t> prompt = args.have_ids ? args.ids : tok->encode(args.prompt);
  if (args.tokenize_only) {
    for (size_t i = 0; i < prompt.size(); ++i) std::cout << (i ? "," : "") << prompt[i];
    std::cout << "\n";
    return 0;
  }
  if (prompt.empty()) throw std::runtime_error("the prompt is empty (no tokens)");

  RuntimeOptions ro;
  ro.device = device;
  ro.dtype = parse_dtype(args.dtype);
  ro.compensate_prefill = args.compensate_prefill;
  ro.lm_head_bits = args.lm_head_bits;
  LlamaModel model(ckpt, ro);
  KPolicy k_policy = args.k_given ? args.k : checkpoint_k_policy(ckpt.raw_config, ckpt.dir + "/config.json");
  if (!args.tune_config.empty()) {
    const TuneChoice tuned = read_tune_config(args.tune_config, args.tune_target);
    for (const auto& [name, fraction] : tuned.fractions)
      k_policy.overrides.emplace_back(name, KValue{true, fraction});
    model.set_sm_budgets(tuned.sm_budgets);
    if (!args.quiet)
      std::cerr << "qdec_infer: " << args.tune_config << ": target " << tuned.target << ", "
                << tuned.fractions.size() << " projections tuned\n";
  }
  model.set_k(k_policy);
  const double load_s = std::chrono::duration<double>(Clock::now() - t_load0).count();
  const auto& cfg = model.config();
  for (auto id : prompt)
    if (id < 0 || id >= cfg.vocab_size)
      throw std::runtime_error("prompt token id " + std::to_string(id) + " is outside the vocabulary of " +
                               std::to_string(cfg.vocab_size));

  int64_t k_total = 0, k_layers = 0;
  for (const auto* l : model.linears())
    if (l->k > 0) k_total += l->k, ++k_layers;
  if (!args.quiet) {
    std::cerr << "qdec_infer: " << args.model << ": " << cfg.model_type << ", " << cfg.num_layers << " layers, hidden "
              << cfg.hidden_size << ", " << ckpt.layers.size() << " quantized linears (" << ckpt.qdec.method
              << "), weights " << mib(model.weight_bytes()) << " MiB on " << device << ", residual store "
              << mib(model.residual_bytes()) << " MiB in " << (device.is_cuda() ? "pinned host" : "host")
              << " memory; compensation: " << (k_layers ? std::to_string(k_layers) + " layers, mean k " +
                                                              std::to_string(k_total / k_layers)
                                                        : std::string("off"))
              << "; loaded in " << load_s << " s\n";
  }

  const int64_t capacity = static_cast<int64_t>(prompt.size()) + std::max<int64_t>(args.max_new_tokens, 1);
  if (capacity > cfg.max_position_embeddings && !args.quiet)
    std::cerr << "qdec_infer: warning: " << capacity << " positions exceed max_position_embeddings "
              << cfg.max_position_embeddings << "\n";
  if (cfg.sliding_window && capacity > *cfg.sliding_window && !args.quiet)
    std::cerr << "qdec_infer: warning: " << capacity << " positions exceed sliding_window "
              << *cfg.sliding_window << "; this runtime attends to all positions\n";
  KVCache cache = model.new_cache(capacity);
  Sampler sampler(args.sampling);

  std::string text_bytes;
  size_t printed = 0;
  if (tok && args.stream) {
    std::cout << (args.have_prompt ? args.prompt : tok->decode(prompt)) << std::flush;
  }
  std::vector<at::Tensor> step_logits;
  std::vector<int64_t> generated;

  c10::InferenceMode inference_mode;
  const auto t0 = Clock::now();
  // Logits come back to the host at once: the sampler needs them there, and
  // the copy waits for the device, so the timings below are honest on CUDA.
  at::Tensor logits = model.forward(at::tensor(prompt, at::kLong), cache).to(at::kCPU);
  const auto t1 = Clock::now();
  const double cpu1 = process_cpu_seconds();
  for (int64_t step = 0; step < args.max_new_tokens; ++step) {
    const int64_t next = sampler.next(logits);
    if (!args.dump_logits.empty()) step_logits.push_back(logits.clone());
    generated.push_back(next);
    if (tok && args.stream) {
      text_bytes += tok->is_special(next) ? std::string() : tok->token_bytes(next);
      const size_t ready = complete_utf8_prefix(text_bytes);
      std::cout << text_bytes.substr(printed, ready - printed) << std::flush;
      printed = ready;
    }
    const bool eos = std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), next) != cfg.eos_token_ids.end();
    if ((eos && !args.ignore_eos) || step + 1 == args.max_new_tokens) break;
    // decode() reuses the cache's buffers (the logits are overwritten next
    // step, which is why --dump-logits clones them above).
    logits = model.decode(next, cache).to(at::kCPU);
  }
  const auto t2 = Clock::now();
  const double cpu2 = process_cpu_seconds();
  const int64_t os_threads = os_thread_count();

  if (tok) {
    if (args.stream) std::cout << text_bytes.substr(printed) << "\n";
    else std::cout << (args.have_prompt ? args.prompt : tok->decode(prompt)) << tok->decode(generated, true) << "\n";
  } else {
    for (size_t i = 0; i < generated.size(); ++i) std::cout << (i ? "," : "") << generated[i];
    std::cout << "\n";
  }
  std::cout.flush();

  if (!args.dump_logits.empty()) {
    std::vector<std::pair<std::string, at::Tensor>> out;
    out.emplace_back("logits", step_logits.empty() ? at::empty({0, cfg.vocab_size}) : at::stack(step_logits));
    out.emplace_back("tokens", at::tensor(generated, at::kLong));
    out.emplace_back("prompt", at::tensor(prompt, at::kLong));
    save_safetensors(args.dump_logits, out,
                     {{"device", device.str()}, {"dtype", args.dtype},
                      {"compensate_prefill", args.compensate_prefill ? "true" : "false"}});
  }

  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  const double decode_cpu_s = cpu2 - cpu1;
  const int64_t decode_steps = std::max<int64_t>(static_cast<int64_t>(generated.size()) - 1, 0);
  const auto [rss, peak] = rss_bytes();
  if (!args.stats_json.empty()) {
    std::ofstream js(args.stats_json);
    if (!js) throw std::runtime_error("cannot write --stats-json " + args.stats_json);
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "{\"prompt_tokens\": %zu, \"generated_tokens\": %zu, \"decode_steps\": %lld, "
                  "\"prefill_seconds\": %.6f, \"decode_seconds\": %.6f, \"decode_cpu_seconds\": %.6f, "
                  "\"threads\": %d, \"os_threads\": %lld, \"peak_rss_mib\": %.1f, \"lm_head_bits\": %d, \"cpu_activations\": \"%s\"}\n",
                  prompt.size(), generated.size(), static_cast<long long>(decode_steps), prefill_s, decode_s,
                  decode_cpu_s, at::get_num_threads(), static_cast<long long>(os_threads), mib(peak),
                  args.lm_head_bits, qdec::cpu_activations().c_str());
    js << buf;
  }
  if (!args.quiet) {
    std::fprintf(stderr,
                 "qdec_infer: prompt %zu tokens, prefill %.3f s (%.1f tokens/s); generated %zu tokens, "
                 "decode %.3f s (%.2f tokens/s, %.2f per CPU-second); threads %d (%lld OS threads)\n",
                 prompt.size(), prefill_s, prompt.size() / std::max(prefill_s, 1e-9), generated.size(), decode_s,
                 decode_steps / std::max(decode_s, 1e-9), decode_steps / std::max(decode_cpu_s, 1e-9),
                 at::get_num_threads(), static_cast<long long>(os_threads));
    std::fprintf(stderr, "qdec_infer: memory: RSS %.1f MiB, peak RSS %.1f MiB (file mappings count once touched)\n",
                 mib(rss), mib(peak));
#ifdef QDEC_RUNTIME_WITH_CUDA
    if (device.is_cuda()) {
      const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
      using c10::CachingAllocator::StatType;
      const auto& a = stats.allocated_bytes[static_cast<size_t>(StatType::AGGREGATE)];
      const auto& r = stats.reserved_bytes[static_cast<size_t>(StatType::AGGREGATE)];
      std::fprintf(stderr, "qdec_infer: CUDA allocator: allocated %.1f MiB (peak %.1f), reserved %.1f MiB (peak %.1f)\n",
                   mib(a.current), mib(a.peak), mib(r.current), mib(r.peak));
    }
#endif
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  try {
    return run(args);
  } catch (const LoadError& e) {
    std::cerr << "qdec_infer: error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {  // from libtorch or a qdec op: the message, not the C++ backtrace
    std::cerr << "qdec_infer: error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "qdec_infer: error: " << e.what() << "\n";
    return 1;
  }
}
