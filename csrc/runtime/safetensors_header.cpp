#include "safetensors_header.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>

#include "json_util.h"

namespace qdec::runtime {

static_assert(std::endian::native == std::endian::little,
              "the safetensors loader maps little-endian data in place");

namespace {

struct DTypeRow {
  DType dtype;
  const char* name;
  size_t itemsize;
};

constexpr DTypeRow kDTypes[] = {
    {DType::F64, "F64", 8},  {DType::F32, "F32", 4},         {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I64, "I64", 8},         {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},  {DType::I8, "I8", 1},           {DType::U64, "U64", 8},
    {DType::U32, "U32", 4},  {DType::U16, "U16", 2},         {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1}, {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};

const DTypeRow& row(DType d) {
  for (const auto& r : kDTypes)
    if (r.dtype == d) return r;
  return kDTypes[0];  // unreachable: every enumerator has a row
}

std::string range_str(uint64_t b, uint64_t e) {
  return "[" + std::to_string(b) + ", " + std::to_string(e) + ")";
}

// A JSON number that is a non-negative integer, or nullopt (floats, negatives,
// strings, ...). nlohmann keeps integers that fit in 64 bits as integers.
std::optional<uint64_t> as_index(const nlohmann::json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) {
    const auto i = v.get<int64_t>();
    if (i >= 0) return static_cast<uint64_t>(i);
  }
  return std::nullopt;
}

TensorInfo parse_entry(const std::string& name, const nlohmann::json& v, const std::string& file,
                       uint64_t data_size) {
  using K = LoadError::Kind;
  if (name.empty()) throw LoadError(K::BadHeader, file, "", "a tensor has an empty name");
  if (!v.is_object())
    throw LoadError(K::BadHeader, file, name,
                    std::string("entry must be an object with dtype, shape, data_offsets; got ") +
                        v.type_name());
  for (auto f = v.begin(); f != v.end(); ++f)
    if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets")
      throw LoadError(K::BadHeader, file, name,
                      "unknown field \"" + f.key() + "\" (expected dtype, shape, data_offsets)");
  TensorInfo t;
  t.name = name;

  auto it = v.find("dtype");
  if (it == v.end() || !it->is_string())
    throw LoadError(K::BadHeader, file, name, "missing string field \"dtype\"");
  const auto& ds = it->get_ref<const std::string&>();
  const auto dt = dtype_from_string(ds);
  if (!dt)
    throw LoadError(K::BadDtype, file, name,
                    "unknown dtype \"" + ds +
                        "\" (expected one of F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL "
                        "F8_E4M3 F8_E5M2)");
  t.dtype = *dt;

  it = v.find("shape");
  if (it == v.end() || !it->is_array())
    throw LoadError(K::BadHeader, file, name, "missing array field \"shape\"");
  uint64_t numel = 1;
  for (const auto& d : *it) {
    const auto dim = as_index(d);
    if (!dim || *dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw LoadError(K::BadShape, file, name,
                      "shape " + it->dump() + " has an entry that is not a non-negative integer");
    if (__builtin_mul_overflow(numel, *dim, &numel) ||
        numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw LoadError(K::BadShape, file, name, "shape " + it->dump() + " overflows 64-bit numel");
    t.shape.push_back(static_cast<int64_t>(*dim));
  }

  it = v.find("data_offsets");
  if (it == v.end() || !it->is_array() || it->size() != 2)
    throw LoadError(K::BadHeader, file, name,
                    "missing field \"data_offsets\": [begin, end] (two integers)");
  const auto b = as_index((*it)[0]), e = as_index((*it)[1]);
  if (!b || !e)
    throw LoadError(K::OffsetsOutOfRange, file, name,
                    "data_offsets " + it->dump() + " must be non-negative integers");
  t.begin = *b;
  t.end = *e;
  if (t.begin > t.end)
    throw LoadError(K::OffsetsOutOfRange, file, name,
                    "data_offsets " + range_str(t.begin, t.end) + " end before they begin");
  if (t.end > data_size)
    throw LoadError(K::OffsetsOutOfRange, file, name,
                    "data_offsets " + range_str(t.begin, t.end) +
                        " reach past the data section of " + std::to_string(data_size) + " bytes");
  uint64_t nbytes = 0;
  const bool overflow =
      __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_itemsize(t.dtype)), &nbytes);
  if (overflow || nbytes != t.end - t.begin)
    throw LoadError(K::SizeMismatch, file, name,
                    "holds " + std::to_string(t.end - t.begin) + " bytes but shape " +
                        nlohmann::json(t.shape).dump() + " x " + ds + " needs " +
                        (overflow ? std::string("more than 2^64") : std::to_string(nbytes)) +
                        " (numel " + std::to_string(numel) + " x itemsize " +
                        std::to_string(dtype_itemsize(t.dtype)) + ")");
  return t;
}

}  // namespace

std::optional<DType> dtype_from_string(std::string_view s) {
  for (const auto& r : kDTypes)
    if (s == r.name) return r.dtype;
  return std::nullopt;
}

const char* dtype_name(DType d) { return row(d).name; }
size_t dtype_itemsize(DType d) { return row(d).itemsize; }

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

const TensorInfo* SafetensorsHeader::find(std::string_view name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

bool is_valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    else return false;  // continuation byte or 0xF8..0xFF as a lead
    if (i + len > n) return false;
    for (int j = 1; j < len; ++j) {
      if ((p[i + j] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + j] & 0x3F);
    }
    // overlong forms, UTF-16 surrogates, beyond Unicode
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
      return false;
    i += len;
  }
  return true;
}

SafetensorsHeader parse_safetensors(const uint8_t* bytes, size_t size, const std::string& file,
                                    const ParseLimits& limits) {
  using K = LoadError::Kind;
  if (size < 8)
    throw LoadError(K::Truncated, file, "",
                    "file is " + std::to_string(size) +
                        " bytes, shorter than the 8-byte header length prefix");
  uint64_t n;
  std::memcpy(&n, bytes, 8);  // little-endian (static_assert above)
  if (n > size - 8)
    throw LoadError(K::HeaderTooLarge, file, "",
                    "header length " + std::to_string(n) + " exceeds the " +
                        std::to_string(size - 8) + " bytes after the length prefix (truncated file?)");
  if (n > limits.max_header_bytes)
    throw LoadError(K::HeaderTooLarge, file, "",
                    "header length " + std::to_string(n) + " exceeds the limit of " +
                        std::to_string(limits.max_header_bytes) + " bytes");
  const std::string_view text(reinterpret_cast<const char*>(bytes + 8), n);
  const auto j = parse_json_limited(text, file, limits.max_depth, /*reject_duplicate_top_keys=*/true);
  if (!j.is_object())
    throw LoadError(K::BadHeader, file, "",
                    std::string("header must be a JSON object, got ") + j.type_name());

  SafetensorsHeader h;
  h.data_offset = 8 + n;
  h.data_size = size - h.data_offset;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object())
        throw LoadError(K::BadHeader, file, "", "__metadata__ must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          throw LoadError(K::BadHeader, file, "",
                          "__metadata__[\"" + m.key() + "\"] must be a string, got " +
                              m->type_name());
        h.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    h.tensors.push_back(parse_entry(it.key(), *it, file, h.data_size));
  }

  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  const TensorInfo* prev = nullptr;
  for (const auto& t : h.tensors) {
    if (t.begin < covered)
      throw LoadError(K::Overlap, file, t.name,
                      "bytes " + range_str(t.begin, t.end) + " overlap tensor '" + prev->name +
                          "' at " + range_str(prev->begin, prev->end));
    if (t.begin > covered)
      throw LoadError(K::Gap, file, t.name,
                      "starts at byte " + std::to_string(t.begin) + " but the data before it ends at " +
                          std::to_string(covered) + ": bytes no tensor covers");
    covered = t.end;
    prev = &t;
  }
  if (covered != h.data_size)
    throw LoadError(K::Gap, file, "",
                    "tensors cover " + std::to_string(covered) + " bytes of a " +
                        std::to_string(h.data_size) + "-byte data section (trailing bytes)");
  return h;
}

}  // namespace qdec::runtime
