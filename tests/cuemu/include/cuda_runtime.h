// cuemu: just enough of the CUDA runtime and language for kernels/*.cu to compile as C++ and run
// on the CPU (tests/cuemu/README.md). Device memory is host memory; kernels, GEMMs and copies run
// at once on the calling thread, while collectives (the emulated NCCL) are queued on their stream
// and run late (streams.cpp), so a missing stream wait shows. A kernel's blocks run one after
// another, each block's threads as cooperative fibers (runtime.cpp) so that __syncthreads, warp
// shuffles and mma.sync behave as on the device. Never part of the real build: only the cuemu
// targets link it.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#define MF_CUEMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
// A __shared__ variable is a static local; cu2cpp.py registers each one (cuemu::register_shared)
// and the runtime poisons them all before every block, so a read of shared memory no thread of
// the block wrote is NaN / -1.
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// The executing thread's coordinates (set by the fiber scheduler before it resumes a thread).
namespace cuemu {
struct Coords { uint3 threadIdx, blockIdx; dim3 blockDim, gridDim; };
extern Coords g_coords;
}  // namespace cuemu
#define threadIdx (::cuemu::g_coords.threadIdx)
#define blockIdx (::cuemu::g_coords.blockIdx)
#define blockDim (::cuemu::g_coords.blockDim)
#define gridDim (::cuemu::g_coords.gridDim)

// ---- runtime API ----------------------------------------------------------------------------------
// Every runtime entry point under its own name, so that nothing clashes with a real libcudart
// linked into the same program.
#define cudaMalloc cuemu_cudaMalloc
#define cudaFree cuemu_cudaFree
#define cudaMemcpy cuemu_cudaMemcpy
#define cudaMemcpyAsync cuemu_cudaMemcpyAsync
#define cudaMemset cuemu_cudaMemset
#define cudaMemsetAsync cuemu_cudaMemsetAsync
#define cudaMemcpy2DAsync cuemu_cudaMemcpy2DAsync
#define cudaStreamSynchronize cuemu_cudaStreamSynchronize
#define cudaDeviceSynchronize cuemu_cudaDeviceSynchronize
#define cudaGetLastError cuemu_cudaGetLastError
#define cudaPeekAtLastError cuemu_cudaPeekAtLastError
#define cudaGetDevice cuemu_cudaGetDevice
#define cudaDeviceGetAttribute cuemu_cudaDeviceGetAttribute
#define cudaGetErrorString cuemu_cudaGetErrorString
#define cudaGetErrorName cuemu_cudaGetErrorName
#define cudaGetDeviceCount cuemu_cudaGetDeviceCount
#define cudaDriverGetVersion cuemu_cudaDriverGetVersion
#define cudaSetDevice cuemu_cudaSetDevice
#define cudaMemGetInfo cuemu_cudaMemGetInfo
#define cudaStreamCreateWithFlags cuemu_cudaStreamCreateWithFlags
#define cudaStreamCreateWithPriority cuemu_cudaStreamCreateWithPriority
#define cudaDeviceGetStreamPriorityRange cuemu_cudaDeviceGetStreamPriorityRange
#define cudaStreamDestroy cuemu_cudaStreamDestroy
#define cudaStreamWaitEvent cuemu_cudaStreamWaitEvent
#define cudaEventCreate cuemu_cudaEventCreate
#define cudaEventCreateWithFlags cuemu_cudaEventCreateWithFlags
#define cudaEventRecord cuemu_cudaEventRecord
#define cudaEventSynchronize cuemu_cudaEventSynchronize
#define cudaEventQuery cuemu_cudaEventQuery
#define cudaEventDestroy cuemu_cudaEventDestroy
#define cudaEventElapsedTime cuemu_cudaEventElapsedTime
#define cudaHostAlloc cuemu_cudaHostAlloc
#define cudaMallocHost cuemu_cudaMallocHost
#define cudaFreeHost cuemu_cudaFreeHost

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
                   cudaErrorStubLibrary = 34, cudaErrorInsufficientDriver = 35, cudaErrorNoDevice = 100,
                   cudaErrorInvalidResourceHandle = 400, cudaErrorNotReady = 600,
                   cudaErrorIllegalAddress = 700, cudaErrorLaunchTimeout = 702, cudaErrorAssert = 710,
                   cudaErrorHardwareStackError = 714, cudaErrorIllegalInstruction = 715,
                   cudaErrorMisalignedAddress = 716, cudaErrorInvalidAddressSpace = 717,
                   cudaErrorInvalidPc = 718, cudaErrorLaunchFailure = 719 };
#define CUDART_VERSION 13000
using cudaError = cudaError_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                      cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16 };
using cudaStream_t = struct CUstream_st*;
using cudaEvent_t = struct CUevent_st*;

cudaError_t cudaMalloc(void** p, size_t n);
template <typename T>
cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t = nullptr);
cudaError_t cudaMemset(void* p, int v, size_t n);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                              size_t height, cudaMemcpyKind, cudaStream_t = nullptr);
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device);
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
namespace cuemu {
// cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): recorded per kernel;
// a launch asking for more than 48 KiB of dynamic shared memory without it fails, as on the device.
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
}  // namespace cuemu
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*f)(P...), cudaFuncAttribute a, int v) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cuemu::set_max_dynamic_smem(reinterpret_cast<const void*>(f), v);
}
constexpr unsigned cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2, cudaHostAllocDefault = 0;
// CUEMU_DEVICES: the devices cudaGetDeviceCount reports: a count (default 1; 0 is
// cudaErrorNoDevice), "no-driver" (cudaErrorInsufficientDriver, driver version 0) or "old-driver"
// (cudaErrorInsufficientDriver with a CUDA 12.0 driver). Only device 0 does any work.
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned flags, int priority);
cudaError_t cudaDeviceGetStreamPriorityRange(int* lo, int* hi);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b);
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned flags);
template <typename T>
cudaError_t cudaHostAlloc(T** p, size_t n, unsigned flags) { return cudaHostAlloc(reinterpret_cast<void**>(p), n, flags); }
cudaError_t cudaMallocHost(void** p, size_t n);
template <typename T>
cudaError_t cudaMallocHost(T** p, size_t n) { return cudaMallocHost(reinterpret_cast<void**>(p), n); }
cudaError_t cudaFreeHost(void* p);

// ---- device functions -----------------------------------------------------------------------------
namespace cuemu {
void syncthreads();
void syncwarp();
uint64_t warp_exchange(uint64_t mine, int src_lane);  // value of src_lane (this lane's if out of range)
unsigned warp_ballot(bool pred);
int lane_id();

template <typename T>
T shfl_from(T v, int src) {
  static_assert(sizeof(T) <= 8, "cuemu: shuffles of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(bits, src);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
}  // namespace cuemu

inline void __syncthreads() { ::cuemu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::cuemu::syncwarp(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = ::cuemu::lane_id();
  return ::cuemu::shfl_from(v, (lane & ~(width - 1)) | ((lane ^ mask) & (width - 1)));
}
template <typename T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = ::cuemu::lane_id();
  return ::cuemu::shfl_from(v, (lane & ~(width - 1)) | (src & (width - 1)));
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  const int lane = ::cuemu::lane_id(), base = lane & ~(width - 1);
  const int src = (lane - base) >= int(d) ? lane - int(d) : lane;
  return ::cuemu::shfl_from(v, src);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  const int lane = ::cuemu::lane_id(), base = lane & ~(width - 1);
  const int src = (lane - base) + int(d) < width ? lane + int(d) : lane;
  return ::cuemu::shfl_from(v, src);
}
inline unsigned __ballot_sync(unsigned, int pred) { return ::cuemu::warp_ballot(pred != 0); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
T __ldg(const T* p) { return *p; }
// CUDA's integer and float min/max overloads (mixed types promote, as there).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
int atomicAdd(int* p, int v);
unsigned atomicAdd(unsigned* p, unsigned v);
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v);
float atomicAdd(float* p, float v);
double atomicAdd(double* p, double v);
int atomicMax(int* p, int v);
int atomicMin(int* p, int v);
using std::exp; using std::log; using std::sqrt; using std::pow; using std::fabs;
using std::fmax; using std::fmin; using std::isfinite; using std::isnan; using std::isinf;

// ---- launches (kernels/*.cu's `k<<<cfg>>>(args)` is rewritten to cuemu::launch(Cfg(cfg), k, args)) --
namespace cuemu {
struct Cfg {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};
// Runs body() for every thread of every block (blocks in order, threads as fibers).
void run_grid(const Cfg& cfg, void (*body)(void*), void* ctx, const void* kernel = nullptr);
unsigned char* dynamic_smem();  // the current block's dynamic shared memory (cfg.smem bytes)
// Records a static __shared__ variable (once per declaration: cu2cpp.py emits the call as a static
// local's initialiser) and poisons it at once; returns true.
bool register_shared(void* p, size_t bytes);

// Streams (streams.cpp). Work runs at once on the calling thread, except what is queued with
// enqueue (collectives, and the copies and memsets issued to a stream behind one). A stream's
// queue runs in order on its own thread: an item's `early` part as soon as the queue reaches it,
// its `late` part when something waits for it or CUEMU_COMM_DELAY_MS (default 2000) after it was
// queued, whichever comes first.
// Called by eager work issued to `s` (launch, copy, GEMM) before it runs: makes the queued work
// of `s` run first (and, for the legacy stream 0, that of the blocking streams), then counts it.
void eager_work(cudaStream_t s);
// Whether `s` has queued work not yet done.
bool stream_busy(cudaStream_t s);
// Queues work on `s`, behind its earlier queued work. On an idle stream `early` runs before this
// returns (under the stream's lock: it must not block). `late` may be empty (then the item does
// not wait to be asked for).
void enqueue(cudaStream_t s, std::function<void()> early, std::function<void()> late);
// Empty when `s` is ordered after all eager work issued so far to the other streams (not the
// legacy one), by event waits or host synchronisations; otherwise says what is not.
std::string ordered_after_all(cudaStream_t s);
// Makes the queued work of every stream run, and returns when it has.
void device_ready();
// A cudaMemcpyAsync between the device and pinned host memory on `s` (after eager_work(s)): an
// upload runs now and its host bytes are checked later; a read-back fills `host` with poison and
// lands when a host synchronisation covers it (streams.cpp has the rules).
void pinned_copy(cudaStream_t s, bool readback, void* host, const void* device, size_t n);
// The host waited for the work issued to `s` so far (a read-back into pageable memory).
void stream_synced(cudaStream_t s);
// The host waited for the legacy stream (cudaMemcpy, cudaMemset): it and the blocking streams.
void legacy_synced();
// cudaFreeHost: the copies using [p, p + n) are over.
void host_memory_freed(const void* p, size_t n);
// Makes the next cudaGetLastError report cudaErrorLaunchFailure (unless an error is pending).
void fail_launch();

// Sets the block and thread order (as CUEMU_ORDER does: "forward", "reverse", "shuffle[:SEED]");
// throws std::invalid_argument on anything else.
void set_order(const std::string& order);

// Counts the launch under `name` (CUEMU_REPORT=1 prints the counts at exit: which kernels a test
// exercised).
void count_launch(const char* name);

// What the host asked of the device, by kind: "launch" (kernels), "gemm" (CublasLt::gemm on the
// host path), "malloc" / "free" (cudaMalloc / cudaFree; a cudaFree also waits for the device),
// "stream_sync" (cudaStreamSynchronize, cudaDeviceSynchronize: the host waits until a stream has
// drained), "event_sync" (cudaEventSynchronize: the host waits for the work up to an event),
// "sync_copy" (cudaMemcpy: waits for the legacy stream), "device_copy" (cudaMemcpyAsync,
// cudaMemsetAsync, cudaMemcpy2DAsync), "queued" (work queued behind a stream: collectives and the
// copies behind them), "pageable_readback" / "pageable_upload" (cudaMemcpyAsync to / from host
// memory not from cudaHostAlloc: the device copies those synchronously, and a read-back waits for
// the stream), and "drain": a stream_sync, sync_copy, pageable_readback, cudaFree, or an
// event_sync on an event recorded after the last work issued, while work (launch, gemm,
// device_copy, queued) has been issued since the last drain, i.e. a point where the device runs
// out of work until the host issues more. Thread-safe. CUEMU_STATS=FILE writes them to FILE as one
// JSON object at exit, so a script can compare whole runs: what two runs of N and 2N steps differ
// by is what N steps cost.
void count_stat(const char* kind);
std::map<std::string, long> stats();
// The number of work items issued so far (cudaEventRecord keeps it), and an event wait: counted as
// "event_sync", and as a drain too when no work was issued after the event was recorded.
long work_seq();
void count_event_wait(long seq_at_record);

template <typename... P, typename... A>
void launch(const Cfg& cfg, const char* name, void (*kernel)(P...), A&&... args) {
  count_launch(name);
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  struct Ctx { void (*k)(P...); std::tuple<std::decay_t<P>...>* p; } ctx{kernel, &params};
  run_grid(cfg, [](void* c) {
    auto* x = static_cast<Ctx*>(c);
    std::apply(x->k, *x->p);  // each thread gets copies of the by-value parameters
  }, &ctx, reinterpret_cast<const void*>(kernel));
}
}  // namespace cuemu
