// Deterministic two-pass reductions (any number of tensors in two launches), scale and axpy.
// See reduce.cuh.
#include "reduce.cuh"

namespace mf::cuda {

constexpr int kReduceThreads = 256;
constexpr int64_t kReduceChunk = 65536;  // elements per first-pass block: fixes the summation order
constexpr int kReduceLanes = 4;          // independent accumulators per thread
constexpr int kEltThreads = 256;
constexpr int64_t kEltMaxBlocks = 4096;

namespace {

enum class ReduceOp { Sum, SumSquares };

// One tensor of a reduction: its chunks are first .. first + ceil(n / kReduceChunk) - 1.
struct ReduceSeg {
  const void* x;
  int64_t n;
  int64_t first;
  int bf16;  // element type: 1 bf16, 0 f32
  int pad_ = 0;
};

struct ReduceParams {
  const ReduceSeg* segs;  // device table of nsegs entries, or nullptr: the one segment `one`
  ReduceSeg one;
  int nsegs;
  double* partials;  // one per chunk of every segment
  double* out;       // one per segment
};

__host__ __device__ int64_t chunks_of(int64_t n) { return (n + kReduceChunk - 1) / kReduceChunk; }

// First pass: block b reduces chunk b of the concatenated segments in double. Thread t takes
// elements t, t + 256, ... of the chunk into accumulator (element / 256) % 4, and the four
// accumulators are added in order: the same bits for a tensor whatever its neighbours.
template <ReduceOp OP>
__global__ void __launch_bounds__(kReduceThreads) reduce_chunk_kernel(ReduceParams p) {
  __shared__ double red[kWarp];
  const int64_t b = blockIdx.x;
  const ReduceSeg* seg = &p.one;
  if (p.segs) {  // the last segment whose first chunk is <= b (never an empty one)
    int lo = 0, hi = p.nsegs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.segs[mid].first <= b) lo = mid; else hi = mid - 1;
    }
    seg = &p.segs[lo];
  }
  const int64_t begin = (b - seg->first) * kReduceChunk;
  const int64_t end = min(seg->n, begin + kReduceChunk);
  double acc[kReduceLanes] = {0.0, 0.0, 0.0, 0.0};
  const float* xf = static_cast<const float*>(seg->x);
  const bf16* xb = static_cast<const bf16*>(seg->x);
  const bool is_bf16 = seg->bf16 != 0;
  int64_t i = begin + threadIdx.x;
  for (; i + (kReduceLanes - 1) * kReduceThreads < end; i += kReduceLanes * kReduceThreads) {
    double v[kReduceLanes];
#pragma unroll
    for (int l = 0; l < kReduceLanes; ++l)
      v[l] = double(is_bf16 ? to_f(xb[i + l * kReduceThreads]) : xf[i + l * kReduceThreads]);
#pragma unroll
    for (int l = 0; l < kReduceLanes; ++l) acc[l] += OP == ReduceOp::SumSquares ? v[l] * v[l] : v[l];
  }
  for (int l = 0; i < end; i += kReduceThreads, ++l) {
    const double v = double(is_bf16 ? to_f(xb[i]) : xf[i]);
    acc[l] += OP == ReduceOp::SumSquares ? v * v : v;
  }
  double sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  sum = block_sum(sum, red);
  if (threadIdx.x == 0) p.partials[b] = sum;
}

// Second pass: block s adds segment s's chunk partials (thread-strided, then the block tree).
__global__ void __launch_bounds__(kReduceThreads) reduce_segment_kernel(ReduceParams p) {
  __shared__ double red[kWarp];
  const ReduceSeg& seg = p.segs ? p.segs[blockIdx.x] : p.one;
  const int64_t nc = chunks_of(seg.n);
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < nc; c += kReduceThreads) acc += p.partials[seg.first + c];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) p.out[blockIdx.x] = acc;
}

template <ReduceOp OP>
void launch_reduce(const ReduceParams& p, int64_t total_chunks, cudaStream_t stream) {
  MF_CHECK(total_chunks <= int64_t(0x7fffffff), "reduce: ", total_chunks, " chunks are too many");
  if (total_chunks > 0) {
    reduce_chunk_kernel<OP><<<unsigned(total_chunks), kReduceThreads, 0, stream>>>(p);
    CUDA_CHECK_LAUNCH();
  }
  reduce_segment_kernel<<<unsigned(p.segs ? p.nsegs : 1), kReduceThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

ReduceSeg seg_of(const Tensor& x, int64_t first) {
  return {x.ptr, x.numel(), first, x.dtype == DType::BF16 ? 1 : 0};
}

// One tensor, its result left at `out` on the device (no table: the segment rides in the params).
template <ReduceOp OP>
void reduce_one(const void* x, int64_t n, bool is_bf16, double* out, double* partials,
                cudaStream_t stream) {
  ReduceParams p{};
  p.one = {x, n, 0, is_bf16 ? 1 : 0};
  p.nsegs = 1;
  p.partials = partials;
  p.out = out;
  launch_reduce<OP>(p, chunks_of(n), stream);
}

}  // namespace

int reduce_partials_count(int64_t n) { return int(std::max<int64_t>(1, chunks_of(n))); }

void launch_sum_squares_f32(const float* x, int64_t n, double* out, double* partials,
                            cudaStream_t stream) {
  reduce_one<ReduceOp::SumSquares>(x, n, false, out, partials, stream);
}

namespace {
template <ReduceOp OP>
double reduce_entry(const Ctx& ctx, const char* op, const Tensor& x) {
  check_float(op, "x", x);
  const size_t nparts = size_t(reduce_partials_count(x.numel()));
  Arena sz;
  sz.take<double>(nparts);
  sz.take<double>(1);
  Arena a(ctx.scratch->get(sz.used()));
  double* partials = a.take<double>(nparts);
  double* out = a.take<double>(1);
  reduce_one<OP>(x.ptr, x.numel(), x.dtype == DType::BF16, out, partials, ctx.stream);
  double host = 0.0;
  CUDA_CHECK(cudaMemcpyAsync(&host, out, sizeof host, cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  return host;
}
}  // namespace

std::vector<double> op_sum_squares_each(const Ctx& ctx, const std::vector<const Tensor*>& xs) {
  std::vector<double> host(xs.size(), 0.0);
  if (xs.empty()) return host;
  MF_CHECK(xs.size() <= size_t(0x7fffffff), "sum_squares_each: ", xs.size(), " tensors are too many for one grid");
  // Two launches for all the tensors: the segment table goes up with the partials' scratch.
  std::vector<ReduceSeg> segs;
  segs.reserve(xs.size());
  int64_t chunks = 0;
  for (const Tensor* x : xs) {
    check_float("sum_squares_each", "x", *x);
    segs.push_back(seg_of(*x, chunks));
    chunks += chunks_of(x->numel());
  }
  Arena sz;
  sz.take<ReduceSeg>(segs.size());
  sz.take<double>(size_t(std::max<int64_t>(1, chunks)));
  sz.take<double>(xs.size());
  Arena a(ctx.scratch->get(sz.used()));
  ReduceSeg* table = a.take<ReduceSeg>(segs.size());
  ReduceParams p{};
  p.segs = table;
  p.nsegs = int(segs.size());
  p.partials = a.take<double>(size_t(std::max<int64_t>(1, chunks)));
  p.out = a.take<double>(xs.size());
  CUDA_CHECK(cudaMemcpyAsync(table, segs.data(), segs.size() * sizeof(ReduceSeg),
                             cudaMemcpyHostToDevice, ctx.stream));
  launch_reduce<ReduceOp::SumSquares>(p, chunks, ctx.stream);
  CUDA_CHECK(cudaMemcpyAsync(host.data(), p.out, xs.size() * sizeof(double),
                             cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  return host;
}

double op_sum_squares(const Ctx& ctx, const Tensor& x) {
  return reduce_entry<ReduceOp::SumSquares>(ctx, "sum_squares", x);
}
double op_sum(const Ctx& ctx, const Tensor& x) { return reduce_entry<ReduceOp::Sum>(ctx, "sum", x); }
// ---- scale / axpy -----------------------------------------------------------------------------
struct AxpyParams {
  const void* x;  // nullptr: scale only (y = alpha y)
  void* y;
  int64_t n;
  float alpha;
  // Given: alpha is float(sqrt(sums[0] / sums[1])) (0 when sums[1] <= 0), formed from two device
  // sums by every thread with the same IEEE double ops as the host's std::sqrt(nr / nx).
  const double* sums = nullptr;
};

template <typename TX, typename TY>
__global__ void axpy_kernel(AxpyParams p) {
  const TX* x = static_cast<const TX*>(p.x);
  TY* y = static_cast<TY*>(p.y);
  float alpha = p.alpha;
  if (p.sums) alpha = p.sums[1] > 0 ? float(sqrt(p.sums[0] / p.sums[1])) : 0.0f;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const float yi = to_f(y[i]);
    y[i] = from_f<TY>(x ? yi + alpha * to_f(x[i]) : alpha * yi);
  }
}

template <typename TX, typename TY>
void launch_axpy(const AxpyParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(p.n, kEltThreads), kEltMaxBlocks));
  axpy_kernel<TX, TY><<<blocks, kEltThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

void op_scale_to_norm_of(const Ctx& ctx, Tensor& x, const Tensor& ref) {
  const char* op = "scale_to_norm_of";
  check_float(op, "x", x);
  check_float(op, "ref", ref);
  if (x.numel() == 0) return;
  const size_t nparts = size_t(std::max(reduce_partials_count(ref.numel()), reduce_partials_count(x.numel())));
  Arena sz;
  sz.take<double>(nparts);
  sz.take<double>(2);
  Arena a(ctx.scratch->get(sz.used()));
  double* partials = a.take<double>(nparts);
  double* sums = a.take<double>(2);
  reduce_one<ReduceOp::SumSquares>(ref.ptr, ref.numel(), ref.dtype == DType::BF16, sums, partials, ctx.stream);
  reduce_one<ReduceOp::SumSquares>(x.ptr, x.numel(), x.dtype == DType::BF16, sums + 1, partials, ctx.stream);
  const AxpyParams ps{nullptr, x.ptr, x.numel(), 0.f, sums};  // x (=) float(sqrt(nr/nx)) x
  if (x.dtype == DType::F32) launch_axpy<float, float>(ps, ctx.stream);
  else launch_axpy<bf16, bf16>(ps, ctx.stream);
}

void op_scale(const Ctx& ctx, Tensor& x, float alpha) {
  check_float("scale", "x", x);
  AxpyParams p{nullptr, x.ptr, x.numel(), alpha};
  if (x.dtype == DType::F32)
    launch_axpy<float, float>(p, ctx.stream);
  else
    launch_axpy<bf16, bf16>(p, ctx.stream);
}

void op_axpy(const Ctx& ctx, float alpha, const Tensor& x, Tensor& y) {
  const char* op = "axpy";
  check_float(op, "x", x);
  check_float(op, "y", y);
  MF_CHECK(x.numel() == y.numel(), op, ": ", describe("x", x), " and ", describe("y", y),
           " differ in size");
  AxpyParams p{x.ptr, y.ptr, x.numel(), alpha};
  const bool xf = x.dtype == DType::F32, yf = y.dtype == DType::F32;
  if (xf && yf) return launch_axpy<float, float>(p, ctx.stream);
  if (!xf && yf) return launch_axpy<bf16, float>(p, ctx.stream);
  if (xf && !yf) return launch_axpy<float, bf16>(p, ctx.stream);
  launch_axpy<bf16, bf16>(p, ctx.stream);
}

}  // namespace mf::cuda
