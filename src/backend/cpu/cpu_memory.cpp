// CpuBackend: memory, transfers and simple reductions.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_ops.h"

extern "C" void openblas_set_num_threads(int);

namespace mf {

CpuBackend::CpuBackend() {
  // OpenBLAS's own thread pool and our OpenMP loops alternate many times per step; both spin
  // while waiting, and on a small machine they starve each other (measured on 2 cores: the tiny
  // config runs 3.6k tok/s with threaded BLAS, 10.4k with single-threaded BLAS; at d_model 512
  // they are even). So OpenBLAS runs on one thread unless OPENBLAS_NUM_THREADS says otherwise,
  // and ref::gemm<float> spreads a GEMM's slabs over the OpenMP threads instead.
  static const bool once = [] {
    if (!std::getenv("OPENBLAS_NUM_THREADS")) openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}

namespace ref {
bool blas_threaded() {
  static const bool threaded = [] {
    const char* e = std::getenv("OPENBLAS_NUM_THREADS");
    return e && std::atoi(e) > 1;
  }();
  return threaded;
}
}  // namespace ref

Tensor CpuBackend::empty(const Shape& s, DType t) {
  MF_CHECK(t != DType::BF16, "the CPU backend is fp32 only (asked for bf16 ", shape_str(s), ")");
  return host_tensor(s, t);
}

void CpuBackend::zero(Tensor& t) { std::memset(t.ptr, 0, t.nbytes()); }

void CpuBackend::upload(const Tensor& src, Tensor& dst) {
  MF_CHECK(src.numel() == dst.numel() && src.dtype == dst.dtype, "upload ", shape_str(src.shape),
           " ", dtype_name(src.dtype), " into ", shape_str(dst.shape), " ", dtype_name(dst.dtype));
  if (src.ptr != dst.ptr) std::memcpy(dst.ptr, src.ptr, src.nbytes());
}

void CpuBackend::download(const Tensor& src, Tensor& dst) { upload(src, dst); }
void CpuBackend::copy(const Tensor& src, Tensor& dst) { upload(src, dst); }

double CpuBackend::sum_squares(const Tensor& x) {
  return ref::ordered_sum_squares(x.f32(), x.numel());
}

double CpuBackend::sum(const Tensor& x) {
  return ref::ordered_sum(x.f32(), x.numel(), [](double v) { return v; });
}

void CpuBackend::scale(Tensor& x, float alpha) {
  float* p = x.f32();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] *= alpha;
}

void CpuBackend::axpy(float alpha, const Tensor& x, Tensor& y) {
  MF_CHECK(x.numel() == y.numel(), "axpy ", shape_str(x.shape), " vs ", shape_str(y.shape));
  const float* a = x.f32();
  float* b = y.f32();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) b[i] += alpha * a[i];
}

}  // namespace mf
