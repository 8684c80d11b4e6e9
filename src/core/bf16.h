// float <-> bfloat16 (and IEEE half -> float) bit conversions, usable on host and in CUDA code.
// bf16 is the top 16 bits of an IEEE f32: widening is exact (bits << 16); narrowing rounds to
// nearest, ties to even, so 1 + 2^-8 (exactly half-way) rounds down to 1 and 1 + 3*2^-8 rounds up.
// NaN stays NaN (quiet, sign kept): plain rounding could carry a NaN payload into +-Inf.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MF_HOST_DEVICE __host__ __device__
#else
#define MF_HOST_DEVICE
#endif

namespace mf {

MF_HOST_DEVICE inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MF_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// f32 -> bf16 bits, round to nearest even; NaN -> quiet NaN with the same sign.
MF_HOST_DEVICE inline uint16_t f32_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);  // finite values past bf16's max round to Inf, as IEEE says
  return uint16_t(u >> 16);
}

// bf16 bits -> f32 (exact).
MF_HOST_DEVICE inline float bf16_to_f32(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// The value f32 -> bf16 -> f32 (what storing in bf16 does to a number).
MF_HOST_DEVICE inline float round_to_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// IEEE binary16 bits -> f32 (exact; subnormals, Inf and NaN included).
MF_HOST_DEVICE inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_float(sign);  // +-0
    // Subnormal: value = man * 2^-24; normalise into an f32 exponent.
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return bits_float(sign | (uint32_t(127 - 15 - e) << 23) | (man << 13));
  }
  return bits_float(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

// Array forms (host).
inline void f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
inline void bf16_to_f32(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

}  // namespace mf
