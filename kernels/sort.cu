// Stable key sort: chunk sort in shared memory, then merge passes by rank. See sort.cuh.
#include "sort.cuh"

namespace mf::cuda {

constexpr int kSortThreads = kSortChunk / 2;  // one compare-exchange pair per thread per stage
constexpr int kSortMergeThreads = 256;
static_assert((kSortChunk & (kSortChunk - 1)) == 0, "the bitonic network needs a power of two");

__global__ void __launch_bounds__(kSortThreads) sort_chunk_kernel(const int32_t* keys, int64_t n,
                                                                  int64_t K, uint64_t* out) {
  __shared__ uint64_t s[kSortChunk];
  const int64_t base = int64_t(blockIdx.x) * kSortChunk;
  for (int j = threadIdx.x; j < kSortChunk; j += kSortThreads) {
    const int64_t i = base + j;
    uint64_t w = ~uint64_t(0);  // padding: after every real entry
    if (i < n) {
      const int32_t k = keys[i];
      const uint32_t key = k >= 0 && k < K ? uint32_t(k) : kSortNoKey;
      w = (uint64_t(key) << 32) | uint64_t(uint32_t(i));
    }
    s[j] = w;
  }
  __syncthreads();
  const int t = threadIdx.x;
  for (int size = 2; size <= kSortChunk; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      // pair (lo, lo + stride) with lo = 2 stride (t / stride) + t % stride
      const int lo = ((t & ~(stride - 1)) << 1) | (t & (stride - 1)), hi = lo + stride;
      const bool up = (lo & size) == 0;  // the last stage (size == kSortChunk) is all increasing
      const uint64_t a = s[lo], b = s[hi];
      if ((a > b) == up) {
        s[lo] = b;
        s[hi] = a;
      }
      __syncthreads();
    }
  }
  for (int j = threadIdx.x; j < kSortChunk; j += kSortThreads)
    if (base + j < n) out[base + j] = s[j];
}

// Runs of `width` sorted entries, merged in pairs: an entry's place in the merged run is its
// index in its own run plus the number of smaller entries in the partner run.
__global__ void __launch_bounds__(kSortMergeThreads) sort_merge_kernel(const uint64_t* in,
                                                                       uint64_t* out, int64_t n,
                                                                       int log2_width) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const uint64_t w = in[j];
  const int64_t width = int64_t(1) << log2_width;
  const int64_t other0 = (j ^ width) & ~(width - 1);  // the partner run: [other0, other1)
  const int64_t other1 = min(n, other0 + width);
  const int64_t less = other0 < n ? sort_count_less(in, other0, other1, w) : 0;
  // the merged pair starts where this run's index has the width bit and below cleared
  out[(j & ~(2 * width - 1)) + (j & (width - 1)) + less] = w;
}

void stable_sort_keys(const int32_t* keys, int64_t n, int64_t K, uint64_t* out, uint64_t* tmp,
                      cudaStream_t stream) {
  if (n == 0) return;
  MF_CHECK(n <= 0x7fffffff, "stable_sort_keys: ", n, " entries is too many (at most 2^31 - 1)");
  int passes = 0;
  for (int64_t w = kSortChunk; w < n; w *= 2) ++passes;
  // Ping-pong so the last pass writes `out`.
  uint64_t* a = passes % 2 == 0 ? out : tmp;
  uint64_t* b = passes % 2 == 0 ? tmp : out;
  sort_chunk_kernel<<<unsigned(ceil_div(n, kSortChunk)), kSortThreads, 0, stream>>>(keys, n, K, a);
  CUDA_CHECK_LAUNCH();
  int log2_width = 0;
  while ((int64_t(1) << log2_width) < kSortChunk) ++log2_width;
  for (int64_t w = kSortChunk; w < n; w *= 2, ++log2_width) {
    sort_merge_kernel<<<unsigned(ceil_div(n, kSortMergeThreads)), kSortMergeThreads, 0, stream>>>(
        a, b, n, log2_width);
    CUDA_CHECK_LAUNCH();
    std::swap(a, b);
  }
}

}  // namespace mf::cuda
