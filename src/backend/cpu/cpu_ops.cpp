// CpuBackend: the model ops. Each method checks its arguments (dtype, device, shapes; the
// message names the op, the tensor and the shapes) and calls the float instantiation of the
// op's math in ref_ops.h, which the tests also run in double.
#include <cstdint>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_ops.h"

namespace mf {

namespace {

std::string desc(const char* name, const Tensor& t) {
  return std::string(name) + " " + shape_str(t.shape) + " " + dtype_name(t.dtype);
}

void check_on_cpu(const char* op, const char* name, const Tensor& t, DType want) {
  MF_CHECK(t.defined(), op, ": ", name, " is not allocated");
  MF_CHECK(t.device == Device::CPU, op, ": ", name, " lives on the GPU but the backend is cpu");
  MF_CHECK(t.dtype == want, op, ": ", desc(name, t), " has the wrong dtype, expected ",
           dtype_name(want));
}
void check_f32(const char* op, const char* name, const Tensor& t) {
  check_on_cpu(op, name, t, DType::F32);
}

// Rows of a [..., width] tensor (every leading dim is a row dim).
int64_t rows_of(const char* op, const char* name, const Tensor& t, int64_t width) {
  MF_CHECK(t.ndim() >= 1 && t.dim(-1) == width, op, ": ", desc(name, t),
           " must have last dim ", width);
  return t.numel() / width;
}

void check_numel(const char* op, const char* name, const Tensor& t, int64_t n,
                 const std::string& expect) {
  MF_CHECK(t.numel() == n, op, ": ", desc(name, t), " must have ", n, " elements (", expect, ")");
}

void check_same_shape(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  MF_CHECK(t.shape == ref.shape, op, ": ", desc(name, t), " must have the shape of ",
           desc(ref_name, ref));
}

void check_ids(const char* op, const char* name, const Tensor& ids, int64_t V) {
  const int32_t* p = ids.i32();
  for (int64_t i = 0; i < ids.numel(); ++i)
    MF_CHECK(p[i] >= 0 && p[i] < V, op, ": ", name, "[", i, "] = ", p[i], " is outside [0, ", V,
             ") (vocab_size)");
}

void check_attn_shape(const char* op, const AttnShape& s) {
  MF_CHECK(s.B > 0 && s.T > 0 && s.H > 0 && s.Hkv > 0 && s.hd > 0, op, ": bad shape B=", s.B,
           " T=", s.T, " H=", s.H, " Hkv=", s.Hkv, " hd=", s.hd);
  MF_CHECK(s.H % s.Hkv == 0, op, ": n_heads ", s.H, " is not a multiple of n_kv_heads ", s.Hkv);
  MF_CHECK(s.scale > 0.f, op, ": softmax scale ", s.scale, " must be positive");
}

ref::AttnDims dims_of(const AttnShape& s) { return {s.B, s.T, s.H, s.Hkv, s.hd}; }

void check_attn_tensor(const char* op, const char* name, const Tensor& t, const AttnShape& s,
                       int heads) {
  check_f32(op, name, t);
  check_numel(op, name, t, int64_t(s.B) * s.T * heads * s.hd,
              "B*T*" + std::to_string(heads) + "*hd with B=" + std::to_string(s.B) +
                  " T=" + std::to_string(s.T) + " hd=" + std::to_string(s.hd));
}

void check_lse(const char* op, const Tensor& lse, const AttnShape& s) {
  check_f32(op, "lse", lse);
  check_numel(op, "lse", lse, int64_t(s.B) * s.H * s.T, "B*H*T");
}

}  // namespace

// ---- embedding ---------------------------------------------------------------------------------

void CpuBackend::embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) {
  const char* op = "embedding_fwd";
  check_on_cpu(op, "tokens", tokens, DType::I32);
  check_f32(op, "wte", wte);
  check_f32(op, "out", out);
  MF_CHECK(wte.ndim() == 2, op, ": ", desc("wte", wte), " must be [V,d]");
  const int64_t V = wte.dim(0), d = wte.dim(1), N = tokens.numel();
  MF_CHECK(rows_of(op, "out", out, d) == N, op, ": ", desc("out", out), " must be [N=", N, ",", d,
           "] for ", desc("tokens", tokens));
  check_ids(op, "tokens", tokens, V);
  ref::embedding_fwd(tokens.i32(), wte.f32(), N, d, out.f32());
}

void CpuBackend::embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) {
  const char* op = "embedding_bwd";
  check_on_cpu(op, "tokens", tokens, DType::I32);
  check_f32(op, "dout", dout);
  check_f32(op, "dwte", dwte);
  MF_CHECK(dwte.ndim() == 2, op, ": ", desc("dwte", dwte), " must be [V,d]");
  const int64_t V = dwte.dim(0), d = dwte.dim(1), N = tokens.numel();
  MF_CHECK(rows_of(op, "dout", dout, d) == N, op, ": ", desc("dout", dout), " must be [N=", N,
           ",", d, "] for ", desc("tokens", tokens));
  check_ids(op, "tokens", tokens, V);
  ref::embedding_bwd(tokens.i32(), dout.f32(), N, d, dwte.f32());
}

// ---- RMSNorm -----------------------------------------------------------------------------------

void CpuBackend::add_rmsnorm_fwd(const Tensor& resid_in, const Tensor* branch, Tensor& resid_out,
                                 const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  const char* op = "add_rmsnorm_fwd";
  check_f32(op, "resid_in", resid_in);
  check_f32(op, "resid_out", resid_out);
  check_f32(op, "w", w);
  check_f32(op, "y", y);
  check_f32(op, "rstd", rstd);
  MF_CHECK(w.ndim() == 1, op, ": ", desc("w", w), " must be [d]");
  const int64_t d = w.dim(0);
  const int64_t N = rows_of(op, "resid_in", resid_in, d);
  if (branch) {
    check_f32(op, "branch", *branch);
    check_same_shape(op, "branch", *branch, "resid_in", resid_in);
  }
  check_same_shape(op, "resid_out", resid_out, "resid_in", resid_in);
  check_same_shape(op, "y", y, "resid_in", resid_in);
  check_numel(op, "rstd", rstd, N, "one per row of resid_in");
  MF_CHECK(eps >= 0.f, op, ": eps ", eps, " must be >= 0 (model.norm_eps)");
  ref::add_rmsnorm_fwd(resid_in.f32(), branch ? branch->f32() : nullptr, resid_out.f32(), w.f32(),
                       N, d, eps, y.f32(), rstd.f32());
}

void CpuBackend::rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w,
                             const Tensor& rstd, Tensor& dx, Tensor& dw) {
  const char* op = "rmsnorm_bwd";
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"dy", &dy}, {"x", &x}, {"w", &w},
                         {"rstd", &rstd}, {"dx", &dx}, {"dw", &dw}})
    check_f32(op, name, *t);
  MF_CHECK(w.ndim() == 1, op, ": ", desc("w", w), " must be [d]");
  const int64_t d = w.dim(0);
  const int64_t N = rows_of(op, "x", x, d);
  check_same_shape(op, "dy", dy, "x", x);
  check_same_shape(op, "dx", dx, "x", x);
  check_same_shape(op, "dw", dw, "w", w);
  check_numel(op, "rstd", rstd, N, "one per row of x");
  ref::rmsnorm_bwd(dy.f32(), x.f32(), w.f32(), rstd.f32(), N, d, dx.f32(), dw.f32());
}

// ---- linear ------------------------------------------------------------------------------------

void CpuBackend::matmul_fwd(const Tensor& x, const Tensor& W, Tensor& y) {
  const char* op = "matmul_fwd";
  check_f32(op, "x", x);
  check_f32(op, "W", W);
  check_f32(op, "y", y);
  MF_CHECK(W.ndim() == 2, op, ": ", desc("W", W), " must be [out,in]");
  const int64_t out = W.dim(0), in = W.dim(1);
  MF_CHECK(x.ndim() >= 1 && x.dim(-1) == in, op, ": ", desc("x", x), " does not match ",
           desc("W", W), " (x's last dim must be in = ", in, ")");
  const int64_t N = x.numel() / in;
  MF_CHECK(rows_of(op, "y", y, out) == N, op, ": ", desc("y", y), " must be [", N, ",", out,
           "] for ", desc("x", x), " and ", desc("W", W));
  ref::matmul_fwd(x.f32(), W.f32(), N, in, out, y.f32());
}

void CpuBackend::matmul_bwd(const Tensor& dy, const Tensor& x, const Tensor& W, Tensor* dx,
                            Tensor* dW, bool accumulate_dx) {
  const char* op = "matmul_bwd";
  check_f32(op, "dy", dy);
  check_f32(op, "x", x);
  check_f32(op, "W", W);
  MF_CHECK(W.ndim() == 2, op, ": ", desc("W", W), " must be [out,in]");
  const int64_t out = W.dim(0), in = W.dim(1);
  MF_CHECK(x.ndim() >= 1 && x.dim(-1) == in, op, ": ", desc("x", x), " does not match ",
           desc("W", W), " (x's last dim must be in = ", in, ")");
  const int64_t N = x.numel() / in;
  MF_CHECK(rows_of(op, "dy", dy, out) == N, op, ": ", desc("dy", dy), " must be [", N, ",", out,
           "] for ", desc("x", x), " and ", desc("W", W));
  if (dx) {
    check_f32(op, "dx", *dx);
    check_same_shape(op, "dx", *dx, "x", x);
  }
  if (dW) {
    check_f32(op, "dW", *dW);
    check_same_shape(op, "dW", *dW, "W", W);
  }
  ref::matmul_bwd(dy.f32(), x.f32(), W.f32(), N, in, out, dx ? dx->f32() : nullptr,
                  dW ? dW->f32() : nullptr, accumulate_dx);
}

// ---- RoPE --------------------------------------------------------------------------------------

namespace {
void rope_checked(const char* op, const char* xn, const Tensor& x, const char* yn, Tensor& y,
                  float theta, bool inverse) {
  check_f32(op, xn, x);
  check_f32(op, yn, y);
  MF_CHECK(x.ndim() == 4, op, ": ", desc(xn, x), " must be [B,T,H,hd]");
  check_same_shape(op, yn, y, xn, x);
  MF_CHECK(x.dim(3) % 2 == 0, op, ": head_dim ", x.dim(3), " must be even for rotary embedding");
  MF_CHECK(theta > 0.f, op, ": rope_theta ", theta, " must be positive (model.rope_theta)");
  ref::rope(x.f32(), y.f32(), x.dim(0), x.dim(1), x.dim(2), x.dim(3), double(theta), inverse);
}
}  // namespace

void CpuBackend::rope_fwd(const Tensor& x, Tensor& y, float theta) {
  rope_checked("rope_fwd", "x", x, "y", y, theta, false);
}

void CpuBackend::rope_bwd(const Tensor& dy, Tensor& dx, float theta) {
  rope_checked("rope_bwd", "dy", dy, "dx", dx, theta, true);
}

namespace {
// qkv [B,T,H+2Hkv,hd] against q [B,T,H,hd], k and v [B,T,Hkv,hd] (names as the op calls them).
void check_qkv(const char* op, const char* pn, const Tensor& p, const char* qn, const Tensor& q,
               const char* kn, const Tensor& k, const char* vn, const Tensor& v, float theta) {
  for (auto [n, t] : {std::pair<const char*, const Tensor*>{pn, &p}, {qn, &q}, {kn, &k}, {vn, &v}}) {
    check_f32(op, n, *t);
    MF_CHECK(t->ndim() == 4, op, ": ", desc(n, *t), " must be [B,T,heads,hd]");
  }
  check_same_shape(op, vn, v, kn, k);
  MF_CHECK(q.dim(0) == k.dim(0) && q.dim(1) == k.dim(1) && q.dim(3) == k.dim(3), op, ": ",
           desc(kn, k), " must match ", desc(qn, q), " in B, T and hd");
  MF_CHECK(p.shape == Shape({q.dim(0), q.dim(1), q.dim(2) + 2 * k.dim(2), q.dim(3)}), op, ": ",
           desc(pn, p), " must be [B,T,H+2Hkv,hd] for ", desc(qn, q), " and ", desc(kn, k));
  MF_CHECK(q.dim(3) % 2 == 0, op, ": head_dim ", q.dim(3), " must be even for rotary embedding");
  MF_CHECK(theta > 0.f, op, ": rope_theta ", theta, " must be positive (model.rope_theta)");
}
}  // namespace

void CpuBackend::qkv_rope_split(const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, float theta) {
  check_qkv("qkv_rope_split", "qkv", qkv, "q", q, "k", k, "v", v, theta);
  ref::qkv_rope_split(qkv.f32(), q.f32(), k.f32(), v.f32(), q.dim(0), q.dim(1), q.dim(2),
                      k.dim(2), q.dim(3), double(theta));
}

void CpuBackend::qkv_rope_merge_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                    Tensor& dqkv, float theta) {
  check_qkv("qkv_rope_merge_bwd", "dqkv", dqkv, "dq", dq, "dk", dk, "dv", dv, theta);
  ref::qkv_rope_merge_bwd(dq.f32(), dk.f32(), dv.f32(), dqkv.f32(), dq.dim(0), dq.dim(1),
                          dq.dim(2), dk.dim(2), dq.dim(3), double(theta));
}

// ---- attention ---------------------------------------------------------------------------------

void CpuBackend::attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                               Tensor& lse, const AttnShape& s) {
  const char* op = "attention_fwd";
  check_attn_shape(op, s);
  check_attn_tensor(op, "q", q, s, s.H);
  check_attn_tensor(op, "k", k, s, s.Hkv);
  check_attn_tensor(op, "v", v, s, s.Hkv);
  check_attn_tensor(op, "out", out, s, s.H);
  check_lse(op, lse, s);
  ref::attention_fwd(q.f32(), k.f32(), v.f32(), out.f32(), lse.f32(), dims_of(s), s.scale);
}

void CpuBackend::attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& out, const Tensor& lse, Tensor& dq,
                               Tensor& dk, Tensor& dv, const AttnShape& s) {
  const char* op = "attention_bwd";
  check_attn_shape(op, s);
  check_attn_tensor(op, "dout", dout, s, s.H);
  check_attn_tensor(op, "q", q, s, s.H);
  check_attn_tensor(op, "k", k, s, s.Hkv);
  check_attn_tensor(op, "v", v, s, s.Hkv);
  check_attn_tensor(op, "out", out, s, s.H);
  check_lse(op, lse, s);
  check_attn_tensor(op, "dq", dq, s, s.H);
  check_attn_tensor(op, "dk", dk, s, s.Hkv);
  check_attn_tensor(op, "dv", dv, s, s.Hkv);
  ref::attention_bwd(dout.f32(), q.f32(), k.f32(), v.f32(), out.f32(), lse.f32(), dq.f32(),
                     dk.f32(), dv.f32(), dims_of(s), s.scale);
}

// ---- SwiGLU ------------------------------------------------------------------------------------

void CpuBackend::swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h) {
  const char* op = "swiglu_fwd";
  check_f32(op, "gate", gate);
  check_f32(op, "up", up);
  check_f32(op, "h", h);
  check_same_shape(op, "up", up, "gate", gate);
  check_same_shape(op, "h", h, "gate", gate);
  ref::swiglu_fwd(gate.f32(), up.f32(), gate.numel(), h.f32());
}

void CpuBackend::swiglu_bwd(const Tensor& dh, const Tensor& gate, const Tensor& up,
                            Tensor& dgate, Tensor& dup) {
  const char* op = "swiglu_bwd";
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"dh", &dh}, {"gate", &gate},
                         {"up", &up}, {"dgate", &dgate}, {"dup", &dup}}) {
    check_f32(op, name, *t);
    check_same_shape(op, name, *t, "gate", gate);
  }
  ref::swiglu_bwd(dh.f32(), gate.f32(), up.f32(), gate.numel(), dgate.f32(), dup.f32());
}

namespace {
// gu [N,2f] and its [N,f] companion (h or dh); returns f.
int64_t check_packed(const char* op, const Tensor& gu, const char* name, const Tensor& t) {
  check_f32(op, "gu", gu);
  check_f32(op, name, t);
  MF_CHECK(gu.ndim() == 2 && gu.dim(1) % 2 == 0, op, ": ", desc("gu", gu),
           " must be [N, 2f] (gate in columns [0,f), up in [f,2f))");
  MF_CHECK(t.ndim() == 2 && t.dim(0) == gu.dim(0) && t.dim(1) * 2 == gu.dim(1), op, ": ",
           desc(name, t), " must be [N, f] of ", desc("gu", gu));
  return t.dim(1);
}
}  // namespace

void CpuBackend::swiglu_packed_fwd(const Tensor& gu, Tensor& h) {
  const int64_t f = check_packed("swiglu_packed_fwd", gu, "h", h);
  ref::swiglu_packed_fwd(gu.f32(), gu.dim(0), f, h.f32());
}

void CpuBackend::swiglu_packed_bwd(const Tensor& dh, const Tensor& gu, Tensor& dgu) {
  const char* op = "swiglu_packed_bwd";
  const int64_t f = check_packed(op, gu, "dh", dh);
  check_f32(op, "dgu", dgu);
  check_same_shape(op, "dgu", dgu, "gu", gu);
  MF_CHECK(dgu.ptr != gu.ptr, op, ": dgu must not alias gu");
  ref::swiglu_packed_bwd(dh.f32(), gu.f32(), gu.dim(0), f, dgu.f32());
}

// ---- lm-head + cross-entropy -------------------------------------------------------------------

void CpuBackend::lmhead_xent(const Tensor& x, const Tensor& W, const Tensor& targets,
                             float logit_scale, Tensor& losses, Tensor* dx, Tensor* dW,
                             float loss_scale) {
  const char* op = "lmhead_xent";
  check_f32(op, "x", x);
  check_f32(op, "W", W);
  check_on_cpu(op, "targets", targets, DType::I32);
  check_f32(op, "losses", losses);
  MF_CHECK(W.ndim() == 2, op, ": ", desc("W", W), " must be [V,d]");
  const int64_t V = W.dim(0), d = W.dim(1);
  MF_CHECK(V > 0, op, ": ", desc("W", W), " has no rows (vocab_size)");
  MF_CHECK(x.ndim() >= 1 && x.dim(-1) == d, op, ": ", desc("x", x), " does not match ",
           desc("W", W), " (x's last dim must be d = ", d, ")");
  const int64_t N = x.numel() / d;
  check_numel(op, "targets", targets, N, "one per row of x");
  check_numel(op, "losses", losses, N, "one per row of x");
  if (dx) {
    check_f32(op, "dx", *dx);
    check_same_shape(op, "dx", *dx, "x", x);
  }
  if (dW) {
    check_f32(op, "dW", *dW);
    check_same_shape(op, "dW", *dW, "W", W);
  }
  check_ids(op, "targets", targets, V);
  ref::lmhead_xent(x.f32(), W.f32(), targets.i32(), N, d, V, logit_scale, losses.f32(),
                   dx ? dx->f32() : nullptr, dW ? dW->f32() : nullptr, loss_scale);
}

}  // namespace mf
