// The byte-level BPE tokenizer on a small hand-made tokenizer.json. Expected
// pre-tokenizer splits were produced by Hugging Face `tokenizers`
// (pre_tokenizers.Split with the GPT-2 / Llama-3 regex, behavior "isolated");
// the SmolLM2 tokenizer itself is compared with transformers in
// tests/python/test_cpp_parity.py.
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "catch.h"
#include "runtime/errors.h"
#include "runtime/tokenizer.h"

using namespace qdec::runtime;
using json = nlohmann::json;

namespace {

const char* kGpt2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char* kLlama3 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Vocabulary: the 256 byte symbols (id = byte value), then merges.
json tokenizer_json(json pre_tokenizer, json post_processor = nullptr) {
  json vocab = json::object();
  const auto& b2u = byte_to_unicode();
  for (int b = 0; b < 256; ++b) vocab[b2u[b]] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {"\xc4\xa0", "t"}, {"\xc4\xa0t", "he"}, {"he", "ll"}, {"hell", "o"}, {"\xc4\xa0", "w"}};
  json m = json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    m.push_back({a, b});
    vocab[a + b] = id++;
  }
  // ids: he 256, ll 257, Ġt 258, Ġthe 259, hell 260, hello 261, Ġw 262
  return {{"version", "1.0"},
          {"added_tokens",
           {{{"id", 263}, {"content", "<|eot|>"}, {"special", true}},
            {{"id", 264}, {"content", "<s>"}, {"special", true}},
            {{"id", 265}, {"content", "<|eot|>x"}, {"special", false}}}},
          {"normalizer", nullptr},
          {"pre_tokenizer", pre_tokenizer},
          {"post_processor", post_processor},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", m}, {"byte_fallback", false}}}};
}

json byte_level(bool use_regex = true) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

json split(const char* regex) {
  return {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
}

using Pieces = std::vector<std::string>;

}  // namespace

TEST_CASE("GPT-2 pre-tokenizer splits like tokenizers' regex", "[tokenizer]") {
  const auto tk = Tokenizer::from_json(tokenizer_json(byte_level()), "t.json");
  CHECK(tk.pre_tokenize("Hello world's  test\n\n  x") == Pieces{"Hello", " world", "'s", " ", " test", "\n\n ", " x"});
  CHECK(tk.pre_tokenize("I'M  123456 ab\r\n\n x") == Pieces{"I", "'", "M", " ", " 123456", " ab", "\r\n\n", " x"});
  CHECK(tk.pre_tokenize("foo!!\n\nbar  \n  baz") == Pieces{"foo", "!!", "\n", "\n", "bar", "  \n ", " baz"});
  CHECK(tk.pre_tokenize("x=1+22;  'll 'LL") == Pieces{"x", "=", "1", "+", "22", ";", " ", " '", "ll", " '", "LL"});
  CHECK(tk.pre_tokenize("tab\tsep \t end  ") == Pieces{"tab", "\t", "sep", " \t", " end", "  "});
  CHECK(tk.pre_tokenize("").empty());
  CHECK(tk.pre_tokenize(" ") == Pieces{" "});
  // the same through an explicit Split + ByteLevel(use_regex=false) sequence
  const auto seq = Tokenizer::from_json(
      tokenizer_json({{"type", "Sequence"}, {"pretokenizers", {split(kGpt2), byte_level(false)}}}), "t.json");
  CHECK(seq.pre_tokenize("Hello world's  test\n\n  x") == tk.pre_tokenize("Hello world's  test\n\n  x"));
}

TEST_CASE("Llama-3 pre-tokenizer and Digits", "[tokenizer]") {
  const auto tk = Tokenizer::from_json(
      tokenizer_json({{"type", "Sequence"}, {"pretokenizers", {split(kLlama3), byte_level(false)}}}), "t.json");
  CHECK(tk.pre_tokenize("Hello world's  test\n\n  x") == Pieces{"Hello", " world", "'s", " ", " test", "\n\n", " ", " x"});
  CHECK(tk.pre_tokenize("I'M  123456 ab\r\n\n x") == Pieces{"I", "'M", " ", " ", "123", "456", " ab", "\r\n\n", " x"});
  CHECK(tk.pre_tokenize("foo!!\n\nbar  \n  baz") == Pieces{"foo", "!!\n\n", "bar", "  \n", " ", " baz"});
  CHECK(tk.pre_tokenize("tab\tsep \t end  ") == Pieces{"tab", "\tsep", " \t", " end", "  "});

  const auto digits = Tokenizer::from_json(
      tokenizer_json({{"type", "Sequence"},
                      {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level(false)}}}),
      "t.json");
  CHECK(digits.pre_tokenize("ab12 3x") == Pieces{"ab", "1", "2", " ", "3", "x"});
}

TEST_CASE("BPE merges, added tokens, template, decode", "[tokenizer]") {
  const json post = {{"type", "TemplateProcessing"},
                     {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                     {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {264}}, {"tokens", {"<s>"}}}}}}};
  const auto tk = Tokenizer::from_json(tokenizer_json(byte_level(), post), "t.json");
  // "hello" -> h e l l o -> he l l o -> he ll o -> hell o -> hello
  CHECK(tk.encode("hello", false) == std::vector<int64_t>{261});
  CHECK(tk.encode("hello the", false) == std::vector<int64_t>{261, 259});
  CHECK(tk.encode("hello the") == std::vector<int64_t>{264, 261, 259});  // BOS from the template
  CHECK(tk.encode(" world", false) == std::vector<int64_t>{262, 'o', 'r', 'l', 'd'});
  // added tokens split first, longest match wins
  CHECK(tk.encode("<|eot|>hello", false) == std::vector<int64_t>{263, 261});
  CHECK(tk.encode("a<|eot|>xy", false) == std::vector<int64_t>{'a', 265, 'y'});
  CHECK(tk.is_special(263));
  CHECK_FALSE(tk.is_special(265));
  CHECK_FALSE(tk.is_special(261));

  // every byte string round-trips, invalid UTF-8 and NUL included
  std::string bytes;
  for (int b = 0; b < 256; ++b) bytes += static_cast<char>(b);
  bytes += "hello the \xff\xfe end";
  CHECK(tk.decode(tk.encode(bytes, false)) == bytes);
  CHECK(tk.decode({264, 261, 263}, true) == "hello");
  CHECK(tk.decode({264, 261, 263}, false) == "<s>hello<|eot|>");
  CHECK_THROWS_AS(tk.token_bytes(9999), std::out_of_range);
}

TEST_CASE("unsupported or malformed tokenizer.json", "[tokenizer]") {
  auto fails = [](json j, const std::string& fragment) {
    try {
      Tokenizer::from_json(j, "tok.json");
      FAIL("no error; expected " << fragment);
    } catch (const LoadError& e) {
      INFO(e.what());
      CHECK(e.kind() == LoadError::Kind::BadConfig);
      CHECK(std::string(e.what()).find("tok.json: ") == 0);
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
    }
  };
  fails(json::array(), "must be a JSON object");
  {
    auto j = tokenizer_json(byte_level());
    j["model"]["type"] = "Unigram";
    fails(j, "model.type must be \"BPE\"");
  }
  {
    auto j = tokenizer_json(byte_level());
    j["model"]["byte_fallback"] = true;
    fails(j, "byte_fallback");
  }
  {
    auto j = tokenizer_json({{"type", "Metaspace"}});
    fails(j, "pre-tokenizer \"Metaspace\" is not supported");
  }
  {
    auto j = tokenizer_json({{"type", "Sequence"}, {"pretokenizers", {split("\\w+"), byte_level(false)}}});
    fails(j, "neither the GPT-2 nor the Llama-3 pattern");
  }
  {
    auto j = tokenizer_json(nullptr);
    fails(j, "no ByteLevel pre-tokenizer");
  }
  {
    auto j = tokenizer_json(byte_level());
    j["normalizer"] = {{"type", "Lowercase"}};
    fails(j, "normalizer \"Lowercase\"");
  }
  {
    auto j = tokenizer_json(byte_level());
    j["model"]["merges"].push_back(3);
    fails(j, "merge entries");
  }
  {
    auto j = tokenizer_json(byte_level());
    j["model"]["vocab"]["zzz"] = -4;
    fails(j, "model.vocab[\"zzz\"]");
  }
  {
    auto j = tokenizer_json(byte_level());
    j["added_tokens"].push_back({{"id", 300}});
    fails(j, "added_tokens entries");
  }
  {
    auto j = tokenizer_json(byte_level());
    j["model"]["type"] = 3;
    fails(j, "unexpected JSON structure");
  }
  {
    auto j = tokenizer_json(byte_level());
    j["added_tokens"].push_back({{"id", 2000000000}, {"content", "<big>"}});
    fails(j, "not dense");
  }
  CHECK_THROWS_AS(Tokenizer::from_file("/nonexistent/tokenizer.json"), LoadError);
}
