// The Backend interface: one virtual entry per op. The model, optimizers and trainer call only
// this, never branching on the device. CpuBackend (fp32, OpenMP + OpenBLAS) is the reference;
// CudaBackend (bf16 activations/weights, fp32 master/grads/state) must honour the same contracts.
//
// Conventions for every op:
//  - Outputs are pre-allocated by the caller with the documented shapes.
//  - "(=)" outputs are overwritten; "(+=)" outputs are accumulated into (gradients of weights
//    and of tensors that feed several consumers).
//  - Optional outputs are passed as nullptr.
//  - N = B*T rows; d = model width; activations row-major [B, T, ...].
//  - Activation tensors have dtype act_dtype(); rstd / lse / losses / grads / optimizer state
//    are always f32; token ids are i32.
#pragma once
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/sizes.h"  // header only, no CUDA
#include "core/tensor.h"

namespace mf {

// Memory of the device a backend computes on (bench, memory plan). CPU: host RAM from
// /proc/meminfo (MemAvailable / MemTotal). CUDA: cudaMemGetInfo of the backend's device.
class OpProfiler;  // backend/profiler.h

struct MemoryInfo {
  size_t free = 0, total = 0;  // bytes; 0 when unknown
  size_t tensors = 0;          // bytes held by tensors from empty() (0: not tracked, e.g. CPU)
  size_t workspace = 0;        // scratch + library workspaces held right now (0: none / unknown)
};

// Host memory from a meminfo file (MemTotal, MemAvailable), bounded by the tightest cgroup
// memory limit on the process's cgroup (named in self_cgroup, the format of /proc/self/cgroup)
// or any of its ancestors under cgroup_root: v2 memory.max / memory.current, v1
// memory/<path>/memory.limit_in_bytes / memory.usage_in_bytes. The CPU backend's memory_info
// reads "/proc/meminfo", "/sys/fs/cgroup", "/proc/self/cgroup".
MemoryInfo host_memory_info(const std::string& meminfo, const std::string& cgroup_root,
                            const std::string& self_cgroup);

struct AttnShape {
  int B = 0, T = 0, H = 0, Hkv = 0, hd = 0;  // batch, sequence, query heads, kv heads, head dim
  float scale = 0.f;                          // softmax scale, usually 1/sqrt(hd)
};

// One AdamW step on one tensor. PyTorch semantics: p *= (1 - decay); then
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * (m/bc1) / (sqrt(v/bc2) + eps).
// g is multiplied by grad_scale first (clipping, averaging). bc1 = 1 - b1^t, bc2 = 1 - b2^t.
// cautious: the decay applies only where the weight and this step's update agree in sign
// (p * mhat >= 0, the sign of the update since its denominator is positive; arXiv 2510.12402).
struct AdamWArgs {
  float lr = 0, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, decay = 0, bc1 = 1, bc2 = 1, grad_scale = 1;
  bool cautious = false;
};

// Arguments of Backend::sym_func.
struct SymFuncArgs {
  double input_scale = 1.0;  // lambda is multiplied by this first (bias correction of an EMA)
  double root = 1.0;         // l^root
  double eps = 0.0;
  bool relative_eps = false;
  double power = 1.0;
  double scale = 1.0;
  double schatten_q = 0.0;   // > 0: multiply by ||sigma||_q ^ schatten_pow
  double schatten_pow = 0.0;
  double base_floor_rel = 0.0;  // > 0: the base l^root + e is at least this times lmax^root
};

// Routing hyper-parameters of one MoE layer (model.moe).
struct MoeRouterArgs {
  int E = 0, k = 0;          // experts, experts chosen per token
  bool sigmoid = false;      // score = sigmoid(logit) (DeepSeek-V3), else softmax over the E logits
  bool norm_topk = true;     // renormalise the k chosen scores to sum to 1
  float route_scale = 1.f;   // multiplies the combine weights
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  virtual DType act_dtype() const = 0;  // dtype of activations and of compute weights
  // train.precision ("bf16" or "fp32"), applied before any model is built on this backend. The
  // CPU computes in fp32 whatever it says; CUDA switches its activations and compute weights to
  // f32 for "fp32" (every GEMM in fp32 without TF32, attention on the f32 SIMT kernels,
  // Newton-Schulz in f32), for runs checked step by step against an fp32 reference.
  virtual void set_precision(const std::string& precision);

  // ---- memory --------------------------------------------------------------------------
  // Zero-filled tensor on this backend.
  virtual Tensor empty(const Shape& s, DType t) = 0;
  virtual void zero(Tensor& t) = 0;
  // dst (this backend, any float dtype or i32) <- src (host tensor of f32 or i32), converting.
  // Returns once host_src may be reused or freed; the copy itself is ordered on the backend's
  // stream like any op (CUDA: small uploads go through a pinned staging ring without waiting for
  // the stream, so a per-micro-batch token upload does not drain the queued work).
  virtual void upload(const Tensor& host_src, Tensor& dst) = 0;
  // host dst (f32 or i32) <- src (this backend), converting.
  virtual void download(const Tensor& src, Tensor& host_dst) = 0;
  // dst <- src on this backend; converts between f32 and bf16 (the master -> compute weight cast).
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  virtual void synchronize() {}
  // Asynchronous read-back of small tensors of this backend (the MoE routing plan): a Readback
  // is bound to its sources; start() queues copies of them into its host buffers behind the work
  // queued so far and returns at once; wait() returns once they have arrived, and host(i) then
  // holds source i (same dtype: f32 or i32). The default copies inside start() (a CPU backend's
  // ops are done when they return); CUDA copies into pinned memory and waits on an event, so
  // the host goes on queueing work instead of draining the stream.
  class Readback {
   public:
    virtual ~Readback() = default;
    virtual void start() = 0;
    virtual void wait() = 0;
    const Tensor& host(size_t i) const { return host_.at(i); }

   protected:
    std::vector<Tensor> host_;
  };
  virtual std::unique_ptr<Readback> make_readback(const std::vector<const Tensor*>& sources);

  // ---- profiling (muonforge bench --profile; backend/profiler.h) ------------------------
  // record_mark() notes the point of this backend's timeline reached by the work queued so far
  // and returns its index (0, 1, ... since clear_marks()); marks_elapsed_ms(a, b) is the time from
  // mark a to mark b in milliseconds, waiting for b. The default reads the host clock, which is
  // right for a backend whose ops are done when they return (CPU); CUDA records events.
  virtual size_t record_mark();
  virtual double marks_elapsed_ms(size_t a, size_t b);
  virtual void clear_marks();
  // The profiler that ProfRegions report to; null (the default) = profiling off, and a region
  // costs one pointer test.
  OpProfiler* profiler() const { return profiler_; }
  void set_profiler(OpProfiler* p) { profiler_ = p; }
  // Not pure: the default reads /proc/meminfo (host RAM) and tracks no tensors.
  virtual MemoryInfo memory_info() const;
  // Grows the ops' scratch buffer to at least `bytes` now, so that the first steps need not
  // allocate (and a shortfall shows at start). CUDA acts on it; the default does nothing.
  virtual void reserve_scratch(size_t bytes) { (void)bytes; }
  // Bytes the allocation behind a tensor from empty() holds (0 for an undefined one): nbytes by
  // default; CUDA rounds small allocations up. Memory plans sum it, so that their tensor lines
  // add up to what the backend holds.
  virtual size_t held_bytes(const Tensor& t) const { return t.defined() ? t.nbytes() : 0; }
  // Scratch bytes one sym_eig (func false) or sym_func (func true) of an n x n matrix takes
  // from that buffer, for memory plans (the matrix optimizers' decompositions). CUDA: the
  // double copies plus cuSOLVER's syevd workspace (queried); refuses an n beyond syevd's 32-bit
  // workspace as the op would. The default (CPU: temporaries on the heap) is 0.
  virtual size_t sym_scratch_bytes(int64_t n, bool func) {
    (void)n;
    (void)func;
    return 0;
  }
  // model.attention: "flash", "cudnn" or "auto" (docs/config.md). Only the CUDA backend acts on
  // it; the default ignores it (and says so once when "cudnn" is asked for).
  virtual void set_attention_impl(const std::string& mode);
  // train.loss_chunk_mb: the fused lm-head cross-entropy's logits + dlogits per chunk of rows,
  // in MiB (> 0). The CUDA backend acts on it; the default only checks it (the CPU reference
  // chunks by its own small bound, ref_ops.h).
  virtual void set_loss_chunk_mb(double mb);
  size_t loss_chunk_bytes() const { return loss_chunk_bytes_; }

  // ---- model ops -----------------------------------------------------------------------
  // out[n,:] (=) wte[tokens[n],:].  tokens i32 [N], wte [V,d], out [N,d]
  virtual void embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) = 0;
  // dwte[tokens[n],:] (+=) dout[n,:]; deterministic (fixed order of accumulation).
  virtual void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) = 0;

  // Fused residual add + RMSNorm: if branch != nullptr, resid_out (=) resid_in + branch, else
  // resid_out (=) resid_in (resid_out may alias resid_in). Then
  // y (=) resid_out * rsqrt(mean(resid_out^2) + eps) * w;  rstd f32 [N] (=) the rsqrt.
  virtual void add_rmsnorm_fwd(const Tensor& resid_in, const Tensor* branch, Tensor& resid_out,
                               const Tensor& w, float eps, Tensor& y, Tensor& rstd) = 0;
  // Backward of y = rmsnorm(x) * w given rstd from forward: dx (+=), dw (+=).
  virtual void rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w,
                           const Tensor& rstd, Tensor& dx, Tensor& dw) = 0;

  // y (=) x W^T.  x [N,in], W [out,in], y [N,out]
  virtual void matmul_fwd(const Tensor& x, const Tensor& W, Tensor& y) = 0;
  // dx (= or += when accumulate_dx) dy W;  dW (+=) dy^T x.  Either output may be nullptr.
  virtual void matmul_bwd(const Tensor& dy, const Tensor& x, const Tensor& W, Tensor* dx,
                          Tensor* dW, bool accumulate_dx) = 0;

  // Rotary embedding, Hugging Face rotate-half form, position = t in [0, T):
  // for i < hd/2: f = t * theta^(-2i/hd); y[i] = x[i] cos f - x[i+hd/2] sin f;
  // y[i+hd/2] = x[i+hd/2] cos f + x[i] sin f.  x, y [B,T,H,hd] (y may alias x).
  virtual void rope_fwd(const Tensor& x, Tensor& y, float theta) = 0;
  // dx (=) the transpose rotation of dy (dx may alias dy).
  virtual void rope_bwd(const Tensor& dy, Tensor& dx, float theta) = 0;
  // The packed projections (one GEMM against the stacked [Wq; Wk; Wv]): qkv [B,T,H+2Hkv,hd] holds
  // per position H query heads, then Hkv key heads, then Hkv value heads. q [B,T,H,hd] (=)
  // rope_fwd of the q part, k [B,T,Hkv,hd] (=) rope_fwd of the k part, v [B,T,Hkv,hd] (=) the v
  // part.
  virtual void qkv_rope_split(const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v,
                              float theta) = 0;
  // Its backward: dqkv [B,T,H+2Hkv,hd] (=) rope_bwd(dq) | rope_bwd(dk) | dv per position.
  virtual void qkv_rope_merge_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                  Tensor& dqkv, float theta) = 0;

  // Causal grouped-query attention; query head h uses kv head h / (H/Hkv).
  // q [B,T,H,hd], k,v [B,T,Hkv,hd], out [B,T,H,hd] (=), lse f32 [B,H,T] (=) log-sum-exp of the
  // scaled scores of each query row (what a flash backward needs). No T x T matrix is stored.
  virtual void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                             Tensor& lse, const AttnShape& s) = 0;
  // dq, dk, dv (=).
  virtual void attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                             const Tensor& v, const Tensor& out, const Tensor& lse, Tensor& dq,
                             Tensor& dk, Tensor& dv, const AttnShape& s) = 0;

  // h (=) silu(gate) * up.  gate, up, h [N,f]
  virtual void swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h) = 0;
  // dgate (=), dup (=).
  virtual void swiglu_bwd(const Tensor& dh, const Tensor& gate, const Tensor& up, Tensor& dgate,
                          Tensor& dup) = 0;
  // The packed form the dense MLP uses: gu [N,2f] holds gate in columns [0,f) and up in [f,2f)
  // (one GEMM against the stacked [W_gate; W_up] writes it). h [N,f] (=).
  virtual void swiglu_packed_fwd(const Tensor& gu, Tensor& h) = 0;
  // dgu [N,2f] (=): dgate in columns [0,f), dup in [f,2f).
  virtual void swiglu_packed_bwd(const Tensor& dh, const Tensor& gu, Tensor& dgu) = 0;

  // Fused lm-head + softmax cross-entropy, never holding all B*T*V fp32 logits at once.
  // logits = logit_scale * x W^T;  losses f32 [N] (=) -log softmax(logits)[n, targets[n]].
  // If dx / dW are given, computes the gradient of (loss_scale * sum_n losses[n]):
  // dx [N,d] (=), dW [V,d] (+=).   x [N,d], W [V,d], targets i32 [N] in [0,V).
  virtual void lmhead_xent(const Tensor& x, const Tensor& W, const Tensor& targets,
                           float logit_scale, Tensor& losses, Tensor* dx, Tensor* dW,
                           float loss_scale) = 0;

  // ---- reductions and elementwise ---------------------------------------------------------
  // sum of squares of all elements, accumulated in double (synchronizes).
  virtual double sum_squares(const Tensor& x) = 0;
  // sum_squares of each tensor, in order (one result per tensor, the same values as calling
  // sum_squares on each). The default calls sum_squares per tensor; CUDA queues every reduction
  // and synchronizes once, so a global gradient norm over ~100 tensors costs one round trip.
  virtual std::vector<double> sum_squares_each(const std::vector<const Tensor*>& xs);
  // sum of all elements (synchronizes).
  virtual double sum(const Tensor& x) = 0;
  // x (=) alpha * x
  virtual void scale(Tensor& x, float alpha) = 0;
  // x (=) x * float(sqrt(sum_squares(ref) / sum_squares(x))), or 0 when sum_squares(x) = 0:
  // x rescaled to the Frobenius norm of ref (Shampoo's grafting). The default reads both sums
  // back and calls scale; CUDA keeps them on the device, so a blocked, grafted Shampoo step
  // does not synchronize twice per block.
  virtual void scale_to_norm_of(Tensor& x, const Tensor& ref);
  // y (=) y + alpha * x
  virtual void axpy(float alpha, const Tensor& x, Tensor& y) = 0;

  // ---- optimizer primitives (all f32) ----------------------------------------------------
  virtual void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                            const AdamWArgs& a) = 0;
  // M (=) mu M + grad_scale*g;  U (=) nesterov ? grad_scale*g + mu M : M.
  virtual void muon_momentum(const Tensor& g, Tensor& M, Tensor& U, float mu, bool nesterov,
                             float grad_scale) = 0;
  // O (=) NS(U) for U [r,c]: X = U / (||U||_F + 1e-7), transposed when r > c; `steps` times
  // A = X X^T; X = a X + (b A + c A^2) X; transposed back. O may alias U.
  // Batched: U and O may also be a stack [k,r,c]; each [r,c] slice is orthogonalised on its own
  // (its own Frobenius norm), exactly as if the op were called once per slice. The CPU backend
  // loops over the slices with the per-matrix code (bitwise the per-matrix results); CUDA runs
  // each GEMM of an iteration as one strided-batched cuBLASLt call over the k slices.
  virtual void newton_schulz(const Tensor& U, Tensor& O, int steps, float a, float b,
                             float c) = 0;

  // ---- Mixture of Experts (DESIGN §4; math in backend/cpu/ref_moe.h) ---------------------------
  // Not pure: the defaults throw "<op> is not implemented on the <name> backend", so a backend
  // compiles before it has MoE kernels. x, xg, yg, out, dout, dyg, dx, dxg: act_dtype();
  // Wr, probs, topk_w, dtopk_w, score_sum, dlogits, bias, aux_grad, dWr: f32; indices: i32.
  //
  // Router, in fp32: probs (=) score(x Wr^T) [N,E] (softmax over E, or sigmoid). Selection
  // ranks probs + bias (bias [E] or nullptr: DeepSeek-V3's e_score_correction_bias, which only
  // selects); topk_idx [N,k] (=) the k best experts, best first, ties to the lower index.
  // topk_w [N,k] (=) route_scale * probs[n, idx] (/ (sum of the k probs + 1e-20) if norm_topk).
  // counts i32 [E] (=) tokens that chose each expert (before any capacity drop).
  // score_sum [E] (=) sum_n pn[n,e], pn = probs (softmax) or probs / sum_e probs (sigmoid):
  // the P_i of the Switch-style balance loss.
  virtual void moe_router_fwd(const Tensor& x, const Tensor& Wr, const Tensor* bias,
                              const MoeRouterArgs& a, Tensor& probs, Tensor& topk_idx,
                              Tensor& topk_w, Tensor& counts, Tensor& score_sum);
  // Given dtopk_w [N,k] and aux_grad [E] (or nullptr: d loss / d pn[n,e], the same for every
  // token), dlogits [N,E] (=) (scratch, also an output), dx [N,d] (+=) dlogits Wr,
  // dWr [E,d] (+=) dlogits^T x. The bias gets no gradient.
  virtual void moe_router_bwd(const Tensor& dtopk_w, const Tensor* aux_grad, const Tensor& x,
                              const Tensor& Wr, const Tensor& probs, const Tensor& topk_idx,
                              const MoeRouterArgs& a, Tensor& dlogits, Tensor& dx, Tensor& dWr);
  // Permutation plan: the (token n, slot j) pairs grouped by expert, each expert's rows in token
  // order (stable, deterministic). Expert e keeps its first `capacity` rows (capacity <= 0:
  // dropless); later ones are dropped. offsets i32 [E+1] (=) start row of each expert's block
  // (offsets[E] = M kept rows); row_of i32 [N,k] (=) the row of slot (n,j) or -1 if dropped;
  // row_token i32 [N*k] (=) the token of row r < M (-1 beyond).
  virtual void moe_permute(const Tensor& topk_idx, int E, int64_t capacity, Tensor& offsets,
                           Tensor& row_of, Tensor& row_token);
  // xg[r,:] (=) x[row_token[r],:] for every row of xg (row_token holds at least as many entries);
  // a row whose row_token is -1 (past the kept rows, with a capacity) is set to zeros.
  virtual void moe_gather(const Tensor& x, const Tensor& row_token, Tensor& xg);
  // dx[n,:] (+=) sum over j = 0..k-1 of dxg[row_of[n,j],:] (dropped slots skipped).
  virtual void moe_gather_bwd(const Tensor& dxg, const Tensor& row_of, Tensor& dx);
  // out[n,:] (= or += when accumulate) sum_j topk_w[n,j] * yg[row_of[n,j],:], j in order.
  virtual void moe_combine_fwd(const Tensor& yg, const Tensor& topk_w, const Tensor& row_of,
                               Tensor& out, bool accumulate);
  // dyg[row_of[n,j],:] (=) topk_w[n,j] * dout[n,:];  dtopk_w[n,j] (=) dout[n,:] . yg[row_of[n,j],:]
  // (0 for dropped slots). Rows of dyg that no slot maps to are left untouched.
  virtual void moe_combine_bwd(const Tensor& dout, const Tensor& yg, const Tensor& topk_w,
                               const Tensor& row_of, Tensor& dyg, Tensor& dtopk_w);
  // Expert linear layers over the permuted rows, all experts in one call (a grouped GEMM).
  // W holds E weights [out,in] of one shape and dtype; offsets i32 [E+1] is the plan of
  // moe_permute, read where it lives (no host copy needed by the CUDA backend). x [R,in],
  // y [R,out] with R >= offsets[E]:  y[r,:] (=) x[r,:] W_e^T for offsets[e] <= r < offsets[e+1].
  // Rows of y at or past offsets[E] are left untouched.
  // The defaults (used by the CPU backend) copy offsets to the host and call matmul_fwd /
  // matmul_bwd once per expert with rows.
  virtual void moe_expert_fwd(const Tensor& x, const std::vector<const Tensor*>& W,
                              const Tensor& offsets, Tensor& y);
  // dx[r,:] (= or += when accumulate_dx) dy[r,:] W_e;  dW_e (+=) dy[rows of e]^T x[rows of e].
  // dx or dW may be null (that part is skipped); dW holds E distinct tensors of W's shape. An
  // expert with no rows leaves its dW_e unchanged.
  virtual void moe_expert_bwd(const Tensor& dy, const Tensor& x,
                              const std::vector<const Tensor*>& W, const Tensor& offsets,
                              Tensor* dx, const std::vector<Tensor*>* dW, bool accumulate_dx);

  // ---- matrix-optimizer primitives (src/optim/matrix_opt.h; docs/optimizers.md) ---------------
  // Not pure: the defaults throw "<op> is not implemented on the <name> backend", so a backend
  // compiles before it has these kernels. All tensors f32, 2-D unless said otherwise.
  //
  // C (=) alpha op(A) op(B) + beta C, op(X) = X^T when the flag is set (beta = 0: C is not read).
  virtual void gemm(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, Tensor& C,
                    float alpha, float beta);
  // dst[dr + i, dc + j] (=) src[sr + i, sc + j] for i < rows, j < cols (a window of a matrix;
  // used to cut blocks out of a parameter and to write them back).
  virtual void block_copy(const Tensor& src, int64_t sr, int64_t sc, Tensor& dst, int64_t dr,
                          int64_t dc, int64_t rows, int64_t cols);
  // Q [n,n] (=) the eigenvectors of the symmetric S [n,n] as columns, ordered by descending
  // eigenvalue; each column's largest-magnitude entry is made positive. Computed in double.
  virtual void sym_eig(const Tensor& S, Tensor& Q);
  // out [n,n] (=) Q diag(f(lambda_i)) Q^T for the eigen-pairs of the symmetric S [n,n] (double):
  // l = max(lambda * input_scale, 0), e = eps (times the largest l when relative_eps),
  // f = scale * (l^root + e)^power, and when schatten_q > 0 scale is further multiplied by
  // (sum_i l_i^(schatten_q/2))^(schatten_pow/schatten_q) (a Schatten-q norm of the singular
  // values sigma = sqrt(l) raised to schatten_pow). When base_floor_rel > 0 the base
  // l^root + e is raised to at least base_floor_rel * lmax^root first (lmax: the largest l), so
  // a negative power amplifies no direction by more than 1 / base_floor_rel relative to the
  // top one. out may alias S.
  virtual void sym_func(const Tensor& S, const SymFuncArgs& a, Tensor& out);
  // Newton-Schulz with one (a,b,c) per iteration (coeffs holds 3*steps floats):
  // X = U / (norm_mult * ||U||_F + 1e-7), transposed when rows > cols; for each (a,b,c):
  // A = X X^T, X = a X + (b A + c A^2) X; transposed back into O (O may alias U).
  // Like newton_schulz, U and O may be a stack [k,r,c] of independently normalised slices.
  virtual void newton_schulz_coeffs(const Tensor& U, Tensor& O, const std::vector<float>& coeffs,
                                    float norm_mult);
  // NorMuon: for O [r,c] and v [r]: v_i (=) beta2 v_i + (1-beta2) mean_j O_ij^2;
  // O_ij /= sqrt(v_i) + eps; then O is rescaled so that ||O||_F equals its value on entry.
  virtual void normuon_normalize(Tensor& O, Tensor& v, float beta2, float eps);
  // Cautious weight decay: p_i *= (1 - decay) only where p_i * u_i >= 0 (u: the update that is
  // then subtracted, p <- p - lr u). Any shape, same shape for p and u.
  virtual void cautious_decay(Tensor& p, const Tensor& u, float decay);
  // Adam in a given basis: v (=) b2 v + (1-b2) g^2;  out (=) (num / bc1) / (sqrt(v / bc2) + eps).
  // Same shapes; out may alias num.
  virtual void adam_precond(const Tensor& num, const Tensor& g, Tensor& v, Tensor& out, float b2,
                            float eps, float bc1, float bc2);

 private:
  std::vector<std::chrono::steady_clock::time_point> host_marks_;
  OpProfiler* profiler_ = nullptr;
  size_t loss_chunk_bytes_ = cuda::kXentChunkBytesDefault;
};


// "cpu", "cuda" or "auto" (cuda when built with CUDA and a device is present, else cpu).
std::unique_ptr<Backend> make_backend(const std::string& device);

// Applies model.attention to `be` (after set_precision). With train.deterministic on a CUDA
// backend, "auto" becomes "flash" and "cudnn" is an error: cuDNN's attention backward
// accumulates dQ with atomics, so two runs are not bitwise identical. The same for f32
// activations (train.precision "fp32"): cuDNN's attention takes bf16 only.
void select_attention(Backend& be, const std::string& mode, bool deterministic);
bool cuda_available();  // built with CUDA and at least one device visible
// Whether `device` (auto | cpu | cuda) resolves to CUDA here; throws, naming it, when it cannot
// be had ("cuda" without a device or a CUDA build, or an unknown name). make_backend's check,
// without the backend's start-up.
bool check_device(const std::string& device);

}  // namespace mf
