// JSON parsing with the runtime's safety rules, shared by the safetensors
// header, config.json and tokenizer.json readers.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

#include "errors.h"

namespace qdec::runtime {

// Parses `text` as one JSON value. Throws LoadError naming `file`:
// BadUtf8 for bytes that are not UTF-8, TooDeep when arrays/objects nest
// deeper than max_depth (checked while parsing, before any deep structure is
// built), BadJson for syntax errors. With reject_duplicate_top_keys, a key
// repeated in the top-level object is an error (BadHeader) instead of nlohmann's
// silent last-one-wins.
nlohmann::json parse_json_limited(std::string_view text, const std::string& file, int max_depth,
                                  bool reject_duplicate_top_keys = false);

// Reads a whole (small) file into a string; LoadError(Io) on failure.
std::string read_text_file(const std::string& path);

// Python's repr() of a JSON scalar (None, True, 'text', 3), so messages about
// config values read exactly as the Python readers', which format them with !r.
std::string py_repr(const nlohmann::json& v);

}  // namespace qdec::runtime
