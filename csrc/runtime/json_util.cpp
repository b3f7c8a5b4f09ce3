#include "json_util.h"

#include <fstream>
#include <sstream>
#include <unordered_set>

#include "safetensors_header.h"

namespace qdec::runtime {

const char* kind_name(LoadError::Kind kind) {
  using K = LoadError::Kind;
  switch (kind) {
    case K::Io: return "Io";
    case K::Truncated: return "Truncated";
    case K::HeaderTooLarge: return "HeaderTooLarge";
    case K::BadUtf8: return "BadUtf8";
    case K::BadJson: return "BadJson";
    case K::TooDeep: return "TooDeep";
    case K::BadHeader: return "BadHeader";
    case K::BadDtype: return "BadDtype";
    case K::BadShape: return "BadShape";
    case K::OffsetsOutOfRange: return "OffsetsOutOfRange";
    case K::Overlap: return "Overlap";
    case K::Gap: return "Gap";
    case K::SizeMismatch: return "SizeMismatch";
    case K::MissingTensor: return "MissingTensor";
    case K::WrongDtype: return "WrongDtype";
    case K::WrongShape: return "WrongShape";
    case K::BadConfig: return "BadConfig";
  }
  return "?";
}

namespace {

// Thrown from inside the parser callback and turned into a LoadError outside,
// where the file name is known.
struct DepthExceeded {};
struct DuplicateKey {
  std::string key;
};

}  // namespace

nlohmann::json parse_json_limited(std::string_view text, const std::string& file, int max_depth,
                                  bool reject_duplicate_top_keys) {
  using json = nlohmann::json;
  if (!is_valid_utf8(text))
    throw LoadError(LoadError::Kind::BadUtf8, file, "", "JSON text is not valid UTF-8");
  std::unordered_set<std::string> top_keys;
  // The callback sees every object/array start with its depth (0 = the root)
  // before the container is built, so a hostile "[[[[...]]]]" is rejected at
  // the first level past the limit rather than after building it.
  json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= max_depth)
      throw DepthExceeded{};
    if (reject_duplicate_top_keys && event == json::parse_event_t::key && depth == 1) {
      auto key = parsed.get<std::string>();
      if (!top_keys.insert(key).second) throw DuplicateKey{std::move(key)};
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const DepthExceeded&) {
    throw LoadError(LoadError::Kind::TooDeep, file, "",
                    "JSON nests deeper than " + std::to_string(max_depth) + " levels");
  } catch (const DuplicateKey& d) {
    throw LoadError(LoadError::Kind::BadHeader, file, d.key, "key appears twice in the header");
  } catch (const json::exception& e) {
    throw LoadError(LoadError::Kind::BadJson, file, "", std::string("invalid JSON: ") + e.what());
  }
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw LoadError(LoadError::Kind::Io, path, "", "cannot open file");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw LoadError(LoadError::Kind::Io, path, "", "read error");
  return ss.str();
}

std::string py_repr(const nlohmann::json& v) {
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_string()) return "'" + v.get<std::string>() + "'";
  return v.dump();
}

}  // namespace qdec::runtime
