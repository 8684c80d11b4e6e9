// A minimal tensor: a typed view of memory owned by a backend (host or device).
// Shapes are row-major; weights follow Hugging Face, [out, in].
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"

namespace mf {

enum class DType : uint8_t { F32, BF16, I32 };
enum class Device : uint8_t { CPU, CUDA };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

struct Tensor {
  void* ptr = nullptr;
  Shape shape;
  DType dtype = DType::F32;
  Device device = Device::CPU;
  std::shared_ptr<void> owner;  // keeps the allocation alive; empty for views

  int64_t numel() const { return shape_numel(shape); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
  int ndim() const { return int(shape.size()); }
  bool defined() const { return ptr != nullptr; }

  template <typename T>
  T* data() const { return static_cast<T*>(ptr); }
  float* f32() const;
  int32_t* i32() const;

  // A view of the same memory with another shape (same numel).
  Tensor view(const Shape& s) const;
  // A view of rows [begin, end) along dim 0.
  Tensor slice0(int64_t begin, int64_t end) const;
};

// [a; b] as one [rows_a + rows_b, cols] view when a and b are 2-D with the same columns, dtype
// and device and b starts where a ends in memory; undefined otherwise.
Tensor stacked(const Tensor& a, const Tensor& b);
// The two halves of t's storage, each as a contiguous [rows, cols/2] tensor: the separate-GEMM
// layout of a buffer whose stacked layout is [rows, cols] (t 2-D, cols even).
void split_storage(const Tensor& t, Tensor& first, Tensor& second);

// Host-memory fp32/i32 tensor (zero-initialised), used by the CPU backend, tests and I/O. From
// kLazyHostBytes up, its pages are mapped fresh and take memory only once written.
constexpr size_t kLazyHostBytes = size_t(4) << 20;
Tensor host_tensor(const Shape& s, DType t = DType::F32);

}  // namespace mf
