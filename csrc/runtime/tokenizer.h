// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (GPT-2,
// SmolLM2, Llama-3 style), without the tokenizers library.
//
// encode(): added/special tokens are split out first (leftmost, longest);
// each remaining segment goes through the pre-tokenizer (the GPT-2 or
// Llama-3 split regex, hand-written as a scanner; optional Digits split), the
// GPT-2 byte-to-unicode mapping, and BPE by merge rank; the post-processor's
// template adds e.g. a BOS token.
//
// Fidelity: exact for ASCII text. For other text, \p{L}/\p{N}/\s are
// approximated: common Unicode whitespace, digits and punctuation blocks are
// classified, every other non-ASCII code point counts as a letter.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace qdec::runtime {

class Tokenizer {
 public:
  // Throws LoadError (Io, BadJson, BadConfig) naming the file.
  static Tokenizer from_file(const std::string& path);
  static Tokenizer from_json(const nlohmann::json& j, const std::string& file);

  std::vector<int64_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // Raw bytes of the tokens concatenated (may end inside a UTF-8 sequence).
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const;
  std::string token_bytes(int64_t id) const;
  bool is_special(int64_t id) const;
  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }
  std::optional<int64_t> token_to_id(const std::string& token) const;

  // Pieces of the pre-tokenizer for one segment (exposed for tests).
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  enum class SplitRegex { None, Gpt2, Llama3 };

 private:
  struct Added {
    std::string content;
    int64_t id;
    bool special;
  };
  struct Stage {
    enum Kind { Regex, Digits } kind;
    SplitRegex regex = SplitRegex::None;
    bool individual_digits = false;
  };

  static Tokenizer from_json_unchecked(const nlohmann::json& j, const std::string& file);
  void bpe(const std::string& word, std::vector<int64_t>& out) const;
  int64_t symbol_id(const std::string& sym) const;

  std::string file_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;  // byte-level strings ("Ġthe")
  std::unordered_map<std::string, int> merge_rank_;  // "a\x00b" -> rank
  std::vector<Added> added_;
  std::vector<bool> special_;
  std::vector<Stage> stages_;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
  std::optional<int64_t> unk_id_;
  std::vector<int64_t> prefix_ids_, suffix_ids_;  // from the post-processor
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

// GPT-2's reversible byte -> printable code point mapping, as UTF-8 strings.
const std::vector<std::string>& byte_to_unicode();

}  // namespace qdec::runtime
