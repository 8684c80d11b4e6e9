// Helpers shared by the [gpu] tests: the skip guard and moving double vectors to and from a
// backend. Header-only; include after <catch2/catch.hpp>.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"
#include "test_util.h"  // norm_err, Vec

// Ends the test case with a warning when no CUDA device is usable (or the build is CPU-only).
#define MF_SKIP_WITHOUT_GPU()                                                      \
  do {                                                                             \
    if (!mf::cuda_available()) {                                                   \
      WARN("no CUDA device (or a CPU-only build): skipping this [gpu] test");      \
      return;                                                                      \
    }                                                                              \
  } while (0)

namespace mf::test {

using Vec = std::vector<double>;

// Host f32 tensor of shape s holding v (rounded to float).
inline Tensor host_of(const Shape& s, const Vec& v) {
  Tensor h = host_tensor(s, DType::F32);
  for (size_t i = 0; i < v.size(); ++i) h.f32()[i] = float(v[i]);
  return h;
}

// Tensor of dtype t on `be` holding v.
inline Tensor dev_of(Backend& be, const Shape& s, DType t, const Vec& v) {
  Tensor d = be.empty(s, t);
  be.upload(host_of(s, v), d);
  return d;
}

// The same, as a view `offset` elements into a larger allocation (off the kernels' 16-byte
// vector paths when offset * dtype size is not a multiple of 16). The view keeps it alive.
inline Tensor dev_of(Backend& be, const Shape& s, DType t, const Vec& v, int64_t offset) {
  const int64_t n = shape_numel(s);
  Tensor d = be.empty({n + offset}, t).slice0(offset, n + offset).view(s);
  be.upload(host_of(s, v), d);
  return d;
}

// The contents of t (any backend, any float dtype) as doubles.
inline Vec fetch(Backend& be, const Tensor& t) {
  Tensor h = host_tensor(t.shape, DType::F32);
  be.download(t, h);
  return Vec(h.f32(), h.f32() + h.numel());
}

}  // namespace mf::test
