// Tensor-core building blocks shared by the mma.sync kernels (attention.cu, moe_gemm.cu): the
// m16n8k16 bf16 -> f32 instruction, fragment reads from row-major shared-memory tiles, and the
// cp.async copies that stage those tiles. The
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
namespace cuemu {  // tests/cuemu: warp-collective models of the two instructions
void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void ldmatrix(uint32_t* d, int nmat, bool trans, const void* row);
void cp_async(void* smem, const void* gmem, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
}  // namespace cuemu
namespace mf::cuda {
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::cuemu::mma16816(d, a, b);
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&d)[4], const bf16* row) { ::cuemu::ldmatrix(d, 4, false, row); }
__device__ __forceinline__ void ldsm_x2(uint32_t (&d)[2], const bf16* row) { ::cuemu::ldmatrix(d, 2, false, row); }
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&d)[2], const bf16* row) {
  ::cuemu::ldmatrix(d, 2, true, row);
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool fill) {
  ::cuemu::cp_async(smem, gmem, 16, fill ? 16 : 0);
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool fill) {
  ::cuemu::cp_async(smem, gmem, 4, fill ? 4 : 0);
}
__device__ __forceinline__ void cp_async_commit() { ::cuemu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ::cuemu::cp_async_wait(N); }
#else
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// ldmatrix.m8n8.b16: each of the warp's lanes 8m..8m+7 gives the shared-memory address of one
// 16-byte row of 8x8 matrix m; lane l receives, in d[m], elements (l/4, 2(l%4)..2(l%4)+1) of
// matrix m, or with .trans elements (2(l%4), l/4) and (2(l%4)+1, l/4). Whole warp, uniform.
__device__ __forceinline__ void ldsm_x4(uint32_t (&d)[4], const bf16* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&d)[2], const bf16* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(d[0]), "=r"(d[1]) : "r"(a));
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&d)[2], const bf16* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(d[0]), "=r"(d[1]) : "r"(a));
}
// cp.async (sm_80+): a copy from global to shared memory that does not pass through registers
// and does not stall the issuing thread. `fill` false writes zeros instead (src-size 0: nothing
// is read, but gmem must still be a valid address). The copies a thread issues since its last
// commit form one group; cp_async_wait<N> returns once at most N of the thread's groups are
// still in flight (groups complete in order). The data is then visible to this thread only:
// other threads of the block see it after a __syncthreads that follows the wait.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool fill) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(fill ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool fill) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(fill ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

__device__ __forceinline__ uint32_t pack2(bf16 lo, bf16 hi) {  // lo in the low 16 bits
  return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack2f(float lo, float hi) {
  return pack2(__float2bfloat16(lo), __float2bfloat16(hi));
}

// The fragment reads are ldmatrix (one instruction for a whole fragment, no bank conflicts with
// the 16-byte row padding the kernels use). They need the warp's 32 lanes together and every row
// address 16-byte aligned: LD a multiple of 8 elements, column offsets multiples of 8, tiles
// 16-byte aligned.
// A fragment: rows [r0, r0+16), columns [c0, c0+16) of a row-major smem tile. Matrices 0..3 are
// (rows r0.., cols c0..), (r0+8.., c0..), (r0.., c0+8..), (r0+8.., c0+8..): a0..a3.
template <int LD>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const bf16* s, int r0, int c0, int lane) {
  static_assert(LD % 8 == 0, "ldmatrix rows must be 16-byte aligned");
  const int m = lane >> 3, i = lane & 7;
  ldsm_x4(a, s + (r0 + i + (m & 1) * 8) * LD + c0 + (m >> 1) * 8);
}
// B fragment with B[k][n] = S[n0 + n][k0 + k]: the tile's rows are the n index (K for Q K^T).
// Matrix 0: rows n0.., cols k0..k0+7 (b0); matrix 1: cols k0+8.. (b1).
template <int LD>
__device__ __forceinline__ void frag_b_rows_n(uint32_t (&b)[2], const bf16* s, int n0, int k0, int lane) {
  static_assert(LD % 8 == 0, "ldmatrix rows must be 16-byte aligned");
  const int m = (lane >> 3) & 1, i = lane & 7;  // lanes 16..31 repeat 0..15 (x2 reads 0..15)
  ldsm_x2(b, s + (n0 + i) * LD + k0 + m * 8);
}
// B fragment with B[k][n] = S[k0 + k][n0 + n]: the tile's rows are the k index (V for P V).
// Transposed: matrix 0 is rows k0..k0+7 (b0), matrix 1 rows k0+8.. (b1), cols n0..n0+7.
template <int LD>
__device__ __forceinline__ void frag_b_rows_k(uint32_t (&b)[2], const bf16* s, int k0, int n0, int lane) {
  static_assert(LD % 8 == 0, "ldmatrix rows must be 16-byte aligned");
  ldsm_x2_trans(b, s + (k0 + (lane & 15)) * LD + n0);
}

}  // namespace mf::cuda
#endif  // __CUDACC__
