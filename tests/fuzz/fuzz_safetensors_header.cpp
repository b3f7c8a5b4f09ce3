// libFuzzer target: the safetensors header parser on arbitrary file images
// (and, for inputs that are JSON, the tokenizer.json reader).
// Anything but a qdec::runtime::LoadError escaping, a crash, or a sanitizer
// report is a bug. For a file that parses, every tensor's byte range is
// touched at both ends, so an offset the validation let through outside the
// input buffer shows up under AddressSanitizer.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/json_util.h"
#include "runtime/safetensors_header.h"
#include "runtime/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qdec::runtime;
  ParseLimits limits;
  limits.max_header_bytes = 1 << 20;
  try {
    const SafetensorsHeader h = parse_safetensors(data, size, "fuzz-input", limits);
    volatile uint8_t sink = 0;
    uint64_t covered = 0;
    for (const auto& t : h.tensors) {
      if (t.end > h.data_size || t.begin > t.end || t.begin < covered) __builtin_trap();
      if (t.nbytes() != static_cast<uint64_t>(t.numel()) * dtype_itemsize(t.dtype)) __builtin_trap();
      if (t.nbytes()) sink = sink + data[h.data_offset + t.begin] + data[h.data_offset + t.end - 1];
      covered = t.end;
    }
    if (covered != h.data_size) __builtin_trap();
    for (const auto& [k, v] : h.metadata) sink = sink + static_cast<uint8_t>(k.size() + v.size());
    (void)sink;
  } catch (const LoadError& e) {
    // expected for malformed input; the message must name the input
    if (std::string(e.what()).find("fuzz-input") != 0) __builtin_trap();
  }
  // The same bytes as a JSON document (the depth limit path), and when that
  // parses, as a tokenizer.json: again only LoadError may come out.
  nlohmann::json j;
  try {
    j = parse_json_limited(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz-json", 16);
  } catch (const LoadError&) {
    return 0;
  }
  try {
    const Tokenizer tk = Tokenizer::from_json(j, "fuzz-json");
    const auto ids = tk.encode("Hello world, it's 2024!\n\n  <s>x");
    (void)tk.decode(ids);
  } catch (const LoadError&) {
  } catch (const std::out_of_range&) {  // decode of an id the vocabulary lacks
  }
  return 0;
}
