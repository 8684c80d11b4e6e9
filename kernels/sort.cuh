// Stable sort of integer keys on the device (embedding backward, MoE permutation plan).
//
// Each entry is one 64-bit word: the key in the high 32 bits, the element's index in the low 32
// bits. All words are distinct, so sorting the words is the stable sort by key (equal keys stay
// in index order), and any correct sort gives the same bits: no atomics, nothing depends on
// scheduling. Chunks of kSortChunk entries are sorted in shared memory (bitonic network), then
// log2(n / kSortChunk) merge passes place each entry at its rank (its index within its run plus
// a binary search in the partner run).
#pragma once
#include "common.cuh"

namespace mf::cuda {

// Key given to elements whose key lies outside [0, K): they sort after every valid key.
constexpr uint32_t kSortNoKey = 0xffffffffu;
constexpr int kSortChunk = 1024;  // entries sorted by one block in shared memory

// The output and scratch of a sort of n keys, carved from an Arena (its sizing pass too).
struct SortBuffers {
  uint64_t* sorted;
  uint64_t* tmp;
};
inline SortBuffers take_sort_buffers(Arena& a, int64_t n) {
  uint64_t* sorted = a.take<uint64_t>(size_t(n));
  return {sorted, a.take<uint64_t>(size_t(n))};
}

// out[0, n) = the words (key, i) of keys[i], i in [0, n), in increasing order; tmp has n entries
// of scratch. n < 2^31. Asynchronous on `stream`.
void stable_sort_keys(const int32_t* keys, int64_t n, int64_t K, uint64_t* out, uint64_t* tmp,
                      cudaStream_t stream);

}  // namespace mf::cuda

#if defined(__CUDACC__)
namespace mf::cuda {
__device__ __forceinline__ uint32_t sort_key(uint64_t w) { return uint32_t(w >> 32); }
__device__ __forceinline__ int64_t sort_index(uint64_t w) { return int64_t(uint32_t(w)); }
// Number of entries of the increasing array a[lo, hi) that are < x.
__device__ __forceinline__ int64_t sort_count_less(const uint64_t* a, int64_t lo, int64_t hi,
                                                   uint64_t x) {
  const int64_t first = lo;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo - first;
}
}  // namespace mf::cuda
#endif  // __CUDACC__
