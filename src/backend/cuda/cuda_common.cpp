// Host side of kernels/common.cuh: check-macro failures, the scratch buffer, argument checks.
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"

namespace mf::cuda {

namespace detail {

// Errors a faulting kernel leaves behind. They are sticky (every later call returns them) and
// show up at whatever call comes next, so the statement named is usually not the culprit.
bool is_kernel_fault(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorMisalignedAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorInvalidPc:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
      return true;
    default:
      return false;
  }
}

[[noreturn]] void cuda_fail(cudaError_t e, const char* stmt, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  std::string msg = ::mf::detail::cat("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e),
                                      ") in `", stmt, "` on device ", dev);
  if (is_kernel_fault(e))
    msg += "; a kernel queued earlier faulted (this call only reported it) and the CUDA context is "
           "unusable: rerun with CUDA_LAUNCH_BLOCKING=1, or under compute-sanitizer, to find the kernel";
  ::mf::detail::throw_error(file, line, msg);
}

void* device_alloc_or_null(size_t bytes, const char* what) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e == cudaSuccess) return p;
  if (e != cudaErrorMemoryAllocation) cuda_fail(e, what, __FILE__, __LINE__);
  cudaGetLastError();
  return nullptr;
}

void* pinned_alloc_or_null(size_t bytes, const char* what) {
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocDefault);
  if (e == cudaSuccess) return p;
  if (e != cudaErrorMemoryAllocation) cuda_fail(e, what, __FILE__, __LINE__);
  cudaGetLastError();
  return nullptr;
}

std::string free_memory() {
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  return ::mf::detail::cat(free_b >> 20, " MiB free of ", total_b >> 20, " MiB");
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
  size_t want = std::max(bytes, cap_ + cap_ / 2);  // grow geometrically
  if (ptr_) CUDA_CHECK(cudaFree(ptr_));
  ptr_ = nullptr;
  cap_ = 0;
  ptr_ = detail::device_alloc_or_null(want, "cudaMalloc (workspace)");
  if (!ptr_ && want > bytes) {  // the exact size may still fit
    want = bytes;
    ptr_ = detail::device_alloc_or_null(want, "cudaMalloc (workspace)");
  }
  MF_CHECK(ptr_, "out of GPU memory for the ops' workspace: ", bytes, " bytes (", bytes >> 20,
           " MiB) wanted, ", detail::free_memory(), ". The largest users are the fused loss "
           "(train.loss_chunk_mb), attention and the matrix optimizer; reduce train.loss_chunk_mb, "
           "train.micro_batch or train.seq_len");
  cap_ = want;
  return ptr_;
}

// The contract's checks (backend/op_contract.h) on the CUDA backend, for the entries that have
// no shared contract function (casts, reductions, optimizer and GEMM ops).
std::string describe(const char* name, const Tensor& t) { return contract::desc(name, t); }

void check_dev(const char* op, const char* name, const Tensor& t) {
  contract::Check(contract::kCuda, op).placed(name, t);
}

void check_dtype(const char* op, const char* name, const Tensor& t, DType want) {
  contract::Check(contract::kCuda, op).dtype(name, t, want);
}

void check_float(const char* op, const char* name, const Tensor& t) {
  contract::Check(contract::kCuda, op).floating(name, t);
}

void check_numel(const char* op, const char* name, const Tensor& t, int64_t n, const char* what) {
  contract::Check(contract::kCuda, op).numel(name, t, n, what);
}

int64_t rows_of(const char* op, const char* name, const Tensor& t, int64_t width) {
  return contract::Check(contract::kCuda, op).rows(name, t, width);
}

}  // namespace mf::cuda
