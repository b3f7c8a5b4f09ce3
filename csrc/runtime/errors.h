// Errors of the qdec runtime's loaders (safetensors, config.json,
// tokenizer.json). Torch-free, so the header parser and its fuzz target build
// without libtorch.
#pragma once

#include <stdexcept>
#include <string>

namespace qdec::runtime {

// A file that cannot be used, with what was wrong. what() reads
//   "<file>: tensor '<tensor>': <detail>"   (or without the tensor part)
// so a user sees which file and which entry to look at; the parts stay
// available separately for programs and tests.
class LoadError : public std::runtime_error {
 public:
  enum class Kind {
    Io,                 // cannot open / stat / map the file
    Truncated,          // shorter than the 8-byte length prefix
    HeaderTooLarge,     // header length beyond the file or the sanity limit
    BadUtf8,            // header bytes are not UTF-8
    BadJson,            // header or config is not parseable JSON
    TooDeep,            // JSON nesting beyond the limit
    BadHeader,          // JSON is valid but not a safetensors header
    BadDtype,           // unknown dtype string
    BadShape,           // negative / non-integer dims, numel overflow
    OffsetsOutOfRange,  // data_offsets outside the data section
    Overlap,            // two tensors share bytes
    Gap,                // bytes of the data section no tensor covers
    SizeMismatch,       // end - begin != numel * itemsize
    MissingTensor,      // a tensor the model needs is absent
    WrongDtype,         // present, but not the dtype the model needs
    WrongShape,         // present, but not the shape the model needs
    BadConfig,          // config.json / tokenizer.json content unusable
  };

  LoadError(Kind kind, std::string file, std::string tensor, const std::string& detail)
      : std::runtime_error(compose(file, tensor, detail)),
        kind_(kind),
        file_(std::move(file)),
        tensor_(std::move(tensor)),
        detail_(detail) {}

  Kind kind() const noexcept { return kind_; }
  const std::string& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  const std::string& detail() const noexcept { return detail_; }

 private:
  static std::string compose(const std::string& file, const std::string& tensor,
                             const std::string& detail) {
    std::string s = file.empty() ? std::string("<memory>") : file;
    if (!tensor.empty()) s += ": tensor '" + tensor + "'";
    return s + ": " + detail;
  }

  Kind kind_;
  std::string file_, tensor_, detail_;
};

const char* kind_name(LoadError::Kind kind);

}  // namespace qdec::runtime
