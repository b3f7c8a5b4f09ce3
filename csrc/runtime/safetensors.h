// Safetensors files as at::Tensors: the validated header of
// safetensors_header.h over a memory mapping of the file, zero-copy views
// that keep the mapping alive, checked access by name, and a writer.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "safetensors_header.h"

namespace qdec::runtime {

// A read-only file mapped into memory (MAP_PRIVATE: pages are shared with the
// page cache until written; a write lands in a private copy, never the file).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
  uint8_t* mutable_data() { return static_cast<uint8_t*>(addr_); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* addr_ = nullptr;
  size_t size_ = 0;
};

at::ScalarType to_scalar_type(DType d);
std::optional<DType> from_scalar_type(at::ScalarType t);

class SafetensorsFile {
 public:
  // Maps and validates the file; throws LoadError.
  explicit SafetensorsFile(const std::string& path, const ParseLimits& limits = {});

  const std::string& path() const { return map_->path(); }
  const SafetensorsHeader& header() const { return header_; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  std::vector<std::string> names() const;
  bool contains(std::string_view name) const;
  // LoadError(MissingTensor) when absent.
  const TensorInfo& info(std::string_view name) const;

  // A CPU tensor over the mapped bytes (no copy); the tensor's storage holds
  // the mapping alive after this object is gone. Misaligned data (possible
  // only in files from unusual writers) is copied instead.
  at::Tensor view(std::string_view name) const;
  // An owning copy in ordinary memory.
  at::Tensor copy(std::string_view name) const;
  // view(), after checking dtype and/or shape; `why` explains the expectation
  // in the error ("[N, ceil(K/32)*bits] with K=576, bits=3").
  at::Tensor get(std::string_view name, std::optional<at::ScalarType> dtype,
                 std::optional<std::vector<int64_t>> shape = std::nullopt,
                 const std::string& why = "") const;

  size_t file_bytes() const { return map_->size(); }

 private:
  std::shared_ptr<MappedFile> map_;
  SafetensorsHeader header_;
  std::unordered_map<std::string, size_t> index_;
};

// Writes CPU tensors (copied to contiguous little-endian bytes) and string
// metadata as a safetensors file, header padded to 8 bytes as the reference
// writer does. Names must be unique.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// The home of a residual store: pinned host memory when the model computes
// on CUDA (the CUDA kernel reads it zero-copy over PCIe), otherwise
// an ordinary private copy (not the file mapping).
at::Tensor place_residual(const at::Tensor& residual, const c10::Device& compute_device);

std::string shape_str(at::IntArrayRef shape);

}  // namespace qdec::runtime
