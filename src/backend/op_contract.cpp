#include "backend/op_contract.h"

#include <algorithm>
#include <utility>

namespace mf::contract {

std::string desc(const char* name, const Tensor& t) {
  return std::string(name) + " " + shape_str(t.shape) + " " + dtype_name(t.dtype);
}

void Check::placed(const char* name, const Tensor& t) const {
  MF_CHECK(t.defined() || t.numel() == 0, op_, ": ", name, " is not allocated");
  if (w_.device == Device::CPU)
    MF_CHECK(t.device == Device::CPU, op_, ": ", desc(name, t),
             " lives on the GPU but the backend is cpu");
  else
    MF_CHECK(t.device == Device::CUDA, op_, ": ", desc(name, t),
             " is a host tensor but the backend is cuda (upload it first)");
}

void Check::dtype(const char* name, const Tensor& t, DType want) const {
  placed(name, t);
  MF_CHECK(t.dtype == want, op_, ": ", desc(name, t), " has the wrong dtype, expected ",
           dtype_name(want));
}

void Check::floating(const char* name, const Tensor& t) const {
  if (!w_.bf16) return dtype(name, t, DType::F32);
  placed(name, t);
  MF_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16, op_, ": ", desc(name, t),
           " must be f32 or bf16");
}

void Check::same_dtype(const char* name, const Tensor& t, const char* ref_name,
                       const Tensor& ref) const {
  floating(name, t);
  MF_CHECK(t.dtype == ref.dtype, op_, ": ", desc(name, t), " must have the dtype of ",
           desc(ref_name, ref));
}

void Check::like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) const {
  same_dtype(name, t, ref_name, ref);
  MF_CHECK(t.shape == ref.shape, op_, ": ", desc(name, t), " must have the shape of ",
           desc(ref_name, ref));
}

int64_t Check::rows(const char* name, const Tensor& t, int64_t width) const {
  MF_CHECK(t.ndim() >= 1 && t.dim(-1) == width, op_, ": ", desc(name, t), " must have last dim ",
           width);
  return width ? t.numel() / width : 0;
}

void Check::rows_of_width(const char* name, const Tensor& t, int64_t rows_want, int64_t width,
                          const char* what) const {
  MF_CHECK(t.ndim() >= 1 && t.dim(-1) == width && t.numel() == rows_want * width, op_, ": ",
           desc(name, t), " must be [", rows_want, ",", width, "] (", what, ")");
}

void Check::numel(const char* name, const Tensor& t, int64_t n, const std::string& what) const {
  MF_CHECK(t.numel() == n, op_, ": ", desc(name, t), " must have ", n, " elements (", what, ")");
}

void Check::mat(const char* name, const Tensor& t, int64_t r, int64_t c, const char* what) const {
  const bool ok = (t.ndim() == 2 && t.dim(0) == r && t.dim(1) == c) ||
                  (t.ndim() == 1 && r == 1 && t.dim(0) == c);
  MF_CHECK(ok, op_, ": ", desc(name, t), " must be [", r, ",", c, "] (", what, ")");
}

// ---- dense model ops ---------------------------------------------------------------------------

EmbeddingDims embedding_fwd(const Where& w, const Tensor& tokens, const Tensor& wte,
                            const Tensor& out) {
  const Check c(w, "embedding_fwd");
  c.dtype("tokens", tokens, DType::I32);
  c.floating("wte", wte);
  c.floating("out", out);
  MF_CHECK(wte.ndim() == 2, c.op(), ": ", desc("wte", wte), " must be [V,d]");
  const EmbeddingDims e{tokens.numel(), wte.dim(0), wte.dim(1)};
  c.rows_of_width("out", out, e.N, e.d, "a row of wte per token");
  return e;
}

EmbeddingDims embedding_bwd(const Where& w, const Tensor& tokens, const Tensor& dout,
                            const Tensor& dwte) {
  const Check c(w, "embedding_bwd");
  c.dtype("tokens", tokens, DType::I32);
  c.floating("dout", dout);
  c.dtype("dwte", dwte, DType::F32);
  MF_CHECK(dwte.ndim() == 2, c.op(), ": ", desc("dwte", dwte), " must be [V,d]");
  const EmbeddingDims e{tokens.numel(), dwte.dim(0), dwte.dim(1)};
  c.rows_of_width("dout", dout, e.N, e.d, "a row per token");
  return e;
}

namespace {
// w [d] floating; returns d.
int64_t norm_weight(const Check& c, const Tensor& wt) {
  c.floating("w", wt);
  MF_CHECK(wt.ndim() == 1, c.op(), ": ", desc("w", wt), " must be [d]");
  return wt.dim(0);
}
}  // namespace

RowDims add_rmsnorm_fwd(const Where& w, const Tensor& resid_in, const Tensor* branch,
                        const Tensor& resid_out, const Tensor& wt, float eps, const Tensor& y,
                        const Tensor& rstd) {
  const Check c(w, "add_rmsnorm_fwd");
  c.floating("resid_in", resid_in);
  const int64_t d = norm_weight(c, wt);
  const RowDims r{c.rows("resid_in", resid_in, d), d};
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"branch", branch},
                         {"resid_out", &resid_out}, {"y", &y}}) {
    if (!t) continue;
    c.same_dtype(name, *t, "resid_in", resid_in);
    c.rows_of_width(name, *t, r.N, d, "like resid_in");
  }
  c.dtype("rstd", rstd, DType::F32);
  c.numel("rstd", rstd, r.N, "one per row of resid_in");
  MF_CHECK(eps >= 0.f, c.op(), ": eps ", eps, " must be >= 0 (model.norm_eps)");
  return r;
}

RowDims rmsnorm_bwd(const Where& w, const Tensor& dy, const Tensor& x, const Tensor& wt,
                    const Tensor& rstd, const Tensor& dx, const Tensor& dw) {
  const Check c(w, "rmsnorm_bwd");
  c.floating("x", x);
  const int64_t d = norm_weight(c, wt);
  const RowDims r{c.rows("x", x, d), d};
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"dy", &dy}, {"dx", &dx}}) {
    c.same_dtype(name, *t, "x", x);
    c.rows_of_width(name, *t, r.N, d, "like x");
  }
  c.dtype("rstd", rstd, DType::F32);
  c.numel("rstd", rstd, r.N, "one per row of x");
  c.dtype("dw", dw, DType::F32);
  c.numel("dw", dw, d, "one per column of x");
  return r;
}

namespace {
// W [out,in] and x [N,in] of W's dtype.
MatmulDims linear_inputs(const Check& c, const Tensor& x, const Tensor& W) {
  c.floating("W", W);
  MF_CHECK(W.ndim() == 2, c.op(), ": ", desc("W", W), " must be [out,in]");
  c.same_dtype("x", x, "W", W);
  const int64_t out = W.dim(0), in = W.dim(1);
  MF_CHECK(x.ndim() >= 1 && x.dim(-1) == in, c.op(), ": ", desc("x", x), " does not match ",
           desc("W", W), " (x's last dim must be in = ", in, ")");
  return {in ? x.numel() / in : 0, in, out};
}
}  // namespace

MatmulDims matmul_fwd(const Where& w, const Tensor& x, const Tensor& W, const Tensor& y) {
  const Check c(w, "matmul_fwd");
  const MatmulDims m = linear_inputs(c, x, W);
  c.floating("y", y);
  c.rows_of_width("y", y, m.N, m.out, "rows of x by rows of W");
  return m;
}

MatmulDims matmul_bwd(const Where& w, const Tensor& dy, const Tensor& x, const Tensor& W,
                      const Tensor* dx, const Tensor* dW) {
  const Check c(w, "matmul_bwd");
  const MatmulDims m = linear_inputs(c, x, W);
  c.same_dtype("dy", dy, "W", W);
  c.rows_of_width("dy", dy, m.N, m.out, "rows of x by rows of W");
  if (dx) {
    c.floating("dx", *dx);
    c.rows_of_width("dx", *dx, m.N, m.in, "like x");
  }
  if (dW) {
    c.floating("dW", *dW);
    MF_CHECK(dW->shape == W.shape, c.op(), ": ", desc("dW", *dW), " must have the shape of ",
             desc("W", W));
  }
  return m;
}

namespace {
void rope_args(const Check& c, int64_t hd, float theta) {
  MF_CHECK(hd % 2 == 0, c.op(), ": head_dim ", hd, " must be even for rotary embedding");
  MF_CHECK(theta > 0.f, c.op(), ": rope_theta ", theta, " must be positive (model.rope_theta)");
}
}  // namespace

void rope(const Where& w, const char* op, const char* xn, const Tensor& x, const char* yn,
          const Tensor& y, float theta) {
  const Check c(w, op);
  c.floating(xn, x);
  MF_CHECK(x.ndim() == 4, op, ": ", desc(xn, x), " must be [B,T,H,hd]");
  c.like(yn, y, xn, x);
  rope_args(c, x.dim(3), theta);
}

void qkv_rope(const Where& w, const char* op, const char* pn, const Tensor& p, const char* qn,
              const Tensor& q, const char* kn, const Tensor& k, const char* vn, const Tensor& v,
              float theta) {
  const Check c(w, op);
  c.floating(qn, q);
  for (auto [n, t] : {std::pair<const char*, const Tensor*>{qn, &q}, {kn, &k}, {vn, &v}, {pn, &p}}) {
    c.same_dtype(n, *t, qn, q);
    MF_CHECK(t->ndim() == 4, op, ": ", desc(n, *t), " must be [B,T,heads,hd]");
  }
  c.like(vn, v, kn, k);
  MF_CHECK(q.dim(0) == k.dim(0) && q.dim(1) == k.dim(1) && q.dim(3) == k.dim(3), op, ": ",
           desc(kn, k), " must match ", desc(qn, q), " in B, T and hd");
  MF_CHECK(p.shape == Shape({q.dim(0), q.dim(1), q.dim(2) + 2 * k.dim(2), q.dim(3)}), op, ": ",
           desc(pn, p), " must be [B,T,H+2Hkv,hd] for ", desc(qn, q), " and ", desc(kn, k));
  rope_args(c, q.dim(3), theta);
}

namespace {
// [rows, f] of a tensor whose last dim is f (leading dims are rows).
SwigluDims rows_cols(const Check& c, const char* name, const Tensor& t) {
  MF_CHECK(t.ndim() >= 1, c.op(), ": ", desc(name, t), " needs at least one dimension");
  const int64_t f = t.dim(-1);
  return {f ? t.numel() / f : 0, f};
}
}  // namespace

SwigluDims swiglu_fwd(const Where& w, const Tensor& gate, const Tensor& up, const Tensor& h) {
  const Check c(w, "swiglu_fwd");
  c.floating("gate", gate);
  c.like("up", up, "gate", gate);
  c.like("h", h, "gate", gate);
  return rows_cols(c, "gate", gate);
}

SwigluDims swiglu_bwd(const Where& w, const Tensor& dh, const Tensor& gate, const Tensor& up,
                      const Tensor& dgate, const Tensor& dup) {
  const Check c(w, "swiglu_bwd");
  c.floating("gate", gate);
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"up", &up}, {"dh", &dh},
                         {"dgate", &dgate}, {"dup", &dup}})
    c.like(name, *t, "gate", gate);
  MF_CHECK(dgate.ptr != dup.ptr, c.op(), ": dgate and dup must be different tensors");
  return rows_cols(c, "gate", gate);
}

namespace {
// gu [N,2f] and its [N,f] companion (h or dh) of gu's dtype.
SwigluDims packed(const Check& c, const Tensor& gu, const char* name, const Tensor& t) {
  c.floating("gu", gu);
  MF_CHECK(gu.ndim() == 2 && gu.dim(1) % 2 == 0, c.op(), ": ", desc("gu", gu),
           " must be [N, 2f] (gate in columns [0,f), up in [f,2f))");
  c.same_dtype(name, t, "gu", gu);
  MF_CHECK(t.ndim() == 2 && t.dim(0) == gu.dim(0) && t.dim(1) * 2 == gu.dim(1), c.op(), ": ",
           desc(name, t), " must be [N, f] of ", desc("gu", gu));
  return {gu.dim(0), t.dim(1)};
}
}  // namespace

SwigluDims swiglu_packed_fwd(const Where& w, const Tensor& gu, const Tensor& h) {
  return packed(Check(w, "swiglu_packed_fwd"), gu, "h", h);
}

SwigluDims swiglu_packed_bwd(const Where& w, const Tensor& dh, const Tensor& gu,
                             const Tensor& dgu) {
  const Check c(w, "swiglu_packed_bwd");
  const SwigluDims s = packed(c, gu, "dh", dh);
  c.like("dgu", dgu, "gu", gu);
  MF_CHECK(dgu.ptr != gu.ptr, c.op(), ": dgu must not alias gu");
  return s;
}

XentDims lmhead_xent(const Where& w, const Tensor& x, const Tensor& W, const Tensor& targets,
                     const Tensor& losses, const Tensor* dx, const Tensor* dW) {
  const Check c(w, "lmhead_xent");
  c.floating("x", x);  // bf16, or f32 for train.precision "fp32"
  c.dtype("W", W, x.dtype);
  c.dtype("targets", targets, DType::I32);
  c.dtype("losses", losses, DType::F32);
  MF_CHECK(W.ndim() == 2, c.op(), ": ", desc("W", W), " must be [V,d]");
  const int64_t V = W.dim(0), d = W.dim(1);
  MF_CHECK(V > 0, c.op(), ": ", desc("W", W), " has no rows (vocab_size)");
  MF_CHECK(x.ndim() >= 1 && x.dim(-1) == d, c.op(), ": ", desc("x", x), " does not match ",
           desc("W", W), " (x's last dim must be d = ", d, ")");
  const int64_t N = d ? x.numel() / d : 0;
  c.numel("targets", targets, N, "one per row of x");
  c.numel("losses", losses, N, "one per row of x");
  if (dx) {
    c.same_dtype("dx", *dx, "x", x);
    c.numel("dx", *dx, x.numel(), "as many as x");
  }
  if (dW) {
    c.floating("dW", *dW);
    MF_CHECK(dW->shape == W.shape, c.op(), ": ", desc("dW", *dW), " must have the shape of ",
             desc("W", W));
  }
  return {N, V, d};
}

void attention_shape(const char* op, const AttnShape& s) {
  MF_CHECK(s.B > 0 && s.T > 0 && s.H > 0 && s.Hkv > 0 && s.hd > 0, op, ": bad shape B=", s.B,
           " T=", s.T, " H=", s.H, " Hkv=", s.Hkv, " hd=", s.hd);
  MF_CHECK(s.H % s.Hkv == 0, op, ": n_heads ", s.H, " is not a multiple of n_kv_heads ", s.Hkv);
  MF_CHECK(s.scale > 0.f, op, ": softmax scale ", s.scale, " must be positive");
}

namespace {
// B*T*heads*hd elements of q's dtype.
void attention_act(const Check& c, const char* name, const Tensor& t, const Tensor& q,
                   const AttnShape& s, int heads) {
  c.same_dtype(name, t, "q", q);
  const int64_t n = int64_t(s.B) * s.T * heads * s.hd;
  MF_CHECK(t.numel() == n, c.op(), ": ", desc(name, t), " must have B*T*", heads, "*hd = ", n,
           " elements (B=", s.B, " T=", s.T, " hd=", s.hd, ")");
}
}  // namespace

void attention_fwd(const Where& w, const char* op, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& out, const Tensor& lse, const AttnShape& s) {
  attention_shape(op, s);
  const Check c(w, op);
  c.floating("q", q);
  attention_act(c, "q", q, q, s, s.H);
  attention_act(c, "k", k, q, s, s.Hkv);
  attention_act(c, "v", v, q, s, s.Hkv);
  attention_act(c, "out", out, q, s, s.H);
  c.dtype("lse", lse, DType::F32);
  c.numel("lse", lse, int64_t(s.B) * s.H * s.T, "B*H*T");
}

void attention_bwd(const Where& w, const char* op, const Tensor& dout, const Tensor& q,
                   const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dq, const Tensor& dk, const Tensor& dv, const AttnShape& s) {
  attention_fwd(w, op, q, k, v, out, lse, s);
  const Check c(w, op);
  attention_act(c, "dout", dout, q, s, s.H);
  attention_act(c, "dq", dq, q, s, s.H);
  attention_act(c, "dk", dk, q, s, s.Hkv);
  attention_act(c, "dv", dv, q, s, s.Hkv);
}

// ---- Mixture-of-Experts ops ---------------------------------------------------------------------

void moe_route_args(const char* op, const MoeRouterArgs& a) {
  MF_CHECK(a.E > 0 && a.k > 0 && a.k <= a.E, op, ": top_k ", a.k, " and n_experts ", a.E,
           " must satisfy 0 < top_k <= n_experts (model.moe)");
  MF_CHECK(a.route_scale > 0.f, op, ": route_scale ", a.route_scale,
           " must be positive (model.moe.route_scale)");
}

namespace {
// x [N,d] floating against Wr f32 [E,d] with d > 0.
RouterDims router_inputs(const Check& c, const Tensor& x, const Tensor& Wr,
                         const MoeRouterArgs& a) {
  moe_route_args(c.op(), a);
  c.floating("x", x);
  c.dtype("Wr", Wr, DType::F32);
  MF_CHECK(Wr.ndim() == 2 && Wr.dim(0) == a.E && Wr.dim(1) > 0, c.op(), ": ", desc("Wr", Wr),
           " must be [", a.E, ",d] (n_experts x d_model)");
  const int64_t d = Wr.dim(1);
  return {c.rows("x", x, d), d};
}

void f32_mat(const Check& c, const char* name, const Tensor& t, int64_t r, int64_t cols,
             const char* what) {
  c.dtype(name, t, DType::F32);
  c.mat(name, t, r, cols, what);
}

void i32_mat(const Check& c, const char* name, const Tensor& t, int64_t r, int64_t cols,
             const char* what) {
  c.dtype(name, t, DType::I32);
  c.mat(name, t, r, cols, what);
}

// Matrices of one dtype (the activations') and one width.
void row_pair(const Check& c, const char* an, const Tensor& A, const char* bn, const Tensor& B) {
  c.floating(an, A);
  c.same_dtype(bn, B, an, A);
  MF_CHECK(A.ndim() == 2 && B.ndim() == 2 && A.dim(1) == B.dim(1), c.op(), ": ", desc(an, A),
           " and ", desc(bn, B), " must be matrices of the same width");
}

// row_of i32 [N,k] with N the rows of `tokens` (named tn).
void row_of_tokens(const Check& c, const Tensor& row_of, const char* tn, const Tensor& tokens) {
  c.dtype("row_of", row_of, DType::I32);
  MF_CHECK(row_of.ndim() == 2 && row_of.dim(0) == tokens.dim(0), c.op(), ": ",
           desc("row_of", row_of), " must be [N,k] with N = ", tokens.dim(0), " (rows of ", tn,
           ")");
}

// f32 with row_of's shape.
void per_slot(const Check& c, const char* name, const Tensor& t, const Tensor& row_of) {
  c.dtype(name, t, DType::F32);
  MF_CHECK(t.shape == row_of.shape, c.op(), ": ", desc(name, t), " must have the shape of ",
           desc("row_of", row_of));
}
}  // namespace

RouterDims moe_router_fwd(const Where& w, const Tensor& x, const Tensor& Wr, const Tensor* bias,
                          const MoeRouterArgs& a, const Tensor& probs, const Tensor& topk_idx,
                          const Tensor& topk_w, const Tensor& counts, const Tensor& score_sum) {
  const Check c(w, "moe_router_fwd");
  const RouterDims r = router_inputs(c, x, Wr, a);
  if (bias) f32_mat(c, "bias", *bias, 1, a.E, "one per expert");
  f32_mat(c, "probs", probs, r.N, a.E, "tokens x experts");
  i32_mat(c, "topk_idx", topk_idx, r.N, a.k, "tokens x top_k");
  f32_mat(c, "topk_w", topk_w, r.N, a.k, "tokens x top_k");
  i32_mat(c, "counts", counts, 1, a.E, "one per expert");
  f32_mat(c, "score_sum", score_sum, 1, a.E, "one per expert");
  return r;
}

RouterDims moe_router_bwd(const Where& w, const Tensor& dtopk_w, const Tensor* aux_grad,
                          const Tensor& x, const Tensor& Wr, const Tensor& probs,
                          const Tensor& topk_idx, const MoeRouterArgs& a, const Tensor& dlogits,
                          const Tensor& dx, const Tensor& dWr) {
  const Check c(w, "moe_router_bwd");
  const RouterDims r = router_inputs(c, x, Wr, a);
  f32_mat(c, "dtopk_w", dtopk_w, r.N, a.k, "tokens x top_k");
  if (aux_grad) f32_mat(c, "aux_grad", *aux_grad, 1, a.E, "one per expert");
  f32_mat(c, "probs", probs, r.N, a.E, "tokens x experts");
  i32_mat(c, "topk_idx", topk_idx, r.N, a.k, "tokens x top_k");
  f32_mat(c, "dlogits", dlogits, r.N, a.E, "tokens x experts");
  c.floating("dx", dx);
  MF_CHECK(dx.shape == x.shape, c.op(), ": ", desc("dx", dx), " must have the shape of ",
           desc("x", x));
  c.dtype("dWr", dWr, DType::F32);
  MF_CHECK(dWr.shape == Wr.shape, c.op(), ": ", desc("dWr", dWr), " must have the shape of ",
           desc("Wr", Wr));
  return r;
}

SlotDims moe_permute(const Where& w, const Tensor& topk_idx, int E, const Tensor& offsets,
                     const Tensor& row_of, const Tensor& row_token) {
  const Check c(w, "moe_permute");
  MF_CHECK(E > 0, c.op(), ": n_experts ", E, " must be positive (model.moe.n_experts)");
  c.dtype("topk_idx", topk_idx, DType::I32);
  MF_CHECK(topk_idx.ndim() == 2, c.op(), ": ", desc("topk_idx", topk_idx), " must be [N,k]");
  const SlotDims s{topk_idx.dim(0), topk_idx.dim(1)};
  i32_mat(c, "offsets", offsets, 1, E + 1, "n_experts + 1");
  c.dtype("row_of", row_of, DType::I32);
  MF_CHECK(row_of.shape == topk_idx.shape, c.op(), ": ", desc("row_of", row_of),
           " must have the shape of ", desc("topk_idx", topk_idx));
  c.dtype("row_token", row_token, DType::I32);
  c.numel("row_token", row_token, s.N * s.k, "N * top_k");
  return s;
}

void moe_gather(const Where& w, const Tensor& x, const Tensor& row_token, const Tensor& xg) {
  const Check c(w, "moe_gather");
  row_pair(c, "x", x, "xg", xg);
  c.dtype("row_token", row_token, DType::I32);
  MF_CHECK(row_token.numel() >= xg.dim(0), c.op(), ": ", desc("row_token", row_token),
           " has fewer entries than the ", xg.dim(0), " rows of xg");
}

void moe_gather_bwd(const Where& w, const Tensor& dxg, const Tensor& row_of, const Tensor& dx) {
  const Check c(w, "moe_gather_bwd");
  row_pair(c, "dxg", dxg, "dx", dx);
  row_of_tokens(c, row_of, "dx", dx);
}

void moe_combine_fwd(const Where& w, const Tensor& yg, const Tensor& topk_w, const Tensor& row_of,
                     const Tensor& out) {
  const Check c(w, "moe_combine_fwd");
  row_pair(c, "yg", yg, "out", out);
  row_of_tokens(c, row_of, "out", out);
  per_slot(c, "topk_w", topk_w, row_of);
}

void moe_combine_bwd(const Where& w, const Tensor& dout, const Tensor& yg, const Tensor& topk_w,
                     const Tensor& row_of, const Tensor& dyg, const Tensor& dtopk_w) {
  const Check c(w, "moe_combine_bwd");
  row_pair(c, "yg", yg, "dout", dout);
  c.like("dyg", dyg, "yg", yg);
  row_of_tokens(c, row_of, "dout", dout);
  per_slot(c, "topk_w", topk_w, row_of);
  per_slot(c, "dtopk_w", dtopk_w, row_of);
}

// ---- optimizer ops -------------------------------------------------------------------------------

namespace {
// f32 with the shape of `ref`.
void f32_like(const Check& c, const char* name, const Tensor& t, const char* ref_name,
              const Tensor& ref) {
  c.dtype(name, t, DType::F32);
  MF_CHECK(t.shape == ref.shape, c.op(), ": ", desc(name, t), " must have the shape of ",
           desc(ref_name, ref));
}
}  // namespace

namespace {
// The expert weights and the plan both grouped GEMMs take.
ExpertDims expert_inputs(const Check& c, const std::vector<const Tensor*>& W,
                         const Tensor& offsets) {
  MF_CHECK(!W.empty(), c.op(), ": no expert weights given");
  const Tensor& w0 = *W[0];
  c.floating("W[0]", w0);
  MF_CHECK(w0.ndim() == 2 && w0.numel() > 0, c.op(), ": ", desc("W[0]", w0),
           " must be a non-empty [out,in] matrix");
  for (size_t e = 1; e < W.size(); ++e) {
    const std::string name = "W[" + std::to_string(e) + "]";
    c.same_dtype(name.c_str(), *W[e], "W[0]", w0);
    MF_CHECK(W[e]->shape == w0.shape, c.op(), ": ", desc(name.c_str(), *W[e]),
             " must have the shape of ", desc("W[0]", w0), " (one shape for all experts)");
  }
  const int64_t E = int64_t(W.size());
  c.dtype("offsets", offsets, DType::I32);
  c.numel("offsets", offsets, E + 1, "experts + 1");
  return {E, 0, w0.dim(0), w0.dim(1)};
}
}  // namespace

ExpertDims moe_expert_fwd(const Where& w, const Tensor& x, const std::vector<const Tensor*>& W,
                          const Tensor& offsets, const Tensor& y) {
  const Check c(w, "moe_expert_fwd");
  ExpertDims d = expert_inputs(c, W, offsets);
  c.same_dtype("x", x, "W[0]", *W[0]);
  c.same_dtype("y", y, "W[0]", *W[0]);
  d.R = std::min(c.rows("x", x, d.in), c.rows("y", y, d.out));
  return d;
}

ExpertDims moe_expert_bwd(const Where& w, const Tensor& dy, const Tensor& x,
                          const std::vector<const Tensor*>& W, const Tensor& offsets,
                          const Tensor* dx, const std::vector<Tensor*>* dW) {
  const Check c(w, "moe_expert_bwd");
  ExpertDims d = expert_inputs(c, W, offsets);
  c.same_dtype("dy", dy, "W[0]", *W[0]);
  c.same_dtype("x", x, "W[0]", *W[0]);
  d.R = std::min(c.rows("dy", dy, d.out), c.rows("x", x, d.in));
  if (dx) {
    c.same_dtype("dx", *dx, "W[0]", *W[0]);
    d.R = std::min(d.R, c.rows("dx", *dx, d.in));
  }
  if (dW) {
    MF_CHECK(int64_t(dW->size()) == d.E, c.op(), ": ", dW->size(), " weight gradients for ",
             d.E, " experts");
    for (size_t e = 0; e < dW->size(); ++e) {
      const std::string name = "dW[" + std::to_string(e) + "]";
      c.dtype(name.c_str(), *(*dW)[e], DType::F32);
      MF_CHECK((*dW)[e]->shape == W[0]->shape, c.op(), ": ", desc(name.c_str(), *(*dW)[e]),
               " must have the shape of ", desc("W[0]", *W[0]));
    }
  }
  return d;
}

void adamw_update(const Where& w, const Tensor& p, const Tensor& g, const Tensor& m,
                  const Tensor& v, const AdamWArgs& a) {
  const Check c(w, "adamw_update");
  c.dtype("param", p, DType::F32);
  f32_like(c, "grad", g, "param", p);
  f32_like(c, "exp_avg", m, "param", p);
  f32_like(c, "exp_avg_sq", v, "param", p);
  MF_CHECK(a.bc1 > 0.f && a.bc2 > 0.f, c.op(), ": bias corrections bc1=", a.bc1, " bc2=", a.bc2,
           " must be positive (step >= 1)");
}

void muon_momentum(const Where& w, const Tensor& g, const Tensor& M, const Tensor& U) {
  const Check c(w, "muon_momentum");
  c.dtype("grad", g, DType::F32);
  f32_like(c, "momentum_buffer", M, "grad", g);
  f32_like(c, "output U", U, "grad", g);
}

namespace {
// U f32 [r,c] or [k,r,c]; O f32 of U's shape.
void ns_stack(const Check& c, const Tensor& U, const Tensor& O) {
  c.dtype("input", U, DType::F32);
  MF_CHECK(U.ndim() == 2 || U.ndim() == 3, c.op(),
           ": input must be a matrix [r,c] or a stack [k,r,c], got ", desc("U", U));
  f32_like(c, "output", O, "input", U);
}
}  // namespace

void newton_schulz(const Where& w, const Tensor& U, const Tensor& O, int steps) {
  const Check c(w, "newton_schulz");
  ns_stack(c, U, O);
  MF_CHECK(steps >= 0, c.op(), ": steps must be >= 0, got ", steps);
}

void newton_schulz_coeffs(const Where& w, const Tensor& U, const Tensor& O,
                          const std::vector<float>& coeffs, float norm_mult) {
  const Check c(w, "newton_schulz_coeffs");
  ns_stack(c, U, O);
  MF_CHECK(coeffs.size() % 3 == 0, c.op(), ": coeffs must hold (a,b,c) triples, got ",
           coeffs.size(), " values");
  MF_CHECK(norm_mult > 0, c.op(), ": norm_mult must be > 0, got ", norm_mult);
}

// ---- matrix-optimizer primitives ---------------------------------------------------------------

namespace {
void f32_matrix(const Check& c, const char* name, const Tensor& t) {
  c.dtype(name, t, DType::F32);
  MF_CHECK(t.ndim() == 2, c.op(), ": ", desc(name, t), " must be a matrix");
}

bool storage_overlaps(const Tensor& a, const Tensor& b) {
  const char *pa = static_cast<const char*>(a.ptr), *pb = static_cast<const char*>(b.ptr);
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
}  // namespace

GemmDims gemm(const Where& w, const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C) {
  const Check c(w, "gemm");
  f32_matrix(c, "A", A);
  f32_matrix(c, "B", B);
  f32_matrix(c, "C", C);
  const int64_t m = ta ? A.dim(1) : A.dim(0), k = ta ? A.dim(0) : A.dim(1);
  const int64_t kb = tb ? B.dim(1) : B.dim(0), n = tb ? B.dim(0) : B.dim(1);
  MF_CHECK(k == kb, c.op(), ": inner dimensions differ: op(A) is ", m, "x", k, ", op(B) is ", kb,
           "x", n);
  MF_CHECK(C.dim(0) == m && C.dim(1) == n, c.op(), ": ", desc("C", C), ", expected [", m, ", ",
           n, "]");
  MF_CHECK(!storage_overlaps(C, A) && !storage_overlaps(C, B), c.op(),
           ": C must not alias A or B");
  return {m, n, k};
}

void block_copy(const Where& w, const Tensor& src, int64_t sr, int64_t sc, const Tensor& dst,
                int64_t dr, int64_t dc, int64_t rows, int64_t cols) {
  const Check c(w, "block_copy");
  f32_matrix(c, "src", src);
  f32_matrix(c, "dst", dst);
  MF_CHECK(rows >= 0 && cols >= 0 && sr >= 0 && sc >= 0 && dr >= 0 && dc >= 0 &&
               sr + rows <= src.dim(0) && sc + cols <= src.dim(1) && dr + rows <= dst.dim(0) &&
               dc + cols <= dst.dim(1),
           c.op(), ": window ", rows, "x", cols, " at (", sr, ",", sc, ") of ",
           shape_str(src.shape), " -> (", dr, ",", dc, ") of ", shape_str(dst.shape),
           " is out of range");
}

void sym_square(const Where& w, const char* op, const Tensor& S, const char* rn, const Tensor& r) {
  const Check c(w, op);
  f32_matrix(c, "S", S);
  MF_CHECK(S.dim(0) == S.dim(1), op, ": ", desc("S", S), " must be a square matrix");
  f32_like(c, rn, r, "S", S);
}

void normuon_normalize(const Where& w, const Tensor& O, const Tensor& v) {
  const Check c(w, "normuon_normalize");
  f32_matrix(c, "O", O);
  c.dtype("v", v, DType::F32);
  MF_CHECK(v.numel() == O.dim(0), c.op(), ": ", desc("v", v), " must have ", O.dim(0),
           " entries (one per row of ", desc("O", O), ")");
}

void cautious_decay(const Where& w, const Tensor& p, const Tensor& u) {
  const Check c(w, "cautious_decay");
  c.dtype("param", p, DType::F32);
  f32_like(c, "update", u, "param", p);
}

void adam_precond(const Where& w, const Tensor& num, const Tensor& g, const Tensor& v,
                  const Tensor& out) {
  const Check c(w, "adam_precond");
  c.dtype("num", num, DType::F32);
  f32_like(c, "g", g, "num", num);
  f32_like(c, "v", v, "num", num);
  f32_like(c, "out", out, "num", num);
}

}  // namespace mf::contract
