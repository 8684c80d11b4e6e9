// Host side of kernels/common.cuh: check-macro failures, the scratch buffer, argument checks.
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"

namespace mf::cuda {

namespace detail {

[[noreturn]] void cuda_fail(cudaError_t e, const char* stmt, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  ::mf::detail::throw_error(file, line,
                            ::mf::detail::cat("CUDA error ", cudaGetErrorName(e), " (",
                                              cudaGetErrorString(e), ") in `", stmt,
                                              "` on device ", dev));
}

[[noreturn]] void cublas_fail(cublasStatus_t s, const char* stmt, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  ::mf::detail::throw_error(file, line,
                            ::mf::detail::cat("cuBLAS error ", cublasLtGetStatusName(s), " (",
                                              cublasLtGetStatusString(s), ") in `", stmt,
                                              "` on device ", dev));
}

}  // namespace detail

Scratch::~Scratch() {
  if (ptr_) cudaFree(ptr_);  // no throw from a destructor; errors at teardown are moot
}

void Scratch::release() {
  if (!ptr_) return;
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // queued kernels may still use it
  void* p = ptr_;
  ptr_ = nullptr;
  cap_ = 0;
  CUDA_CHECK(cudaFree(p));
}

void* Scratch::get(size_t bytes) {
  if (bytes <= cap_) return ptr_;
  // Earlier ops queued on the stream may still read the old buffer.
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  const size_t want = std::max(bytes, cap_ + cap_ / 2);  // grow geometrically
  if (ptr_) CUDA_CHECK(cudaFree(ptr_));
  ptr_ = nullptr;
  cap_ = 0;
  cudaError_t e = cudaMalloc(&ptr_, want);
  if (e != cudaSuccess) {
    cudaGetLastError();
    ptr_ = nullptr;
    CUDA_CHECK(cudaMalloc(&ptr_, bytes));
    cap_ = bytes;
  } else {
    cap_ = want;
  }
  return ptr_;
}

std::string describe(const char* name, const Tensor& t) {
  return std::string(name) + " " + shape_str(t.shape) + " " + dtype_name(t.dtype);
}

void check_dev(const char* op, const char* name, const Tensor& t) {
  MF_CHECK(t.defined(), op, ": ", name, " is not allocated");
  MF_CHECK(t.device == Device::CUDA, op, ": ", describe(name, t),
           " is a host tensor but the backend is cuda (upload it first)");
}

void check_dtype(const char* op, const char* name, const Tensor& t, DType want) {
  check_dev(op, name, t);
  MF_CHECK(t.dtype == want, op, ": ", describe(name, t), " has the wrong dtype, expected ",
           dtype_name(want));
}

void check_float(const char* op, const char* name, const Tensor& t) {
  check_dev(op, name, t);
  MF_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16, op, ": ", describe(name, t),
           " must be f32 or bf16");
}

void check_numel(const char* op, const char* name, const Tensor& t, int64_t n, const char* what) {
  MF_CHECK(t.numel() == n, op, ": ", describe(name, t), " must have ", n, " elements (", what,
           ")");
}

int64_t rows_of(const char* op, const char* name, const Tensor& t, int64_t width) {
  MF_CHECK(t.ndim() >= 1 && t.dim(-1) == width, op, ": ", describe(name, t),
           " must have last dim ", width);
  return width ? t.numel() / width : 0;
}

}  // namespace mf::cuda
