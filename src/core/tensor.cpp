#include "core/tensor.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace mf {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::I32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
  }
  return "?";
}

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? "," : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

float* Tensor::f32() const {
  MF_CHECK(dtype == DType::F32, "tensor is ", dtype_name(dtype), ", expected f32");
  return static_cast<float*>(ptr);
}

int32_t* Tensor::i32() const {
  MF_CHECK(dtype == DType::I32, "tensor is ", dtype_name(dtype), ", expected i32");
  return static_cast<int32_t*>(ptr);
}

Tensor Tensor::view(const Shape& s) const {
  MF_CHECK(shape_numel(s) == numel(), "view ", shape_str(s), " of tensor ", shape_str(shape));
  Tensor t = *this;
  t.shape = s;
  return t;
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  MF_CHECK(ndim() >= 1 && begin >= 0 && begin <= end && end <= shape[0], "slice0 [", begin, ",",
           end, ") of ", shape_str(shape));
  Tensor t = *this;
  int64_t row = shape[0] ? numel() / shape[0] : 0;
  t.ptr = static_cast<char*>(ptr) + size_t(begin * row) * dtype_size(dtype);
  t.shape[0] = end - begin;
  return t;
}

Tensor stacked(const Tensor& a, const Tensor& b) {
  if (a.ndim() != 2 || b.ndim() != 2 || a.dim(1) != b.dim(1) || a.dtype != b.dtype ||
      a.device != b.device || static_cast<const char*>(a.ptr) + a.nbytes() != b.ptr)
    return Tensor{};
  Tensor t = a;
  t.shape = {a.dim(0) + b.dim(0), a.dim(1)};
  return t;
}

void split_storage(const Tensor& t, Tensor& first, Tensor& second) {
  MF_CHECK(t.ndim() == 2 && t.dim(1) % 2 == 0, "split_storage of ", shape_str(t.shape),
           ": needs a 2-D tensor with an even number of columns");
  const int64_t rows = t.dim(0), half = t.numel() / 2;
  const Tensor flat = t.view({2, half});
  first = flat.slice0(0, 1).view({rows, t.dim(1) / 2});
  second = flat.slice0(1, 2).view({rows, t.dim(1) / 2});
}

Tensor host_tensor(const Shape& s, DType t) {
  Tensor x;
  x.shape = s;
  x.dtype = t;
  x.device = Device::CPU;
  size_t bytes = std::max<size_t>(x.nbytes(), 1);
  if (bytes >= kLazyHostBytes) {
    // Fresh anonymous pages read as zero and take no memory until written, so building a model
    // and its optimizer touches only what they initialise (the weights); the memory plan can
    // then refuse a run too large for the machine before its first step fills the rest, where
    // touching it all here would have let the kernel's OOM killer end the process instead.
    // Page-aligned, so the 64-byte alignment below holds too.
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      const int err = errno;  // before the message's own calls can change it
      MF_FAIL("out of host memory allocating ", dtype_name(t), " ", shape_str(s), " (", bytes,
              " bytes): ", std::strerror(err));
    }
    x.owner = std::shared_ptr<void>(p, [bytes](void* q) { ::munmap(q, bytes); });
    x.ptr = p;
    return x;
  }
  // 64-byte alignment for vector loads; calloc-like zero fill.
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  MF_CHECK(p, "out of host memory allocating ", dtype_name(t), " ", shape_str(s), " (", bytes,
           " bytes)");
  std::memset(p, 0, bytes);
  x.owner = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  x.ptr = p;
  return x;
}

}  // namespace mf
