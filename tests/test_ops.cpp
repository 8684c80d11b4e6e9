// The op harness: every model op of the Backend interface.
//
//  1. Finite differences (double): each op's backward, run as the double instantiation of
//     backend/cpu/ref_ops.h, against central differences of its forward.
//  2. The op table: every backend entry point at awkward and real-ish shapes as data (OpCase:
//     input/output specs, a double reference, a run function taking any Backend&). The same
//     table drives CpuBackend (f32) vs the double reference and, tagged [gpu], the CUDA backend
//     vs CpuBackend with the bf16 tolerance. Tolerances live in op_tolerance.h.
//  3. Properties: naive attention / log-softmax formulas, accumulation flags, repeated tokens,
//     aliasing, rope's inverse, chunking, determinism, argument errors.
//
// MF_OPS_VERBOSE=1 prints every table comparison's error and tolerance (margins at a glance).
//
// A new op gets: a ref:: template, FD check, table cases (add_*_cases), and property tests.
#include <catch2/catch.hpp>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "backend/attention_check.h"
#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_ops.h"
#include "core/bf16.h"
#include "core/rng.h"
#include "op_tolerance.h"
#include "test_util.h"

using namespace mf;
using mf::test::op_tolerance;

namespace {

using mf::test::fd_error;

using Vec = std::vector<double>;

// ---- small helpers -------------------------------------------------------------------------------

Vec uniform_vec(Rng& rng, size_t n, double lo = -1.0, double hi = 1.0) {
  Vec v(n);
  for (auto& x : v) x = lo + (hi - lo) * rng.uniform();
  return v;
}

std::vector<int32_t> id_vec(Rng& rng, size_t n, int64_t range) {
  std::vector<int32_t> v(n);
  for (auto& x : v) x = int32_t(rng.below(uint64_t(range)));
  return v;
}

using mf::test::norm_err;

// The value a float takes after a round trip through bf16 (round to nearest even).
double round_bf16(double x) {
  float f = float(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

Tensor host_f32(const Shape& s, const Vec& v) {
  Tensor t = host_tensor(s, DType::F32);
  REQUIRE(size_t(t.numel()) == v.size());
  for (size_t i = 0; i < v.size(); ++i) t.f32()[i] = float(v[i]);
  return t;
}

Tensor host_i32(const Shape& s, const std::vector<int32_t>& v) {
  Tensor t = host_tensor(s, DType::I32);
  REQUIRE(size_t(t.numel()) == v.size());
  std::copy(v.begin(), v.end(), t.i32());
  return t;
}

Vec to_vec(const Tensor& t) {
  Vec v(size_t(t.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = t.f32()[i];
  return v;
}

Vec to_double(const std::vector<float>& f) { return Vec(f.begin(), f.end()); }


double dot_all(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// ==================================================================================================
// The op table
// ==================================================================================================

// Which dtype a tensor has on a backend: activations (and compute weights) follow
// Backend::act_dtype(); rstd / lse / losses / weight gradients are always f32; ids are i32.
enum class Kind { Act, F32, I32 };

struct TSpec {
  std::string name;
  Shape shape;
  Kind kind = Kind::Act;
  int64_t id_range = 0;  // I32: values in [0, id_range)
};
TSpec act(std::string n, Shape s) { return {std::move(n), std::move(s), Kind::Act, 0}; }
TSpec f32(std::string n, Shape s) { return {std::move(n), std::move(s), Kind::F32, 0}; }
TSpec ids(std::string n, Shape s, int64_t range) { return {std::move(n), std::move(s), Kind::I32, range}; }

struct Buf {
  TSpec spec;
  Vec f;                   // float kinds
  std::vector<int32_t> i;  // I32
};
using Bufs = std::vector<Buf>;

struct OpCase {
  std::string op;     // backend entry point (and tolerance key)
  std::string label;  // shapes and flags, for failure messages
  std::vector<TSpec> in, out;
  // Optional: recompute inputs that must be consistent with others (lse from q,k,v; rstd from
  // x), in double, after the random fill.
  std::function<void(Bufs& in)> derive;
  // The double reference: `out` arrives holding the outputs' initial contents (random garbage
  // for (=) outputs, start values for (+=) outputs) and must leave with the expected results.
  std::function<void(const Bufs& in, Bufs& out)> reference;
  // Calls the op on a backend; tensors are that backend's, in the order of the specs.
  std::function<void(Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out)> run;
};

const double* F(const Bufs& b, size_t k) { return b.at(k).f.data(); }
double* F(Bufs& b, size_t k) { return b.at(k).f.data(); }
const int32_t* I(const Bufs& b, size_t k) { return b.at(k).i.data(); }

Buf random_buf(Rng& rng, const TSpec& s) {
  Buf b{s, {}, {}};
  const size_t n = size_t(shape_numel(s.shape));
  if (s.kind == Kind::I32)
    b.i = id_vec(rng, n, s.id_range);
  else
    b.f = uniform_vec(rng, n);
  return b;
}

void round_act_to_bf16(Bufs& bufs) {
  for (auto& b : bufs)
    if (b.spec.kind == Kind::Act)
      for (auto& x : b.f) x = round_bf16(x);
}

// Inputs and initial outputs of a case from its fixed seed. With bf16 = true every activation
// is made bf16-representable, so a bf16 backend and the f32 backend see identical values.
void make_case_data(const OpCase& c, uint64_t seed, bool bf16, Bufs& in, Bufs& out) {
  Rng rng(seed);
  in.clear();
  out.clear();
  for (auto& s : c.in) in.push_back(random_buf(rng, s));
  for (auto& s : c.out) out.push_back(random_buf(rng, s));
  if (bf16) round_act_to_bf16(in);
  if (c.derive) c.derive(in);
  if (bf16) {
    round_act_to_bf16(in);
    round_act_to_bf16(out);
  }
}

// Where a case's tensors live on a backend: the dtype of its activations (the backend's
// act_dtype() unless a test asks for another), and whether every tensor is a view one element
// into a larger allocation, which takes each kernel off its 16-byte vector path.
struct Placement {
  DType act;
  bool offset = false;
};

DType dtype_of(Kind k, DType act) { return k == Kind::I32 ? DType::I32 : k == Kind::F32 ? DType::F32 : act; }

Tensor to_backend(Backend& be, const Buf& b, const Placement& pl) {
  Tensor h = b.spec.kind == Kind::I32 ? host_i32(b.spec.shape, b.i) : host_f32(b.spec.shape, b.f);
  const DType dt = dtype_of(b.spec.kind, pl.act);
  Tensor t;
  if (pl.offset) {  // the view keeps the allocation alive (Tensor::owner)
    const int64_t n = shape_numel(b.spec.shape);
    t = be.empty({n + 1}, dt).slice0(1, n + 1).view(b.spec.shape);
  } else {
    t = be.empty(b.spec.shape, dt);
  }
  be.upload(h, t);
  return t;
}

// Runs the case on `be`; `out` holds the initial outputs and receives the results.
void run_on(Backend& be, const OpCase& c, const Bufs& in, Bufs& out, const Placement& pl) {
  std::vector<Tensor> tin, tout;
  for (auto& b : in) tin.push_back(to_backend(be, b, pl));
  for (auto& b : out) tout.push_back(to_backend(be, b, pl));
  c.run(be, tin, tout);
  be.synchronize();
  for (size_t k = 0; k < out.size(); ++k) {
    Tensor h = host_tensor(out[k].spec.shape, DType::F32);
    be.download(tout[k], h);
    out[k].f = to_vec(h);
  }
}

void run_on(Backend& be, const OpCase& c, const Bufs& in, Bufs& out) {
  run_on(be, c, in, out, Placement{be.act_dtype()});
}

std::string shape_label(std::initializer_list<std::pair<const char*, int64_t>> kv) {
  std::ostringstream os;
  for (auto& [k, v] : kv) os << k << "=" << v << " ";
  return os.str();
}

// ---- case builders, one per op family ------------------------------------------------------------

void add_embedding_cases(std::vector<OpCase>& cs) {
  struct S { int64_t N, V, d, range; };
  // range < V makes tokens repeat (the accumulation order matters in the backward).
  for (S s : {S{1, 1, 1, 1}, S{7, 33, 7, 33}, S{33, 127, 16, 3}, S{127, 7, 33, 7},
              S{256, 1000, 128, 1000}}) {
    const std::string lab = shape_label({{"N", s.N}, {"V", s.V}, {"d", s.d}, {"ids<", s.range}});
    OpCase f;
    f.op = "embedding_fwd";
    f.label = lab;
    f.in = {ids("tokens", {s.N}, s.range), act("wte", {s.V, s.d})};
    f.out = {act("out", {s.N, s.d})};
    f.reference = [s](const Bufs& in, Bufs& out) {
      ref::embedding_fwd(I(in, 0), F(in, 1), s.N, s.d, F(out, 0));
    };
    f.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.embedding_fwd(in[0], in[1], out[0]);
    };
    cs.push_back(f);
    OpCase b;
    b.op = "embedding_bwd";
    b.label = lab;
    b.in = {ids("tokens", {s.N}, s.range), act("dout", {s.N, s.d})};
    b.out = {f32("dwte", {s.V, s.d})};
    b.reference = [s](const Bufs& in, Bufs& out) {
      ref::embedding_bwd(I(in, 0), F(in, 1), s.N, s.d, F(out, 0));
    };
    b.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.embedding_bwd(in[0], in[1], out[0]);
    };
    cs.push_back(b);
  }
}

constexpr double kEps = 1e-5;

void add_rmsnorm_cases(std::vector<OpCase>& cs) {
  struct S { int64_t N, d; };
  // The CUDA backward has a warp-per-row kernel for d <= 256 * VEC (VEC = 8 for 16-byte bf16
  // rows, else 1) and a block-per-row one above it: 2048 is the widest warp case (64 KiB of
  // shared memory, past the 48 KiB default), 2056 and 300 (unaligned width, scalar) take the
  // block kernel. 4100 rows is more than the warp kernel's 2048 warps, so warps take two rows.
  for (S s : {S{1, 1}, S{7, 7}, S{33, 33}, S{127, 127}, S{3, 768}, S{256, 512}, S{4100, 64},
              S{9, 300}, S{5, 2048}, S{4, 2056}}) {
    for (bool with_branch : {false, true}) {
      OpCase f;
      f.op = "add_rmsnorm_fwd";
      f.label = shape_label({{"N", s.N}, {"d", s.d}, {"branch", with_branch}});
      f.in = {act("resid_in", {s.N, s.d}), act("branch", {s.N, s.d}), act("w", {s.d})};
      f.out = {act("resid_out", {s.N, s.d}), act("y", {s.N, s.d}), f32("rstd", {s.N})};
      f.reference = [s, with_branch](const Bufs& in, Bufs& out) {
        ref::add_rmsnorm_fwd(F(in, 0), with_branch ? F(in, 1) : nullptr, F(out, 0), F(in, 2), s.N,
                             s.d, kEps, F(out, 1), F(out, 2));
      };
      f.run = [with_branch](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
        be.add_rmsnorm_fwd(in[0], with_branch ? &in[1] : nullptr, out[0], in[2], float(kEps),
                           out[1], out[2]);
      };
      cs.push_back(f);
    }
    OpCase b;
    b.op = "rmsnorm_bwd";
    b.label = shape_label({{"N", s.N}, {"d", s.d}});
    b.in = {act("dy", {s.N, s.d}), act("x", {s.N, s.d}), act("w", {s.d}), f32("rstd", {s.N})};
    b.out = {act("dx", {s.N, s.d}), f32("dw", {s.d})};
    b.derive = [s](Bufs& in) {  // rstd consistent with x
      Vec r(static_cast<size_t>(s.N * s.d)), y(r.size());
      ref::add_rmsnorm_fwd(F(in, 1), (const double*)nullptr, r.data(), F(in, 2), s.N, s.d, kEps, y.data(),
                           F(in, 3));
    };
    b.reference = [s](const Bufs& in, Bufs& out) {
      ref::rmsnorm_bwd(F(in, 0), F(in, 1), F(in, 2), F(in, 3), s.N, s.d, F(out, 0), F(out, 1));
    };
    b.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.rmsnorm_bwd(in[0], in[1], in[2], in[3], out[0], out[1]);
    };
    cs.push_back(b);
  }
}

void add_matmul_cases(std::vector<OpCase>& cs) {
  struct S { int64_t N, in, out; };
  for (S s : {S{1, 1, 1}, S{7, 33, 1}, S{1, 7, 33}, S{33, 127, 7}, S{127, 33, 127},
              S{128, 384, 1024}}) {
    OpCase f;
    f.op = "matmul_fwd";
    f.label = shape_label({{"N", s.N}, {"in", s.in}, {"out", s.out}});
    f.in = {act("x", {s.N, s.in}), act("W", {s.out, s.in})};
    f.out = {act("y", {s.N, s.out})};
    f.reference = [s](const Bufs& in, Bufs& out) {
      ref::matmul_fwd(F(in, 0), F(in, 1), s.N, s.in, s.out, F(out, 0));
    };
    f.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.matmul_fwd(in[0], in[1], out[0]);
    };
    cs.push_back(f);
    for (bool acc : {false, true}) {
      OpCase b;
      b.op = "matmul_bwd";
      b.label = f.label + (acc ? "accumulate_dx" : "");
      b.in = {act("dy", {s.N, s.out}), act("x", {s.N, s.in}), act("W", {s.out, s.in})};
      b.out = {act("dx", {s.N, s.in}), f32("dW", {s.out, s.in})};
      b.reference = [s, acc](const Bufs& in, Bufs& out) {
        ref::matmul_bwd(F(in, 0), F(in, 1), F(in, 2), s.N, s.in, s.out, F(out, 0), F(out, 1), acc);
      };
      b.run = [acc](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
        be.matmul_bwd(in[0], in[1], in[2], &out[0], &out[1], acc);
      };
      cs.push_back(b);
    }
  }
}

void add_rope_cases(std::vector<OpCase>& cs) {
  struct S { int64_t B, T, H, hd; double theta; };
  for (S s : {S{1, 1, 1, 2, 10000}, S{2, 7, 3, 8, 10000}, S{1, 33, 6, 16, 500000},
              S{2, 127, 2, 64, 10000}, S{2, 128, 12, 64, 10000}}) {
    for (bool bwd : {false, true}) {
      OpCase c;
      c.op = bwd ? "rope_bwd" : "rope_fwd";
      c.label = shape_label({{"B", s.B}, {"T", s.T}, {"H", s.H}, {"hd", s.hd},
                             {"theta", int64_t(s.theta)}});
      c.in = {act(bwd ? "dy" : "x", {s.B, s.T, s.H, s.hd})};
      c.out = {act(bwd ? "dx" : "y", {s.B, s.T, s.H, s.hd})};
      c.reference = [s, bwd](const Bufs& in, Bufs& out) {
        ref::rope(F(in, 0), F(out, 0), s.B, s.T, s.H, s.hd, s.theta, bwd);
      };
      c.run = [s, bwd](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
        if (bwd)
          be.rope_bwd(in[0], out[0], float(s.theta));
        else
          be.rope_fwd(in[0], out[0], float(s.theta));
      };
      cs.push_back(c);
    }
  }
}

// The packed projections: split qkv into rotated q, k and copied v; merge is its backward.
void add_qkv_cases(std::vector<OpCase>& cs) {
  struct S { int64_t B, T, H, Hkv, hd; double theta; };
  for (S s : {S{1, 1, 1, 1, 2, 10000}, S{2, 7, 3, 1, 8, 10000}, S{1, 33, 6, 2, 16, 500000},
              S{2, 128, 4, 4, 64, 10000}}) {
    const std::string lab = shape_label({{"B", s.B}, {"T", s.T}, {"H", s.H}, {"Hkv", s.Hkv},
                                         {"hd", s.hd}, {"theta", int64_t(s.theta)}});
    const Shape packed = {s.B, s.T, s.H + 2 * s.Hkv, s.hd}, qs = {s.B, s.T, s.H, s.hd},
                kvs = {s.B, s.T, s.Hkv, s.hd};
    OpCase f;
    f.op = "qkv_rope_split";
    f.label = lab;
    f.in = {act("qkv", packed)};
    f.out = {act("q", qs), act("k", kvs), act("v", kvs)};
    f.reference = [s](const Bufs& in, Bufs& out) {
      ref::qkv_rope_split(F(in, 0), F(out, 0), F(out, 1), F(out, 2), s.B, s.T, s.H, s.Hkv, s.hd,
                          s.theta);
    };
    f.run = [s](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.qkv_rope_split(in[0], out[0], out[1], out[2], float(s.theta));
    };
    cs.push_back(f);
    OpCase b;
    b.op = "qkv_rope_merge_bwd";
    b.label = lab;
    b.in = {act("dq", qs), act("dk", kvs), act("dv", kvs)};
    b.out = {act("dqkv", packed)};
    b.reference = [s](const Bufs& in, Bufs& out) {
      ref::qkv_rope_merge_bwd(F(in, 0), F(in, 1), F(in, 2), F(out, 0), s.B, s.T, s.H, s.Hkv,
                              s.hd, s.theta);
    };
    b.run = [s](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.qkv_rope_merge_bwd(in[0], in[1], in[2], out[0], float(s.theta));
    };
    cs.push_back(b);
  }
}

AttnShape attn_shape(int B, int T, int H, int Hkv, int hd) {
  AttnShape s;
  s.B = B, s.T = T, s.H = H, s.Hkv = Hkv, s.hd = hd;
  s.scale = float(1.0 / std::sqrt(double(hd)));
  return s;
}
ref::AttnDims dims(const AttnShape& s) { return {s.B, s.T, s.H, s.Hkv, s.hd}; }

// n floats uniform in [lo, hi).
std::vector<float> uniform_floats(Rng& rng, size_t n, double lo, double hi) {
  std::vector<float> x(n);
  for (auto& e : x) e = float(lo + (hi - lo) * rng.uniform());
  return x;
}

std::vector<AttnShape> attention_shapes() {
  return {attn_shape(1, 1, 1, 1, 8),   attn_shape(2, 7, 6, 2, 16),  attn_shape(1, 33, 6, 6, 8),
          attn_shape(2, 33, 4, 1, 64), attn_shape(1, 127, 6, 2, 16), attn_shape(1, 65, 3, 3, 8),
          attn_shape(2, 128, 12, 4, 64), attn_shape(1, 40, 4, 2, 96), attn_shape(1, 21, 2, 1, 160)};
}

void add_attention_cases(std::vector<OpCase>& cs) {
  for (AttnShape s : attention_shapes()) {
    const Shape qs{s.B, s.T, s.H, s.hd}, ks{s.B, s.T, s.Hkv, s.hd};
    const std::string lab =
        shape_label({{"B", s.B}, {"T", s.T}, {"H", s.H}, {"Hkv", s.Hkv}, {"hd", s.hd}});
    OpCase f;
    f.op = "attention_fwd";
    f.label = lab;
    f.in = {act("q", qs), act("k", ks), act("v", ks)};
    f.out = {act("out", qs), f32("lse", {s.B, s.H, s.T})};
    f.reference = [s](const Bufs& in, Bufs& out) {
      ref::attention_fwd(F(in, 0), F(in, 1), F(in, 2), F(out, 0), F(out, 1), dims(s),
                         double(s.scale));
    };
    f.run = [s](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.attention_fwd(in[0], in[1], in[2], out[0], out[1], s);
    };
    cs.push_back(f);
    OpCase b;
    b.op = "attention_bwd";
    b.label = lab;
    b.in = {act("dout", qs), act("q", qs), act("k", ks), act("v", ks), act("out", qs),
            f32("lse", {s.B, s.H, s.T})};
    b.out = {act("dq", qs), act("dk", ks), act("dv", ks)};
    b.derive = [s](Bufs& in) {  // out and lse from q, k, v
      ref::attention_fwd(F(in, 1), F(in, 2), F(in, 3), F(in, 4), F(in, 5), dims(s),
                         double(s.scale));
    };
    b.reference = [s](const Bufs& in, Bufs& out) {
      ref::attention_bwd(F(in, 0), F(in, 1), F(in, 2), F(in, 3), F(in, 4), F(in, 5), F(out, 0),
                         F(out, 1), F(out, 2), dims(s), double(s.scale));
    };
    b.run = [s](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.attention_bwd(in[0], in[1], in[2], in[3], in[4], in[5], out[0], out[1], out[2], s);
    };
    cs.push_back(b);
  }
}

void add_swiglu_cases(std::vector<OpCase>& cs) {
  struct S { int64_t N, f; };
  for (S s : {S{1, 1}, S{7, 33}, S{33, 7}, S{127, 127}, S{256, 1024}}) {
    const std::string lab = shape_label({{"N", s.N}, {"f", s.f}});
    OpCase f;
    f.op = "swiglu_fwd";
    f.label = lab;
    f.in = {act("gate", {s.N, s.f}), act("up", {s.N, s.f})};
    f.out = {act("h", {s.N, s.f})};
    f.reference = [s](const Bufs& in, Bufs& out) {
      ref::swiglu_fwd(F(in, 0), F(in, 1), s.N * s.f, F(out, 0));
    };
    f.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.swiglu_fwd(in[0], in[1], out[0]);
    };
    cs.push_back(f);
    OpCase b;
    b.op = "swiglu_bwd";
    b.label = lab;
    b.in = {act("dh", {s.N, s.f}), act("gate", {s.N, s.f}), act("up", {s.N, s.f})};
    b.out = {act("dgate", {s.N, s.f}), act("dup", {s.N, s.f})};
    b.reference = [s](const Bufs& in, Bufs& out) {
      ref::swiglu_bwd(F(in, 0), F(in, 1), F(in, 2), s.N * s.f, F(out, 0), F(out, 1));
    };
    b.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.swiglu_bwd(in[0], in[1], in[2], out[0], out[1]);
    };
    cs.push_back(b);
  }
  // The packed form: gu [N,2f] = [gate | up] per row. f = 7 and 33 leave the up half's rows off
  // the 16-byte grid (scalar path), f = 1024 and 24 keep them on it.
  for (S s : {S{1, 1}, S{7, 33}, S{33, 7}, S{5, 24}, S{256, 1024}}) {
    const std::string lab = shape_label({{"N", s.N}, {"f", s.f}});
    OpCase f;
    f.op = "swiglu_packed_fwd";
    f.label = lab;
    f.in = {act("gu", {s.N, 2 * s.f})};
    f.out = {act("h", {s.N, s.f})};
    f.reference = [s](const Bufs& in, Bufs& out) {
      ref::swiglu_packed_fwd(F(in, 0), s.N, s.f, F(out, 0));
    };
    f.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.swiglu_packed_fwd(in[0], out[0]);
    };
    cs.push_back(f);
    OpCase b;
    b.op = "swiglu_packed_bwd";
    b.label = lab;
    b.in = {act("dh", {s.N, s.f}), act("gu", {s.N, 2 * s.f})};
    b.out = {act("dgu", {s.N, 2 * s.f})};
    b.reference = [s](const Bufs& in, Bufs& out) {
      ref::swiglu_packed_bwd(F(in, 0), F(in, 1), s.N, s.f, F(out, 0));
    };
    b.run = [](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.swiglu_packed_bwd(in[0], in[1], out[0]);
    };
    cs.push_back(b);
  }
}

void add_lmhead_cases(std::vector<OpCase>& cs) {
  struct S { int64_t N, d, V; double logit_scale, loss_scale; bool grads; };
  for (S s : {S{1, 1, 1, 1.0, 1.0, true}, S{7, 33, 127, 1.0, 1.0 / 7, true},
              S{33, 16, 1000, 0.25, 1.0 / 33, true}, S{127, 7, 33, 3.0, 0.5, true},
              S{33, 16, 1000, 0.5, 1.0, false}, S{48, 96, 8192, 1.0, 1.0 / 48, true}}) {
    OpCase c;
    c.op = "lmhead_xent";
    c.label = shape_label({{"N", s.N}, {"d", s.d}, {"V", s.V}, {"grads", s.grads}}) +
              "logit_scale=" + std::to_string(s.logit_scale) +
              " loss_scale=" + std::to_string(s.loss_scale);
    c.in = {act("x", {s.N, s.d}), act("W", {s.V, s.d}), ids("targets", {s.N}, s.V)};
    c.out = {f32("losses", {s.N})};
    if (s.grads) {
      c.out.push_back(act("dx", {s.N, s.d}));
      c.out.push_back(f32("dW", {s.V, s.d}));
    }
    c.reference = [s](const Bufs& in, Bufs& out) {
      ref::lmhead_xent(F(in, 0), F(in, 1), I(in, 2), s.N, s.d, s.V, s.logit_scale, F(out, 0),
                       s.grads ? F(out, 1) : nullptr, s.grads ? F(out, 2) : nullptr,
                       s.loss_scale);
    };
    c.run = [s](Backend& be, std::vector<Tensor>& in, std::vector<Tensor>& out) {
      be.lmhead_xent(in[0], in[1], in[2], float(s.logit_scale), out[0],
                     s.grads ? &out[1] : nullptr, s.grads ? &out[2] : nullptr,
                     float(s.loss_scale));
    };
    cs.push_back(c);
  }
}

const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> cases = [] {
    std::vector<OpCase> cs;
    add_embedding_cases(cs);
    add_rmsnorm_cases(cs);
    add_matmul_cases(cs);
    add_rope_cases(cs);
    add_qkv_cases(cs);
    add_attention_cases(cs);
    add_swiglu_cases(cs);
    add_lmhead_cases(cs);
    return cs;
  }();
  return cases;
}

uint64_t case_seed(size_t k) { return 1000 + 17 * k; }

// Checks every output of a case against `want` with the tolerance of the case's op.
void check_outputs(const OpCase& c, const Bufs& got, const Bufs& want, DType act,
                   const std::string& who) {
  const double tol = op_tolerance(c.op, act);
  static const bool verbose = std::getenv("MF_OPS_VERBOSE") != nullptr;
  for (size_t k = 0; k < got.size(); ++k) {
    const double err = norm_err(got[k].f, want[k].f);
    if (verbose)
      std::printf("%-14s %-16s %-10s err %.3g (tol %.3g)  %s\n", who.c_str(), c.op.c_str(),
                  got[k].spec.name.c_str(), err, tol, c.label.c_str());
    INFO(who << ": " << c.op << " [" << c.label << "] output " << got[k].spec.name << ": err "
             << err << " > tol " << tol);
    CHECK(err <= tol);
  }
}

// Attention written the naive way: the full masked score row, softmax, weighted sum of v.
void naive_attention(const Vec& q, const Vec& k, const Vec& v, const AttnShape& s, Vec& out,
                     Vec& lse) {
  const ref::AttnDims D = dims(s);
  const int64_t group = s.H / s.Hkv;
  out.assign(q.size(), 0.0);
  lse.assign(size_t(s.B * s.H * s.T), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t t = 0; t < s.T; ++t) {
        // Full row of scores with the causal mask as -inf, then a plain softmax.
        Vec sc(static_cast<size_t>(s.T));
        for (int64_t j = 0; j < s.T; ++j) {
          double dd = 0;
          for (int64_t c = 0; c < s.hd; ++c)
            dd += q[size_t(D.q_at(b, t, h) + c)] * k[size_t(D.kv_at(b, j, h / group) + c)];
          sc[size_t(j)] = j <= t ? dd * double(s.scale) : -std::numeric_limits<double>::infinity();
        }
        const double mx = *std::max_element(sc.begin(), sc.end());
        double z = 0;
        for (double x : sc) z += std::exp(x - mx);
        lse[size_t(D.row_at(b, h, t))] = mx + std::log(z);
        for (int64_t j = 0; j <= t; ++j) {
          const double p = std::exp(sc[size_t(j)] - mx) / z;
          for (int64_t c = 0; c < s.hd; ++c)
            out[size_t(D.q_at(b, t, h) + c)] += p * v[size_t(D.kv_at(b, j, h / group) + c)];
        }
      }
}

}  // namespace

// ==================================================================================================
// 1. Finite differences in double
// ==================================================================================================

TEST_CASE("embedding_bwd is the gradient of embedding_fwd (double, finite differences)", "[ops][fd]") {
  for (auto [N, V, d] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 5, 3}, {33, 7, 16}}) {
    Rng rng(11 + N);
    auto tok = id_vec(rng, size_t(N), V);
    Vec wte = uniform_vec(rng, size_t(V * d)), G = uniform_vec(rng, size_t(N * d));
    auto loss = [&] {
      Vec out(static_cast<size_t>(N * d));
      ref::embedding_fwd(tok.data(), wte.data(), N, d, out.data());
      return dot_all(out, G);
    };
    Vec g(wte.size(), 0.0);
    ref::embedding_bwd(tok.data(), G.data(), N, d, g.data());
    INFO("N=" << N << " V=" << V << " d=" << d);
    CHECK(fd_error(wte, g, loss, 1) <= mf::test::kFdTol);
  }
}

TEST_CASE("rmsnorm_bwd is the gradient of rmsnorm (double, finite differences)", "[ops][fd]") {
  for (auto [N, d] : {std::pair<int64_t, int64_t>{1, 1}, {7, 7}, {3, 33}, {5, 127}}) {
    Rng rng(21 + d);
    Vec x = uniform_vec(rng, size_t(N * d)), w = uniform_vec(rng, size_t(d));
    Vec G = uniform_vec(rng, size_t(N * d));
    Vec r(x.size()), y(x.size()), rstd(static_cast<size_t>(N));
    auto loss = [&] {
      ref::add_rmsnorm_fwd(x.data(), (const double*)nullptr, r.data(), w.data(), N, d, kEps,
                           y.data(), rstd.data());
      return dot_all(y, G);
    };
    loss();
    Vec dx(x.size(), 0.0), dw(w.size(), 0.0);
    ref::rmsnorm_bwd(G.data(), x.data(), w.data(), rstd.data(), N, d, dx.data(), dw.data());
    INFO("N=" << N << " d=" << d);
    CHECK(fd_error(x, dx, loss, 2) <= mf::test::kFdTol);
    CHECK(fd_error(w, dw, loss, 3) <= mf::test::kFdTol);
  }
}

TEST_CASE("matmul_bwd is the gradient of matmul_fwd (double, finite differences)", "[ops][fd]") {
  for (auto [N, in, out] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 33, 1}, {33, 7, 16}}) {
    Rng rng(31 + in);
    Vec x = uniform_vec(rng, size_t(N * in)), W = uniform_vec(rng, size_t(out * in));
    Vec G = uniform_vec(rng, size_t(N * out));
    auto loss = [&] {
      Vec y(static_cast<size_t>(N * out));
      ref::matmul_fwd(x.data(), W.data(), N, in, out, y.data());
      return dot_all(y, G);
    };
    Vec dx(x.size(), 0.0), dW(W.size(), 0.0);
    ref::matmul_bwd(G.data(), x.data(), W.data(), N, in, out, dx.data(), dW.data(), false);
    INFO("N=" << N << " in=" << in << " out=" << out);
    CHECK(fd_error(x, dx, loss, 4) <= mf::test::kFdTol);
    CHECK(fd_error(W, dW, loss, 5) <= mf::test::kFdTol);
  }
}

TEST_CASE("rope_bwd is the gradient of rope_fwd (double, finite differences)", "[ops][fd]") {
  for (auto [B, T, H, hd] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 1, 2},
                             {2, 7, 3, 8}, {1, 33, 2, 16}}) {
    Rng rng(41 + T);
    Vec x = uniform_vec(rng, size_t(B * T * H * hd)), G = uniform_vec(rng, x.size());
    auto loss = [&] {
      Vec y(x.size());
      ref::rope(x.data(), y.data(), B, T, H, hd, 10000.0, false);
      return dot_all(y, G);
    };
    Vec dx(x.size());
    ref::rope(G.data(), dx.data(), B, T, H, hd, 10000.0, true);
    INFO("B=" << B << " T=" << T << " H=" << H << " hd=" << hd);
    CHECK(fd_error(x, dx, loss, 6) <= mf::test::kFdTol);
  }
}

// Split is rope_fwd on the q and k parts and a copy of the v part; merge is its transpose, so
// <merge(G), x> = <G, split(x)> for every x and G (the adjoint identity of a linear map).
TEST_CASE("qkv_rope_split is rope on the parts; merge is its adjoint (double)", "[ops][fd]") {
  for (auto [B, T, H, Hkv, hd] : {std::array<int64_t, 5>{1, 1, 1, 1, 2}, {2, 7, 3, 1, 8},
                                  {1, 9, 4, 2, 16}}) {
    Rng rng(uint64_t(43 + T * H));
    const int64_t W = (H + 2 * Hkv) * hd, N = B * T;
    Vec qkv = uniform_vec(rng, size_t(N * W));
    Vec q(size_t(N * H * hd)), k(size_t(N * Hkv * hd)), v(k.size());
    ref::qkv_rope_split(qkv.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, hd, 10000.0);
    Vec qp(q.size()), kp(k.size()), vp(v.size()), rq(q.size()), rk(k.size());
    for (int64_t n = 0; n < N; ++n) {
      std::copy_n(&qkv[size_t(n * W)], H * hd, &qp[size_t(n * H * hd)]);
      std::copy_n(&qkv[size_t(n * W + H * hd)], Hkv * hd, &kp[size_t(n * Hkv * hd)]);
      std::copy_n(&qkv[size_t(n * W + (H + Hkv) * hd)], Hkv * hd, &vp[size_t(n * Hkv * hd)]);
    }
    ref::rope(qp.data(), rq.data(), B, T, H, hd, 10000.0, false);
    ref::rope(kp.data(), rk.data(), B, T, Hkv, hd, 10000.0, false);
    INFO("B=" << B << " T=" << T << " H=" << H << " Hkv=" << Hkv << " hd=" << hd);
    CHECK(q == rq);
    CHECK(k == rk);
    CHECK(v == vp);
    Vec Gq = uniform_vec(rng, q.size()), Gk = uniform_vec(rng, k.size()), Gv = uniform_vec(rng, v.size());
    Vec dqkv(qkv.size());
    ref::qkv_rope_merge_bwd(Gq.data(), Gk.data(), Gv.data(), dqkv.data(), B, T, H, Hkv, hd, 10000.0);
    const double lhs = dot_all(dqkv, qkv), rhs = dot_all(Gq, q) + dot_all(Gk, k) + dot_all(Gv, v);
    CHECK(std::abs(lhs - rhs) <= mf::test::kDoubleTol * (std::abs(rhs) + 1));
  }
}

TEST_CASE("attention_bwd is the gradient of attention_fwd (double, finite differences)", "[ops][fd]") {
  for (AttnShape s : {attn_shape(1, 1, 1, 1, 8), attn_shape(2, 7, 6, 2, 8),
                      attn_shape(1, 33, 2, 2, 16), attn_shape(1, 7, 3, 1, 64),
                      attn_shape(1, 70, 2, 1, 8)}) {
    Rng rng(51 + s.T * 8 + s.H);
    const size_t nq = size_t(s.B * s.T * s.H * s.hd), nk = size_t(s.B * s.T * s.Hkv * s.hd);
    // Larger-than-unit q, k so the softmax is far from uniform.
    Vec q = uniform_vec(rng, nq, -2, 2), k = uniform_vec(rng, nk, -2, 2), v = uniform_vec(rng, nk);
    Vec G = uniform_vec(rng, nq);
    Vec out(nq), lse(static_cast<size_t>(s.B * s.H * s.T));
    auto loss = [&] {
      ref::attention_fwd(q.data(), k.data(), v.data(), out.data(), lse.data(), dims(s),
                         double(s.scale));
      return dot_all(out, G);
    };
    loss();
    Vec dq(nq), dk(nk), dv(nk);
    ref::attention_bwd(G.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), dq.data(),
                       dk.data(), dv.data(), dims(s), double(s.scale));
    INFO("B=" << s.B << " T=" << s.T << " H=" << s.H << " Hkv=" << s.Hkv << " hd=" << s.hd);
    CHECK(fd_error(q, dq, loss, 7) <= mf::test::kFdTol);
    CHECK(fd_error(k, dk, loss, 8) <= mf::test::kFdTol);
    CHECK(fd_error(v, dv, loss, 9) <= mf::test::kFdTol);
  }
}

TEST_CASE("swiglu_bwd is the gradient of swiglu_fwd (double, finite differences)", "[ops][fd]") {
  for (int64_t n : {1, 7, 33, 127}) {
    Rng rng(61 + n);
    Vec g = uniform_vec(rng, size_t(n), -6, 6), u = uniform_vec(rng, size_t(n));
    Vec G = uniform_vec(rng, size_t(n));
    auto loss = [&] {
      Vec h(static_cast<size_t>(n));
      ref::swiglu_fwd(g.data(), u.data(), n, h.data());
      return dot_all(h, G);
    };
    Vec dg(static_cast<size_t>(n)), du(static_cast<size_t>(n));
    ref::swiglu_bwd(G.data(), g.data(), u.data(), n, dg.data(), du.data());
    INFO("n=" << n);
    CHECK(fd_error(g, dg, loss, 10) <= mf::test::kFdTol);
    CHECK(fd_error(u, du, loss, 11) <= mf::test::kFdTol);
  }
}

// The packed form is the flat form applied row by row to the two halves: the same numbers.
TEST_CASE("swiglu packed matches swiglu on the split halves (double)", "[ops]") {
  for (auto [N, f] : {std::pair<int64_t, int64_t>{1, 1}, {3, 5}, {17, 64}}) {
    Rng rng(uint64_t(71 + N * f));
    Vec gu = uniform_vec(rng, size_t(N * 2 * f), -6, 6), dh = uniform_vec(rng, size_t(N * f));
    Vec g(size_t(N * f)), u(size_t(N * f));
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < f; ++j) {
        g[size_t(r * f + j)] = gu[size_t(r * 2 * f + j)];
        u[size_t(r * f + j)] = gu[size_t(r * 2 * f + f + j)];
      }
    Vec h(size_t(N * f)), hp(size_t(N * f)), dg(size_t(N * f)), du(size_t(N * f));
    Vec dgu(size_t(N * 2 * f));
    ref::swiglu_fwd(g.data(), u.data(), N * f, h.data());
    ref::swiglu_bwd(dh.data(), g.data(), u.data(), N * f, dg.data(), du.data());
    ref::swiglu_packed_fwd(gu.data(), N, f, hp.data());
    ref::swiglu_packed_bwd(dh.data(), gu.data(), N, f, dgu.data());
    INFO("N=" << N << " f=" << f);
    CHECK(hp == h);
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < f; ++j) {
        CHECK(dgu[size_t(r * 2 * f + j)] == dg[size_t(r * f + j)]);
        CHECK(dgu[size_t(r * 2 * f + f + j)] == du[size_t(r * f + j)]);
      }
  }
}

TEST_CASE("lmhead_xent gradients match finite differences (double)", "[ops][fd]") {
  struct S { int64_t N, d, V; double logit_scale, loss_scale; int64_t chunk; };
  for (S s : {S{1, 1, 1, 1.0, 1.0, 0}, S{7, 33, 127, 1.0, 1.0 / 7, 0}, S{33, 8, 50, 2.5, 0.5, 4},
              S{5, 16, 300, 0.125, 3.0, 2}}) {
    Rng rng(71 + s.V);
    Vec x = uniform_vec(rng, size_t(s.N * s.d)), W = uniform_vec(rng, size_t(s.V * s.d));
    auto tgt = id_vec(rng, size_t(s.N), s.V);
    Vec losses(static_cast<size_t>(s.N));
    auto loss = [&] {
      ref::lmhead_xent(x.data(), W.data(), tgt.data(), s.N, s.d, s.V, s.logit_scale,
                       losses.data(), (double*)nullptr, (double*)nullptr, s.loss_scale, s.chunk);
      double l = 0;
      for (double v : losses) l += v;
      return s.loss_scale * l;
    };
    Vec dx(x.size()), dW(W.size(), 0.0);
    ref::lmhead_xent(x.data(), W.data(), tgt.data(), s.N, s.d, s.V, s.logit_scale, losses.data(),
                     dx.data(), dW.data(), s.loss_scale, s.chunk);
    INFO("N=" << s.N << " d=" << s.d << " V=" << s.V << " chunk=" << s.chunk);
    CHECK(fd_error(x, dx, loss, 12) <= mf::test::kFdTol);
    CHECK(fd_error(W, dW, loss, 13) <= mf::test::kFdTol);
  }
}

// ==================================================================================================
// 2. The op table: CpuBackend (f32) vs the double reference; CUDA vs CpuBackend
// ==================================================================================================

TEST_CASE("every op case: CpuBackend matches the double reference", "[ops]") {
  CpuBackend cpu;
  const auto& cases = op_cases();
  REQUIRE(cases.size() > 50);
  for (size_t k = 0; k < cases.size(); ++k) {
    const OpCase& c = cases[k];
    Bufs in, out;
    make_case_data(c, case_seed(k), false, in, out);
    // The f32 backend sees inputs and initial outputs rounded to float; so does the reference.
    for (Bufs* bs : {&in, &out})
      for (auto& b : *bs)
        for (auto& x : b.f) x = double(float(x));
    Bufs want = out, got = out;
    c.reference(in, want);
    run_on(cpu, c, in, got);
    check_outputs(c, got, want, DType::F32, "cpu vs double");
  }
}

// The whole table on the CUDA backend with tensors placed as `pl`, against CpuBackend. The ops in
// `bf16_only` must refuse f32 activations with an error naming bf16 (a clear error, not a wrong
// answer).
void gpu_table(Backend& gpu, const Placement& pl, const std::set<std::string>& bf16_only = {}) {
  CpuBackend cpu;
  const auto& cases = op_cases();
  const std::string who = std::string("cuda (") + dtype_name(pl.act) +
                          (pl.offset ? ", unaligned views)" : ")") + " vs cpu";
  for (size_t k = 0; k < cases.size(); ++k) {
    const OpCase& c = cases[k];
    Bufs in, out;
    make_case_data(c, case_seed(k), pl.act == DType::BF16, in, out);
    Bufs got = out, want = out;
    run_on(cpu, c, in, want);
    if (pl.act == DType::F32 && bf16_only.count(c.op)) {
      INFO(c.op << " [" << c.label << "] on f32 tensors");
      CHECK_THROWS_WITH(run_on(gpu, c, in, got, pl), Catch::Contains("expected bf16"));
      continue;
    }
    run_on(gpu, c, in, got, pl);
    check_outputs(c, got, want, pl.act, who);
  }
}

TEST_CASE("every op case: CudaBackend matches CpuBackend", "[ops][gpu]") {
  if (!cuda_available()) {
    WARN("no CUDA device (or a CPU-only build): skipping the GPU op comparison");
    return;
  }
  auto gpu = make_backend("cuda");
  gpu_table(*gpu, Placement{gpu->act_dtype()});
}

// The same table on the kernels' other paths, which training at aligned bf16 never takes: every
// tensor a view one element into its allocation (each kernel's scalar path, flash attention's
// SIMT fallback, cuBLASLt at 2-byte alignment), and f32 activations (each op's f32
// instantiation; the f32 tolerance, as both backends then compute in f32).
TEST_CASE("every op case: CudaBackend matches CpuBackend on unaligned views and in f32", "[ops][gpu]") {
  if (!cuda_available()) {
    WARN("no CUDA device (or a CPU-only build): skipping the GPU op comparison");
    return;
  }
  auto gpu = make_backend("cuda");
  // The ops whose CUDA kernels take bf16 activations only: none since train.precision "fp32"
  // (attention on its SIMT kernels and lmhead_xent have f32 instantiations).
  const std::set<std::string> bf16_only = {};
  for (const Placement pl : {Placement{DType::BF16, true}, Placement{DType::F32, false},
                             Placement{DType::F32, true}})
    gpu_table(*gpu, pl, bf16_only);
}

TEST_CASE("CpuBackend ops are deterministic (bitwise equal on repeat)", "[ops]") {
  CpuBackend cpu;
  const auto& cases = op_cases();
  const int threads = omp_get_max_threads();
  for (size_t k = 0; k < cases.size(); ++k) {
    const OpCase& c = cases[k];
    Bufs in, out;
    make_case_data(c, case_seed(k), false, in, out);
    Bufs a = out, b = out, one = out;
    run_on(cpu, c, in, a);
    run_on(cpu, c, in, b);
    // The OpenMP loops never split a reduction across threads, and GEMMs cut C into slabs by
    // shape alone, so even the thread count does not change a bit.
    omp_set_num_threads(1);
    run_on(cpu, c, in, one);
    omp_set_num_threads(threads);
    for (size_t j = 0; j < a.size(); ++j) {
      INFO(c.op << " [" << c.label << "] output " << a[j].spec.name << ", " << threads
                << " threads");
      CHECK(a[j].f == b[j].f);
      CHECK(a[j].f == one[j].f);
    }
  }
}

// ==================================================================================================
// 3. Properties
// ==================================================================================================

TEST_CASE("attention equals naive masked softmax(QK^T scale) V, and lse matches", "[ops]") {
  for (AttnShape s : attention_shapes()) {
    Rng rng(81 + s.T);
    const size_t nq = size_t(s.B * s.T * s.H * s.hd), nk = size_t(s.B * s.T * s.Hkv * s.hd);
    Vec q = uniform_vec(rng, nq, -3, 3), k = uniform_vec(rng, nk, -3, 3), v = uniform_vec(rng, nk);
    Vec out(nq), lse(static_cast<size_t>(s.B * s.H * s.T)), out_n, lse_n;
    ref::attention_fwd(q.data(), k.data(), v.data(), out.data(), lse.data(), dims(s),
                       double(s.scale));
    naive_attention(q, k, v, s, out_n, lse_n);
    INFO("B=" << s.B << " T=" << s.T << " H=" << s.H << " Hkv=" << s.Hkv << " hd=" << s.hd);
    CHECK(norm_err(out, out_n) <= mf::test::kDoubleTol);
    CHECK(norm_err(lse, lse_n) <= mf::test::kDoubleTol);
    // And the f32 backend against the naive formula.
    CpuBackend cpu;
    Tensor tq = host_f32({s.B, s.T, s.H, s.hd}, q), tk = host_f32({s.B, s.T, s.Hkv, s.hd}, k),
           tv = host_f32({s.B, s.T, s.Hkv, s.hd}, v);
    Tensor to = host_tensor({s.B, s.T, s.H, s.hd}), tl = host_tensor({s.B, s.H, s.T});
    cpu.attention_fwd(tq, tk, tv, to, tl, s);
    CHECK(norm_err(to_vec(to), out_n) <= 1e-5);
    CHECK(norm_err(to_vec(tl), lse_n) <= 1e-5);
  }
  // T = 1: the output is v itself, lse is the single score.
  AttnShape s = attn_shape(1, 1, 2, 1, 4);
  Vec q{1, 2, 3, 4, -1, 0, 1, 2}, k{0.5, -0.5, 1, 2}, v{3, -1, 2, 7};
  Vec out(8), lse(2);
  ref::attention_fwd(q.data(), k.data(), v.data(), out.data(), lse.data(), dims(s), 0.5);
  CHECK(out == Vec{3, -1, 2, 7, 3, -1, 2, 7});
  CHECK(lse[0] == Approx(0.5 * (0.5 - 1 + 3 + 8)));
  CHECK(lse[1] == Approx(0.5 * (-0.5 + 0 + 1 + 4)));
}

TEST_CASE("tiled float attention is bitwise equal to the row-at-a-time loops", "[ops]") {
  // CpuBackend runs ref::attention_*_tiled for float; attention_*_rows is the plain loop it
  // rearranges. Same operations in the same order: not one bit may differ, for any tile split
  // (T below, at and across the 16-row tiles and 64-key blocks), GQA group, thread count or
  // backward path.
  std::vector<AttnShape> shapes = attention_shapes();
  shapes.push_back(attn_shape(3, 200, 6, 2, 20));
  shapes.push_back(attn_shape(1, 64, 4, 4, 32));
  shapes.push_back(attn_shape(2, 81, 8, 2, 12));
  const int threads0 = omp_get_max_threads();
  for (AttnShape s : shapes) {
    INFO("B=" << s.B << " T=" << s.T << " H=" << s.H << " Hkv=" << s.Hkv << " hd=" << s.hd);
    Rng rng(303 + s.T + s.hd);
    const size_t nq = size_t(s.B * s.T * s.H * s.hd), nk = size_t(s.B * s.T * s.Hkv * s.hd);
    const size_t nr = size_t(s.B * s.H * s.T);
    auto fvec = [&](size_t n, double lo, double hi) { return uniform_floats(rng, n, lo, hi); };
    const std::vector<float> q = fvec(nq, -3, 3), k = fvec(nk, -3, 3), v = fvec(nk, -1, 1),
                             dout = fvec(nq, -1, 1);
    std::vector<float> out_r(nq), lse_r(nr), dq_r(nq), dk_r(nk), dv_r(nk);
    ref::attention_fwd_rows(q.data(), k.data(), v.data(), out_r.data(), lse_r.data(), dims(s),
                            s.scale);
    ref::attention_bwd_rows(dout.data(), q.data(), k.data(), v.data(), out_r.data(), lse_r.data(),
                            dq_r.data(), dk_r.data(), dv_r.data(), dims(s), s.scale);
    for (int threads : {1, 2, 3}) {
      INFO("threads " << threads);
      omp_set_num_threads(threads);
      std::vector<float> out(nq, 7.f), lse(nr, 7.f), dq(nq, 7.f), dk(nk, 7.f), dv(nk, 7.f);
      ref::attention_fwd_tiled(q.data(), k.data(), v.data(), out.data(), lse.data(), dims(s),
                               s.scale);
      CHECK(std::memcmp(out.data(), out_r.data(), nq * sizeof(float)) == 0);
      CHECK(std::memcmp(lse.data(), lse_r.data(), nr * sizeof(float)) == 0);
      for (auto path : {ref::AttnBwdPath::TwoPass, ref::AttnBwdPath::Fused}) {
        INFO("backward path " << (path == ref::AttnBwdPath::Fused ? "fused" : "two-pass"));
        std::fill(dq.begin(), dq.end(), 7.f);
        std::fill(dk.begin(), dk.end(), 7.f);
        std::fill(dv.begin(), dv.end(), 7.f);
        ref::attention_bwd_tiled(dout.data(), q.data(), k.data(), v.data(), out_r.data(),
                                 lse_r.data(), dq.data(), dk.data(), dv.data(), dims(s), s.scale,
                                 path);
        CHECK(std::memcmp(dq.data(), dq_r.data(), nq * sizeof(float)) == 0);
        CHECK(std::memcmp(dk.data(), dk_r.data(), nk * sizeof(float)) == 0);
        CHECK(std::memcmp(dv.data(), dv_r.data(), nk * sizeof(float)) == 0);
      }
    }
  }
  omp_set_num_threads(threads0);
}

TEST_CASE("attention_disagreement: bf16 rounding agrees, real attention bugs do not", "[ops]") {
  // model.attention = "auto" compares cuDNN's outputs with flash's before using cuDNN
  // (src/backend/attention_check.h). The tolerances are twice the harness's bf16 ones.
  CHECK(kAttnAgreeOut == 2 * test::op_tolerance("attention_fwd", DType::BF16));
  CHECK(kAttnAgreeGrad == 2 * test::op_tolerance("attention_bwd", DType::BF16));
  const AttnShape s = attn_shape(2, 96, 4, 2, 16);
  Rng rng(4242);
  const size_t nq = size_t(s.B * s.T * s.H * s.hd), nk = size_t(s.B * s.T * s.Hkv * s.hd);
  const size_t nr = size_t(s.B * s.H * s.T);
  auto fvec = [&](size_t n, double lo, double hi) { return uniform_floats(rng, n, lo, hi); };
  const std::vector<float> q = fvec(nq, -2, 2), k = fvec(nk, -2, 2), v = fvec(nk, -1, 1);
  // What one path computes at a given softmax scale (q doubles as dout, as in the autotune).
  auto run = [&](float scale) {
    AttnOutputs o;
    o.out.resize(nq), o.lse.resize(nr), o.dq.resize(nq), o.dk.resize(nk), o.dv.resize(nk);
    ref::attention_fwd_rows(q.data(), k.data(), v.data(), o.out.data(), o.lse.data(), dims(s),
                            scale);
    ref::attention_bwd_rows(q.data(), q.data(), k.data(), v.data(), o.out.data(), o.lse.data(),
                            o.dq.data(), o.dk.data(), o.dv.data(), dims(s), scale);
    return o;
  };
  const AttnOutputs ref_o = run(s.scale);
  CHECK(attention_disagreement(ref_o, ref_o).empty());
  // A second implementation that rounds every output to bf16 agrees.
  AttnOutputs bf = ref_o;
  for (auto* x : {&bf.out, &bf.dq, &bf.dk, &bf.dv})
    for (float& e : *x) e = round_to_bf16(e);
  CHECK(attention_disagreement(ref_o, bf).empty());
  // The µP scale 1/hd instead of 1/sqrt(hd): caught at the output.
  CHECK_THAT(attention_disagreement(ref_o, run(1.f / float(s.hd))), Catch::StartsWith("out:"));
  // Statistics off by a constant (e.g. log2 instead of ln): lse.
  AttnOutputs bad = ref_o;
  for (float& e : bad.lse) e *= float(1 / std::log(2.0));
  CHECK_THAT(attention_disagreement(ref_o, bad), Catch::StartsWith("lse:"));
  // GQA: the kv-head gradient averaged over its group instead of summed (H / Hkv = 2).
  bad = ref_o;
  for (float& e : bad.dk) e *= 0.5f;
  CHECK_THAT(attention_disagreement(ref_o, bad), Catch::StartsWith("dk:"));
  // dv of the two kv heads swapped.
  bad = ref_o;
  for (size_t i = 0; i < nk; i += size_t(2 * s.hd))
    std::swap_ranges(bad.dv.begin() + i, bad.dv.begin() + i + s.hd, bad.dv.begin() + i + s.hd);
  CHECK_THAT(attention_disagreement(ref_o, bad), Catch::StartsWith("dv:"));
  // One NaN, a missing output, and dq left unwritten (zeros).
  bad = ref_o;
  bad.dq[nq / 2] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THAT(attention_disagreement(ref_o, bad), Catch::StartsWith("dq: error inf"));
  bad = ref_o;
  bad.dv.clear();
  CHECK_THAT(attention_disagreement(ref_o, bad), Catch::StartsWith("dv:"));
  bad = ref_o;
  std::fill(bad.dq.begin(), bad.dq.end(), 0.f);
  CHECK_THAT(attention_disagreement(ref_o, bad), Catch::Contains("dq: error 1 > 0.08"));
}

TEST_CASE("lmhead_xent equals naive logits + log_softmax; loss_scale; chunking", "[ops]") {
  const int64_t N = 19, d = 9, V = 37;
  Rng rng(91);
  Vec x = uniform_vec(rng, size_t(N * d), -2, 2), W = uniform_vec(rng, size_t(V * d), -2, 2);
  auto tgt = id_vec(rng, size_t(N), V);
  const double ls = 1.7;
  // Naive: full logits, log-softmax, its gradient.
  Vec naive_loss(static_cast<size_t>(N)), naive_dx(x.size(), 0.0), naive_dW(W.size(), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    Vec z(static_cast<size_t>(V));
    for (int64_t j = 0; j < V; ++j) {
      double a = 0;
      for (int64_t c = 0; c < d; ++c) a += x[size_t(n * d + c)] * W[size_t(j * d + c)];
      z[size_t(j)] = ls * a;
    }
    double mx = *std::max_element(z.begin(), z.end()), se = 0;
    for (double zz : z) se += std::exp(zz - mx);
    const double logz = mx + std::log(se);
    naive_loss[size_t(n)] = logz - z[size_t(tgt[size_t(n)])];
    for (int64_t j = 0; j < V; ++j) {
      const double g = ls * (std::exp(z[size_t(j)] - logz) - (j == tgt[size_t(n)] ? 1.0 : 0.0));
      for (int64_t c = 0; c < d; ++c) {
        naive_dx[size_t(n * d + c)] += g * W[size_t(j * d + c)];
        naive_dW[size_t(j * d + c)] += g * x[size_t(n * d + c)];
      }
    }
  }
  for (double loss_scale : {1.0, 0.25, 1.0 / N}) {
    for (int64_t chunk : {int64_t(0), int64_t(1), int64_t(4), int64_t(7), N + 5}) {
      Vec losses(static_cast<size_t>(N)), dx(x.size()), dW(W.size(), 0.0);
      ref::lmhead_xent(x.data(), W.data(), tgt.data(), N, d, V, ls, losses.data(), dx.data(),
                       dW.data(), loss_scale, chunk);
      INFO("loss_scale=" << loss_scale << " chunk=" << chunk);
      CHECK(norm_err(losses, naive_loss) <= mf::test::kDoubleTol);  // losses ignore loss_scale
      Vec sdx = naive_dx, sdW = naive_dW;
      for (auto& g : sdx) g *= loss_scale;
      for (auto& g : sdW) g *= loss_scale;
      CHECK(norm_err(dx, sdx) <= mf::test::kDoubleTol);
      CHECK(norm_err(dW, sdW) <= mf::test::kDoubleTol);
    }
  }
  // Backend: losses only, dx only, dW only give the same values as the full call.
  CpuBackend cpu;
  Tensor tx = host_f32({N, d}, x), tW = host_f32({V, d}, W), tt = host_i32({N}, tgt);
  Tensor l0 = host_tensor({N}), l1 = host_tensor({N}), l2 = host_tensor({N});
  Tensor dx1 = host_tensor({N, d}), dW2 = host_tensor({V, d});
  cpu.lmhead_xent(tx, tW, tt, float(ls), l0, nullptr, nullptr, 1.f);
  cpu.lmhead_xent(tx, tW, tt, float(ls), l1, &dx1, nullptr, 1.f);
  cpu.lmhead_xent(tx, tW, tt, float(ls), l2, nullptr, &dW2, 1.f);
  CHECK(norm_err(to_vec(l0), naive_loss) <= 1e-5);
  CHECK(to_vec(l0) == to_vec(l1));
  CHECK(to_vec(l0) == to_vec(l2));
  CHECK(norm_err(to_vec(dx1), naive_dx) <= 1e-5);
  CHECK(norm_err(to_vec(dW2), naive_dW) <= 1e-5);
  // A confident correct prediction has ~0 loss; uniform logits have loss log V.
  Vec xu(size_t(d), 0.0), Wu(size_t(V * d), 0.0);
  std::vector<int32_t> t1{3};
  Vec lu(1);
  ref::lmhead_xent(xu.data(), Wu.data(), t1.data(), 1, d, V, 1.0, lu.data(), (double*)nullptr,
                   (double*)nullptr, 1.0);
  CHECK(lu[0] == Approx(std::log(double(V))).epsilon(1e-12));
}

TEST_CASE("embedding_bwd accumulates repeated tokens into existing gradients", "[ops]") {
  CpuBackend cpu;
  const int64_t N = 33, V = 5, d = 7;
  Rng rng(101);
  std::vector<int32_t> tok(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) tok[size_t(n)] = n % 3 == 0 ? 2 : 4;  // rows 0,1,3 unused
  Vec dout = uniform_vec(rng, size_t(N * d)), init = uniform_vec(rng, size_t(V * d));
  Tensor tt = host_i32({N}, tok), tdo = host_f32({N, d}, dout), tdw = host_f32({V, d}, init);
  cpu.embedding_bwd(tt, tdo, tdw);
  Vec want = init;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < d; ++c) want[size_t(tok[size_t(n)] * d + c)] += dout[size_t(n * d + c)];
  CHECK(norm_err(to_vec(tdw), want) <= 1e-6);
  for (int64_t r : {0, 1, 3})
    for (int64_t c = 0; c < d; ++c) CHECK(tdw.f32()[r * d + c] == float(init[size_t(r * d + c)]));
  // Forward copies rows.
  Vec wte = uniform_vec(rng, size_t(V * d));
  Tensor tw = host_f32({V, d}, wte), out = host_tensor({N, d});
  cpu.embedding_fwd(tt, tw, out);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < d; ++c)
      CHECK(out.f32()[n * d + c] == float(wte[size_t(tok[size_t(n)] * d + c)]));
}

TEST_CASE("matmul_bwd: dx (=) or (+=) by flag, dW (+=), either output optional", "[ops]") {
  CpuBackend cpu;
  const int64_t N = 7, in = 33, out = 5;
  Rng rng(111);
  Vec dy = uniform_vec(rng, size_t(N * out)), x = uniform_vec(rng, size_t(N * in)),
      W = uniform_vec(rng, size_t(out * in));
  Vec dx0 = uniform_vec(rng, size_t(N * in)), dW0 = uniform_vec(rng, size_t(out * in));
  Vec gdx(dx0.size(), 0.0), gdW(dW0.size(), 0.0);
  ref::matmul_bwd(dy.data(), x.data(), W.data(), N, in, out, gdx.data(), gdW.data(), false);
  Tensor tdy = host_f32({N, out}, dy), tx = host_f32({N, in}, x), tW = host_f32({out, in}, W);
  for (bool acc : {false, true}) {
    Tensor tdx = host_f32({N, in}, dx0), tdW = host_f32({out, in}, dW0);
    cpu.matmul_bwd(tdy, tx, tW, &tdx, &tdW, acc);
    Vec wdx = gdx, wdW = gdW;
    if (acc)
      for (size_t i = 0; i < wdx.size(); ++i) wdx[i] += dx0[i];
    for (size_t i = 0; i < wdW.size(); ++i) wdW[i] += dW0[i];
    INFO("accumulate_dx=" << acc);
    CHECK(norm_err(to_vec(tdx), wdx) <= 1e-5);
    CHECK(norm_err(to_vec(tdW), wdW) <= 1e-5);
  }
  Tensor tdx = host_f32({N, in}, dx0), tdW = host_f32({out, in}, dW0);
  cpu.matmul_bwd(tdy, tx, tW, &tdx, nullptr, false);
  CHECK(norm_err(to_vec(tdx), gdx) <= 1e-5);
  cpu.matmul_bwd(tdy, tx, tW, nullptr, &tdW, false);
  Vec wdW = gdW;
  for (size_t i = 0; i < wdW.size(); ++i) wdW[i] += dW0[i];
  CHECK(norm_err(to_vec(tdW), wdW) <= 1e-5);
  // A 3-D activation [B,T,in] is N = B*T rows.
  Tensor x3 = tx.view({1, N, in}), y3 = host_tensor({1, N, out}), y2 = host_tensor({N, out});
  cpu.matmul_fwd(x3, tW, y3);
  cpu.matmul_fwd(tx, tW, y2);
  CHECK(to_vec(y3) == to_vec(y2));
}

TEST_CASE("add_rmsnorm_fwd: with and without branch, resid_out aliasing resid_in", "[ops]") {
  CpuBackend cpu;
  const int64_t N = 33, d = 127;
  Rng rng(121);
  Vec a = uniform_vec(rng, size_t(N * d)), br = uniform_vec(rng, size_t(N * d)),
      w = uniform_vec(rng, size_t(d));
  Tensor tw = host_f32({d}, w), tb = host_f32({N, d}, br);
  for (bool with_branch : {false, true}) {
    Vec sum = a;
    if (with_branch)
      for (size_t i = 0; i < sum.size(); ++i) sum[i] = double(float(a[i]) + float(br[i]));
    // Expected y from the formula directly.
    Vec want_y(sum.size()), want_r(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
      double ms = 0;
      for (int64_t c = 0; c < d; ++c) ms += sum[size_t(n * d + c)] * sum[size_t(n * d + c)];
      want_r[size_t(n)] = 1.0 / std::sqrt(ms / double(d) + kEps);
      for (int64_t c = 0; c < d; ++c)
        want_y[size_t(n * d + c)] = sum[size_t(n * d + c)] * want_r[size_t(n)] * w[size_t(c)];
    }
    // Separate resid_out.
    Tensor tin = host_f32({N, d}, a), tout = host_tensor({N, d}), y = host_tensor({N, d}),
           r = host_tensor({N});
    cpu.add_rmsnorm_fwd(tin, with_branch ? &tb : nullptr, tout, tw, float(kEps), y, r);
    INFO("branch=" << with_branch);
    CHECK(norm_err(to_vec(tout), sum) <= 1e-7);
    CHECK(norm_err(to_vec(y), want_y) <= 1e-5);
    CHECK(norm_err(to_vec(r), want_r) <= 1e-5);
    CHECK(to_vec(tin) == to_double(std::vector<float>(a.begin(), a.end())));  // input untouched
    // In place: resid_out is resid_in.
    Tensor tio = host_f32({N, d}, a), y2 = host_tensor({N, d}), r2 = host_tensor({N});
    cpu.add_rmsnorm_fwd(tio, with_branch ? &tb : nullptr, tio, tw, float(kEps), y2, r2);
    CHECK(to_vec(tio) == to_vec(tout));
    CHECK(to_vec(y2) == to_vec(y));
    CHECK(to_vec(r2) == to_vec(r));
  }
}

TEST_CASE("rope: bwd inverts fwd (orthogonal), position 0 is identity, in place", "[ops]") {
  CpuBackend cpu;
  for (auto [B, T, H, hd] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 1, 2},
                             {2, 33, 6, 16}, {1, 127, 2, 64}}) {
    Rng rng(131 + T);
    Vec x = uniform_vec(rng, size_t(B * T * H * hd));
    Vec y(x.size()), back(x.size());
    ref::rope(x.data(), y.data(), B, T, H, hd, 10000.0, false);
    ref::rope(y.data(), back.data(), B, T, H, hd, 10000.0, true);
    INFO("B=" << B << " T=" << T << " H=" << H << " hd=" << hd);
    CHECK(norm_err(back, x) <= 1e-14);
    // Norm of each head vector is preserved; position 0 is unrotated.
    for (int64_t row = 0; row < B * T * H; ++row) {
      double n0 = 0, n1 = 0;
      for (int64_t c = 0; c < hd; ++c) {
        n0 += x[size_t(row * hd + c)] * x[size_t(row * hd + c)];
        n1 += y[size_t(row * hd + c)] * y[size_t(row * hd + c)];
      }
      CHECK(n1 == Approx(n0).epsilon(1e-12));
      if ((row / H) % T == 0)
        for (int64_t c = 0; c < hd; ++c) CHECK(y[size_t(row * hd + c)] == x[size_t(row * hd + c)]);
    }
    // Backend, in place (y aliases x, dx aliases dy).
    Tensor t = host_f32({B, T, H, hd}, x);
    cpu.rope_fwd(t, t, 10000.f);
    CHECK(norm_err(to_vec(t), y) <= 1e-5);
    cpu.rope_bwd(t, t, 10000.f);
    CHECK(norm_err(to_vec(t), x) <= 1e-5);
  }
  // Hand-computed: hd = 4, t = 1: angles 1 and 10000^-0.5 = 0.01.
  Vec x{0, 0, 0, 0, 1, 2, 3, 4}, y(8);
  ref::rope(x.data(), y.data(), 1, 2, 1, 4, 10000.0, false);
  CHECK(y[4] == Approx(1 * std::cos(1.0) - 3 * std::sin(1.0)));
  CHECK(y[5] == Approx(2 * std::cos(0.01) - 4 * std::sin(0.01)));
  CHECK(y[6] == Approx(3 * std::cos(1.0) + 1 * std::sin(1.0)));
  CHECK(y[7] == Approx(4 * std::cos(0.01) + 2 * std::sin(0.01)));
}

TEST_CASE("swiglu: silu(g) * up by formula", "[ops]") {
  Vec g{-30, -1, 0, 0.5, 2, 30}, u{1, 2, 3, -1, 0.5, 1}, h(6);
  ref::swiglu_fwd(g.data(), u.data(), 6, h.data());
  for (size_t i = 0; i < g.size(); ++i)
    CHECK(h[i] == Approx(g[i] / (1 + std::exp(-g[i])) * u[i]).margin(1e-15));
  CHECK(h[2] == 0.0);
  CHECK(h[5] == Approx(30.0));
}

TEST_CASE("op argument errors throw mf::Error naming the tensors", "[ops]") {
  CpuBackend cpu;
  Tensor x = host_tensor({7, 33}), W = host_tensor({5, 32}), y = host_tensor({7, 5});
  CHECK_THROWS_AS(cpu.matmul_fwd(x, W, y), mf::Error);
  CHECK_THROWS_WITH(cpu.matmul_fwd(x, W, y), Catch::Contains("matmul_fwd") &&
                                                 Catch::Contains("[7,33]") &&
                                                 Catch::Contains("[5,32]"));
  Tensor W2 = host_tensor({5, 33}), ybad = host_tensor({6, 5});
  CHECK_THROWS_AS(cpu.matmul_fwd(x, W2, ybad), mf::Error);
  Tensor dxbad = host_tensor({7, 32});
  CHECK_THROWS_AS(cpu.matmul_bwd(y, x, W2, &dxbad, nullptr, false), mf::Error);
  Tensor xi = host_tensor({7, 33}, DType::I32);
  CHECK_THROWS_WITH(cpu.matmul_fwd(xi, W2, y), Catch::Contains("dtype"));

  // Token ids out of range name the index and the value.
  Tensor tok = host_tensor({3}, DType::I32), wte = host_tensor({4, 8}), out = host_tensor({3, 8});
  tok.i32()[1] = 4;
  CHECK_THROWS_WITH(cpu.embedding_fwd(tok, wte, out), Catch::Contains("tokens[1] = 4"));
  tok.i32()[1] = -1;
  CHECK_THROWS_AS(cpu.embedding_bwd(tok, out, wte), mf::Error);
  tok.i32()[1] = 0;
  Tensor tf = host_tensor({3});
  CHECK_THROWS_AS(cpu.embedding_fwd(tf, wte, out), mf::Error);

  // rmsnorm: w width, rstd length, branch shape.
  Tensor a = host_tensor({4, 8}), w7 = host_tensor({7}), w8 = host_tensor({8}),
         r4 = host_tensor({4}), r3 = host_tensor({3}), yy = host_tensor({4, 8}),
         br = host_tensor({4, 7});
  CHECK_THROWS_AS(cpu.add_rmsnorm_fwd(a, nullptr, a, w7, 1e-5f, yy, r4), mf::Error);
  CHECK_THROWS_AS(cpu.add_rmsnorm_fwd(a, nullptr, a, w8, 1e-5f, yy, r3), mf::Error);
  CHECK_THROWS_AS(cpu.add_rmsnorm_fwd(a, &br, a, w8, 1e-5f, yy, r4), mf::Error);
  Tensor dw7 = host_tensor({7});
  CHECK_THROWS_AS(cpu.rmsnorm_bwd(yy, a, w8, r4, yy, dw7), mf::Error);

  // rope: odd head dim, wrong rank, mismatched output.
  Tensor q_odd = host_tensor({1, 2, 3, 5}), q3 = host_tensor({1, 2, 12}),
         qa = host_tensor({1, 2, 3, 4}), qb = host_tensor({1, 2, 4, 3});
  CHECK_THROWS_WITH(cpu.rope_fwd(q_odd, q_odd, 1e4f), Catch::Contains("even"));
  CHECK_THROWS_AS(cpu.rope_fwd(q3, q3, 1e4f), mf::Error);
  CHECK_THROWS_AS(cpu.rope_bwd(qa, qb, 1e4f), mf::Error);

  // attention: H not a multiple of Hkv, wrong numel, wrong lse.
  AttnShape s = attn_shape(1, 4, 6, 4, 8);
  Tensor q = host_tensor({1, 4, 6, 8}), k = host_tensor({1, 4, 4, 8}), o = host_tensor({1, 4, 6, 8}),
         lse = host_tensor({1, 6, 4});
  CHECK_THROWS_WITH(cpu.attention_fwd(q, k, k, o, lse, s), Catch::Contains("multiple"));
  s = attn_shape(1, 4, 6, 2, 8);
  Tensor k2 = host_tensor({1, 4, 2, 8}), lse_bad = host_tensor({1, 6, 3});
  CHECK_NOTHROW(cpu.attention_fwd(q, k2, k2, o, lse, s));
  CHECK_THROWS_AS(cpu.attention_fwd(q, k, k, o, lse, s), mf::Error);
  CHECK_THROWS_AS(cpu.attention_fwd(q, k2, k2, o, lse_bad, s), mf::Error);
  Tensor dq = host_tensor({1, 4, 6, 8}), dk = host_tensor({1, 4, 2, 8}), dv_bad = host_tensor({1, 4, 6, 8});
  CHECK_THROWS_AS(cpu.attention_bwd(o, q, k2, k2, o, lse, dq, dk, dv_bad, s), mf::Error);

  // swiglu: shapes must agree.
  Tensor g = host_tensor({3, 4}), u = host_tensor({4, 3}), h = host_tensor({3, 4});
  CHECK_THROWS_AS(cpu.swiglu_fwd(g, u, h), mf::Error);
  CHECK_THROWS_AS(cpu.swiglu_bwd(h, g, g, h, u), mf::Error);

  // lmhead_xent: width mismatch, target out of range, dW shape.
  Tensor lx = host_tensor({3, 8}), lW = host_tensor({10, 8}), lW7 = host_tensor({10, 7}),
         lt = host_tensor({3}, DType::I32), ll = host_tensor({3}), ldW = host_tensor({8, 10});
  CHECK_THROWS_AS(cpu.lmhead_xent(lx, lW7, lt, 1.f, ll, nullptr, nullptr, 1.f), mf::Error);
  CHECK_THROWS_AS(cpu.lmhead_xent(lx, lW, lt, 1.f, ll, nullptr, &ldW, 1.f), mf::Error);
  lt.i32()[2] = 10;
  CHECK_THROWS_WITH(cpu.lmhead_xent(lx, lW, lt, 1.f, ll, nullptr, nullptr, 1.f),
                    Catch::Contains("targets[2] = 10"));
}

TEST_CASE("float GEMM: slabs on the threads give the same bits for 1, 2 and 3 threads", "[ops][gemm]") {
  // Shapes above the slab threshold (split by rows, or by columns when wider than tall, with a
  // ragged last slab), one below it, every transpose; checked against a double GEMM too.
  struct Shape3 { int64_t M, N, K; };
  CpuBackend cpu;  // sets OpenBLAS to one thread, as in training
  const int threads0 = omp_get_max_threads();
  Rng rng(77);
  for (Shape3 sh : {Shape3{515, 130, 96}, Shape3{70, 600, 64}, Shape3{300, 300, 40}, Shape3{40, 30, 20}})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        const int64_t M = sh.M, N = sh.N, K = sh.K;
        const int64_t lda = ta ? M : K, ldb = tb ? K : N;
        std::vector<float> A(size_t(M * K)), B(size_t(K * N)), C0(size_t(M * N));
        for (float& v : A) v = float(rng.normal());
        for (float& v : B) v = float(rng.normal());
        for (float& v : C0) v = float(rng.normal());
        std::vector<double> Ad(A.begin(), A.end()), Bd(B.begin(), B.end()), Cd(C0.begin(), C0.end());
        ref::gemm<double>(ta, tb, M, N, K, 0.5, Ad.data(), lda, Bd.data(), ldb, 0.25, Cd.data(), N);
        std::vector<std::vector<float>> got;
        for (int t : {1, 2, 3}) {
          omp_set_num_threads(t);
          std::vector<float> C = C0;
          ref::gemm<float>(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 0.25f, C.data(), N);
          got.push_back(C);
        }
        omp_set_num_threads(threads0);
        INFO("M " << M << " N " << N << " K " << K << " transA " << ta << " transB " << tb);
        CHECK(std::memcmp(got[0].data(), got[1].data(), got[0].size() * sizeof(float)) == 0);
        CHECK(std::memcmp(got[0].data(), got[2].data(), got[0].size() * sizeof(float)) == 0);
        double worst = 0;
        for (size_t i = 0; i < Cd.size(); ++i) worst = std::max(worst, std::abs(double(got[0][i]) - Cd[i]));
        CHECK(worst < 1e-4 * std::sqrt(double(K)) * 4);
      }
}
