#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/bf16.h"
#include "io/atomic_file.h"

namespace mf {

namespace {

using json = nlohmann::json;

// Same cap as the reference implementation: a header this large is a corrupt length field.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// Conversions go through a bounded buffer instead of a second full-size copy.
constexpr size_t kChunkElems = size_t(1) << 20;

struct DtypeInfo {
  const char* name;
  size_t size;
};
// Every dtype of the safetensors spec; only the floating ones convert to f32.
constexpr DtypeInfo kDtypes[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2},
    {"U16", 2},  {"F16", 2}, {"BF16", 2}, {"I32", 4},    {"U32", 4},     {"F32", 4},
    {"F64", 8},  {"I64", 8}, {"U64", 8},
};

std::string known_dtypes() {
  std::string s;
  for (const auto& d : kDtypes) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

const char* st_dtype_of(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
  }
  return "?";
}

uint64_t load_u64_le(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void store_u64_le(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = (unsigned char)(v >> (8 * i));
}

// A JSON value that is a non-negative integer (shape dims, offsets).
bool as_u64(const json& v, uint64_t& out) {
  if (v.is_number_unsigned()) {
    out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    out = uint64_t(v.get<int64_t>());
    return true;
  }
  return false;
}

}  // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  for (const auto& d : kDtypes)
    if (dtype == d.name) return d.size;
  return 0;
}

// ---- reader ------------------------------------------------------------------------------------

#define ST_FAIL(...) MF_FAIL("safetensors file '", path_, "': ", __VA_ARGS__)
#define ST_CHECK(cond, ...) MF_CHECK(cond, "safetensors file '", path_, "': ", __VA_ARGS__)

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MF_CHECK(fd_ >= 0, "cannot open safetensors file '", path, "': ", std::strerror(errno));
  try {
    struct stat st;
    ST_CHECK(::fstat(fd_, &st) == 0, "stat failed: ", std::strerror(errno));
    ST_CHECK(S_ISREG(st.st_mode), "not a regular file");
    const uint64_t file_size = uint64_t(st.st_size);
    ST_CHECK(file_size >= 8, "file is ", file_size,
             " bytes, too short to hold the 8-byte header length");
    unsigned char lenbuf[8];
    pread_all(lenbuf, 8, 0, "the header length");
    const uint64_t n = load_u64_le(lenbuf);
    ST_CHECK(n <= file_size - 8, "header length ", n, " is larger than the file (", file_size,
             " bytes); the file is truncated or not safetensors");
    ST_CHECK(n <= kMaxHeaderBytes, "header length ", n, " exceeds the ", kMaxHeaderBytes,
             "-byte limit");
    data_start_ = 8 + n;
    const uint64_t data_size = file_size - data_start_;

    std::string text(size_t(n), '\0');
    if (n) pread_all(&text[0], size_t(n), 8, "the header");

    // Parse, rejecting duplicate top-level keys (nlohmann would silently keep the last one).
    std::set<std::string> seen;
    std::string duplicate;
    json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
      if (depth == 1 && ev == json::parse_event_t::key) {
        const auto& k = parsed.get_ref<const std::string&>();
        if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
      }
      return true;
    };
    json header;
    try {
      header = json::parse(text, cb);
    } catch (const json::exception& e) {
      ST_FAIL("invalid JSON header: ", e.what());
    }
    ST_CHECK(header.is_object(), "header is not a JSON object");
    ST_CHECK(duplicate.empty(), "tensor '", duplicate, "' appears twice in the header");

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        ST_CHECK(v.is_object(), "\"__metadata__\" is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          ST_CHECK(m.value().is_string(), "metadata '", m.key(), "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      ST_CHECK(v.is_object(), "tensor '", name, "': header entry is not an object");
      ST_CHECK(v.contains("dtype"), "tensor '", name, "': missing \"dtype\"");
      ST_CHECK(v.contains("shape"), "tensor '", name, "': missing \"shape\"");
      ST_CHECK(v.contains("data_offsets"), "tensor '", name, "': missing \"data_offsets\"");
      SafetensorsEntry e;
      e.name = name;
      ST_CHECK(v["dtype"].is_string(), "tensor '", name, "': \"dtype\" is not a string");
      e.dtype = v["dtype"].get<std::string>();
      const size_t esize = safetensors_dtype_size(e.dtype);
      ST_CHECK(esize > 0, "tensor '", name, "': unknown dtype '", e.dtype, "' (known: ",
               known_dtypes(), ")");

      const json& shape = v["shape"];
      ST_CHECK(shape.is_array(), "tensor '", name, "': \"shape\" is not an array");
      uint64_t bytes = esize;  // numel * esize, checked for overflow
      bool overflow = false;
      for (const auto& d : shape) {
        uint64_t dim;
        ST_CHECK(as_u64(d, dim), "tensor '", name, "': shape ", shape.dump(),
                 " has an entry that is not a non-negative integer");
        ST_CHECK(dim <= uint64_t(std::numeric_limits<int64_t>::max()), "tensor '", name,
                 "': shape dimension ", dim, " is too large");
        if (dim && bytes > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
        bytes = overflow ? 0 : bytes * dim;
        e.shape.push_back(int64_t(dim));
      }
      ST_CHECK(!overflow, "tensor '", name, "': shape ", shape.dump(), " is too large");

      const json& off = v["data_offsets"];
      ST_CHECK(off.is_array() && off.size() == 2 && as_u64(off[0], e.begin) &&
                   as_u64(off[1], e.end),
               "tensor '", name, "': \"data_offsets\" must be [begin, end] with non-negative "
               "integers, found ", off.dump());
      ST_CHECK(e.begin <= e.end, "tensor '", name, "': data_offsets [", e.begin, ", ", e.end,
               "] has begin > end");
      ST_CHECK(e.end <= data_size, "tensor '", name, "': data_offsets [", e.begin, ", ", e.end,
               "] go past the end of the data section (", data_size,
               " bytes); the file is truncated or the offsets are wrong");
      ST_CHECK(e.end - e.begin == bytes, "tensor '", name, "': shape ", shape_str(e.shape), " ",
               e.dtype, " needs ", bytes, " bytes but data_offsets [", e.begin, ", ", e.end,
               "] span ", e.end - e.begin);
      entries_.emplace(name, std::move(e));
    }

    // No two tensors may share bytes (empty tensors occupy none).
    std::vector<const SafetensorsEntry*> by_offset;
    for (const auto& kv : entries_)
      if (kv.second.end > kv.second.begin) by_offset.push_back(&kv.second);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
                return a->begin < b->begin || (a->begin == b->begin && a->name < b->name);
              });
    for (size_t i = 1; i < by_offset.size(); ++i) {
      const auto* a = by_offset[i - 1];
      const auto* b = by_offset[i];
      ST_CHECK(b->begin >= a->end, "tensors '", a->name, "' [", a->begin, ", ", a->end,
               ") and '", b->name, "' [", b->begin, ", ", b->end, ") overlap");
    }
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

SafetensorsReader::SafetensorsReader(SafetensorsReader&& o) noexcept
    : path_(std::move(o.path_)),
      fd_(o.fd_),
      data_start_(o.data_start_),
      entries_(std::move(o.entries_)),
      metadata_(std::move(o.metadata_)) {
  o.fd_ = -1;
}

SafetensorsReader& SafetensorsReader::operator=(SafetensorsReader&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(o.path_);
    fd_ = o.fd_;
    data_start_ = o.data_start_;
    entries_ = std::move(o.entries_);
    metadata_ = std::move(o.metadata_);
    o.fd_ = -1;
  }
  return *this;
}

void SafetensorsReader::pread_all(void* dst, size_t n, uint64_t file_offset,
                                  const std::string& what) const {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd_, p, n, off_t(file_offset));
    if (r < 0 && errno == EINTR) continue;
    ST_CHECK(r >= 0, "read of ", what, " failed: ", std::strerror(errno));
    ST_CHECK(r > 0, "unexpected end of file reading ", what,
             " (was the file changed while open?)");
    p += r;
    n -= size_t(r);
    file_offset += uint64_t(r);
  }
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

const SafetensorsEntry& SafetensorsReader::entry(const std::string& name) const {
  auto it = entries_.find(name);
  ST_CHECK(it != entries_.end(), "no tensor named '", name, "' (the file has ", entries_.size(),
           " tensors)");
  return it->second;
}

void SafetensorsReader::read_raw(const std::string& name, void* dst, size_t nbytes) const {
  const auto& e = entry(name);
  ST_CHECK(nbytes == e.end - e.begin, "tensor '", name, "': read of ", nbytes,
           " bytes, stored size is ", e.end - e.begin);
  pread_all(dst, nbytes, data_start_ + e.begin, "tensor '" + name + "'");
}

Tensor SafetensorsReader::read_f32(const std::string& name) const {
  Tensor t = host_tensor(entry(name).shape, DType::F32);
  read_f32_into(name, t);
  return t;
}

void SafetensorsReader::read_f32_into(const std::string& name, const Tensor& dst) const {
  const auto& e = entry(name);
  ST_CHECK(dst.device == Device::CPU && dst.dtype == DType::F32, "tensor '", name,
           "': destination must be a host f32 tensor, got ", dtype_name(dst.dtype));
  ST_CHECK(dst.shape == e.shape, "tensor '", name, "': stored shape ", shape_str(e.shape),
           ", destination shape ", shape_str(dst.shape));
  const size_t n = size_t(e.numel());
  float* out = dst.f32();
  const uint64_t base = data_start_ + e.begin;
  const std::string what = "tensor '" + name + "'";
  if (e.dtype == "F32") {  // the format is little-endian, like every host we build for
    pread_all(out, n * 4, base, what);
    return;
  }
  const size_t esize = safetensors_dtype_size(e.dtype);
  ST_CHECK(e.dtype == "BF16" || e.dtype == "F16" || e.dtype == "F64", "tensor '", name,
           "': dtype ", e.dtype, " cannot be read as f32 (supported: F32, BF16, F16, F64)");
  std::vector<unsigned char> buf(std::min(n, kChunkElems) * esize);
  for (size_t i0 = 0; i0 < n; i0 += kChunkElems) {
    const size_t m = std::min(kChunkElems, n - i0);
    pread_all(buf.data(), m * esize, base + i0 * esize, what);
    if (e.dtype == "BF16") {
      for (size_t i = 0; i < m; ++i) {
        uint16_t h;
        std::memcpy(&h, &buf[2 * i], 2);
        out[i0 + i] = bf16_to_f32(h);
      }
    } else if (e.dtype == "F16") {
      for (size_t i = 0; i < m; ++i) {
        uint16_t h;
        std::memcpy(&h, &buf[2 * i], 2);
        out[i0 + i] = f16_to_f32(h);
      }
    } else {
      for (size_t i = 0; i < m; ++i) {
        double d;
        std::memcpy(&d, &buf[8 * i], 8);
        out[i0 + i] = float(d);
      }
    }
  }
}

#undef ST_FAIL
#undef ST_CHECK

// ---- writer ------------------------------------------------------------------------------------

SafetensorsWriter::SafetensorsWriter() { metadata_["format"] = "pt"; }

void SafetensorsWriter::add(const std::string& name, const Tensor& t, DType store_as) {
  MF_CHECK(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name '", name,
           "'");
  for (const auto& it : items_)
    MF_CHECK(it.name != name, "safetensors: tensor '", name, "' added twice");
  MF_CHECK(t.device == Device::CPU, "safetensors: tensor '", name,
           "' must be in host memory to be written");
  MF_CHECK(t.defined() || t.numel() == 0, "safetensors: tensor '", name, "' has no data");
  const bool ok = (t.dtype == DType::F32 && (store_as == DType::F32 || store_as == DType::BF16)) ||
                  (t.dtype == DType::BF16 && (store_as == DType::F32 || store_as == DType::BF16)) ||
                  (t.dtype == DType::I32 && store_as == DType::I32);
  MF_CHECK(ok, "safetensors: tensor '", name, "' is ", dtype_name(t.dtype), ", cannot store it as ",
           dtype_name(store_as));
  items_.push_back({name, t, store_as});
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

void SafetensorsWriter::write(const std::string& path) const {
  // Larger elements first, then by name: every tensor starts aligned to its element size.
  std::vector<const Item*> order;
  for (const auto& it : items_) order.push_back(&it);
  std::sort(order.begin(), order.end(), [](const Item* a, const Item* b) {
    size_t sa = dtype_size(a->store_as), sb = dtype_size(b->store_as);
    return sa != sb ? sa > sb : a->name < b->name;
  });

  json header = json::object();
  uint64_t offset = 0;
  for (const Item* it : order) {
    const uint64_t bytes = uint64_t(it->src.numel()) * dtype_size(it->store_as);
    header[it->name] = {{"dtype", st_dtype_of(it->store_as)},
                        {"shape", it->src.shape},
                        {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  AtomicFile f(path);
  unsigned char lenbuf[8];
  store_u64_le(lenbuf, text.size());
  f.write(lenbuf, 8);
  f.write(text.data(), text.size());

  std::vector<uint16_t> half;
  std::vector<float> full;
  for (const Item* it : order) {
    const size_t n = size_t(it->src.numel());
    if (it->src.dtype == it->store_as) {
      f.write(it->src.ptr, n * dtype_size(it->store_as));
    } else if (it->store_as == DType::BF16) {  // f32 -> bf16
      const float* src = static_cast<const float*>(it->src.ptr);
      half.resize(std::min(n, kChunkElems));
      for (size_t i0 = 0; i0 < n; i0 += kChunkElems) {
        const size_t m = std::min(kChunkElems, n - i0);
        f32_to_bf16(src + i0, half.data(), m);
        f.write(half.data(), m * 2);
      }
    } else {  // bf16 -> f32
      const uint16_t* src = static_cast<const uint16_t*>(it->src.ptr);
      full.resize(std::min(n, kChunkElems));
      for (size_t i0 = 0; i0 < n; i0 += kChunkElems) {
        const size_t m = std::min(kChunkElems, n - i0);
        bf16_to_f32(src + i0, full.data(), m);
        f.write(full.data(), m * 4);
      }
    }
  }
  f.commit();
}

}  // namespace mf
