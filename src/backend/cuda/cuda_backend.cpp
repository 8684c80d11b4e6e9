// CudaBackend: memory and transfers here; every op forwards to its entry in kernels/*.cu,
// which checks the arguments and launches on the backend's stream.
#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "adamw.cuh"
#include "attention.cuh"
#include "cast.cuh"
#include "core/bf16.h"
#include "core/log.h"
#include "dist/env.h"
#include "embedding.cuh"
#include "matmul.cuh"
#include "moe.cuh"
#include "muon.cuh"
#include "reduce.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "swiglu.cuh"
#include "xent.cuh"

namespace mf {

// No device (cudaErrorNoDevice), no driver at all (cudaErrorInsufficientDriver with driver
// version 0) and the toolkit's stub libcuda in place of a driver (cudaErrorStubLibrary) count as
// zero devices; any other failure (a driver too old for this build, a broken installation) is an
// error, so that train.device "auto" does not quietly train on the CPU.
int cuda_device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess) return n;
  cudaGetLastError();  // not sticky: nothing was initialised
  int driver = 0;
  cudaDriverGetVersion(&driver);
  if (e == cudaErrorNoDevice || e == cudaErrorStubLibrary || (e == cudaErrorInsufficientDriver && driver == 0))
    return 0;
  MF_FAIL("CUDA cannot list the GPUs: cudaGetDeviceCount gave ", cudaGetErrorName(e), " (",
          cudaGetErrorString(e), "); the driver supports CUDA ", driver / 1000, ".", driver % 1000 / 10,
          ", this build needs ", CUDART_VERSION / 1000, ".", CUDART_VERSION % 1000 / 10,
          " (update the driver, or run with train.device \"cpu\")");
}

std::unique_ptr<Backend> make_cuda_backend() {
  // One process per GPU: the local rank picks the device, by the same rules the process group
  // uses (LOCAL_RANK from scripts/launch.py / torchrun, SLURM_LOCALID under srun, or the rank
  // modulo LOCAL_WORLD_SIZE). A process run alone takes the current device.
  int dev = -1;
  const DistEnv env = read_dist_env();
  if (env.source != "single") {
    const int n = cuda_device_count();
    // More local ranks than GPUs would put two ranks on one GPU (NCCL refuses that at init with
    // a less clear message). One visible GPU per process (CUDA_VISIBLE_DEVICES set per rank)
    // is the one exception: every rank takes its device 0.
    if (n > 1) {
      const char* vis = std::getenv("CUDA_VISIBLE_DEVICES");
      MF_CHECK(env.local_rank < n, "LOCAL_RANK ", env.local_rank, " has no GPU of its own: ", n,
               " are visible (CUDA_VISIBLE_DEVICES=", vis ? vis : "<unset>", "); start at most ", n,
               " processes per node, or give each process one GPU");
    }
    if (n > 0) dev = env.local_rank % n;
  }
  return std::make_unique<CudaBackend>(dev);
}

CudaBackend::CudaBackend(int device) : allocated_(std::make_shared<std::atomic<size_t>>(0)) {
  const int n = cuda_device_count();
  MF_CHECK(n > 0, "CudaBackend: no CUDA device is visible (train.device = \"cpu\" runs on the CPU)");
  if (device < 0) CUDA_CHECK(cudaGetDevice(&device));
  MF_CHECK(device < n, "CudaBackend: device ", device, " requested but only ", n, " visible");
  dev_ = device;
  (void)cuda::attention_fwd_mtiles();  // a bad MF_ATTN_FWD_MTILES fails here, whatever the model
  CUDA_CHECK(cudaSetDevice(dev_));
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  lt_ = std::make_unique<cuda::CublasLt>(stream_);
  scratch_ = std::make_unique<cuda::Scratch>(stream_);
  ctx_.stream = stream_;
  ctx_.lt = lt_.get();
  ctx_.scratch = scratch_.get();
  int sms = 1, smem = 48 * 1024;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev_));
  CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev_));
  ctx_.sm_count = sms;
  ctx_.max_smem_optin = size_t(smem);
  attn_ = std::make_unique<cuda::AttentionDispatch>(&ctx_);
}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (cudaEvent_t e : mark_events_) cudaEventDestroy(e);
  for (UploadSlot& u : upload_ring_) {
    if (u.done) cudaEventDestroy(u.done);
    if (u.host) cudaFreeHost(u.host);
  }
  for (auto& [ptrs, table] : pointer_tables_) cudaFree(table);
  attn_.reset();  // the cuDNN handle is bound to stream_
  mo_.reset();  // its library handles are bound to stream_
  scratch_.reset();
  lt_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

// ---- memory ------------------------------------------------------------------------------------

namespace {
// Every tensor allocation holds at least this much (and a 0-element tensor gets a real pointer).
constexpr size_t kMinTensorBytes = 256;
}  // namespace

size_t CudaBackend::held_bytes(const Tensor& t) const {
  return t.defined() ? std::max(t.nbytes(), kMinTensorBytes) : 0;
}

Tensor CudaBackend::empty(const Shape& s, DType t) {
  for (auto d : s) MF_CHECK(d >= 0, "empty: negative dimension in shape ", shape_str(s));
  Tensor x;
  x.shape = s;
  x.dtype = t;
  x.device = Device::CUDA;
  const size_t bytes = std::max(x.nbytes(), kMinTensorBytes);
  void* p = cuda::detail::device_alloc_or_null(bytes, "cudaMalloc");
  MF_CHECK(p, "out of GPU memory allocating ", dtype_name(t), " ", shape_str(s), " (", bytes,
           " bytes; ", cuda::detail::free_memory(), ", ", allocated_->load() >> 20,
           " MiB held by tensors): reduce train.micro_batch or train.seq_len");
  CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
  *allocated_ += bytes;
  auto counter = allocated_;
  x.owner = std::shared_ptr<void>(p, [counter, bytes](void* q) {
    cudaFree(q);  // never throws; a failure at teardown has nothing left to protect
    *counter -= bytes;
  });
  x.ptr = p;
  return x;
}

void CudaBackend::zero(Tensor& t) {
  cuda::check_dev("zero", "t", t);
  if (t.nbytes()) CUDA_CHECK(cudaMemsetAsync(t.ptr, 0, t.nbytes(), stream_));
}

void CudaBackend::upload(const Tensor& src, Tensor& dst) {
  const char* op = "upload";
  MF_CHECK(src.device == Device::CPU && src.defined(), op, ": source ",
           cuda::describe("src", src), " must be an allocated host tensor");
  cuda::check_dev(op, "dst", dst);
  MF_CHECK(src.numel() == dst.numel(), op, " ", cuda::describe("src", src), " into ",
           cuda::describe("dst", dst), ": sizes differ");
  if (src.numel() == 0) return;
  const bool to_bf16 = src.dtype == DType::F32 && dst.dtype == DType::BF16;
  MF_CHECK(to_bf16 || src.dtype == dst.dtype, op, " ", cuda::describe("src", src), " into ",
           cuda::describe("dst", dst), ": unsupported conversion (f32 -> f32/bf16, i32 -> i32)");
  const size_t bytes = dst.nbytes();
  UploadSlot* slot = nullptr;
  if (bytes <= kUploadRingMaxBytes) {
    if (upload_ring_.empty()) upload_ring_.resize(kUploadSlots);
    UploadSlot& u = upload_ring_[upload_next_++ % kUploadSlots];
    if (u.pending) CUDA_CHECK(cudaEventSynchronize(u.done));  // the slot's last copy has run
    u.pending = false;
    if (!u.done) CUDA_CHECK(cudaEventCreateWithFlags(&u.done, cudaEventDisableTiming));
    if (u.cap < bytes) {
      if (u.host) CUDA_CHECK(cudaFreeHost(u.host));
      u.host = nullptr;
      u.cap = 0;
      const size_t cap = std::max<size_t>(bytes, 64 << 10);
      // No pinned memory to spare (nullptr): this upload takes the synchronous path.
      u.host = cuda::detail::pinned_alloc_or_null(cap, "cudaHostAlloc (upload ring)");
      if (u.host) u.cap = cap;
    }
    if (u.host) slot = &u;
  }
  if (slot) {
    // Through the pinned ring: the host copy (or bf16 conversion) into the slot is all the caller
    // waits for. A copy from pageable memory would synchronise the stream (CUDA's pageable
    // cudaMemcpyAsync semantics), draining the queue once per micro-batch.
    UploadSlot& u = *slot;
    if (to_bf16)
      f32_to_bf16(static_cast<const float*>(src.ptr), static_cast<uint16_t*>(u.host),
                  size_t(src.numel()));
    else
      std::memcpy(u.host, src.ptr, bytes);
    CUDA_CHECK(cudaMemcpyAsync(dst.ptr, u.host, bytes, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaEventRecord(u.done, stream_));
    u.pending = true;
    return;
  }
  const void* from = src.ptr;
  std::vector<uint16_t> staging;
  if (to_bf16) {
    staging.resize(size_t(src.numel()));
    f32_to_bf16(static_cast<const float*>(src.ptr), staging.data(), staging.size());
    from = staging.data();
  }
  CUDA_CHECK(cudaMemcpyAsync(dst.ptr, from, bytes, cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // staging / caller's buffer may go away
}

void CudaBackend::download(const Tensor& src, Tensor& dst) {
  const char* op = "download";
  cuda::check_dev(op, "src", src);
  MF_CHECK(dst.device == Device::CPU && dst.defined(), op, ": destination ",
           cuda::describe("dst", dst), " must be an allocated host tensor");
  MF_CHECK(src.numel() == dst.numel(), op, " ", cuda::describe("src", src), " into ",
           cuda::describe("dst", dst), ": sizes differ");
  if (src.numel() == 0) return;
  if (src.dtype == DType::BF16 && dst.dtype == DType::F32) {
    std::vector<uint16_t> staging(size_t(src.numel()));
    CUDA_CHECK(cudaMemcpyAsync(staging.data(), src.ptr, src.nbytes(), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    bf16_to_f32(staging.data(), static_cast<float*>(dst.ptr), staging.size());
    return;
  }
  MF_CHECK(src.dtype == dst.dtype, op, " ", cuda::describe("src", src), " into ",
           cuda::describe("dst", dst), ": unsupported conversion (f32/bf16 -> f32, i32 -> i32)");
  CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, src.nbytes(), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

namespace {
class CudaReadback final : public Backend::Readback {
 public:
  CudaReadback(cudaStream_t stream, const std::vector<const Tensor*>& src)
      : stream_(stream), src_(src) {
    for (const Tensor* t : src) {
      cuda::check_dev("make_readback", "source", *t);
      MF_CHECK(t->dtype == DType::F32 || t->dtype == DType::I32, "make_readback: ",
               cuda::describe("source", *t), " must be f32 or i32");
      const size_t bytes = std::max<size_t>(t->nbytes(), 16);
      Tensor h;
      if (void* p = cuda::detail::pinned_alloc_or_null(bytes, "cudaHostAlloc (read-back buffer)")) {
        h.owner = std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
      } else {
        // Page-locked memory ran out: a pageable buffer works too, but its copy is synchronous
        // (start() then waits for the stream), so the read-back no longer overlaps the device.
        h.owner = std::shared_ptr<void>(::operator new(bytes), [](void* q) { ::operator delete(q); });
        if (!warned_unpinned_.exchange(true))
          spdlog::warn("make_readback: no page-locked host memory left for {} bytes; reading back "
                       "through pageable memory (synchronous)", bytes);
      }
      h.ptr = h.owner.get();
      h.shape = t->shape;
      h.dtype = t->dtype;
      h.device = Device::CPU;
      host_.push_back(h);
    }
    CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }
  ~CudaReadback() override {
    if (pending_) cudaEventSynchronize(done_);  // the copies write into host_
    cudaEventDestroy(done_);
  }
  void start() override {
    for (size_t i = 0; i < src_.size(); ++i)
      CUDA_CHECK(cudaMemcpyAsync(host_[i].ptr, src_[i]->ptr, src_[i]->nbytes(),
                                 cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaEventRecord(done_, stream_));
    pending_ = true;
  }
  void wait() override {
    if (!pending_) return;
    CUDA_CHECK(cudaEventSynchronize(done_));
    pending_ = false;
  }

 private:
  cudaStream_t stream_;
  std::vector<const Tensor*> src_;
  cudaEvent_t done_ = nullptr;
  bool pending_ = false;
  static inline std::atomic<bool> warned_unpinned_{false};  // warn once per process
};
}  // namespace

std::unique_ptr<Backend::Readback> CudaBackend::make_readback(
    const std::vector<const Tensor*>& sources) {
  return std::make_unique<CudaReadback>(stream_, sources);
}

void CudaBackend::copy(const Tensor& src, Tensor& dst) { cuda::op_cast(ctx_, src, dst); }

void CudaBackend::reserve_scratch(size_t bytes) {
  if (bytes > scratch_->capacity()) scratch_->get(bytes);
}

void CudaBackend::synchronize() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

size_t CudaBackend::record_mark() {
  if (marks_used_ == mark_events_.size()) {
    cudaEvent_t e = nullptr;
    CUDA_CHECK(cudaEventCreate(&e));  // with timing (the default flags)
    mark_events_.push_back(e);
  }
  CUDA_CHECK(cudaEventRecord(mark_events_[marks_used_], stream_));
  return marks_used_++;
}

double CudaBackend::marks_elapsed_ms(size_t a, size_t b) {
  MF_CHECK(a < marks_used_ && b < marks_used_, "marks_elapsed_ms: mark ", std::max(a, b),
           " was not recorded (", marks_used_, " marks)");
  CUDA_CHECK(cudaEventSynchronize(mark_events_[b]));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, mark_events_[a], mark_events_[b]));
  return double(ms);
}

void CudaBackend::clear_marks() { marks_used_ = 0; }

MemoryInfo CudaBackend::memory_info() const {
  MemoryInfo m;
  int cur = 0;
  CUDA_CHECK(cudaGetDevice(&cur));
  if (cur != dev_) CUDA_CHECK(cudaSetDevice(dev_));
  CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
  if (cur != dev_) CUDA_CHECK(cudaSetDevice(cur));
  m.tensors = bytes_allocated();
  m.workspace = scratch_bytes() + cuda::CublasLt::kWorkspaceBytes + attn_->workspace_bytes();
  return m;
}

// ---- model ops ---------------------------------------------------------------------------------

void CudaBackend::embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) {
  cuda::op_embedding_fwd(ctx_, tokens, wte, out);
}
void CudaBackend::embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) {
  cuda::op_embedding_bwd(ctx_, tokens, dout, dwte);
}
void CudaBackend::add_rmsnorm_fwd(const Tensor& resid_in, const Tensor* branch, Tensor& resid_out,
                                  const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  cuda::op_add_rmsnorm_fwd(ctx_, resid_in, branch, resid_out, w, eps, y, rstd);
}
void CudaBackend::rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w,
                              const Tensor& rstd, Tensor& dx, Tensor& dw) {
  cuda::op_rmsnorm_bwd(ctx_, dy, x, w, rstd, dx, dw);
}
void CudaBackend::matmul_fwd(const Tensor& x, const Tensor& W, Tensor& y) {
  cuda::op_matmul_fwd(ctx_, x, W, y);
}
void CudaBackend::matmul_bwd(const Tensor& dy, const Tensor& x, const Tensor& W, Tensor* dx,
                             Tensor* dW, bool accumulate_dx) {
  cuda::op_matmul_bwd(ctx_, dy, x, W, dx, dW, accumulate_dx);
}
void CudaBackend::rope_fwd(const Tensor& x, Tensor& y, float theta) {
  cuda::op_rope_fwd(ctx_, x, y, theta);
}
void CudaBackend::rope_bwd(const Tensor& dy, Tensor& dx, float theta) {
  cuda::op_rope_bwd(ctx_, dy, dx, theta);
}
void CudaBackend::qkv_rope_split(const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, float theta) {
  cuda::op_qkv_rope_split(ctx_, qkv, q, k, v, theta);
}
void CudaBackend::qkv_rope_merge_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                     Tensor& dqkv, float theta) {
  cuda::op_qkv_rope_merge_bwd(ctx_, dq, dk, dv, dqkv, theta);
}
void CudaBackend::attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                                Tensor& lse, const AttnShape& s) {
  attn_->fwd(q, k, v, out, lse, s);
}
void CudaBackend::attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                const Tensor& v, const Tensor& out, const Tensor& lse, Tensor& dq,
                                Tensor& dk, Tensor& dv, const AttnShape& s) {
  attn_->bwd(dout, q, k, v, out, lse, dq, dk, dv, s);
}
void CudaBackend::set_attention_impl(const std::string& mode) { attn_->set_mode(mode); }
void CudaBackend::set_loss_chunk_mb(double mb) {
  Backend::set_loss_chunk_mb(mb);
  ctx_.xent_chunk_bytes = loss_chunk_bytes();
}
void CudaBackend::set_precision(const std::string& precision) {
  Backend::set_precision(precision);
  act_ = precision == "fp32" ? DType::F32 : DType::BF16;
}
void CudaBackend::swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h) {
  cuda::op_swiglu_fwd(ctx_, gate, up, h);
}
void CudaBackend::swiglu_bwd(const Tensor& dh, const Tensor& gate, const Tensor& up,
                             Tensor& dgate, Tensor& dup) {
  cuda::op_swiglu_bwd(ctx_, dh, gate, up, dgate, dup);
}
void CudaBackend::swiglu_packed_fwd(const Tensor& gu, Tensor& h) {
  cuda::op_swiglu_packed_fwd(ctx_, gu, h);
}
void CudaBackend::swiglu_packed_bwd(const Tensor& dh, const Tensor& gu, Tensor& dgu) {
  cuda::op_swiglu_packed_bwd(ctx_, dh, gu, dgu);
}
void CudaBackend::lmhead_xent(const Tensor& x, const Tensor& W, const Tensor& targets,
                              float logit_scale, Tensor& losses, Tensor* dx, Tensor* dW,
                              float loss_scale) {
  cuda::op_lmhead_xent(ctx_, x, W, targets, logit_scale, losses, dx, dW, loss_scale);
}

// ---- Mixture of Experts (kernels/moe.cu) --------------------------------------------------------

void CudaBackend::moe_router_fwd(const Tensor& x, const Tensor& Wr, const Tensor* bias,
                                 const MoeRouterArgs& a, Tensor& probs, Tensor& topk_idx,
                                 Tensor& topk_w, Tensor& counts, Tensor& score_sum) {
  cuda::op_moe_router_fwd(ctx_, x, Wr, bias, a, probs, topk_idx, topk_w, counts, score_sum);
}
void CudaBackend::moe_router_bwd(const Tensor& dtopk_w, const Tensor* aux_grad, const Tensor& x,
                                 const Tensor& Wr, const Tensor& probs, const Tensor& topk_idx,
                                 const MoeRouterArgs& a, Tensor& dlogits, Tensor& dx,
                                 Tensor& dWr) {
  cuda::op_moe_router_bwd(ctx_, dtopk_w, aux_grad, x, Wr, probs, topk_idx, a, dlogits, dx, dWr);
}
void CudaBackend::moe_permute(const Tensor& topk_idx, int E, int64_t capacity, Tensor& offsets,
                              Tensor& row_of, Tensor& row_token) {
  cuda::op_moe_permute(ctx_, topk_idx, E, capacity, offsets, row_of, row_token);
}
void CudaBackend::moe_gather(const Tensor& x, const Tensor& row_token, Tensor& xg) {
  cuda::op_moe_gather(ctx_, x, row_token, xg);
}
void CudaBackend::moe_gather_bwd(const Tensor& dxg, const Tensor& row_of, Tensor& dx) {
  cuda::op_moe_gather_bwd(ctx_, dxg, row_of, dx);
}
void CudaBackend::moe_combine_fwd(const Tensor& yg, const Tensor& topk_w, const Tensor& row_of,
                                  Tensor& out, bool accumulate) {
  cuda::op_moe_combine_fwd(ctx_, yg, topk_w, row_of, out, accumulate);
}
void CudaBackend::moe_combine_bwd(const Tensor& dout, const Tensor& yg, const Tensor& topk_w,
                                  const Tensor& row_of, Tensor& dyg, Tensor& dtopk_w) {
  cuda::op_moe_combine_bwd(ctx_, dout, yg, topk_w, row_of, dyg, dtopk_w);
}

void** CudaBackend::pointer_table(const std::vector<void*>& ptrs) {
  auto it = pointer_tables_.find(ptrs);
  if (it != pointer_tables_.end()) return it->second;
  void** table = nullptr;
  CUDA_CHECK(cudaMalloc(&table, ptrs.size() * sizeof(void*)));
  // Once per list, queued on the backend's stream so the kernels that read the table come after
  // it. (A plain cudaMemcpy would go on the legacy stream, which a non-blocking stream does not
  // wait for, and from pageable memory it may return before the bytes reach the device.) The
  // pageable source is staged before cudaMemcpyAsync returns, so `ptrs` may go away.
  CUDA_CHECK(cudaMemcpyAsync(table, ptrs.data(), ptrs.size() * sizeof(void*),
                             cudaMemcpyHostToDevice, stream_));
  pointer_tables_.emplace(ptrs, table);
  return table;
}

namespace {
template <typename T>
std::vector<void*> pointers_of(const std::vector<T*>& ts) {
  std::vector<void*> p;
  p.reserve(ts.size());
  for (T* t : ts) p.push_back(const_cast<void*>(static_cast<const void*>(t->ptr)));
  return p;
}
bool all_bf16(const std::vector<const Tensor*>& ts) {
  for (const Tensor* t : ts)
    if (t->dtype != DType::BF16) return false;
  return true;
}
}  // namespace

void CudaBackend::moe_expert_fwd(const Tensor& x, const std::vector<const Tensor*>& W,
                                 const Tensor& offsets, Tensor& y) {
  if (W.empty() || x.dtype != DType::BF16 || y.dtype != DType::BF16 || !all_bf16(W))
    return Backend::moe_expert_fwd(x, W, offsets, y);
  cuda::op_moe_expert_fwd(ctx_, x, W, pointer_table(pointers_of(W)), offsets, y);
}

void CudaBackend::moe_expert_bwd(const Tensor& dy, const Tensor& x,
                                 const std::vector<const Tensor*>& W, const Tensor& offsets,
                                 Tensor* dx, const std::vector<Tensor*>* dW, bool accumulate_dx) {
  bool grouped = !W.empty() && dy.dtype == DType::BF16 && x.dtype == DType::BF16 && all_bf16(W) &&
                 (!dx || dx->dtype == DType::BF16);
  if (dW)
    for (const Tensor* g : *dW) grouped = grouped && g->dtype == DType::F32;
  if (!grouped) return Backend::moe_expert_bwd(dy, x, W, offsets, dx, dW, accumulate_dx);
  cuda::op_moe_expert_bwd(ctx_, dy, x, W, pointer_table(pointers_of(W)), offsets, dx, dW,
                          dW ? pointer_table(pointers_of(*dW)) : nullptr, accumulate_dx);
}

// ---- reductions and elementwise ----------------------------------------------------------------

double CudaBackend::sum_squares(const Tensor& x) { return cuda::op_sum_squares(ctx_, x); }
std::vector<double> CudaBackend::sum_squares_each(const std::vector<const Tensor*>& xs) {
  return cuda::op_sum_squares_each(ctx_, xs);
}
double CudaBackend::sum(const Tensor& x) { return cuda::op_sum(ctx_, x); }
void CudaBackend::scale(Tensor& x, float alpha) { cuda::op_scale(ctx_, x, alpha); }
void CudaBackend::scale_to_norm_of(Tensor& x, const Tensor& ref) {
  cuda::op_scale_to_norm_of(ctx_, x, ref);
}
void CudaBackend::axpy(float alpha, const Tensor& x, Tensor& y) { cuda::op_axpy(ctx_, alpha, x, y); }

// ---- optimizer primitives ----------------------------------------------------------------------

void CudaBackend::adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                               const AdamWArgs& a) {
  cuda::op_adamw_update(ctx_, p, g, m, v, a, nullptr);
}
void CudaBackend::adamw_update_fused(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                                     const AdamWArgs& a, Tensor* weight_out) {
  cuda::op_adamw_update(ctx_, p, g, m, v, a, weight_out);
}
void CudaBackend::muon_momentum(const Tensor& g, Tensor& M, Tensor& U, float mu, bool nesterov,
                                float grad_scale) {
  cuda::op_muon_momentum(ctx_, g, M, U, mu, nesterov, grad_scale);
}
void CudaBackend::newton_schulz(const Tensor& U, Tensor& O, int steps, float a, float b, float c) {
  cuda::op_newton_schulz(ctx_, U, O, steps, a, b, c, act_);  // bf16, or f32 in fp32 runs
}

}  // namespace mf
