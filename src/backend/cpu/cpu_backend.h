// The fp32 reference backend: plain loops + OpenMP, OpenBLAS sgemm for matmuls.
// Op implementations are split by family across cpu_*.cpp files.
// Not final: tests derive from it to change one behaviour (e.g. late read-backs in test_moe).
#pragma once
#include "backend/backend.h"

namespace mf {

class CpuBackend : public Backend {
 public:
  CpuBackend();
  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::CPU; }
  DType act_dtype() const override { return DType::F32; }

  Tensor empty(const Shape& s, DType t) override;
  void zero(Tensor& t) override;
  void upload(const Tensor& host_src, Tensor& dst) override;
  void download(const Tensor& src, Tensor& host_dst) override;
  void copy(const Tensor& src, Tensor& dst) override;

  void embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) override;
  void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) override;
  void add_rmsnorm_fwd(const Tensor& resid_in, const Tensor* branch, Tensor& resid_out,
                       const Tensor& w, float eps, Tensor& y, Tensor& rstd) override;
  void rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                   Tensor& dx, Tensor& dw) override;
  void matmul_fwd(const Tensor& x, const Tensor& W, Tensor& y) override;
  void matmul_bwd(const Tensor& dy, const Tensor& x, const Tensor& W, Tensor* dx, Tensor* dW,
                  bool accumulate_dx) override;
  void rope_fwd(const Tensor& x, Tensor& y, float theta) override;
  void rope_bwd(const Tensor& dy, Tensor& dx, float theta) override;
  void qkv_rope_split(const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, float theta) override;
  void qkv_rope_merge_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv, Tensor& dqkv,
                          float theta) override;
  void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                     Tensor& lse, const AttnShape& s) override;
  void attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse, Tensor& dq, Tensor& dk, Tensor& dv,
                     const AttnShape& s) override;
  void swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h) override;
  void swiglu_bwd(const Tensor& dh, const Tensor& gate, const Tensor& up, Tensor& dgate,
                  Tensor& dup) override;
  void swiglu_packed_fwd(const Tensor& gu, Tensor& h) override;
  void swiglu_packed_bwd(const Tensor& dh, const Tensor& gu, Tensor& dgu) override;
  void lmhead_xent(const Tensor& x, const Tensor& W, const Tensor& targets, float logit_scale,
                   Tensor& losses, Tensor* dx, Tensor* dW, float loss_scale) override;

  double sum_squares(const Tensor& x) override;
  double sum(const Tensor& x) override;
  void scale(Tensor& x, float alpha) override;
  void axpy(float alpha, const Tensor& x, Tensor& y) override;

  void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                    const AdamWArgs& a) override;
  void muon_momentum(const Tensor& g, Tensor& M, Tensor& U, float mu, bool nesterov,
                     float grad_scale) override;
  void newton_schulz(const Tensor& U, Tensor& O, int steps, float a, float b,
                     float c) override;

  // cpu_moe.cpp
  void moe_router_fwd(const Tensor& x, const Tensor& Wr, const Tensor* bias,
                      const MoeRouterArgs& a, Tensor& probs, Tensor& topk_idx, Tensor& topk_w,
                      Tensor& counts, Tensor& score_sum) override;
  void moe_router_bwd(const Tensor& dtopk_w, const Tensor* aux_grad, const Tensor& x,
                      const Tensor& Wr, const Tensor& probs, const Tensor& topk_idx,
                      const MoeRouterArgs& a, Tensor& dlogits, Tensor& dx, Tensor& dWr) override;
  void moe_permute(const Tensor& topk_idx, int E, int64_t capacity, Tensor& offsets,
                   Tensor& row_of, Tensor& row_token) override;
  void moe_gather(const Tensor& x, const Tensor& row_token, Tensor& xg) override;
  void moe_gather_bwd(const Tensor& dxg, const Tensor& row_of, Tensor& dx) override;
  void moe_combine_fwd(const Tensor& yg, const Tensor& topk_w, const Tensor& row_of, Tensor& out,
                       bool accumulate) override;
  void moe_combine_bwd(const Tensor& dout, const Tensor& yg, const Tensor& topk_w,
                       const Tensor& row_of, Tensor& dyg, Tensor& dtopk_w) override;

  // cpu_optim2.cpp (matrix optimizers)
  void gemm(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, Tensor& C, float alpha,
            float beta) override;
  void block_copy(const Tensor& src, int64_t sr, int64_t sc, Tensor& dst, int64_t dr, int64_t dc,
                  int64_t rows, int64_t cols) override;
  void sym_eig(const Tensor& S, Tensor& Q) override;
  void sym_func(const Tensor& S, const SymFuncArgs& a, Tensor& out) override;
  void newton_schulz_coeffs(const Tensor& U, Tensor& O, const std::vector<float>& coeffs,
                            float norm_mult) override;
  void normuon_normalize(Tensor& O, Tensor& v, float beta2, float eps) override;
  void cautious_decay(Tensor& p, const Tensor& u, float decay) override;
  void adam_precond(const Tensor& num, const Tensor& g, Tensor& v, Tensor& out, float b2,
                    float eps, float bc1, float bc2) override;
};

}  // namespace mf
