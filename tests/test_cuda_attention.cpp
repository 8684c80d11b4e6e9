// The cuDNN attention path (src/backend/cuda/cudnn_attention.*) and model.attention dispatch on
// the CUDA backend: cuDNN forward/backward against the double reference (src/backend/cpu/
// ref_ops.h), its lse against the flash kernels' (so either backward may follow either forward),
// and "auto" selection. [gpu] cases skip themselves (WARN + return) without a device, and the
// cuDNN cases also when the build has no cuDNN.
//
// Inputs are bf16-representable, so the differences left are the GPU's roundings; tolerances are
// the op harness's bf16 ones (tests/op_tolerance.h).
#include <catch2/catch.hpp>

#include "gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/ref_ops.h"
#include "core/bf16.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "op_tolerance.h"
#ifdef MF_HAS_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cudnn_attention.h"
#include "attention.cuh"
#endif

using namespace mf;
using mf::test::host_of;
using mf::test::dev_of;
using mf::test::fetch;
using mf::test::norm_err;

namespace {

using Vec = std::vector<double>;

struct S {
  int B, T, H, Hkv, hd;
};

// GQA and MHA, hd 64 and 128, T a multiple of 128 and not (200), B > 1.
const std::vector<S> kShapes = {S{2, 200, 8, 2, 64}, S{1, 256, 4, 4, 128}, S{2, 128, 8, 2, 128},
                                S{2, 200, 6, 6, 64}, S{1, 384, 8, 1, 64}};

AttnShape attn(const S& s) {
  return AttnShape{s.B, s.T, s.H, s.Hkv, s.hd, float(1.0 / std::sqrt(double(s.hd)))};
}
ref::AttnDims dims(const S& s) { return {s.B, s.T, s.H, s.Hkv, s.hd}; }

Vec rand_bf16(Rng& rng, size_t n) {
  Vec v(n);
  for (auto& x : v) x = double(round_to_bf16(float(-1.0 + 2.0 * rng.uniform())));
  return v;
}

const double kFwdTol = test::op_tolerance("attention_fwd", DType::BF16);
const double kBwdTol = test::op_tolerance("attention_bwd", DType::BF16);
constexpr double kLseTol = 1e-3;  // fp32 statistics from the same bf16 inputs

// One problem: inputs on host and device, the double reference.
struct Problem {
  S s;
  AttnShape as;
  Shape qs, ks, ls;
  Vec q, k, v, dout, out, lse, dq, dk, dv;
  Tensor tq, tk, tv, tdo;
  Problem(Backend& be, Rng& rng, const S& sh) : s(sh), as(attn(sh)) {
    qs = {s.B, s.T, s.H, s.hd};
    ks = {s.B, s.T, s.Hkv, s.hd};
    ls = {s.B, s.H, s.T};
    const size_t nq = size_t(s.B) * s.T * s.H * s.hd, nk = size_t(s.B) * s.T * s.Hkv * s.hd;
    q = rand_bf16(rng, nq);
    k = rand_bf16(rng, nk);
    v = rand_bf16(rng, nk);
    dout = rand_bf16(rng, nq);
    out.resize(nq);
    lse.resize(size_t(s.B) * s.H * s.T);
    ref::attention_fwd(q.data(), k.data(), v.data(), out.data(), lse.data(), dims(s),
                       double(as.scale));
    tq = dev_of(be, qs, DType::BF16, q);
    tk = dev_of(be, ks, DType::BF16, k);
    tv = dev_of(be, ks, DType::BF16, v);
    tdo = dev_of(be, qs, DType::BF16, dout);
  }
  // Reference gradients given the out / lse the backward is fed.
  void ref_bwd(const Vec& o, const Vec& l) {
    dq.assign(q.size(), 0);
    dk.assign(k.size(), 0);
    dv.assign(v.size(), 0);
    ref::attention_bwd(dout.data(), q.data(), k.data(), v.data(), o.data(), l.data(), dq.data(),
                       dk.data(), dv.data(), dims(s), double(as.scale));
  }
  // Checks a forward's out and lse (on the device) against the reference, then takes the reference
  // gradients for that forward's own out and lse, as training feeds the backward.
  void check_fwd(Backend& be, const Tensor& to, const Tensor& tl) {
    const Vec got_out = fetch(be, to), got_lse = fetch(be, tl);
    CHECK(norm_err(got_out, out) < kFwdTol);
    CHECK(norm_err(got_lse, lse) < kLseTol);
    ref_bwd(got_out, got_lse);
  }
  struct Grads {
    Tensor dq, dk, dv;
  };
  Grads empty_grads(Backend& be) const {
    return {be.empty(qs, DType::BF16), be.empty(ks, DType::BF16), be.empty(ks, DType::BF16)};
  }
  // Checks dq, dk, dv against the last ref_bwd; returns them as fetched (dq, dk, dv).
  std::vector<Vec> check_grads(Backend& be, const Grads& g) const {
    std::vector<Vec> got{fetch(be, g.dq), fetch(be, g.dk), fetch(be, g.dv)};
    CHECK(norm_err(got[0], dq) < kBwdTol);
    CHECK(norm_err(got[1], dk) < kBwdTol);  // GQA: summed over the group's heads
    CHECK(norm_err(got[2], dv) < kBwdTol);
    return got;
  }
  std::string label() const {
    return "B=" + std::to_string(s.B) + " T=" + std::to_string(s.T) + " H=" + std::to_string(s.H) +
           " Hkv=" + std::to_string(s.Hkv) + " hd=" + std::to_string(s.hd);
  }
};

#ifdef MF_HAS_CUDA
bool have_cudnn() {
  if (!cuda::CudnnAttention::compiled()) {
    WARN("this build has no cuDNN: skipping the cuDNN attention cases");
    return false;
  }
  return true;
}
// cuDNN < 9.16 has no backward for T % 128 != 0 without a padding mask (cudnn_attention.cpp).
bool cudnn_supports(const S& s) {
  return s.T % 128 == 0 || cuda::CudnnAttention::runtime_version() >= 91600;
}
#endif

}  // namespace

TEST_CASE("model.attention: invalid modes are errors; the CPU backend ignores the key",
          "[cuda][attention]") {
  auto cpu = make_backend("cpu");
  CHECK_NOTHROW(cpu->set_attention_impl("cudnn"));
  CHECK_NOTHROW(cpu->set_attention_impl("auto"));
  CHECK_NOTHROW(cpu->set_attention_impl("flash"));
#ifdef MF_HAS_CUDA
  // The dispatcher validates without touching a device.
  cuda::AttentionDispatch d(nullptr);
  CHECK(d.mode() == "flash");  // the default until the trainer sets the config's value
  CHECK_THROWS_WITH(d.set_mode("sdpa"), Catch::Contains("model.attention") &&
                                            Catch::Contains("flash|cudnn|auto"));
  CHECK_NOTHROW(d.set_mode("auto"));
  CHECK(d.mode() == "auto");
  if (cuda::CudnnAttention::compiled()) {
    CHECK_NOTHROW(d.set_mode("cudnn"));
  } else {
    CHECK_THROWS_WITH(d.set_mode("cudnn"), Catch::Contains("no cuDNN"));
  }
#endif
}

TEST_CASE("train.deterministic and train.precision fp32 keep attention on flash",
          "[gpu][cuda][attention]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  CHECK_THROWS_WITH(select_attention(*be, "cudnn", true),
                    Catch::Contains("train.deterministic") && Catch::Contains("flash"));
  CHECK_NOTHROW(select_attention(*be, "auto", true));
#ifdef MF_HAS_CUDA
  auto* cb = dynamic_cast<CudaBackend*>(be.get());
  REQUIRE(cb);
  CHECK(cb->attention().mode() == "flash");
  CHECK_NOTHROW(select_attention(*be, "auto", false));
  CHECK(cb->attention().mode() == "auto");
#endif
  // train.precision fp32: cuDNN's attention is bf16 only, so the same holds without determinism.
  auto be32 = make_backend("cuda");
  be32->set_precision("fp32");
  CHECK(be32->act_dtype() == DType::F32);
  CHECK_THROWS_WITH(select_attention(*be32, "cudnn", false),
                    Catch::Contains("train.precision = \"fp32\"") && Catch::Contains("bf16 only"));
  CHECK_NOTHROW(select_attention(*be32, "auto", false));
#ifdef MF_HAS_CUDA
  CHECK(dynamic_cast<CudaBackend*>(be32.get())->attention().mode() == "flash");
#endif
  // The CPU backend takes any mode either way.
  auto cpu = make_backend("cpu");
  CHECK_NOTHROW(select_attention(*cpu, "cudnn", true));
  cpu->set_precision("fp32");
  CHECK_NOTHROW(select_attention(*cpu, "cudnn", false));
}

TEST_CASE("flash attention matches the double reference at both head dims, tails and GQA groups",
          "[gpu][cuda][attention]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  be->set_attention_impl("flash");
  Rng rng(404);
  // Tensor-core shapes (hd 64 and 128): T not a multiple of the 64-row tiles or of hd 128's
  // 32-query dk/dv tiles, one tile only, and groups of 1, 2 and 6 query heads per KV head, so the
  // copy pipelines run their first, middle and last stages and cross from one head to the next.
  // hd 64 runs with 1 and 2 m-tiles per warp in the forward (hd 128 has 1 only).
  std::vector<std::pair<S, int>> cases;
  for (const S& s : {S{2, 200, 8, 2, 64}, S{1, 97, 6, 1, 64}, S{1, 40, 2, 2, 64}, S{1, 77, 4, 2, 128},
                     S{1, 256, 4, 4, 128}, S{1, 130, 2, 1, 128}})
    for (int mt : {1, 2})
      if (s.hd == 64 || mt == 1) cases.push_back({s, mt});
#ifdef MF_HAS_CUDA
  const int mt0 = cuda::attention_fwd_mtiles();
  const char* env = std::getenv("MF_ATTN_FWD_MTILES");
  if (env == nullptr || *env == '\0') CHECK(mt0 == 2);  // the default
  CHECK_THROWS_WITH(cuda::set_attention_fwd_mtiles(3), Catch::Contains("not 1 or 2"));
  struct Restore {  // later cases get the setting back even if a check throws
    int mt;
    ~Restore() { cuda::set_attention_fwd_mtiles(mt); }
  } restore{mt0};
#endif
  for (const auto& [s, mt] : cases) {
#ifdef MF_HAS_CUDA
    cuda::set_attention_fwd_mtiles(mt);
#endif
    Problem p(*be, rng, s);
    INFO(p.label() << " m-tiles " << mt);
    Tensor to = be->empty(p.qs, DType::BF16), tl = be->empty(p.ls, DType::F32);
    be->attention_fwd(p.tq, p.tk, p.tv, to, tl, p.as);
    p.check_fwd(*be, to, tl);
    Problem::Grads g = p.empty_grads(*be);
    be->attention_bwd(p.tdo, p.tq, p.tk, p.tv, to, tl, g.dq, g.dk, g.dv, p.as);
    const std::vector<Vec> got = p.check_grads(*be, g);
    // Deterministic: a second backward gives the same bits.
    be->attention_bwd(p.tdo, p.tq, p.tk, p.tv, to, tl, g.dq, g.dk, g.dv, p.as);
    CHECK(fetch(*be, g.dq) == got[0]);
    CHECK(fetch(*be, g.dk) == got[1]);
  }
}

TEST_CASE("cuDNN attention forward and backward match the double reference",
          "[gpu][cuda][attention]") {
  MF_SKIP_WITHOUT_GPU();
#ifdef MF_HAS_CUDA
  if (!have_cudnn()) return;
  auto be = make_backend("cuda");
  auto* cb = dynamic_cast<CudaBackend*>(be.get());
  REQUIRE(cb != nullptr);
  be->set_attention_impl("cudnn");
  WARN("cuDNN runtime version " << cuda::CudnnAttention::runtime_version());
  Rng rng(401);
  for (const S& s : kShapes) {
    Problem p(*be, rng, s);
    INFO(p.label());
    Tensor to = be->empty(p.qs, DType::BF16), tl = be->empty(p.ls, DType::F32);
    if (!cudnn_supports(s)) {
      CHECK_THROWS_WITH(be->attention_fwd(p.tq, p.tk, p.tv, to, tl, p.as),
                        Catch::Contains("multiple of 128"));
      continue;
    }
    be->attention_fwd(p.tq, p.tk, p.tv, to, tl, p.as);
    CHECK(cb->attention().choice(p.as) == "cudnn");
    // Backward from cuDNN's own (bf16) out and lse, as training does.
    p.check_fwd(*be, to, tl);
    Problem::Grads g = p.empty_grads(*be);
    be->attention_bwd(p.tdo, p.tq, p.tk, p.tv, to, tl, g.dq, g.dk, g.dv, p.as);
    p.check_grads(*be, g);
    // A second call reuses the cached plan and overwrites (=) its outputs.
    be->attention_bwd(p.tdo, p.tq, p.tk, p.tv, to, tl, g.dq, g.dk, g.dv, p.as);
    p.check_grads(*be, g);
  }
  const MemoryInfo m = be->memory_info();
  CHECK(m.workspace > 0);
#endif
}

TEST_CASE("cuDNN and flash agree on lse; each backward follows the other's forward",
          "[gpu][cuda][attention]") {
  MF_SKIP_WITHOUT_GPU();
#ifdef MF_HAS_CUDA
  if (!have_cudnn()) return;
  auto be = make_backend("cuda");
  Rng rng(402);
  for (const S& s : kShapes) {
    if (!cudnn_supports(s)) continue;
    Problem p(*be, rng, s);
    INFO(p.label());
    Tensor fo = be->empty(p.qs, DType::BF16), fl = be->empty(p.ls, DType::F32);
    Tensor co = be->empty(p.qs, DType::BF16), cl = be->empty(p.ls, DType::F32);
    be->set_attention_impl("flash");
    be->attention_fwd(p.tq, p.tk, p.tv, fo, fl, p.as);
    be->set_attention_impl("cudnn");
    be->attention_fwd(p.tq, p.tk, p.tv, co, cl, p.as);
    const Vec flse = fetch(*be, fl), clse = fetch(*be, cl);
    CHECK(norm_err(clse, flse) < kLseTol);
    CHECK(norm_err(fetch(*be, co), fetch(*be, fo)) < kFwdTol);

    Problem::Grads g = p.empty_grads(*be);
    // cuDNN backward from the flash forward.
    p.ref_bwd(fetch(*be, fo), flse);
    be->attention_bwd(p.tdo, p.tq, p.tk, p.tv, fo, fl, g.dq, g.dk, g.dv, p.as);
    p.check_grads(*be, g);
    // Flash backward from the cuDNN forward.
    be->set_attention_impl("flash");
    p.ref_bwd(fetch(*be, co), clse);
    be->attention_bwd(p.tdo, p.tq, p.tk, p.tv, co, cl, g.dq, g.dk, g.dv, p.as);
    p.check_grads(*be, g);
  }
#endif
}

TEST_CASE("model.attention = auto picks a path per shape and matches the reference",
          "[gpu][cuda][attention]") {
  MF_SKIP_WITHOUT_GPU();
#ifdef MF_HAS_CUDA
  auto be = make_backend("cuda");
  auto* cb = dynamic_cast<CudaBackend*>(be.get());
  REQUIRE(cb != nullptr);
  be->set_attention_impl("auto");
  Rng rng(403);
  for (const S& s : {kShapes[0], kShapes[2]}) {
    Problem p(*be, rng, s);
    INFO(p.label());
    Tensor to = be->empty(p.qs, DType::BF16), tl = be->empty(p.ls, DType::F32);
    be->attention_fwd(p.tq, p.tk, p.tv, to, tl, p.as);
    const std::string pick = cb->attention().choice(p.as);
    INFO("auto chose " << pick);
    CHECK((pick == "flash" || pick == "cudnn"));
    if (!cuda::CudnnAttention::compiled() || !cudnn_supports(s)) CHECK(pick == "flash");
    p.check_fwd(*be, to, tl);
    Problem::Grads g = p.empty_grads(*be);
    be->attention_bwd(p.tdo, p.tq, p.tk, p.tv, to, tl, g.dq, g.dk, g.dv, p.as);
    CHECK(cb->attention().choice(p.as) == pick);  // chosen once per shape
    p.check_grads(*be, g);
  }
#endif
}
