// The safetensors container, parsed and validated without libtorch.
//
// Layout: an 8-byte little-endian header length n, n bytes of UTF-8 JSON (an
// object: tensor name -> {"dtype", "shape", "data_offsets": [begin, end]},
// plus an optional "__metadata__" object of string -> string), then the data
// section. Offsets are relative to the data section. As in the format's
// specification, tensors may not overlap and must cover the data section with
// no holes, so every byte of a valid file is accounted for.
//
// parse_safetensors() checks everything a consumer could trip over before any
// tensor is touched: it is the fuzz target's entry point
// (tests/fuzz/fuzz_safetensors_header.cpp) and never reads outside the bytes
// it is given.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "errors.h"

namespace qdec::runtime {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2 };

// "F32" -> DType::F32; std::nullopt for anything else.
std::optional<DType> dtype_from_string(std::string_view s);
const char* dtype_name(DType d);
size_t dtype_itemsize(DType d);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range in the data section
  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;                 // ordered by begin offset
  std::map<std::string, std::string> metadata;     // "__metadata__"
  uint64_t data_offset = 0;                        // 8 + header length
  uint64_t data_size = 0;                          // file size - data_offset

  // nullptr when absent.
  const TensorInfo* find(std::string_view name) const;
};

struct ParseLimits {
  uint64_t max_header_bytes = 100ull << 20;  // as the reference implementation
  int max_depth = 8;                         // a valid header needs 3
};

// Validates the whole file image bytes[0, size) and returns its header.
// Throws LoadError naming `file` (used only in messages) on any problem.
SafetensorsHeader parse_safetensors(const uint8_t* bytes, size_t size, const std::string& file,
                                    const ParseLimits& limits = {});

// True when s is well-formed UTF-8 (no overlongs, no surrogates, <= U+10FFFF).
bool is_valid_utf8(std::string_view s);

}  // namespace qdec::runtime
