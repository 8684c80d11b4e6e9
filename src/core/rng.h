// Deterministic RNG shared by init, data shuffle and tests. The state is one uint64 pair so
// it can be checkpointed exactly. Normal samples use Box-Muller on 53-bit uniforms.
#pragma once
#include <cstdint>

namespace mf {

struct Rng {
  uint64_t state = 0x853c49e6748fea9bULL;
  uint64_t inc = 0xda3e39cb94b95bdbULL;

  Rng() = default;
  explicit Rng(uint64_t seed, uint64_t stream = 0) { seed_with(seed, stream); }

  void seed_with(uint64_t seed, uint64_t stream = 0) {
    state = 0;
    inc = (stream << 1u) | 1u;
    next_u32();
    state += seed;
    next_u32();
  }
  // PCG32 (O'Neill), XSH-RR output.
  uint32_t next_u32() {
    uint64_t old = state;
    state = old * 6364136223846793005ULL + inc;
    uint32_t xorshifted = uint32_t(((old >> 18u) ^ old) >> 27u);
    uint32_t rot = uint32_t(old >> 59u);
    return (xorshifted >> rot) | (xorshifted << ((-rot) & 31));
  }
  uint64_t next_u64() { return (uint64_t(next_u32()) << 32) | next_u32(); }
  // Uniform in [0, 1).
  double uniform() { return double(next_u64() >> 11) * (1.0 / 9007199254740992.0); }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n ? next_u64() % n : 0; }
  double normal();
};

}  // namespace mf
