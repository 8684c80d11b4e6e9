// cuDNN scaled-dot-product attention: a second implementation of Backend::attention_fwd/bwd
// (causal GQA, bf16 in/out, fp32 compute), built with the cuDNN 9 backend (graph) API in plain C
// calls: tensor / operation descriptors, an operation graph, engine heuristics, one execution
// plan per shape, variant packs. docs/cuda.md "cuDNN attention" describes the graphs.
//
// Layout: our [B,T,H,hd] activations are cuDNN's [b,h,s,d] tensors with strides
// (T*H*hd, hd, H*hd, 1), so no transposes; lse f32 [B,H,T] is cuDNN's softmax stats tensor
// [b,h,s,1] with strides (H*T, T, 1, 1). Both are the natural-log log-sum-exp of the scaled,
// masked scores, so a cuDNN forward feeds our flash backward and vice versa (no conversion).
//
// AttentionDispatch is what CudaBackend calls: it applies model.attention ("flash", "cudnn",
// "auto") and, for "auto", times both paths once per shape.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "backend/backend.h"

namespace mf::cuda {

struct Ctx;  // kernels/common.cuh

// One cuDNN handle on the backend's stream, a cache of execution plans keyed by
// (B, T, H, Hkv, hd, scale, fwd/bwd) and one grow-only workspace shared by all plans.
class CudnnAttention {
 public:
  explicit CudnnAttention(cudaStream_t stream);  // creates the cuDNN handle (needs a device)
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // Whether this build links cuDNN (MF_HAS_CUDNN) and, if so, cudnnGetVersion() (e.g. 91900).
  static bool compiled();
  static int64_t runtime_version();

  // Builds (or finds) the forward and backward plans of shape s. Throws mf::Error naming the
  // shape and cuDNN's reason when no engine supports the graph (the caller may fall back).
  void prepare(const AttnShape& s);
  // Same contracts as Backend::attention_fwd / attention_bwd (checks shapes and dtypes).
  void fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
           const AttnShape& s);
  void bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
           const Tensor& out, const Tensor& lse, Tensor& dq, Tensor& dk, Tensor& dv,
           const AttnShape& s);
  // "fwd engine 7 (ws 0 MiB), bwd engine 5 (ws 12 MiB)" for a prepared shape.
  std::string plan_info(const AttnShape& s) const;
  size_t workspace_bytes() const;
  // Frees the workspace (the plans stay): "auto" calls it when no shape uses cuDNN, so the
  // backward's fp32 intermediates (B*H*T*(hd+1)*4 bytes) are not held for a run on flash.
  void release_workspace();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Chooses flash or cuDNN per call according to model.attention.
class AttentionDispatch {
 public:
  explicit AttentionDispatch(const Ctx* ctx) : ctx_(ctx) {}
  ~AttentionDispatch();
  // "flash" (default), "cudnn" or "auto"; anything else is an error naming model.attention.
  void set_mode(const std::string& mode);
  const std::string& mode() const { return mode_; }
  // "flash" or "cudnn": what the last call for shape s used (empty before the first call).
  std::string choice(const AttnShape& s) const;

  void fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
           const AttnShape& s);
  void bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
           const Tensor& out, const Tensor& lse, Tensor& dq, Tensor& dk, Tensor& dv,
           const AttnShape& s);
  size_t workspace_bytes() const { return cudnn_ ? cudnn_->workspace_bytes() : 0; }

 private:
  using Key = std::tuple<int, int, int, int, int>;
  static Key key_of(const AttnShape& s) { return {s.B, s.T, s.H, s.Hkv, s.hd}; }
  bool use_cudnn(const AttnShape& s, const Tensor& q, const Tensor& k, const Tensor& v);
  CudnnAttention& cudnn();
  bool autotune(const AttnShape& s, const Tensor& q, const Tensor& k, const Tensor& v);

  const Ctx* ctx_;
  std::string mode_ = "flash";
  std::unique_ptr<CudnnAttention> cudnn_;
  std::map<Key, bool> cudnn_for_;  // per shape: true = cuDNN
  bool warned_unaligned_ = false;
};

}  // namespace mf::cuda
