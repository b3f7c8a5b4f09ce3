#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

namespace qdec::runtime {

using K = LoadError::Kind;

MappedFile::MappedFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw LoadError(K::Io, path, "", std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw LoadError(K::Io, path, "", std::string("cannot stat: ") + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw LoadError(K::Io, path, "", "not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    addr_ = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (addr_ == MAP_FAILED) {
      const int err = errno;
      addr_ = nullptr;
      ::close(fd);
      throw LoadError(K::Io, path, "", std::string("cannot mmap: ") + std::strerror(err));
    }
  }
  ::close(fd);  // the mapping stays valid without the descriptor
}

MappedFile::~MappedFile() {
  if (addr_) ::munmap(addr_, size_);
}

at::ScalarType to_scalar_type(DType d) {
  switch (d) {
    case DType::F64: return at::kDouble;
    case DType::F32: return at::kFloat;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::I64: return at::kLong;
    case DType::I32: return at::kInt;
    case DType::I16: return at::kShort;
    case DType::I8: return at::kChar;
    case DType::U64: return at::kUInt64;
    case DType::U32: return at::kUInt32;
    case DType::U16: return at::kUInt16;
    case DType::U8: return at::kByte;
    case DType::BOOL: return at::kBool;
    case DType::F8_E4M3: return at::kFloat8_e4m3fn;
    case DType::F8_E5M2: return at::kFloat8_e5m2;
  }
  return at::kFloat;
}

std::optional<DType> from_scalar_type(at::ScalarType t) {
  for (DType d : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32,
                  DType::I16, DType::I8, DType::U64, DType::U32, DType::U16, DType::U8,
                  DType::BOOL, DType::F8_E4M3, DType::F8_E5M2})
    if (to_scalar_type(d) == t) return d;
  return std::nullopt;
}

std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::SafetensorsFile(const std::string& path, const ParseLimits& limits)
    : map_(std::make_shared<MappedFile>(path)),
      header_(parse_safetensors(map_->data(), map_->size(), path, limits)) {
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& t : header_.tensors) out.push_back(t.name);
  return out;
}

bool SafetensorsFile::contains(std::string_view name) const {
  return index_.count(std::string(name)) != 0;
}

const TensorInfo& SafetensorsFile::info(std::string_view name) const {
  auto it = index_.find(std::string(name));
  if (it == index_.end())
    throw LoadError(K::MissingTensor, path(), std::string(name), "not in this file");
  return header_.tensors[it->second];
}

at::Tensor SafetensorsFile::view(std::string_view name) const {
  const auto& t = info(name);
  const auto dtype = to_scalar_type(t.dtype);
  uint8_t* ptr = map_->mutable_data() + header_.data_offset + t.begin;
  if (t.nbytes() == 0 || reinterpret_cast<uintptr_t>(ptr) % dtype_itemsize(t.dtype) != 0)
    return copy(name);
  auto keep = map_;  // the deleter owns a reference: the mapping outlives the tensor
  return at::from_blob(
      ptr, t.shape, [keep](void*) mutable { keep.reset(); }, at::TensorOptions().dtype(dtype));
}

at::Tensor SafetensorsFile::copy(std::string_view name) const {
  const auto& t = info(name);
  auto out = at::empty(t.shape, at::TensorOptions().dtype(to_scalar_type(t.dtype)));
  if (t.nbytes())
    std::memcpy(out.data_ptr(), map_->data() + header_.data_offset + t.begin, t.nbytes());
  return out;
}

at::Tensor SafetensorsFile::get(std::string_view name, std::optional<at::ScalarType> dtype,
                                std::optional<std::vector<int64_t>> shape,
                                const std::string& why) const {
  const auto& t = info(name);
  const std::string because = why.empty() ? "" : " (" + why + ")";
  if (dtype && to_scalar_type(t.dtype) != *dtype) {
    const auto want = from_scalar_type(*dtype);
    throw LoadError(K::WrongDtype, path(), std::string(name),
                    std::string("expected dtype ") + (want ? dtype_name(*want) : "?") + ", got " +
                        dtype_name(t.dtype) + because);
  }
  if (shape && *shape != t.shape)
    throw LoadError(K::WrongShape, path(), std::string(name),
                    "expected shape " + shape_str(*shape) + ", got " + shape_str(t.shape) + because);
  return view(name);
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (!seen.insert(name).second)
      throw std::invalid_argument("save_safetensors: duplicate tensor name '" + name + "'");
    const auto dt = from_scalar_type(tensor.scalar_type());
    if (!dt)
      throw std::invalid_argument("save_safetensors: tensor '" + name + "' has dtype " +
                                  std::string(c10::toString(tensor.scalar_type())) +
                                  ", which safetensors cannot store");
    auto t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t nbytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_name(*dt)},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw LoadError(K::Io, path, "", "cannot create file");
  const uint64_t n = text.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : data)
    out.write(static_cast<const char*>(t.data_ptr()),
              static_cast<std::streamsize>(t.numel() * t.element_size()));
  if (!out) throw LoadError(K::Io, path, "", "write failed");
}

at::Tensor place_residual(const at::Tensor& residual, const c10::Device& compute_device) {
  // A private copy even on CPU: the decode loop should not page-fault into
  // the file mapping for rows it has never touched.
  if (!compute_device.is_cuda()) return residual.clone(at::MemoryFormat::Contiguous);
  auto pinned = at::empty(residual.sizes(),
                          at::TensorOptions().dtype(residual.scalar_type()).pinned_memory(true));
  pinned.copy_(residual);
  return pinned;
}

}  // namespace qdec::runtime
