#include "tokenizer.h"

#include <algorithm>
#include <climits>

#include <nlohmann/json.hpp>

#include "errors.h"
#include "json_util.h"

namespace qdec::runtime {

namespace {

using json = nlohmann::json;
using K = LoadError::Kind;

// ---------------------------------------------------------------- unicode ---

struct CodePoint {
  uint32_t cp;
  size_t begin, end;  // byte range in the text
};

// Lenient UTF-8 decoding: an invalid byte becomes a one-byte unit U+FFFD so
// that every input byte still lands in exactly one piece.
std::vector<CodePoint> decode_utf8(std::string_view s) {
  std::vector<CodePoint> out;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned c = p[i];
    int len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = len > 0 && i + len <= s.size();
    for (int j = 1; ok && j < len; ++j) {
      if ((p[i + j] & 0xC0) != 0x80) ok = false;
      else cp = (cp << 6) | (p[i + j] & 0x3F);
    }
    if (!ok) {
      out.push_back({0xFFFD, i, i + 1});
      ++i;
    } else {
      out.push_back({cp, i, i + len});
      i += len;
    }
  }
  return out;
}

std::string encode_utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) s += static_cast<char>(cp);
  else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

bool in(uint32_t c, uint32_t lo, uint32_t hi) { return c >= lo && c <= hi; }

bool is_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         in(c, 0x2000, 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

bool is_number(uint32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  return c == 0xB2 || c == 0xB3 || c == 0xB9 || in(c, 0xBC, 0xBE) || in(c, 0x0660, 0x0669) ||
         in(c, 0x06F0, 0x06F9) || in(c, 0x0966, 0x096F) || c == 0x2070 || in(c, 0x2074, 0x2079) ||
         in(c, 0x2080, 0x2089) || in(c, 0x2150, 0x2189) || in(c, 0x2460, 0x249B) ||
         in(c, 0xFF10, 0xFF19);
}

// Approximates "neither \p{L} nor \p{N} nor \s" outside ASCII: Latin-1
// punctuation and symbols, combining marks, general punctuation, currency,
// arrows/math/technical symbols, box drawing to dingbats, CJK punctuation,
// full-width punctuation, emoji.
bool is_other_nonascii(uint32_t c) {
  if (in(c, 0x80, 0x9F)) return c != 0x85;  // C1 controls
  if (in(c, 0xA1, 0xBF)) return !(c == 0xAA || c == 0xB5 || c == 0xBA || is_number(c));
  return c == 0xD7 || c == 0xF7 || in(c, 0x0300, 0x036F) || in(c, 0x2010, 0x2027) ||
         in(c, 0x2030, 0x205E) || in(c, 0x20A0, 0x20FF) || in(c, 0x2100, 0x214F) ||
         in(c, 0x2190, 0x23FF) || in(c, 0x2500, 0x27BF) || in(c, 0x2900, 0x2BFF) ||
         in(c, 0x3001, 0x3004) || in(c, 0x3008, 0x303F) || in(c, 0xFE30, 0xFE4F) ||
         in(c, 0xFF01, 0xFF0F) || in(c, 0xFF1A, 0xFF20) || in(c, 0xFF3B, 0xFF40) ||
         in(c, 0xFF5B, 0xFF65) || in(c, 0x1F000, 0x1FAFF) || c == 0xFFFD;
}

bool is_letter(uint32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  return !is_space(c) && !is_number(c) && !is_other_nonascii(c);
}

bool is_other(uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }
bool is_newline(uint32_t c) { return c == '\r' || c == '\n'; }

uint32_t lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// Length (in code points) of a contraction 's 't 're 've 'm 'll 'd at i, or 0.
size_t contraction(const std::vector<CodePoint>& t, size_t i, bool ci) {
  if (t[i].cp != '\'' || i + 1 >= t.size()) return 0;
  auto at = [&](size_t j) -> uint32_t {
    if (j >= t.size()) return 0;
    return ci ? lower(t[j].cp) : t[j].cp;
  };
  const uint32_t a = at(i + 1), b = at(i + 2);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  return 0;
}

// End of the whitespace run starting at i.
size_t space_run(const std::vector<CodePoint>& t, size_t i) {
  while (i < t.size() && is_space(t[i].cp)) ++i;
  return i;
}

// `\s+(?!\S)|\s+` at a whitespace code point i: the run, minus its last
// character when a non-space follows and the run is longer than one.
size_t trailing_space_rule(const std::vector<CodePoint>& t, size_t i) {
  const size_t j = space_run(t, i);
  if (j == t.size() || j - i == 1) return j;
  return j - 1;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t match_gpt2(const std::vector<CodePoint>& t, size_t i) {
  if (size_t n = contraction(t, i, false)) return i + n;
  const uint32_t c = t[i].cp;
  const bool sp = c == ' ' && i + 1 < t.size();
  const uint32_t d = sp ? t[i + 1].cp : c;
  const size_t s = sp ? i + 1 : i;  // first code point after the optional space
  auto run = [&](bool (*cls)(uint32_t)) {
    size_t j = s;
    while (j < t.size() && cls(t[j].cp)) ++j;
    return j;
  };
  if (is_letter(d) && (sp || is_letter(c))) return run(is_letter);
  if (is_number(d) && (sp || is_number(c))) return run(is_number);
  if (is_other(d) && (sp || is_other(c))) return run(is_other);
  if (is_space(c)) return trailing_space_rule(t, i);
  return i + 1;  // unreachable: every code point is L, N, \s or other
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
size_t match_llama3(const std::vector<CodePoint>& t, size_t i) {
  if (size_t n = contraction(t, i, true)) return i + n;
  const uint32_t c = t[i].cp;
  const size_t n = t.size();
  // [^\r\n\p{L}\p{N}]?\p{L}+
  {
    size_t s = i;
    if (!is_newline(c) && !is_letter(c) && !is_number(c) && i + 1 < n && is_letter(t[i + 1].cp)) s = i + 1;
    if (is_letter(t[s].cp)) {
      while (s < n && is_letter(t[s].cp)) ++s;
      return s;
    }
  }
  if (is_number(c)) {
    size_t j = i;
    while (j < n && j - i < 3 && is_number(t[j].cp)) ++j;
    return j;
  }
  // " ?[^\s\p{L}\p{N}]+[\r\n]*"
  {
    const size_t s = (c == ' ' && i + 1 < n && is_other(t[i + 1].cp)) ? i + 1 : i;
    if (is_other(t[s].cp)) {
      size_t j = s;
      while (j < n && is_other(t[j].cp)) ++j;
      while (j < n && is_newline(t[j].cp)) ++j;
      return j;
    }
  }
  if (is_space(c)) {
    // \s*[\r\n]+ : up to the last newline of the whitespace run
    const size_t j = space_run(t, i);
    for (size_t p = j; p > i; --p)
      if (is_newline(t[p - 1].cp)) return p;
    return trailing_space_rule(t, i);
  }
  return i + 1;
}

const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char* kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

[[noreturn]] void bad(const std::string& file, const std::string& what) {
  throw LoadError(K::BadConfig, file, "", what);
}

}  // namespace

const std::vector<std::string>& byte_to_unicode() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      t[b] = encode_utf8(printable ? b : next++);
    }
    return t;
  }();
  return table;
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  return from_json(parse_json_limited(read_text_file(path), path, 64), path);
}

Tokenizer Tokenizer::from_json(const json& j, const std::string& file) {
  // Fields of an unexpected JSON type (a number where a string belongs, ...)
  // surface as nlohmann exceptions; report them as this file's error.
  try {
    return from_json_unchecked(j, file);
  } catch (const json::exception& e) {
    throw LoadError(K::BadConfig, file, "", std::string("unexpected JSON structure: ") + e.what());
  }
}

Tokenizer Tokenizer::from_json_unchecked(const json& j, const std::string& file) {
  Tokenizer tk;
  tk.file_ = file;
  if (!j.is_object()) bad(file, "tokenizer.json must be a JSON object");
  const json model = j.value("model", json());
  if (!model.is_object() || model.value("type", std::string()) != "BPE")
    bad(file, "model.type must be \"BPE\" (only byte-level BPE tokenizers are supported)");
  if (model.value("byte_fallback", false))
    bad(file, "byte_fallback BPE (SentencePiece style) is not supported; only byte-level BPE");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() && model[key] != "")
      bad(file, std::string("model.") + key + " is not supported");
  tk.ignore_merges_ = model.value("ignore_merges", false);

  const json& vocab = model.value("vocab", json());
  if (!vocab.is_object() || vocab.empty()) bad(file, "model.vocab must be a non-empty object");
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > INT32_MAX)
      bad(file, "model.vocab[\"" + it.key() + "\"] must be a non-negative integer id");
    max_id = std::max(max_id, it->get<int64_t>());
  }
  std::vector<std::pair<std::string, int64_t>> entries;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) entries.emplace_back(it.key(), it->get<int64_t>());
  const json added = j.value("added_tokens", json::array());
  if (!added.is_array()) bad(file, "added_tokens must be a list");
  for (const auto& a : added) {
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
        a["id"].get<int64_t>() > INT32_MAX || !a.contains("content") || !a["content"].is_string() ||
        a["content"].get<std::string>().empty())
      bad(file, "added_tokens entries need an integer id and non-empty content: " + a.dump());
    max_id = std::max(max_id, a["id"].get<int64_t>());
  }
  // Ids index a table: they must be (nearly) dense, or one hostile id would
  // make it huge.
  const int64_t n_tokens = static_cast<int64_t>(vocab.size() + added.size());
  if (max_id >= 2 * n_tokens + 1024)
    bad(file, "token ids are not dense: the largest is " + std::to_string(max_id) + " for " +
                  std::to_string(n_tokens) + " tokens");
  tk.id_to_token_.assign(max_id + 1, std::string());
  tk.special_.assign(max_id + 1, false);
  for (auto& [tok, id] : entries) {
    tk.vocab_[tok] = id;
    tk.id_to_token_[id] = tok;
  }
  for (const auto& a : added) {
    const auto id = a["id"].get<int64_t>();
    const auto content = a["content"].get<std::string>();
    const bool special = a.value("special", false);
    tk.added_.push_back({content, id, special});
    tk.special_[id] = special;
    if (tk.id_to_token_[id].empty()) tk.id_to_token_[id] = content;
    tk.vocab_.emplace(content, id);
  }
  // Longest first, so the scan below prefers "<|im_start|>" over a prefix.
  std::stable_sort(tk.added_.begin(), tk.added_.end(),
                   [](const Added& a, const Added& b) { return a.content.size() > b.content.size(); });

  const json merges = model.value("merges", json::array());
  if (!merges.is_array()) bad(file, "model.merges must be a list");
  int rank = 0;
  for (const auto& m : merges) {
    std::string a, b;
    if (m.is_string()) {
      const auto s = m.get<std::string>();
      const auto sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        bad(file, "merge \"" + s + "\" must be two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      bad(file, "merge entries must be \"a b\" strings or [a, b] pairs, got " + m.dump());
    }
    tk.merge_rank_.emplace(a + '\0' + b, rank++);
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = tk.vocab_.find(model["unk_token"].get<std::string>());
    if (it != tk.vocab_.end()) tk.unk_id_ = it->second;
  }

  const json norm = j.value("normalizer", json());
  if (!norm.is_null()) {
    const auto type = norm.value("type", std::string());
    if (type != "NFC")  // NFC leaves ASCII unchanged; anything else would change the text
      bad(file, "normalizer \"" + type + "\" is not supported (only none or NFC)");
  }

  // Pre-tokenizer: ByteLevel (with or without its GPT-2 split), Split with the
  // GPT-2 or Llama-3 regex, Digits; possibly inside a Sequence.
  bool saw_byte_level = false;
  std::vector<json> pre;
  const json p = j.value("pre_tokenizer", json());
  if (p.is_object() && p.value("type", std::string()) == "Sequence" && p.contains("pretokenizers") &&
      p["pretokenizers"].is_array())
    for (const auto& e : p["pretokenizers"]) pre.push_back(e);
  else if (!p.is_null())
    pre.push_back(p);
  for (const auto& e : pre) {
    const auto type = e.is_object() ? e.value("type", std::string()) : std::string();
    if (type == "ByteLevel") {
      saw_byte_level = true;
      tk.add_prefix_space_ = e.value("add_prefix_space", false);
      if (e.value("use_regex", true)) tk.stages_.push_back({Stage::Regex, SplitRegex::Gpt2});
    } else if (type == "Split") {
      const json pat = e.value("pattern", json());
      const std::string regex = pat.is_object() ? pat.value("Regex", std::string()) : std::string();
      if (e.value("behavior", std::string()) != "Isolated" || e.value("invert", false))
        bad(file, "Split pre-tokenizer must have behavior Isolated and invert false");
      if (regex == kGpt2Pattern) tk.stages_.push_back({Stage::Regex, SplitRegex::Gpt2});
      else if (regex == kLlama3Pattern) tk.stages_.push_back({Stage::Regex, SplitRegex::Llama3});
      else bad(file, "Split pre-tokenizer regex is neither the GPT-2 nor the Llama-3 pattern: " + regex);
    } else if (type == "Digits") {
      tk.stages_.push_back({Stage::Digits, SplitRegex::None, e.value("individual_digits", false)});
    } else {
      bad(file, "pre-tokenizer \"" + type + "\" is not supported (ByteLevel, Split, Digits)");
    }
  }
  if (!saw_byte_level) bad(file, "no ByteLevel pre-tokenizer: only byte-level BPE is supported");

  // Post-processor: the special tokens TemplateProcessing puts around a
  // single sequence ($A). ByteLevel post-processing changes offsets only.
  std::vector<json> post;
  const json pp = j.value("post_processor", json());
  if (pp.is_object() && pp.value("type", std::string()) == "Sequence" && pp.contains("processors"))
    for (const auto& e : pp["processors"]) post.push_back(e);
  else if (!pp.is_null())
    post.push_back(pp);
  for (const auto& e : post) {
    const auto type = e.is_object() ? e.value("type", std::string()) : std::string();
    if (type == "ByteLevel") continue;
    if (type != "TemplateProcessing") bad(file, "post-processor \"" + type + "\" is not supported");
    bool after = false;
    const json specials = e.value("special_tokens", json::object());
    for (const auto& piece : e.value("single", json::array())) {
      if (piece.contains("Sequence")) {
        after = true;
        continue;
      }
      const std::string id = piece.contains("SpecialToken") ? piece["SpecialToken"].value("id", std::string()) : "";
      if (!specials.contains(id) || !specials[id].contains("ids") || !specials[id]["ids"].is_array())
        bad(file, "TemplateProcessing special token \"" + id + "\" has no ids");
      for (const auto& v : specials[id]["ids"]) {
        if (!v.is_number_integer()) bad(file, "TemplateProcessing ids must be integers");
        (after ? tk.suffix_ids_ : tk.prefix_ids_).push_back(v.get<int64_t>());
      }
    }
  }
  return tk;
}

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::is_special(int64_t id) const {
  return id >= 0 && id < static_cast<int64_t>(special_.size()) && special_[id];
}

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string> pieces;
  if (text.empty()) return pieces;
  std::string first(text);
  if (add_prefix_space_ && first[0] != ' ') first.insert(first.begin(), ' ');
  pieces.push_back(std::move(first));
  for (const auto& stage : stages_) {
    std::vector<std::string> next;
    for (const auto& piece : pieces) {
      const auto cps = decode_utf8(piece);
      size_t i = 0;
      while (i < cps.size()) {
        size_t j;
        if (stage.kind == Stage::Digits) {
          if (is_number(cps[i].cp)) {
            j = i + 1;
            if (!stage.individual_digits)
              while (j < cps.size() && is_number(cps[j].cp)) ++j;
          } else {
            j = i;
            while (j < cps.size() && !is_number(cps[j].cp)) ++j;
          }
        } else {
          j = stage.regex == SplitRegex::Llama3 ? match_llama3(cps, i) : match_gpt2(cps, i);
        }
        const size_t b = cps[i].begin, e = cps[j - 1].end;
        next.emplace_back(piece.substr(b, e - b));
        i = j;
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

int64_t Tokenizer::symbol_id(const std::string& sym) const {
  auto it = vocab_.find(sym);
  if (it != vocab_.end()) return it->second;
  if (unk_id_) return *unk_id_;
  throw LoadError(K::BadConfig, file_, "", "symbol \"" + sym + "\" is not in the vocabulary and there is no unk_token");
}

void Tokenizer::bpe(const std::string& word, std::vector<int64_t>& out) const {
  if (auto it = cache_.find(word); it != cache_.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  std::vector<int64_t> ids;
  if (ignore_merges_ && vocab_.count(word)) {
    ids.push_back(vocab_.at(word));
  } else {
    // Symbols start as the word's code points (each is one mapped byte).
    std::vector<std::string> sym;
    for (const auto& cp : decode_utf8(word)) sym.push_back(word.substr(cp.begin, cp.end - cp.begin));
    while (sym.size() > 1) {
      int best = INT_MAX;
      size_t at = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = merge_rank_.find(sym[i] + '\0' + sym[i + 1]);
        if (it != merge_rank_.end() && it->second < best) best = it->second, at = i;
      }
      if (best == INT_MAX) break;
      // Merge every non-overlapping occurrence of the best pair, left to right.
      const std::string a = sym[at], b = sym[at + 1];
      std::vector<std::string> merged;
      for (size_t i = 0; i < sym.size();) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
          merged.push_back(a + b);
          i += 2;
        } else {
          merged.push_back(sym[i++]);
        }
      }
      sym = std::move(merged);
    }
    for (const auto& s : sym) ids.push_back(symbol_id(s));
  }
  if (cache_.size() < 100000) cache_.emplace(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
}

std::vector<int64_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int64_t> ids;
  if (add_special_tokens) ids = prefix_ids_;
  const auto& b2u = byte_to_unicode();
  auto encode_segment = [&](std::string_view seg) {
    for (const auto& piece : pre_tokenize(seg)) {
      std::string mapped;
      for (unsigned char c : piece) mapped += b2u[c];
      bpe(mapped, ids);
    }
  };
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const Added* hit = nullptr;
    for (const auto& a : added_)
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    encode_segment(text.substr(start, i - start));
    ids.push_back(hit->id);
    i += hit->content.size();
    start = i;
  }
  encode_segment(text.substr(start));
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

std::string Tokenizer::token_bytes(int64_t id) const {
  if (id < 0 || id >= vocab_size())
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary of " +
                            std::to_string(vocab_size()));
  const std::string& tok = id_to_token_[id];
  for (const auto& a : added_)
    if (a.id == id) return tok;  // added tokens are stored as plain text
  static const std::unordered_map<std::string, unsigned char> inverse = [] {
    std::unordered_map<std::string, unsigned char> m;
    const auto& t = byte_to_unicode();
    for (int b = 0; b < 256; ++b) m.emplace(t[b], static_cast<unsigned char>(b));
    return m;
  }();
  std::string out;
  for (const auto& cp : decode_utf8(tok)) {
    auto it = inverse.find(tok.substr(cp.begin, cp.end - cp.begin));
    if (it != inverse.end()) out += static_cast<char>(it->second);
    else out += tok.substr(cp.begin, cp.end - cp.begin);  // not a byte symbol: keep as text
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  std::string out;
  for (auto id : ids) {
    if (skip_special_tokens && is_special(id)) continue;
    out += token_bytes(id);
  }
  return out;
}

}  // namespace qdec::runtime
