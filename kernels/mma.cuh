// Tensor-core building blocks shared by the mma.sync kernels (attention.cu, moe_gemm.cu): the
// m16n8k16 bf16 -> f32 instruction and fragment reads from row-major shared-memory tiles. The
// fragment layouts are the PTX ISA's for mma.m16n8k16 (groupID g = lane/4, tig t = lane%4):
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8..2t+9, n = g)
//   C (16x8 f32):   c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
#pragma once
#include "common.cuh"

#if defined(__CUDACC__)
namespace mf::cuda {

#if defined(MF_CUEMU)
}  // namespace mf::cuda
namespace cuemu {
void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);  // tests/cuemu
}
namespace mf::cuda {
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::cuemu::mma16816(d, a, b);  // the CPU emulator's warp-collective model of the instruction
}
#else
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

__device__ __forceinline__ uint32_t ld_pair(const bf16* p) {  // two consecutive elements
  return *reinterpret_cast<const uint32_t*>(p);
}
__device__ __forceinline__ uint32_t pack2(bf16 lo, bf16 hi) {  // lo in the low 16 bits
  return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack2f(float lo, float hi) {
  return pack2(__float2bfloat16(lo), __float2bfloat16(hi));
}

// A fragment: rows [r0, r0+16), columns [c0, c0+16) of a row-major smem tile.
template <int LD>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const bf16* s, int r0, int c0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  a[0] = ld_pair(s + (r0 + g) * LD + c0 + 2 * t);
  a[1] = ld_pair(s + (r0 + g + 8) * LD + c0 + 2 * t);
  a[2] = ld_pair(s + (r0 + g) * LD + c0 + 8 + 2 * t);
  a[3] = ld_pair(s + (r0 + g + 8) * LD + c0 + 8 + 2 * t);
}
// B fragment with B[k][n] = S[n0 + n][k0 + k]: the tile's rows are the n index (K for Q K^T).
template <int LD>
__device__ __forceinline__ void frag_b_rows_n(uint32_t (&b)[2], const bf16* s, int n0, int k0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  b[0] = ld_pair(s + (n0 + g) * LD + k0 + 2 * t);
  b[1] = ld_pair(s + (n0 + g) * LD + k0 + 8 + 2 * t);
}
// B fragment with B[k][n] = S[k0 + k][n0 + n]: the tile's rows are the k index (V for P V).
template <int LD>
__device__ __forceinline__ void frag_b_rows_k(uint32_t (&b)[2], const bf16* s, int k0, int n0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const bf16* c = s + n0 + g;
  b[0] = pack2(c[(k0 + 2 * t) * LD], c[(k0 + 2 * t + 1) * LD]);
  b[1] = pack2(c[(k0 + 2 * t + 8) * LD], c[(k0 + 2 * t + 9) * LD]);
}

}  // namespace mf::cuda
#endif  // __CUDACC__
