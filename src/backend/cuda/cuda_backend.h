// CudaBackend: bf16 activations and compute weights, f32 master weights, gradients and
// optimizer state; cuBLASLt for every GEMM, the kernels in kernels/ for everything else.
// All work is queued on one stream owned by the backend; methods that return host values
// (sum, sum_squares, download) synchronize it.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <map>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cublaslt.h"
#include "backend/cuda/cudnn_attention.h"
#include "common.cuh"

namespace mf {

namespace cuda {
struct MatOptLibs;  // cuda_matrix_opt.cpp
}

class CudaBackend final : public Backend {
 public:
  // device < 0: the current CUDA device.
  explicit CudaBackend(int device = -1);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::CUDA; }
  DType act_dtype() const override { return act_; }
  // "bf16" (the default) or "fp32": see Backend::set_precision.
  void set_precision(const std::string& precision) override;

  Tensor empty(const Shape& s, DType t) override;
  void zero(Tensor& t) override;
  void upload(const Tensor& host_src, Tensor& dst) override;
  void download(const Tensor& src, Tensor& host_dst) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void synchronize() override;
  // Pinned host buffers and an event (see Backend::Readback).
  std::unique_ptr<Readback> make_readback(const std::vector<const Tensor*>& sources) override;
  // Profiling marks: timing events recorded on the backend's stream, from a pool reused after
  // clear_marks().
  size_t record_mark() override;
  double marks_elapsed_ms(size_t a, size_t b) override;
  void clear_marks() override;
  // cudaMemGetInfo of this device; tensors = bytes_allocated(); workspace = scratch + cuBLASLt's.
  MemoryInfo memory_info() const override;
  void reserve_scratch(size_t bytes) override;
  size_t sym_scratch_bytes(int64_t n, bool func) override;
  size_t held_bytes(const Tensor& t) const override;
  // "flash" (the default until called), "cudnn" or "auto": see cuda::AttentionDispatch.
  void set_attention_impl(const std::string& mode) override;
  // Sets ctx_.xent_chunk_bytes (kernels/xent.cuh).
  void set_loss_chunk_mb(double mb) override;

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
  // bf16 operands (f32 dW): one grouped launch per product (kernels/moe_gemm.cu); other dtypes
  // take the per-expert default.
  void moe_expert_fwd(const Tensor& x, const std::vector<const Tensor*>& W, const Tensor& offsets,
                      Tensor& y) override;
  void moe_expert_bwd(const Tensor& dy, const Tensor& x, const std::vector<const Tensor*>& W,
                      const Tensor& offsets, Tensor* dx, const std::vector<Tensor*>* dW,
                      bool accumulate_dx) override;

  double sum_squares(const Tensor& x) override;
  std::vector<double> sum_squares_each(const std::vector<const Tensor*>& xs) override;
  double sum(const Tensor& x) override;
  void scale(Tensor& x, float alpha) override;
  void scale_to_norm_of(Tensor& x, const Tensor& ref) override;
  void axpy(float alpha, const Tensor& x, Tensor& y) override;

  void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                    const AdamWArgs& a) override;
  void muon_momentum(const Tensor& g, Tensor& M, Tensor& U, float mu, bool nesterov,
                     float grad_scale) override;
  void newton_schulz(const Tensor& U, Tensor& O, int steps, float a, float b,
                     float c) override;

  // Matrix-optimizer primitives: src/backend/cuda/cuda_matrix_opt.cpp, kernels/matrix_opt.cu.
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

  // ---- CUDA-only extras ------------------------------------------------------------------
  // AdamW that also writes the updated master into its bf16 compute copy in the same pass
  // (saves the separate copy() the optimizer would otherwise issue).
  void adamw_update_fused(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const AdamWArgs& a,
                          Tensor* weight_out);
  int device_index() const { return dev_; }
  cudaStream_t stream() const { return ctx_.stream; }
  cuda::CublasLt& cublas() { return *lt_; }
  cuda::AttentionDispatch& attention() { return *attn_; }
  // Bytes currently held by tensors from empty() (scratch and cuBLASLt workspace excluded).
  size_t bytes_allocated() const { return allocated_->load(); }
  size_t scratch_bytes() const { return scratch_->capacity(); }

 private:
  int dev_ = 0;
  DType act_ = DType::BF16;  // train.precision: BF16, or F32 for "fp32"
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::CublasLt> lt_;
  std::unique_ptr<cuda::Scratch> scratch_;
  cuda::Ctx ctx_;
  std::shared_ptr<std::atomic<size_t>> allocated_;
  std::unique_ptr<cuda::AttentionDispatch> attn_;
  // cuSOLVER / cuBLAS handles of the eigen path, created on first use (cuda_matrix_opt.cpp).
  std::shared_ptr<cuda::MatOptLibs> mo_;
  cuda::MatOptLibs& mo_libs();
  std::vector<cudaEvent_t> mark_events_;  // pool; the first marks_used_ hold recorded marks
  size_t marks_used_ = 0;
  // Pinned staging ring of upload(): each slot's event is recorded after the copy out of it, and
  // a slot is refilled only once that event has completed.
  struct UploadSlot {
    void* host = nullptr;  // pinned (cudaHostAlloc)
    size_t cap = 0;
    cudaEvent_t done = nullptr;
    bool pending = false;
  };
  static constexpr size_t kUploadSlots = 8;
  static constexpr size_t kUploadRingMaxBytes = size_t(4) << 20;  // larger uploads synchronise
  std::vector<UploadSlot> upload_ring_;
  size_t upload_next_ = 0;
  // Device arrays of tensor pointers for the grouped expert GEMMs, one per distinct list (the
  // expert weights and gradients never move, so each is uploaded once).
  std::map<std::vector<void*>, void**> pointer_tables_;
  void** pointer_table(const std::vector<void*>& ptrs);
};

int cuda_device_count();
std::unique_ptr<Backend> make_cuda_backend();

}  // namespace mf
