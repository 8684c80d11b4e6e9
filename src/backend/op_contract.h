// The argument contract of the model ops, one function per op, called by both backends' entries
// (CpuBackend in backend/cpu, the CUDA entries in kernels/*.cu), so the fp32 reference and the
// kernels it checks accept exactly the same arguments. Each function checks allocation, device,
// dtypes and shapes, throws mf::Error naming the op, the tensor and its shape, and returns the
// sizes the op computes over.
//
// The one difference between the backends is a parameter, `Where`: the tensors' device, and
// whether the op's float tensors may be bf16 (CUDA: activations and compute weights are bf16, or
// f32 for train.precision "fp32"; the CPU reference computes in f32 only). Tensors the contract
// fixes as f32 (statistics such as rstd and lse, losses, fp32 gradients) are f32 on both.
// What only one implementation needs stays in that backend: the CPU's token-id range checks (it
// can read the ids), the kernels' launch-size and shared-memory limits.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace mf::contract {

struct Where {
  Device device;
  bool bf16;  // float tensors may be bf16 (then every activation of one call shares a dtype)
};
inline constexpr Where kCpu{Device::CPU, false};
inline constexpr Where kCuda{Device::CUDA, true};

// "name [2,3] bf16", the form every message uses.
std::string desc(const char* name, const Tensor& t);

// The checks an op's contract is made of, for one op on one backend.
class Check {
 public:
  Check(const Where& w, const char* op) : w_(w), op_(op) {}
  const char* op() const { return op_; }
  // Allocated (or empty) and on the backend's device.
  void placed(const char* name, const Tensor& t) const;
  // Placed, of dtype `want`.
  void dtype(const char* name, const Tensor& t, DType want) const;
  // Placed, f32 (or bf16 where the backend takes it).
  void floating(const char* name, const Tensor& t) const;
  // Floating, with the dtype of `ref` (the dtype an op's activations share).
  void same_dtype(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) const;
  // Floating, with the dtype and the shape of `ref`.
  void like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) const;
  // Rows of a [..., width] tensor (every leading dim is a row dim).
  int64_t rows(const char* name, const Tensor& t, int64_t width) const;
  // [rows, width] with `rows` rows (any leading dims).
  void rows_of_width(const char* name, const Tensor& t, int64_t rows, int64_t width,
                     const char* what) const;
  void numel(const char* name, const Tensor& t, int64_t n, const std::string& what) const;
  // [rows, cols], or [cols] when rows == 1 (what: e.g. "tokens x experts").
  void mat(const char* name, const Tensor& t, int64_t rows, int64_t cols, const char* what) const;

 private:
  Where w_;
  const char* op_;
};

// ---- dense model ops ---------------------------------------------------------------------------

struct EmbeddingDims {
  int64_t N, V, d;  // tokens, vocab rows, width
};
// tokens i32 (N of any shape), wte [V,d] floating, out [N,d] floating.
EmbeddingDims embedding_fwd(const Where& w, const Tensor& tokens, const Tensor& wte,
                            const Tensor& out);
// tokens i32, dout [N,d] floating, dwte [V,d] f32 (the gradient).
EmbeddingDims embedding_bwd(const Where& w, const Tensor& tokens, const Tensor& dout,
                            const Tensor& dwte);

struct RowDims {
  int64_t N, d;  // rows, width
};
// resid_in [N,d]; branch, resid_out, y like resid_in (dtype and rows); w [d] floating (its own
// dtype); rstd f32 [N]; eps >= 0.
RowDims add_rmsnorm_fwd(const Where& w, const Tensor& resid_in, const Tensor* branch,
                        const Tensor& resid_out, const Tensor& wt, float eps, const Tensor& y,
                        const Tensor& rstd);
// x [N,d]; dy, dx like x; w [d] floating; rstd f32 [N]; dw f32 [d].
RowDims rmsnorm_bwd(const Where& w, const Tensor& dy, const Tensor& x, const Tensor& wt,
                    const Tensor& rstd, const Tensor& dx, const Tensor& dw);

struct MatmulDims {
  int64_t N, in, out;
};
// x [N,in] and W [out,in] of one dtype; y [N,out] floating.
MatmulDims matmul_fwd(const Where& w, const Tensor& x, const Tensor& W, const Tensor& y);
// dy [N,out], x [N,in], W [out,in] of one dtype; dx [N,in] floating; dW floating, W's shape.
MatmulDims matmul_bwd(const Where& w, const Tensor& dy, const Tensor& x, const Tensor& W,
                      const Tensor* dx, const Tensor* dW);

// x [B,T,H,hd] (hd even), y x's dtype and shape; theta > 0. xn, yn: the names the op uses.
void rope(const Where& w, const char* op, const char* xn, const Tensor& x, const char* yn,
          const Tensor& y, float theta);
// p [B,T,H+2Hkv,hd] against q [B,T,H,hd], k and v [B,T,Hkv,hd], one dtype; hd even; theta > 0.
void qkv_rope(const Where& w, const char* op, const char* pn, const Tensor& p, const char* qn,
              const Tensor& q, const char* kn, const Tensor& k, const char* vn, const Tensor& v,
              float theta);

struct SwigluDims {
  int64_t rows, f;
};
// gate [..., f]; up, h like gate.
SwigluDims swiglu_fwd(const Where& w, const Tensor& gate, const Tensor& up, const Tensor& h);
// gate [..., f]; up, dh, dgate, dup like gate; dgate and dup distinct.
SwigluDims swiglu_bwd(const Where& w, const Tensor& dh, const Tensor& gate, const Tensor& up,
                      const Tensor& dgate, const Tensor& dup);
// gu [N,2f] (gate in columns [0,f), up in [f,2f)), h [N,f] of gu's dtype.
SwigluDims swiglu_packed_fwd(const Where& w, const Tensor& gu, const Tensor& h);
// gu [N,2f], dh [N,f], dgu like gu and not gu itself.
SwigluDims swiglu_packed_bwd(const Where& w, const Tensor& dh, const Tensor& gu,
                             const Tensor& dgu);

struct XentDims {
  int64_t N, V, d;
};
// x [N,d] floating, W [V,d] (V > 0) of x's dtype, targets i32 [N], losses f32 [N]; dx like x
// (any shape of N*d elements); dW floating, W's shape.
XentDims lmhead_xent(const Where& w, const Tensor& x, const Tensor& W, const Tensor& targets,
                     const Tensor& losses, const Tensor* dx, const Tensor* dW);

// All sizes > 0, H a multiple of Hkv, scale > 0.
void attention_shape(const char* op, const AttnShape& s);
// q, out: B*T*H*hd elements; k, v: B*T*Hkv*hd; all of q's float dtype; lse f32 B*H*T.
void attention_fwd(const Where& w, const char* op, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& out, const Tensor& lse, const AttnShape& s);
// The forward's arguments, and dout, dq (H heads), dk, dv (Hkv) of q's dtype.
void attention_bwd(const Where& w, const char* op, const Tensor& dout, const Tensor& q,
                   const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dq, const Tensor& dk, const Tensor& dv, const AttnShape& s);

// ---- Mixture-of-Experts ops ---------------------------------------------------------------------
// The routing tensors are f32 (probs, topk_w, scores and their gradients) and i32 (indices,
// offsets, rows); the rows that move between tokens and experts are floating.

// 0 < top_k <= n_experts, route_scale > 0.
void moe_route_args(const char* op, const MoeRouterArgs& a);

struct RouterDims {
  int64_t N, d;  // tokens, width
};
// x [N,d] floating; Wr f32 [E,d] (d > 0); bias f32 [E]; probs f32 [N,E]; topk_idx i32 [N,k];
// topk_w f32 [N,k]; counts i32 [E]; score_sum f32 [E].
RouterDims moe_router_fwd(const Where& w, const Tensor& x, const Tensor& Wr, const Tensor* bias,
                          const MoeRouterArgs& a, const Tensor& probs, const Tensor& topk_idx,
                          const Tensor& topk_w, const Tensor& counts, const Tensor& score_sum);
// x, Wr as forward; dtopk_w f32 [N,k]; aux_grad f32 [E]; probs f32 [N,E]; topk_idx i32 [N,k];
// dlogits f32 [N,E]; dx floating, x's shape; dWr f32, Wr's shape.
RouterDims moe_router_bwd(const Where& w, const Tensor& dtopk_w, const Tensor* aux_grad,
                          const Tensor& x, const Tensor& Wr, const Tensor& probs,
                          const Tensor& topk_idx, const MoeRouterArgs& a, const Tensor& dlogits,
                          const Tensor& dx, const Tensor& dWr);

struct SlotDims {
  int64_t N, k;  // tokens, slots per token
};
// E > 0; topk_idx i32 [N,k]; offsets i32 [E+1]; row_of i32, topk_idx's shape; row_token i32 of
// N*k elements.
SlotDims moe_permute(const Where& w, const Tensor& topk_idx, int E, const Tensor& offsets,
                     const Tensor& row_of, const Tensor& row_token);
// x [N,d] and xg [M,d] of one dtype; row_token i32 of at least M elements.
void moe_gather(const Where& w, const Tensor& x, const Tensor& row_token, const Tensor& xg);
// dxg [M,d] and dx [N,d] of one dtype; row_of i32 [N,k].
void moe_gather_bwd(const Where& w, const Tensor& dxg, const Tensor& row_of, const Tensor& dx);
// yg [M,d] and out [N,d] of one dtype; row_of i32 [N,k]; topk_w f32, row_of's shape.
void moe_combine_fwd(const Where& w, const Tensor& yg, const Tensor& topk_w, const Tensor& row_of,
                     const Tensor& out);
// yg [M,d] and dout [N,d] of one dtype; dyg like yg; row_of i32 [N,k]; topk_w, dtopk_w f32,
// row_of's shape.
void moe_combine_bwd(const Where& w, const Tensor& dout, const Tensor& yg, const Tensor& topk_w,
                     const Tensor& row_of, const Tensor& dyg, const Tensor& dtopk_w);

struct ExpertDims {
  int64_t E, R, out, in;  // experts, rows the operands cover, each expert's W [out, in]
};
// The grouped expert GEMMs. W: E >= 1 experts, non-empty [out,in] matrices of one shape and one
// float dtype; offsets i32 [E+1] (its values, a moe_permute plan, are checked where they are
// read). fwd: x [R_x,in] and y [R_y,out] of W's dtype, R = min(R_x, R_y).
ExpertDims moe_expert_fwd(const Where& w, const Tensor& x, const std::vector<const Tensor*>& W,
                          const Tensor& offsets, const Tensor& y);
// bwd: dy [*,out], x [*,in] and dx (when given) [*,in] of W's dtype, R = their fewest rows; dW
// (when given) E f32 tensors of W's shape.
ExpertDims moe_expert_bwd(const Where& w, const Tensor& dy, const Tensor& x,
                          const std::vector<const Tensor*>& W, const Tensor& offsets,
                          const Tensor* dx, const std::vector<Tensor*>* dW);

// ---- optimizer ops (f32 master weights, gradients and state on both backends) ------------------

// param, grad, exp_avg, exp_avg_sq f32 of one shape; bias corrections > 0 (step >= 1).
void adamw_update(const Where& w, const Tensor& p, const Tensor& g, const Tensor& m,
                  const Tensor& v, const AdamWArgs& a);
// grad, momentum_buffer, output U f32 of one shape.
void muon_momentum(const Where& w, const Tensor& g, const Tensor& M, const Tensor& U);
// input U f32 [r,c] or a stack [k,r,c]; output O f32, U's shape; steps >= 0.
void newton_schulz(const Where& w, const Tensor& U, const Tensor& O, int steps);
// U and O as newton_schulz; coeffs (a,b,c) triples; norm_mult > 0.
void newton_schulz_coeffs(const Where& w, const Tensor& U, const Tensor& O,
                          const std::vector<float>& coeffs, float norm_mult);

// ---- matrix-optimizer primitives (f32 matrices on both backends) -------------------------------

struct GemmDims {
  int64_t m, n, k;
};
// A, B, C f32 matrices; op(A) [m,k], op(B) [k,n], C [m,n]; C's storage overlaps neither A's nor B's.
GemmDims gemm(const Where& w, const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C);
// src, dst f32 matrices; the rows x cols windows at (sr,sc) and (dr,dc) inside them.
void block_copy(const Where& w, const Tensor& src, int64_t sr, int64_t sc, const Tensor& dst,
                int64_t dr, int64_t dc, int64_t rows, int64_t cols);
// S and its result (named rn: Q or out) f32 square matrices of one shape; op: sym_eig, sym_func.
void sym_square(const Where& w, const char* op, const Tensor& S, const char* rn, const Tensor& r);
// O f32 [r,c]; v f32 of r elements.
void normuon_normalize(const Where& w, const Tensor& O, const Tensor& v);
// param, update f32 of one shape.
void cautious_decay(const Where& w, const Tensor& p, const Tensor& u);
// num, g, v, out f32 of one shape.
void adam_precond(const Where& w, const Tensor& num, const Tensor& g, const Tensor& v,
                  const Tensor& out);

}  // namespace mf::contract
