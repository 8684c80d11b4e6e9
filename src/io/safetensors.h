// safetensors reader and writer (https://huggingface.co/docs/safetensors).
//
// File layout: u64 little-endian N | N bytes of JSON header | data section.
// Header: {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {"<str>": "<str>"}}; offsets are relative to the data section.
//
// The reader validates the whole header when the file is opened (length, JSON, fields, known
// dtype, offsets inside the data section, byte size = numel * dtype size, no overlaps, no
// duplicate names) and reads tensors on demand with pread; every error names the file and, where
// there is one, the tensor. The writer sorts like the reference implementation (larger dtypes
// first, then by name, so every tensor stays aligned to its element size), pads the header with
// spaces to a multiple of 8 and writes atomically (temp file, fsync, rename, fsync dir).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mf {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;   // safetensors spelling: "F32", "BF16", "F16", "I64", ...
  Shape shape;
  uint64_t begin = 0;  // byte offsets within the data section
  uint64_t end = 0;
  int64_t numel() const { return shape_numel(shape); }
};

// Element size of a safetensors dtype name; 0 when the name is not a safetensors dtype.
size_t safetensors_dtype_size(const std::string& dtype);

class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;
  SafetensorsReader(SafetensorsReader&& o) noexcept;
  SafetensorsReader& operator=(SafetensorsReader&& o) noexcept;

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;  // throws naming file + tensor
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Reads a floating-point tensor (F32, BF16, F16, F64) as a new host f32 tensor.
  Tensor read_f32(const std::string& name) const;
  // Same into an existing host f32 tensor, which must have the stored shape.
  void read_f32_into(const std::string& name, const Tensor& dst) const;
  // Reads the raw bytes of a tensor (dst must hold entry(name).end - begin bytes).
  void read_raw(const std::string& name, void* dst, size_t nbytes) const;

 private:
  void pread_all(void* dst, size_t n, uint64_t file_offset, const std::string& what) const;
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;  // 8 + N
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  SafetensorsWriter();  // metadata starts as {"format": "pt"}, which transformers expects
  // Adds a host tensor. f32 sources store as F32 or BF16 (round to nearest even); bf16 sources
  // as BF16 or F32; i32 as I32. The tensor's memory must stay valid until write().
  void add(const std::string& name, const Tensor& t, DType store_as = DType::F32);
  void set_metadata(const std::string& key, const std::string& value);
  size_t size() const { return items_.size(); }
  void write(const std::string& path) const;

 private:
  struct Item {
    std::string name;
    Tensor src;
    DType store_as;
  };
  std::vector<Item> items_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace mf
