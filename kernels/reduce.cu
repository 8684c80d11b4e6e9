// Deterministic two-pass reductions, scale and axpy. See reduce.cuh.
#include "reduce.cuh"

namespace mf::cuda {

constexpr int kReduceBlocks = 1024;   // fixed: part of the summation order (determinism)
constexpr int kReduceThreads = 256;
constexpr int kFinalThreads = 1024;   // second pass: one block over the partials
constexpr int kEltThreads = 256;
constexpr int64_t kEltMaxBlocks = 4096;

enum class ReduceOp { Sum, SumSquares };

struct ReduceParams {
  const void* x;
  int64_t n;
  double* partials;  // [kReduceBlocks]
  double* out;       // [1]
};

template <typename T, ReduceOp OP>
__global__ void __launch_bounds__(kReduceThreads) reduce_partial_kernel(ReduceParams p) {
  __shared__ double red[kWarp];
  const T* x = static_cast<const T*>(p.x);
  double acc = 0.0;
  const int64_t stride = int64_t(kReduceBlocks) * kReduceThreads;
  for (int64_t i = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x; i < p.n; i += stride) {
    const double v = double(to_f(x[i]));
    acc += OP == ReduceOp::SumSquares ? v * v : v;
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) p.partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kFinalThreads) reduce_final_kernel(ReduceParams p) {
  __shared__ double red[kWarp];
  double acc = 0.0;
  for (int i = threadIdx.x; i < kReduceBlocks; i += kFinalThreads) acc += p.partials[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *p.out = acc;
}

template <typename T, ReduceOp OP>
void launch_reduce(const ReduceParams& p, cudaStream_t stream) {
  reduce_partial_kernel<T, OP><<<kReduceBlocks, kReduceThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
  reduce_final_kernel<<<1, kFinalThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

int reduce_partials_count() { return kReduceBlocks; }

void launch_sum_squares_f32(const float* x, int64_t n, double* out, double* partials,
                            cudaStream_t stream) {
  launch_reduce<float, ReduceOp::SumSquares>({x, n, partials, out}, stream);
}

namespace {
template <ReduceOp OP>
double reduce_entry(const Ctx& ctx, const char* op, const Tensor& x) {
  check_float(op, "x", x);
  Arena sz;
  sz.take<double>(kReduceBlocks);
  sz.take<double>(1);
  Arena a(ctx.scratch->get(sz.used()));
  ReduceParams p{x.ptr, x.numel(), a.take<double>(kReduceBlocks), a.take<double>(1)};
  if (x.dtype == DType::F32)
    launch_reduce<float, OP>(p, ctx.stream);
  else
    launch_reduce<bf16, OP>(p, ctx.stream);
  double host = 0.0;
  CUDA_CHECK(cudaMemcpyAsync(&host, p.out, sizeof host, cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  return host;
}
}  // namespace

std::vector<double> op_sum_squares_each(const Ctx& ctx, const std::vector<const Tensor*>& xs) {
  std::vector<double> host(xs.size(), 0.0);
  if (xs.empty()) return host;
  for (const Tensor* x : xs) check_float("sum_squares_each", "x", *x);
  // One partials area reused by every tensor (the stream orders the passes) and one result
  // slot per tensor, copied back together.
  Arena sz;
  sz.take<double>(kReduceBlocks);
  sz.take<double>(xs.size());
  Arena a(ctx.scratch->get(sz.used()));
  double* partials = a.take<double>(kReduceBlocks);
  double* outs = a.take<double>(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const ReduceParams p{xs[i]->ptr, xs[i]->numel(), partials, outs + i};
    if (xs[i]->dtype == DType::F32)
      launch_reduce<float, ReduceOp::SumSquares>(p, ctx.stream);
    else
      launch_reduce<bf16, ReduceOp::SumSquares>(p, ctx.stream);
  }
  CUDA_CHECK(cudaMemcpyAsync(host.data(), outs, xs.size() * sizeof(double),
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
  Arena sz;
  sz.take<double>(kReduceBlocks);
  sz.take<double>(2);
  Arena a(ctx.scratch->get(sz.used()));
  double* partials = a.take<double>(kReduceBlocks);
  double* sums = a.take<double>(2);
  const ReduceParams pr{ref.ptr, ref.numel(), partials, sums};
  const ReduceParams px{x.ptr, x.numel(), partials, sums + 1};
  if (ref.dtype == DType::F32) launch_reduce<float, ReduceOp::SumSquares>(pr, ctx.stream);
  else launch_reduce<bf16, ReduceOp::SumSquares>(pr, ctx.stream);
  if (x.dtype == DType::F32) launch_reduce<float, ReduceOp::SumSquares>(px, ctx.stream);
  else launch_reduce<bf16, ReduceOp::SumSquares>(px, ctx.stream);
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
