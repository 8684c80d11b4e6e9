// The emulator's own behaviour (tests/cuemu/README.md): thread and block orders, shared and global
// memory poison, warp collectives and the divergent-barrier error. The kernels are selftest.cu,
// rewritten by cu2cpp.py like kernels/*.cu.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

#include "cublasLt.h"
#include "cuda_runtime.h"

namespace selftest {
void block_sum(const float* x, float* out, int blocks, int threads, bool racy);
void stale_shared(unsigned* out, int blocks, bool dynamic);
void block_order(int* counter, int* position, int* coords, dim3 grid);
void thread_order(int* counter, int* position, int threads);
void warp_ops(int* out, int threads);
void divergent_barrier(float* out);
void ldmatrix(unsigned* out, int offset);
void cp_async(const float* src, float* out, int offset);
void cp_async_src_write(float* src, float* out, bool before_wait);
cudaError_t dyn_smem(float* out, int bytes, int attribute);  // attribute < 0: not set
cudaError_t mixed_smem(float* out, int bytes, int attribute);  // 32 KiB static + `bytes` dynamic
cudaError_t big_static(float* out);                            // 52 KiB static
void warp_drift(int* counter, int* position, int warps);
}  // namespace selftest

namespace {

// Device memory for n values of T, filled from `init` when given.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n;
  explicit Dev(size_t n_, const std::vector<T>* init = nullptr) : n(n_) {
    REQUIRE(cudaMalloc(&p, n * sizeof(T)) == cudaSuccess);
    if (init) REQUIRE(cudaMemcpy(p, init->data(), n * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    REQUIRE(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
};

// Restores the default order when a test ends, pass or fail.
struct OrderGuard {
  explicit OrderGuard(const char* o) { cuemu::set_order(o); }
  ~OrderGuard() { cuemu::set_order("forward"); }
};

struct SumCase {
  std::vector<float> want, got_fwd, got_rev;
};

SumCase run_sums(bool racy) {
  const int blocks = 3, threads = 256;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  std::vector<float> x(size_t(blocks) * threads);
  for (float& v : x) v = u(rng);
  SumCase c;
  for (int b = 0; b < blocks; ++b) {
    double s = 0;
    for (int t = 0; t < threads; ++t) s += x[size_t(b) * threads + t];
    c.want.push_back(float(s));
  }
  Dev<float> dx(x.size(), &x), dout(blocks);
  for (const char* o : {"forward", "reverse"}) {
    OrderGuard g(o);
    selftest::block_sum(dx.p, dout.p, blocks, threads, racy);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    (std::strcmp(o, "forward") == 0 ? c.got_fwd : c.got_rev) = dout.get();
  }
  return c;
}

bool close_to(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(a[i] - b[i]) <= 1e-3f * std::fabs(b[i]))) return false;
  return true;
}

}  // namespace

TEST_CASE("cuemu: a block reduction with its barrier is right in every order", "[cuemu]") {
  const SumCase c = run_sums(false);
  CHECK(close_to(c.got_fwd, c.want));
  CHECK(close_to(c.got_rev, c.want));
  OrderGuard g("shuffle:5");
  const SumCase s = run_sums(false);
  CHECK(close_to(s.got_fwd, s.want));
}

TEST_CASE("cuemu: a missing barrier shows as a wrong result in some order", "[cuemu]") {
  // Forward: thread 0 reads the other warps' slots before they write them (poison: NaN).
  // Reverse: the other warps have written first, and the result happens to be right.
  const SumCase c = run_sums(true);
  CHECK_FALSE(close_to(c.got_fwd, c.want));
  for (float v : c.got_fwd) CHECK(std::isnan(v));
  CHECK(close_to(c.got_rev, c.want));
}

TEST_CASE("cuemu: shared memory starts every block poisoned", "[cuemu]") {
  for (bool dynamic : {false, true}) {
    Dev<unsigned> out(3 * 64);
    selftest::stale_shared(out.p, 3, dynamic);
    const std::vector<unsigned> h = out.get();
    for (int t = 0; t < 64; ++t) {
      CHECK(h[size_t(t)] == 7u);             // block 0 wrote it
      CHECK(h[size_t(64 + t)] == ~0u);       // later blocks did not: 0xFF bytes, not block 0's 7
      CHECK(h[size_t(128 + t)] == ~0u);
    }
  }
}

TEST_CASE("cuemu: cudaMalloc returns poisoned memory", "[cuemu]") {
  Dev<float> f(100);
  for (float v : f.get()) CHECK(std::isnan(v));
}

TEST_CASE("cuemu: orders of blocks and threads", "[cuemu]") {
  const dim3 grid(3, 2, 2);
  const int nb = 12, nt = 70;
  auto blocks = [&](const char* o) {
    OrderGuard g(o);
    Dev<int> counter(1), pos(nb), coords(3 * nb);
    REQUIRE(cudaMemset(counter.p, 0, sizeof(int)) == cudaSuccess);
    selftest::block_order(counter.p, pos.p, coords.p, grid);
    const std::vector<int> c = coords.get();
    for (int b = 0; b < nb; ++b) {  // every block ran once, with its own coordinates
      CHECK(c[size_t(3 * b)] == b % 3);
      CHECK(c[size_t(3 * b + 1)] == (b / 3) % 2);
      CHECK(c[size_t(3 * b + 2)] == b / 6);
    }
    return pos.get();
  };
  auto threads = [&](const char* o) {
    OrderGuard g(o);
    Dev<int> counter(1), pos(nt);
    REQUIRE(cudaMemset(counter.p, 0, sizeof(int)) == cudaSuccess);
    selftest::thread_order(counter.p, pos.p, nt);
    return pos.get();
  };
  std::vector<int> ident(nb), rev(nb), tident(nt), trev(nt);
  for (int i = 0; i < nb; ++i) ident[size_t(i)] = i, rev[size_t(i)] = nb - 1 - i;
  for (int i = 0; i < nt; ++i) tident[size_t(i)] = i, trev[size_t(i)] = nt - 1 - i;
  CHECK(blocks("forward") == ident);
  CHECK(blocks("reverse") == rev);
  CHECK(threads("forward") == tident);
  CHECK(threads("reverse") == trev);
  const std::vector<int> sb = blocks("shuffle:3"), st = threads("shuffle:3");
  CHECK(std::set<int>(sb.begin(), sb.end()).size() == size_t(nb));  // a permutation
  CHECK(std::set<int>(st.begin(), st.end()).size() == size_t(nt));
  CHECK(sb != ident);
  CHECK(st != tident);
  CHECK(blocks("shuffle:3") == sb);  // a seed gives the same order again
  CHECK(blocks("shuffle:4") != sb);
}

TEST_CASE("cuemu: warp shuffles and ballot", "[cuemu]") {
  for (const char* o : {"forward", "shuffle:9"}) {
    OrderGuard g(o);
    Dev<int> out(4 * 64);
    selftest::warp_ops(out.p, 64);
    const std::vector<int> h = out.get();
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32;
      CHECK(unsigned(h[size_t(4 * t)]) == 0xAAAAAAAAu);
      CHECK(h[size_t(4 * t + 1)] == (lane >= 1 ? lane - 1 : lane));
      CHECK(h[size_t(4 * t + 2)] == (lane + 2 < 32 ? lane + 2 : lane));
      CHECK(h[size_t(4 * t + 3)] == 30);
    }
  }
}

TEST_CASE("cuemu: a barrier in divergent code is an error, not a hang", "[cuemu]") {
  Dev<float> out(64);
  CHECK_THROWS_WITH(selftest::divergent_barrier(out.p), Catch::Contains("deadlock"));
}

TEST_CASE("cuemu: a bad order names itself", "[cuemu]") {
  CHECK_THROWS_WITH(cuemu::set_order("backwards"), Catch::Contains("backwards"));
  CHECK_THROWS_WITH(cuemu::set_order("shuffle:x"), Catch::Contains("seed"));
  cuemu::set_order("forward");
}

TEST_CASE("cuemu: cudaMemGetInfo counts what is allocated; cudaFree refuses foreign pointers", "[cuemu]") {
  size_t free0 = 0, total = 0, free1 = 0, free2 = 0;
  REQUIRE(cudaMemGetInfo(&free0, &total) == cudaSuccess);
  CHECK(free0 <= total);
  void* p = nullptr;
  REQUIRE(cudaMalloc(&p, size_t(10) << 20) == cudaSuccess);
  REQUIRE(cudaMemGetInfo(&free1, &total) == cudaSuccess);
  CHECK(free0 - free1 == size_t(10) << 20);
  void* too_big = nullptr;
  CHECK(cudaMalloc(&too_big, total) == cudaErrorMemoryAllocation);
  int on_stack = 0;
  CHECK(cudaFree(&on_stack) == cudaErrorInvalidValue);
  CHECK(cudaFree(p) == cudaSuccess);
  REQUIRE(cudaMemGetInfo(&free2, &total) == cudaSuccess);
  CHECK(free2 == free0);
  CHECK(cudaFree(nullptr) == cudaSuccess);
}

TEST_CASE("cuemu: ldmatrix gives the mma fragments of the PTX layouts", "[cuemu]") {
  Dev<unsigned> out(32 * 8);
  selftest::ldmatrix(out.p, 0);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  const std::vector<unsigned> h = out.get();
  auto pair = [](int r0, int c0, int r1, int c1) {  // tile values at two places, low then high
    return unsigned(100 * r0 + c0) | (unsigned(100 * r1 + c1) << 16);
  };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const unsigned* o = &h[size_t(8 * lane)];
    INFO("lane " << lane);
    // A (16x16, rows 0..15, cols 0..15): a0 (g, 2t), a1 (g+8, 2t), a2 (g, 2t+8), a3 (g+8, 2t+8).
    CHECK(o[0] == pair(g, 2 * t, g, 2 * t + 1));
    CHECK(o[1] == pair(g + 8, 2 * t, g + 8, 2 * t + 1));
    CHECK(o[2] == pair(g, 2 * t + 8, g, 2 * t + 9));
    CHECK(o[3] == pair(g + 8, 2 * t + 8, g + 8, 2 * t + 9));
    // B[k][n] = S[8 + n][k]: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g).
    CHECK(o[4] == pair(8 + g, 2 * t, 8 + g, 2 * t + 1));
    CHECK(o[5] == pair(8 + g, 2 * t + 8, 8 + g, 2 * t + 9));
    // B[k][n] = S[k][8 + n]: b0 = (S[2t][8+g], S[2t+1][8+g]), b1 = rows 2t+8, 2t+9.
    CHECK(o[6] == pair(2 * t, 8 + g, 2 * t + 1, 8 + g));
    CHECK(o[7] == pair(2 * t + 8, 8 + g, 2 * t + 9, 8 + g));
  }
  // Rows 2 elements off 16-byte alignment: a failed launch, as on the device.
  selftest::ldmatrix(out.p, 2);
  CHECK(cudaGetLastError() != cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);  // and the error is cleared by reading it
}

TEST_CASE("cuemu: cp.async lands at the wait, poisons its destination before, zero-fills", "[cuemu]") {
  std::vector<float> src(128);
  for (size_t i = 0; i < src.size(); ++i) src[i] = 1.f + float(i);
  Dev<float> s(128, &src), out(8 * 32);
  selftest::cp_async(s.p, out.p, 0);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  const std::vector<float> h = out.get();
  for (int l = 0; l < 32; ++l) {
    INFO("lane " << l);
    const float* o = &h[size_t(8 * l)];
    CHECK(std::isnan(o[0]));          // issued, not waited for: neither the old -1 nor the data
    CHECK(o[1] == src[size_t(4 * l)]);  // group 0 done after wait_group 1
    CHECK(o[2] == src[size_t(4 * l + 3)]);
    CHECK(std::isnan(o[3]));          // group 1 (the newest) may still be in flight
    CHECK(o[4] == src[size_t(4 * l)]);
    CHECK(o[5] == 0.f);               // src-size 0: zeros, whatever the source holds
    CHECK(o[6] == 0.f);
  }
  // A destination 4 bytes off 16-byte alignment: a failed launch, as on the device.
  selftest::cp_async(s.p, out.p, 1);
  CHECK(cudaGetLastError() != cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("cuemu: a write to a cp.async source before the wait fails the launch", "[cuemu]") {
  std::vector<float> src(128);
  for (size_t i = 0; i < src.size(); ++i) src[i] = 1.f + float(i);
  {
    Dev<float> s(128, &src), out(128);
    selftest::cp_async_src_write(s.p, out.p, false);  // written after the wait: no race
    REQUIRE(cudaGetLastError() == cudaSuccess);
    CHECK(out.get() == src);
  }
  Dev<float> s(128, &src), out(128);
  selftest::cp_async_src_write(s.p, out.p, true);
  CHECK(cudaGetLastError() != cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("cuemu: over 48 KiB of dynamic shared memory needs the kernel's attribute", "[cuemu]") {
  Dev<float> out(1);
  CHECK(selftest::dyn_smem(out.p, 48 * 1024, -1) == cudaSuccess);
  CHECK(out.get()[0] == 3.f);
  CHECK(selftest::dyn_smem(out.p, 64 * 1024, -1) == cudaErrorInvalidValue);   // attribute not raised
  CHECK(selftest::dyn_smem(out.p, 64 * 1024, 64 * 1024) == cudaSuccess);
  CHECK(out.get()[0] == 3.f);
  CHECK(selftest::dyn_smem(out.p, 96 * 1024, -1) == cudaErrorInvalidValue);   // above what was set
  CHECK(selftest::dyn_smem(out.p, 96 * 1024, 228 * 1024) == cudaErrorInvalidValue);  // above the opt-in
  CHECK(selftest::dyn_smem(out.p, 227 * 1024, 227 * 1024) == cudaSuccess);
}

TEST_CASE("cuemu: static and dynamic shared memory together stay within the opt-in limit", "[cuemu]") {
  // The static size is learnt on the kernel's first run, so the first over-limit launch fails
  // from inside it, and later attribute calls and launches are refused up front.
  Dev<float> out(1);
  CHECK(selftest::mixed_smem(out.p, 200 * 1024, 200 * 1024) == cudaErrorInvalidValue);  // first run
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(selftest::mixed_smem(out.p, 200 * 1024, -1) == cudaErrorInvalidValue);  // now refused up front
  CHECK(selftest::mixed_smem(out.p, 1024, -1) == cudaSuccess);
  CHECK(out.get()[0] == 3.f);
  CHECK(selftest::mixed_smem(out.p, 195 * 1024, 195 * 1024) == cudaSuccess);  // 32 + 195 = 227 KiB
  CHECK(out.get()[0] == 3.f);
  CHECK(selftest::mixed_smem(out.p, 196 * 1024, 196 * 1024) == cudaErrorInvalidValue);  // the attribute
  CHECK(selftest::mixed_smem(out.p, 200 * 1024, -1) == cudaErrorInvalidValue);  // above what was set
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(selftest::big_static(out.p) == cudaErrorInvalidValue);  // over 48 KiB static
  CHECK(cudaGetLastError() == cudaSuccess);
}

namespace {
struct Pinned {
  float* p = nullptr;
  explicit Pinned(size_t n) { REQUIRE(cudaHostAlloc(reinterpret_cast<void**>(&p), n * sizeof(float), 0) == cudaSuccess); }
  ~Pinned() { cudaFreeHost(p); }
};
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess); }
  ~Stream() { cudaStreamDestroy(s); }
};
struct Event {
  cudaEvent_t e = nullptr;
  Event() { REQUIRE(cudaEventCreate(&e) == cudaSuccess); }
  ~Event() { cudaEventDestroy(e); }
};
}  // namespace

TEST_CASE("cuemu: a read-back into pinned memory lands at the synchronisation that covers it", "[cuemu]") {
  const size_t n = 64;
  std::vector<float> src(n);
  for (size_t i = 0; i < n; ++i) src[i] = 0.5f + float(i);
  Dev<float> d(n, &src);
  Pinned h(n);
  Stream st;
  auto issue = [&] {
    for (size_t i = 0; i < n; ++i) h.p[i] = 0.f;
    REQUIRE(cudaMemcpyAsync(h.p, d.p, n * sizeof(float), cudaMemcpyDeviceToHost, st.s) == cudaSuccess);
    CHECK(std::isnan(h.p[0]));  // not yet: the host may not read it before a synchronisation
    CHECK(std::isnan(h.p[n - 1]));
  };
  auto landed = [&] { return std::vector<float>(h.p, h.p + n) == src; };
  issue();
  REQUIRE(cudaStreamSynchronize(st.s) == cudaSuccess);
  CHECK(landed());

  Event before, after;
  REQUIRE(cudaEventRecord(before.e, st.s) == cudaSuccess);
  issue();
  REQUIRE(cudaEventRecord(after.e, st.s) == cudaSuccess);
  REQUIRE(cudaEventSynchronize(before.e) == cudaSuccess);  // recorded before the copy
  CHECK(std::isnan(h.p[0]));
  REQUIRE(cudaEventSynchronize(after.e) == cudaSuccess);
  CHECK(landed());

  issue();
  REQUIRE(cudaEventRecord(after.e, st.s) == cudaSuccess);
  REQUIRE(cudaEventQuery(after.e) == cudaSuccess);  // a successful query covers it too
  CHECK(landed());

  issue();  // a read-back into pageable memory on the same stream waits for the stream
  std::vector<float> pageable(n);
  REQUIRE(cudaMemcpyAsync(pageable.data(), d.p, n * sizeof(float), cudaMemcpyDeviceToHost, st.s) == cudaSuccess);
  CHECK(landed());

  issue();  // another stream's synchronisation does not cover it
  Stream other;
  REQUIRE(cudaStreamSynchronize(other.s) == cudaSuccess);
  CHECK(std::isnan(h.p[0]));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  CHECK(landed());
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("cuemu: the host writing pinned memory an upload may still read is reported", "[cuemu]") {
  const size_t n = 64;
  Dev<float> d(n);
  Pinned h(n);
  Stream st;
  std::vector<float> first(n);
  for (size_t i = 0; i < n; ++i) h.p[i] = first[i] = 1.f + float(i);
  const size_t bytes = n * sizeof(float);
  // Written after the stream was synchronised: fine, and the device has the first bytes.
  REQUIRE(cudaMemcpyAsync(d.p, h.p, bytes, cudaMemcpyHostToDevice, st.s) == cudaSuccess);
  REQUIRE(cudaStreamSynchronize(st.s) == cudaSuccess);
  h.p[3] = -1.f;
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(d.get() == first);
  // Written after an event recorded behind the copy was waited for: fine (the upload ring's way).
  Event done;
  REQUIRE(cudaMemcpyAsync(d.p, h.p, bytes, cudaMemcpyHostToDevice, st.s) == cudaSuccess);
  REQUIRE(cudaEventRecord(done.e, st.s) == cudaSuccess);
  REQUIRE(cudaEventSynchronize(done.e) == cudaSuccess);
  h.p[3] = -2.f;
  REQUIRE(cudaMemcpyAsync(d.p, h.p, bytes, cudaMemcpyHostToDevice, st.s) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
  // Written before any synchronisation: found at the synchronisation ...
  h.p[5] = -3.f;
  REQUIRE(cudaStreamSynchronize(st.s) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  // ... or when the next copy reuses the bytes (a staging ring without its event wait).
  REQUIRE(cudaMemcpyAsync(d.p, h.p, bytes, cudaMemcpyHostToDevice, st.s) == cudaSuccess);
  h.p[7] = -4.f;
  REQUIRE(cudaMemcpyAsync(d.p, h.p, bytes, cudaMemcpyHostToDevice, st.s) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  REQUIRE(cudaStreamSynchronize(st.s) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
}

// The emulated cuBLASLt against a product worked by hand, in cuBLAS's column-major convention:
// A = [1 2 3; 4 5 6] (2x3), B = [1 0; 0 1; 1 1] (3x2), A B = [4 5; 10 11].
TEST_CASE("cuemu: cudaEventElapsedTime wants timed, recorded, completed events", "[cuemu]") {
  Stream st;
  Event a, b;
  float ms = -1.f;
  CHECK(cudaEventElapsedTime(&ms, a.e, b.e) == cudaErrorInvalidResourceHandle);  // not recorded
  REQUIRE(cudaEventRecord(a.e, st.s) == cudaSuccess);
  REQUIRE(cudaEventRecord(b.e, st.s) == cudaSuccess);
  REQUIRE(cudaEventSynchronize(b.e) == cudaSuccess);
  REQUIRE(cudaEventElapsedTime(&ms, a.e, b.e) == cudaSuccess);
  CHECK(ms >= 0.f);
  // An event made without timing cannot be timed.
  cudaEvent_t untimed = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&untimed, cudaEventDisableTiming) == cudaSuccess);
  REQUIRE(cudaEventRecord(untimed, st.s) == cudaSuccess);
  REQUIRE(cudaEventSynchronize(untimed) == cudaSuccess);
  CHECK(cudaEventElapsedTime(&ms, a.e, untimed) == cudaErrorInvalidResourceHandle);
  cudaEventDestroy(untimed);
  // Behind queued work the second event is not done yet, and asking does not wait for it.
  bool ran = false;
  cuemu::enqueue(st.s, nullptr, [&] { ran = true; });
  REQUIRE(cudaEventRecord(b.e, st.s) == cudaSuccess);
  CHECK(cudaEventElapsedTime(&ms, a.e, b.e) == cudaErrorNotReady);
  CHECK_FALSE(ran);
  REQUIRE(cudaEventSynchronize(b.e) == cudaSuccess);
  CHECK(ran);
  CHECK(cudaEventElapsedTime(&ms, a.e, b.e) == cudaSuccess);
}

TEST_CASE("cuemu: the emulated cublasLtMatmul is column-major, with transposes and checks", "[cuemu]") {
  cublasLtHandle_t h = nullptr;
  REQUIRE(cublasLtCreate(&h) == CUBLAS_STATUS_SUCCESS);
  auto run = [&](bool transA, int64_t lda, std::vector<float> a, float beta, std::vector<float>& d,
                 cublasStatus_t* heuristic = nullptr) {
    Dev<float> A(a.size(), &a), B(6, nullptr), D(4, &d);
    const std::vector<float> b = {1, 0, 1, 0, 1, 1};
    REQUIRE(cudaMemcpy(B.p, b.data(), 6 * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
    cublasLtMatmulDesc_t op = nullptr;
    REQUIRE(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
    const cublasOperation_t t = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
    REQUIRE(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t) == CUBLAS_STATUS_SUCCESS);
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, transA ? 3 : 2, transA ? 2 : 3, lda);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, 3, 2, 3);
    cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, 2, 2, 2);
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    cublasLtMatmulHeuristicResult_t res[2];
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, ld, ld, pref, 2, res, &found);
    if (heuristic) *heuristic = st;
    if (st == CUBLAS_STATUS_SUCCESS) {
      REQUIRE(found == 1);
      const float alpha = 1.f;
      CHECK(cublasLtMatmul(h, op, &alpha, A.p, la, B.p, lb, &beta, D.p, ld, D.p, ld, &res[0].algo, nullptr, 0,
                           nullptr) == CUBLAS_STATUS_SUCCESS);
      d = D.get();
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(op);
  };
  std::vector<float> d = {0, 0, 0, 0};
  run(false, 2, {1, 4, 2, 5, 3, 6}, 0.f, d);
  CHECK(d == std::vector<float>{4, 10, 5, 11});
  d = {1, 1, 1, 1};
  run(true, 3, {1, 2, 3, 4, 5, 6}, 1.f, d);  // A stored transposed (3x2); D += A B
  CHECK(d == std::vector<float>{5, 11, 6, 12});
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  run(false, 1, {1, 4, 2, 5, 3, 6}, 0.f, d, &st);  // ld 1 < 2 rows
  CHECK(st == CUBLAS_STATUS_INVALID_VALUE);
  cublasLtMatrixLayout_t l;
  cublasLtMatrixLayoutCreate(&l, CUDA_R_32F, 2, 2, 2);
  const int64_t wide = 3;  // BATCH_COUNT is an int32
  CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &wide, sizeof wide) ==
        CUBLAS_STATUS_INVALID_VALUE);
  cublasLtMatrixLayoutDestroy(l);
  cublasLtDestroy(h);
}

TEST_CASE("cuemu: between block barriers one warp runs ahead of the others", "[cuemu]") {
  auto run = [](const char* o) {
    OrderGuard g(o);
    Dev<int> counter(1), pos(12);
    REQUIRE(cudaMemset(counter.p, 0, sizeof(int)) == cudaSuccess);
    selftest::warp_drift(counter.p, pos.p, 3);
    return pos.get();
  };
  // forward: warp 0 passes all its warp barriers first, then warp 1, then warp 2; reverse: the
  // other way round. (Lock-step rounds would interleave them: 0, 3, 6, 9 for warp 0.)
  CHECK(run("forward") == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  CHECK(run("reverse") == std::vector<int>{8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3});
  const std::vector<int> sh = run("shuffle:2");
  CHECK(std::set<int>(sh.begin(), sh.end()).size() == 12);
  for (int w = 0; w < 3; ++w)  // each warp's own steps stay in order
    for (int i = 1; i < 4; ++i) CHECK(sh[size_t(4 * w + i)] > sh[size_t(4 * w + i - 1)]);
}
