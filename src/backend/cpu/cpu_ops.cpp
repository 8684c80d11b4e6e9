// CpuBackend: the model ops. Each method checks its arguments against the op's contract
// (backend/op_contract.h, shared with the CUDA kernels) and calls the float instantiation of the
// op's math in ref_ops.h, which the tests also run in double.
#include <cstdint>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_ops.h"
#include "backend/op_contract.h"

namespace mf {

namespace {

constexpr const contract::Where& kHere = contract::kCpu;

// Every id in [0, V): the reference indexes rows with them (the CUDA kernels cannot read them
// without a sync, and treat ids outside [0, V) as their own contract says).
void check_ids(const char* op, const char* name, const Tensor& ids, int64_t V) {
  const int32_t* p = ids.i32();
  for (int64_t i = 0; i < ids.numel(); ++i)
    MF_CHECK(p[i] >= 0 && p[i] < V, op, ": ", name, "[", i, "] = ", p[i], " is outside [0, ", V,
             ") (vocab_size)");
}

ref::AttnDims dims_of(const AttnShape& s) { return {s.B, s.T, s.H, s.Hkv, s.hd}; }

}  // namespace

// ---- embedding ---------------------------------------------------------------------------------

void CpuBackend::embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) {
  const auto e = contract::embedding_fwd(kHere, tokens, wte, out);
  check_ids("embedding_fwd", "tokens", tokens, e.V);
  ref::embedding_fwd(tokens.i32(), wte.f32(), e.N, e.d, out.f32());
}

void CpuBackend::embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) {
  const auto e = contract::embedding_bwd(kHere, tokens, dout, dwte);
  check_ids("embedding_bwd", "tokens", tokens, e.V);
  ref::embedding_bwd(tokens.i32(), dout.f32(), e.N, e.d, dwte.f32());
}

// ---- RMSNorm -----------------------------------------------------------------------------------

void CpuBackend::add_rmsnorm_fwd(const Tensor& resid_in, const Tensor* branch, Tensor& resid_out,
                                 const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  const auto r = contract::add_rmsnorm_fwd(kHere, resid_in, branch, resid_out, w, eps, y, rstd);
  ref::add_rmsnorm_fwd(resid_in.f32(), branch ? branch->f32() : nullptr, resid_out.f32(), w.f32(),
                       r.N, r.d, eps, y.f32(), rstd.f32());
}

void CpuBackend::rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w,
                             const Tensor& rstd, Tensor& dx, Tensor& dw) {
  const auto r = contract::rmsnorm_bwd(kHere, dy, x, w, rstd, dx, dw);
  ref::rmsnorm_bwd(dy.f32(), x.f32(), w.f32(), rstd.f32(), r.N, r.d, dx.f32(), dw.f32());
}

// ---- linear ------------------------------------------------------------------------------------

void CpuBackend::matmul_fwd(const Tensor& x, const Tensor& W, Tensor& y) {
  const auto m = contract::matmul_fwd(kHere, x, W, y);
  ref::matmul_fwd(x.f32(), W.f32(), m.N, m.in, m.out, y.f32());
}

void CpuBackend::matmul_bwd(const Tensor& dy, const Tensor& x, const Tensor& W, Tensor* dx,
                            Tensor* dW, bool accumulate_dx) {
  const auto m = contract::matmul_bwd(kHere, dy, x, W, dx, dW);
  ref::matmul_bwd(dy.f32(), x.f32(), W.f32(), m.N, m.in, m.out, dx ? dx->f32() : nullptr,
                  dW ? dW->f32() : nullptr, accumulate_dx);
}

// ---- RoPE --------------------------------------------------------------------------------------

void CpuBackend::rope_fwd(const Tensor& x, Tensor& y, float theta) {
  contract::rope(kHere, "rope_fwd", "x", x, "y", y, theta);
  ref::rope(x.f32(), y.f32(), x.dim(0), x.dim(1), x.dim(2), x.dim(3), double(theta), false);
}

void CpuBackend::rope_bwd(const Tensor& dy, Tensor& dx, float theta) {
  contract::rope(kHere, "rope_bwd", "dy", dy, "dx", dx, theta);
  ref::rope(dy.f32(), dx.f32(), dy.dim(0), dy.dim(1), dy.dim(2), dy.dim(3), double(theta), true);
}

void CpuBackend::qkv_rope_split(const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, float theta) {
  contract::qkv_rope(kHere, "qkv_rope_split", "qkv", qkv, "q", q, "k", k, "v", v, theta);
  ref::qkv_rope_split(qkv.f32(), q.f32(), k.f32(), v.f32(), q.dim(0), q.dim(1), q.dim(2),
                      k.dim(2), q.dim(3), double(theta));
}

void CpuBackend::qkv_rope_merge_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                    Tensor& dqkv, float theta) {
  contract::qkv_rope(kHere, "qkv_rope_merge_bwd", "dqkv", dqkv, "dq", dq, "dk", dk, "dv", dv,
                     theta);
  ref::qkv_rope_merge_bwd(dq.f32(), dk.f32(), dv.f32(), dqkv.f32(), dq.dim(0), dq.dim(1),
                          dq.dim(2), dk.dim(2), dq.dim(3), double(theta));
}

// ---- attention ---------------------------------------------------------------------------------

void CpuBackend::attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                               Tensor& lse, const AttnShape& s) {
  contract::attention_fwd(kHere, "attention_fwd", q, k, v, out, lse, s);
  ref::attention_fwd(q.f32(), k.f32(), v.f32(), out.f32(), lse.f32(), dims_of(s), s.scale);
}

void CpuBackend::attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& out, const Tensor& lse, Tensor& dq,
                               Tensor& dk, Tensor& dv, const AttnShape& s) {
  contract::attention_bwd(kHere, "attention_bwd", dout, q, k, v, out, lse, dq, dk, dv, s);
  ref::attention_bwd(dout.f32(), q.f32(), k.f32(), v.f32(), out.f32(), lse.f32(), dq.f32(),
                     dk.f32(), dv.f32(), dims_of(s), s.scale);
}

// ---- SwiGLU ------------------------------------------------------------------------------------

void CpuBackend::swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h) {
  const auto g = contract::swiglu_fwd(kHere, gate, up, h);
  ref::swiglu_fwd(gate.f32(), up.f32(), g.rows * g.f, h.f32());
}

void CpuBackend::swiglu_bwd(const Tensor& dh, const Tensor& gate, const Tensor& up,
                            Tensor& dgate, Tensor& dup) {
  const auto g = contract::swiglu_bwd(kHere, dh, gate, up, dgate, dup);
  ref::swiglu_bwd(dh.f32(), gate.f32(), up.f32(), g.rows * g.f, dgate.f32(), dup.f32());
}

void CpuBackend::swiglu_packed_fwd(const Tensor& gu, Tensor& h) {
  const auto g = contract::swiglu_packed_fwd(kHere, gu, h);
  ref::swiglu_packed_fwd(gu.f32(), g.rows, g.f, h.f32());
}

void CpuBackend::swiglu_packed_bwd(const Tensor& dh, const Tensor& gu, Tensor& dgu) {
  const auto g = contract::swiglu_packed_bwd(kHere, dh, gu, dgu);
  ref::swiglu_packed_bwd(dh.f32(), gu.f32(), g.rows, g.f, dgu.f32());
}

// ---- lm-head + cross-entropy -------------------------------------------------------------------

void CpuBackend::lmhead_xent(const Tensor& x, const Tensor& W, const Tensor& targets,
                             float logit_scale, Tensor& losses, Tensor* dx, Tensor* dW,
                             float loss_scale) {
  const auto e = contract::lmhead_xent(kHere, x, W, targets, losses, dx, dW);
  check_ids("lmhead_xent", "targets", targets, e.V);
  ref::lmhead_xent(x.f32(), W.f32(), targets.i32(), e.N, e.d, e.V, logit_scale, losses.f32(),
                   dx ? dx->f32() : nullptr, dW ? dW->f32() : nullptr, loss_scale);
}

}  // namespace mf
