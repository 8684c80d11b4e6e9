// cuDNN SDPA through the backend (graph) API, and the flash/cuDNN dispatch. See the header and
// docs/cuda.md "cuDNN attention".
//
// The graphs are the composite pattern cuDNN's fused flash-attention engines recognise (the same
// one cudnn-frontend lowers its SDPA nodes to):
//
//   forward   S = Q KT (fp32);  S *= scale;  causal: S = row >= col ? S : lowest;
//             M = max_row S;  E = exp(S - M);  Z = sum_row E;  stats = M + log Z;  P = E / Z (bf16)
//             O = P V
//   backward  softmax_sum = sum_row(dO * O) * 1  (fp32, non-virtual, in our workspace)
//             S = Q KT * scale - stats, causal mask, P = exp(S);  dV = P^T dO
//             dP = dO VT;  dS = (dP - softmax_sum) * P * scale;  dK = dS^T Q
//             dQ_accum = dS K (fp32, non-virtual, in our workspace);  dQ = identity(dQ_accum)
//   GQA: K and V carry Hkv heads (the matmuls broadcast a kv head over its H/Hkv query heads);
//   dK and dV are computed per query head into virtual [b,H,s,d] tensors and reduced (ADD) onto
//   the Hkv heads.
#include "backend/cuda/cudnn_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.cuh"
#include "backend/attention_check.h"
#include "common.cuh"
#include "core/bf16.h"
#include "core/error.h"
#include "core/log.h"

#ifdef MF_HAS_CUDNN
#include <cudnn.h>
#endif

namespace mf::cuda {

namespace {

std::string shape_text(const AttnShape& s) {
  return ::mf::detail::cat("B=", s.B, " T=", s.T, " H=", s.H, " Hkv=", s.Hkv, " hd=", s.hd,
                     " scale=", s.scale);
}

}  // namespace

#ifdef MF_HAS_CUDNN

// ================================================================================================
// cuDNN backend API
// ================================================================================================
namespace {

using Desc = cudnnBackendDescriptor_t;

[[noreturn]] void cudnn_fail(cudnnStatus_t st, const std::string& what) {
  char last[512] = {0};
  cudnnGetLastErrorString(last, sizeof(last));
  MF_FAIL("cuDNN: ", what, " failed: ", cudnnGetErrorString(st),
          last[0] ? std::string(" (") + last + ")" : std::string());
}

// Every cuDNN call goes through this: a failure names the call (and attribute).
#define MF_CUDNN(what, call)                                      \
  do {                                                            \
    cudnnStatus_t mf_st_ = (call);                                \
    if (mf_st_ != CUDNN_STATUS_SUCCESS) cudnn_fail(mf_st_, what); \
  } while (0)

// Tensor uids of the variant packs (virtual tensors get uids from kFirstVirtual up).
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kDO, kDQ, kDK, kDV, kOne, kSoftmaxSum, kDQAccum,
  kFirstVirtual = 100
};

using Dims = std::vector<int64_t>;

// Owns every descriptor of one graph (and its plan) until destroyed.
class Graph {
 public:
  explicit Graph(cudnnHandle_t h) : h_(h) {}
  ~Graph() {
    for (auto it = owned_.rbegin(); it != owned_.rend(); ++it) cudnnBackendDestroyDescriptor(*it);
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  Desc make(cudnnBackendDescriptorType_t type, const char* name) {
    Desc d = nullptr;
    MF_CUDNN(::mf::detail::cat("cudnnBackendCreateDescriptor(", name, ")"),
             cudnnBackendCreateDescriptor(type, &d));
    owned_.push_back(d);
    return d;
  }
  static void set(Desc d, cudnnBackendAttributeName_t a, const char* aname,
                  cudnnBackendAttributeType_t t, int64_t n, const void* v) {
    MF_CUDNN(::mf::detail::cat("cudnnBackendSetAttribute(", aname, ")"),
             cudnnBackendSetAttribute(d, a, t, n, v));
  }
  static void finalize(Desc d, const char* name) {
    MF_CUDNN(::mf::detail::cat("cudnnBackendFinalize(", name, ")"), cudnnBackendFinalize(d));
  }

  Desc tensor(int64_t uid, cudnnDataType_t dt, const Dims& dims, const Dims& strides,
              bool is_virtual = false, bool by_value = false) {
    Desc d = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "TENSOR");
    const int64_t align = 16;
    set(d, CUDNN_ATTR_TENSOR_UNIQUE_ID, "TENSOR_UNIQUE_ID", CUDNN_TYPE_INT64, 1, &uid);
    set(d, CUDNN_ATTR_TENSOR_DATA_TYPE, "TENSOR_DATA_TYPE", CUDNN_TYPE_DATA_TYPE, 1, &dt);
    set(d, CUDNN_ATTR_TENSOR_DIMENSIONS, "TENSOR_DIMENSIONS", CUDNN_TYPE_INT64,
        int64_t(dims.size()), dims.data());
    set(d, CUDNN_ATTR_TENSOR_STRIDES, "TENSOR_STRIDES", CUDNN_TYPE_INT64, int64_t(strides.size()),
        strides.data());
    set(d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, "TENSOR_BYTE_ALIGNMENT", CUDNN_TYPE_INT64, 1, &align);
    if (is_virtual) {
      const bool yes = true;
      set(d, CUDNN_ATTR_TENSOR_IS_VIRTUAL, "TENSOR_IS_VIRTUAL", CUDNN_TYPE_BOOLEAN, 1, &yes);
    }
    if (by_value) {
      const bool yes = true;
      set(d, CUDNN_ATTR_TENSOR_IS_BY_VALUE, "TENSOR_IS_BY_VALUE", CUDNN_TYPE_BOOLEAN, 1, &yes);
    }
    finalize(d, "TENSOR");
    return d;
  }
  Desc virt(cudnnDataType_t dt, const Dims& dims, const Dims& strides) {
    return tensor(next_virtual_++, dt, dims, strides, true, false);
  }
  // A float passed by value in the variant pack (a host pointer at execution).
  Desc scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  // y = mode(x[, b[, t]]); math precision `prec`; axis for GEN_INDEX.
  void pointwise(cudnnPointwiseMode_t mode, Desc x, Desc b, Desc t, Desc y,
                 cudnnDataType_t prec = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    Desc pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "POINTWISE");
    set(pw, CUDNN_ATTR_POINTWISE_MODE, "POINTWISE_MODE", CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, "POINTWISE_MATH_PREC", CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (axis >= 0)
      set(pw, CUDNN_ATTR_POINTWISE_AXIS, "POINTWISE_AXIS", CUDNN_TYPE_INT64, 1, &axis);
    finalize(pw, "POINTWISE");
    Desc op = make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "OPERATION_POINTWISE");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, "OPERATION_POINTWISE_PW_DESCRIPTOR",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &pw);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, "OPERATION_POINTWISE_XDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x);
    if (b)
      set(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, "OPERATION_POINTWISE_BDESC",
          CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b);
    if (t)
      set(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, "OPERATION_POINTWISE_TDESC",
          CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &t);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, "OPERATION_POINTWISE_YDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y);
    finalize(op, "OPERATION_POINTWISE");
    ops_.push_back(op);
  }
  void reduction(cudnnReduceTensorOp_t red, Desc x, Desc y) {
    Desc rd = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "REDUCTION");
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(rd, CUDNN_ATTR_REDUCTION_OPERATOR, "REDUCTION_OPERATOR",
        CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &red);
    set(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, "REDUCTION_COMP_TYPE", CUDNN_TYPE_DATA_TYPE, 1, &comp);
    finalize(rd, "REDUCTION");
    Desc op = make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "OPERATION_REDUCTION");
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, "OPERATION_REDUCTION_XDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x);
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, "OPERATION_REDUCTION_YDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y);
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, "OPERATION_REDUCTION_DESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &rd);
    finalize(op, "OPERATION_REDUCTION");
    ops_.push_back(op);
  }
  // c = a b over the last two dims (batch dims broadcast), fp32 accumulation.
  void matmul(Desc a, Desc b, Desc c) {
    Desc mm = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "MATMUL");
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, "MATMUL_COMP_TYPE", CUDNN_TYPE_DATA_TYPE, 1, &comp);
    finalize(mm, "MATMUL");
    Desc op = make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "OPERATION_MATMUL");
    set(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, "OPERATION_MATMUL_ADESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &a);
    set(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, "OPERATION_MATMUL_BDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b);
    set(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, "OPERATION_MATMUL_CDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &c);
    set(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, "OPERATION_MATMUL_DESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &mm);
    finalize(op, "OPERATION_MATMUL");
    ops_.push_back(op);
  }
  // y = x seen through another dims/strides (a transpose here; the engine fuses it).
  void reshape(Desc x, Desc y) {
    Desc op = make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "OPERATION_RESHAPE");
    set(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, "OPERATION_RESHAPE_XDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x);
    set(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, "OPERATION_RESHAPE_YDESC",
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y);
    finalize(op, "OPERATION_RESHAPE");
    ops_.push_back(op);
  }

  // Operation graph -> heuristics (mode A, then FALLBACK) -> the first engine config whose plan
  // finalizes. Returns false with *why when none does.
  bool build_plan(std::string* why) {
    Desc graph = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "OPERATIONGRAPH");
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, "OPERATIONGRAPH_HANDLE", CUDNN_TYPE_HANDLE, 1,
        &h_);
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, "OPERATIONGRAPH_OPS", CUDNN_TYPE_BACKEND_DESCRIPTOR,
        int64_t(ops_.size()), ops_.data());
    cudnnStatus_t st = cudnnBackendFinalize(graph);
    if (st != CUDNN_STATUS_SUCCESS) {
      char last[512] = {0};
      cudnnGetLastErrorString(last, sizeof(last));
      *why = ::mf::detail::cat("cudnnBackendFinalize(OPERATIONGRAPH): ", cudnnGetErrorString(st),
                         last[0] ? std::string(" (") + last + ")" : std::string());
      return false;
    }
    int tried = 0;
    std::string last_err;
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      Desc heur = make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "ENGINEHEUR");
      set(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, "ENGINEHEUR_OPERATION_GRAPH",
          CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
      set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, "ENGINEHEUR_MODE", CUDNN_TYPE_HEUR_MODE, 1, &mode);
      st = cudnnBackendFinalize(heur);
      if (st != CUDNN_STATUS_SUCCESS) {  // mode not offered; its reason ends the error if none is
        char last[512] = {0};
        cudnnGetLastErrorString(last, sizeof(last));
        last_err = ::mf::detail::cat("heuristics mode ", int(mode), ": ", cudnnGetErrorString(st),
                                     last[0] ? std::string(" (") + last + ")" : std::string());
        continue;
      }
      int64_t count = 0;
      MF_CUDNN("cudnnBackendGetAttribute(ENGINEHEUR_RESULTS count)",
               cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                        CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
      if (count <= 0) continue;
      std::vector<Desc> cfgs(size_t(count), nullptr);
      for (auto& c : cfgs) c = make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "ENGINECFG");
      int64_t got = 0;
      MF_CUDNN("cudnnBackendGetAttribute(ENGINEHEUR_RESULTS)",
               cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                        CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, cfgs.data()));
      for (int64_t i = 0; i < got; ++i) {
        ++tried;
        Desc plan = make(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, "EXECUTION_PLAN");
        set(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, "EXECUTION_PLAN_HANDLE", CUDNN_TYPE_HANDLE, 1,
            &h_);
        set(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, "EXECUTION_PLAN_ENGINE_CONFIG",
            CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfgs[size_t(i)]);
        st = cudnnBackendFinalize(plan);
        if (st != CUDNN_STATUS_SUCCESS) {
          char last[512] = {0};
          cudnnGetLastErrorString(last, sizeof(last));
          last_err = ::mf::detail::cat(cudnnGetErrorString(st), last[0] ? std::string(" (") + last + ")"
                                                                  : std::string());
          continue;
        }
        plan_ = plan;
        MF_CUDNN("cudnnBackendGetAttribute(EXECUTION_PLAN_WORKSPACE_SIZE)",
                 cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                          CUDNN_TYPE_INT64, 1, &got, &workspace_));
        engine_ = engine_index(cfgs[size_t(i)]);
        return true;
      }
    }
    *why = tried == 0 ? ::mf::detail::cat("the engine heuristics returned no configuration for the graph",
                                          last_err.empty() ? "" : " (", last_err,
                                          last_err.empty() ? "" : ")")
                      : ::mf::detail::cat("none of the ", tried, " engine configurations finalized (last: ",
                                    last_err, ")");
    return false;
  }

  Desc plan() const { return plan_; }
  int64_t workspace() const { return workspace_; }
  int64_t engine() const { return engine_; }

 private:
  // Global index of the engine behind an engine config (-1 if cuDNN does not say).
  int64_t engine_index(Desc cfg) {
    Desc eng = nullptr;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng) != CUDNN_STATUS_SUCCESS)
      return -1;
    owned_.push_back(eng);
    int64_t n = 0, idx = -1;
    if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                 1, &n, &eng) != CUDNN_STATUS_SUCCESS)
      return -1;
    if (cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
                                 &idx) != CUDNN_STATUS_SUCCESS)
      return -1;
    return idx;
  }

  cudnnHandle_t h_;
  std::vector<Desc> owned_;
  std::vector<Desc> ops_;
  int64_t next_virtual_ = kFirstVirtual;
  Desc plan_ = nullptr;
  int64_t workspace_ = 0;
  int64_t engine_ = -1;
};

constexpr cudnnDataType_t kBF16 = CUDNN_DATA_BFLOAT16;
constexpr cudnnDataType_t kF32 = CUDNN_DATA_FLOAT;

// Layouts of our tensors as cuDNN [b,h,s,d] (see the header).
struct Layout {
  int64_t b, h, hk, s, d;
  explicit Layout(const AttnShape& a) : b(a.B), h(a.H), hk(a.Hkv), s(a.T), d(a.hd) {}
  Dims q_dims() const { return {b, h, s, d}; }
  Dims q_strides() const { return {s * h * d, d, h * d, 1}; }
  Dims kv_dims() const { return {b, hk, s, d}; }
  Dims kv_strides() const { return {s * hk * d, d, hk * d, 1}; }
  Dims kvT_dims() const { return {b, hk, d, s}; }  // K^T / V^T: the same memory, dims swapped
  Dims kvT_strides() const { return {s * hk * d, d, 1, hk * d}; }
  Dims row_dims() const { return {b, h, s, 1}; }  // stats, row sums: our lse [B,H,T]
  Dims row_strides() const { return {h * s, s, 1, 1}; }
  Dims ss_dims() const { return {b, h, s, s}; }  // scores
  Dims ss_strides() const { return {h * s * s, s * s, s, 1}; }
  Dims ssT_dims() const { return {b, h, s, s}; }  // scores seen transposed
  Dims ssT_strides() const { return {h * s * s, s * s, 1, s}; }
  Dims full_dims() const { return {b, h, s, d}; }  // per-query-head packed [b,h,s,d]
  Dims full_strides() const { return {h * s * d, s * d, d, 1}; }
};

// Causal mask on scores x (row = query index >= col = key index keeps the score).
Desc causal_mask(Graph& g, const Layout& L, Desc x, Desc neg_inf) {
  Desc row = g.virt(CUDNN_DATA_INT32, L.ss_dims(), L.ss_strides());
  Desc col = g.virt(CUDNN_DATA_INT32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, row, CUDNN_DATA_INT32, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, col, CUDNN_DATA_INT32, 3);
  Desc keep = g.virt(CUDNN_DATA_BOOLEAN, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_CMP_GE, row, col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  Desc y = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, x, neg_inf, keep, y);
  return y;
}

void build_fwd(Graph& g, const Layout& L) {
  Desc q = g.tensor(kQ, kBF16, L.q_dims(), L.q_strides());
  Desc kT = g.tensor(kK, kBF16, L.kvT_dims(), L.kvT_strides());
  Desc v = g.tensor(kV, kBF16, L.kv_dims(), L.kv_strides());
  Desc o = g.tensor(kO, kBF16, L.q_dims(), L.q_strides());
  Desc stats = g.tensor(kStats, kF32, L.row_dims(), L.row_strides());
  Desc scale = g.scalar(kScale);
  Desc neg_inf = g.scalar(kNegInf);

  Desc s = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.matmul(q, kT, s);
  Desc ss = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, s, scale, nullptr, ss);
  Desc sm = causal_mask(g, L, ss, neg_inf);
  // softmax with its log-sum-exp: stats = max + log(sum exp(s - max))
  Desc mx = g.virt(kF32, L.row_dims(), L.row_strides());
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, sm, mx);
  Desc sub = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_SUB, sm, mx, nullptr, sub);
  Desc e = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_EXP, sub, nullptr, nullptr, e);
  Desc z = g.virt(kF32, L.row_dims(), L.row_strides());
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
  Desc lz = g.virt(kF32, L.row_dims(), L.row_strides());
  g.pointwise(CUDNN_POINTWISE_LOG, z, nullptr, nullptr, lz);
  g.pointwise(CUDNN_POINTWISE_ADD, mx, lz, nullptr, stats);
  Desc p = g.virt(kBF16, L.ss_dims(), L.ss_strides());  // bmm2's A operand is in the io type
  g.pointwise(CUDNN_POINTWISE_DIV, e, z, nullptr, p);
  g.matmul(p, v, o);
}

void build_bwd(Graph& g, const Layout& L) {
  Desc q = g.tensor(kQ, kBF16, L.q_dims(), L.q_strides());
  Desc kT = g.tensor(kK, kBF16, L.kvT_dims(), L.kvT_strides());
  Desc vT = g.tensor(kV, kBF16, L.kvT_dims(), L.kvT_strides());
  Desc o = g.tensor(kO, kBF16, L.q_dims(), L.q_strides());
  Desc dO = g.tensor(kDO, kBF16, L.q_dims(), L.q_strides());
  Desc stats = g.tensor(kStats, kF32, L.row_dims(), L.row_strides());
  Desc dQ = g.tensor(kDQ, kBF16, L.q_dims(), L.q_strides());
  Desc dK = g.tensor(kDK, kBF16, L.kv_dims(), L.kv_strides());
  Desc dV = g.tensor(kDV, kBF16, L.kv_dims(), L.kv_strides());
  Desc scale = g.scalar(kScale);
  Desc neg_inf = g.scalar(kNegInf);
  Desc one = g.scalar(kOne);
  // Non-virtual fp32 intermediates the engine needs, placed in our workspace.
  Desc softmax_sum = g.tensor(kSoftmaxSum, kF32, L.row_dims(), L.row_strides());
  Desc dq_accum = g.tensor(kDQAccum, kF32, L.full_dims(), L.full_strides());
  const bool gqa = L.h != L.hk;

  // softmax_sum = rowsum(dO * O)
  Desc dOo = g.virt(kF32, L.q_dims(), L.q_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, dO, o, nullptr, dOo);
  Desc rs = g.virt(kF32, L.row_dims(), L.row_strides());
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, dOo, rs);
  g.pointwise(CUDNN_POINTWISE_MUL, rs, one, nullptr, softmax_sum);

  // P = exp(mask(Q K^T * scale - stats))
  Desc s = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.matmul(q, kT, s);
  Desc ss = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, s, scale, nullptr, ss);
  Desc sl = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_SUB, ss, stats, nullptr, sl);
  Desc sm = causal_mask(g, L, sl, neg_inf);
  Desc p = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_EXP, sm, nullptr, nullptr, p);

  // dV = P^T dO (summed over the query heads of each kv head for GQA)
  Desc pT = g.virt(kBF16, L.ssT_dims(), L.ssT_strides());
  g.reshape(p, pT);
  if (!gqa) {
    g.matmul(pT, dO, dV);
  } else {
    Desc dv_full = g.virt(kBF16, L.full_dims(), L.full_strides());
    g.matmul(pT, dO, dv_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dv_full, dV);
  }

  // dS = (dO V^T - softmax_sum) * P * scale
  Desc dp = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.matmul(dO, vT, dp);
  Desc dp1 = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_SUB, dp, softmax_sum, nullptr, dp1);
  Desc dp2 = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, dp1, p, nullptr, dp2);
  Desc ds = g.virt(kF32, L.ss_dims(), L.ss_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, dp2, scale, nullptr, ds);

  // dK = dS^T Q
  Desc dsT = g.virt(kBF16, L.ssT_dims(), L.ssT_strides());
  g.reshape(ds, dsT);
  if (!gqa) {
    g.matmul(dsT, q, dK);
  } else {
    Desc dk_full = g.virt(kBF16, L.full_dims(), L.full_strides());
    g.matmul(dsT, q, dk_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dk_full, dK);
  }

  // dQ = dS K (fp32 accumulator, then cast to bf16)
  Desc k = g.virt(kF32, L.kv_dims(), L.kv_strides());
  g.reshape(kT, k);
  g.matmul(ds, k, dq_accum);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, dq_accum, nullptr, nullptr, dQ);
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

struct CudnnAttention::Impl {
  struct Plan {
    std::unique_ptr<Graph> graph;
    size_t cudnn_ws = 0;  // cuDNN's own workspace
    size_t extra = 0;     // bwd: softmax_sum + dQ_accum after it
  };
  using Key = std::tuple<int, int, int, int, int, uint32_t, bool>;

  cudaStream_t stream;
  cudnnHandle_t handle = nullptr;
  Scratch ws;
  std::map<Key, std::unique_ptr<Plan>> plans;

  explicit Impl(cudaStream_t st) : stream(st), ws(st) {
    MF_CUDNN("cudnnCreate", cudnnCreate(&handle));
    const cudnnStatus_t s = cudnnSetStream(handle, stream);
    if (s != CUDNN_STATUS_SUCCESS) {
      cudnnDestroy(handle);
      cudnn_fail(s, "cudnnSetStream");
    }
  }
  ~Impl() {
    plans.clear();
    if (handle) cudnnDestroy(handle);
  }

  static Key key_of(const AttnShape& s, bool bwd) {
    uint32_t bits = 0;
    std::memcpy(&bits, &s.scale, sizeof(bits));
    return {s.B, s.T, s.H, s.Hkv, s.hd, bits, bwd};
  }

  Plan& plan(const AttnShape& s, bool bwd) {
    auto it = plans.find(key_of(s, bwd));
    if (it != plans.end()) return *it->second;
    const char* which = bwd ? "backward" : "forward";
    if (bwd && s.T % 128 != 0 && cudnnGetVersion() < 91600)
      MF_FAIL("cuDNN attention ", which, " for ", shape_text(s), ": cuDNN ", cudnnGetVersion(),
              " (< 9.16) needs T to be a multiple of 128 without a padding mask; use "
              "model.attention = \"flash\" or \"auto\"");
    // cudnn-frontend refuses bf16/fp16 SDPA, forward and backward, on these two releases
    // ("known bugs"), so this graph is not trusted there either.
    if (cudnnGetVersion() == 91000 || cudnnGetVersion() == 91001)
      MF_FAIL("cuDNN attention ", which, " for ", shape_text(s), ": cuDNN ", cudnnGetVersion(),
              " (9.10.0 and 9.10.1) has known bugs in bf16 attention; use another cuDNN, or "
              "model.attention = \"flash\" or \"auto\"");
    auto p = std::make_unique<Plan>();
    p->graph = std::make_unique<Graph>(handle);
    const Layout L(s);
    std::string why;
    try {
      if (bwd)
        build_bwd(*p->graph, L);
      else
        build_fwd(*p->graph, L);
      if (!p->graph->build_plan(&why)) MF_FAIL(why);
    } catch (const Error& e) {
      MF_FAIL("cuDNN attention ", which, " for ", shape_text(s), " (cuDNN ", cudnnGetVersion(),
              "): cannot build the graph: ", e.what());
    }
    p->cudnn_ws = size_t(std::max<int64_t>(0, p->graph->workspace()));
    if (bwd) {
      const size_t rows = size_t(s.B) * s.H * s.T;
      p->extra = align_up(rows * sizeof(float)) + align_up(rows * size_t(s.hd) * sizeof(float));
    }
    Plan& ref = *p;
    plans.emplace(key_of(s, bwd), std::move(p));
    return ref;
  }

  void execute(Plan& p, std::vector<int64_t> uids, std::vector<void*> ptrs, const AttnShape& s,
               bool bwd) {
    char* base = static_cast<char*>(ws.get(align_up(p.cudnn_ws) + p.extra + kAlign));
    void* cudnn_ws = p.cudnn_ws ? base : nullptr;
    if (bwd) {
      const size_t rows = size_t(s.B) * s.H * s.T;
      char* sums = base + align_up(p.cudnn_ws);
      char* dq_accum = sums + align_up(rows * sizeof(float));
      // The dQ accumulator must start at zero (cuDNN < 9.6 does not clear it itself).
      CUDA_CHECK(cudaMemsetAsync(dq_accum, 0, rows * size_t(s.hd) * sizeof(float), stream));
      uids.push_back(kSoftmaxSum);
      ptrs.push_back(sums);
      uids.push_back(kDQAccum);
      ptrs.push_back(dq_accum);
    }
    Graph vp_owner(handle);
    Desc vp = vp_owner.make(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "VARIANT_PACK");
    Graph::set(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, "VARIANT_PACK_UNIQUE_IDS", CUDNN_TYPE_INT64,
               int64_t(uids.size()), uids.data());
    Graph::set(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, "VARIANT_PACK_DATA_POINTERS",
               CUDNN_TYPE_VOID_PTR, int64_t(ptrs.size()), ptrs.data());
    Graph::set(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, "VARIANT_PACK_WORKSPACE", CUDNN_TYPE_VOID_PTR,
               1, &cudnn_ws);
    Graph::finalize(vp, "VARIANT_PACK");
    MF_CUDNN(bwd ? "cudnnBackendExecute(attention backward)" : "cudnnBackendExecute(attention forward)",
             cudnnBackendExecute(handle, p.graph->plan(), vp));
  }
};

CudnnAttention::CudnnAttention(cudaStream_t stream) : impl_(std::make_unique<Impl>(stream)) {}
CudnnAttention::~CudnnAttention() = default;

bool CudnnAttention::compiled() { return true; }
int64_t CudnnAttention::runtime_version() { return int64_t(cudnnGetVersion()); }

void CudnnAttention::prepare(const AttnShape& s) {
  contract::attention_shape("cudnn attention", s);
  impl_->plan(s, false);
  impl_->plan(s, true);
}

// The graphs declare 16-byte aligned tensors (TENSOR_BYTE_ALIGNMENT); a less aligned pointer
// would fault on the device, asynchronously, so it is refused here.
static void check_cudnn_aligned(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> ts) {
  for (const auto& [name, t] : ts)
    MF_CHECK(aligned16(t->ptr), op, ": ", name, " is not 16-byte aligned (", t->ptr,
             "), which the cuDNN graph assumes");
}

void CudnnAttention::fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                         Tensor& lse, const AttnShape& s) {
  const char* op = "attention_fwd (cuDNN)";
  contract::attention_fwd(contract::kCuda, op, q, k, v, out, lse, s);
  check_dtype(op, "q", q, DType::BF16);
  check_cudnn_aligned(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
  auto& p = impl_->plan(s, false);
  float scale = s.scale, neg_inf = std::numeric_limits<float>::lowest();
  impl_->execute(p, {kQ, kK, kV, kO, kStats, kScale, kNegInf},
                 {q.ptr, k.ptr, v.ptr, out.ptr, lse.ptr, &scale, &neg_inf}, s, false);
}

void CudnnAttention::bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& out, const Tensor& lse, Tensor& dq, Tensor& dk, Tensor& dv,
                         const AttnShape& s) {
  const char* op = "attention_bwd (cuDNN)";
  contract::attention_bwd(contract::kCuda, op, dout, q, k, v, out, lse, dq, dk, dv, s);
  check_dtype(op, "q", q, DType::BF16);
  check_cudnn_aligned(op, {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out},
                           {"lse", &lse}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}});
  auto& p = impl_->plan(s, true);
  float scale = s.scale, neg_inf = std::numeric_limits<float>::lowest(), one = 1.f;
  impl_->execute(p, {kQ, kK, kV, kO, kDO, kStats, kDQ, kDK, kDV, kScale, kNegInf, kOne},
                 {q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr, dv.ptr, &scale,
                  &neg_inf, &one},
                 s, true);
}

std::string CudnnAttention::plan_info(const AttnShape& s) const {
  std::string r;
  for (bool bwd : {false, true}) {
    auto it = impl_->plans.find(Impl::key_of(s, bwd));
    if (it == impl_->plans.end()) continue;
    const auto& p = *it->second;
    r += ::mf::detail::cat(r.empty() ? "" : ", ", bwd ? "bwd" : "fwd", " engine ", p.graph->engine(),
                     " (workspace ", (p.cudnn_ws + p.extra) >> 20, " MiB)");
  }
  return r.empty() ? "no plans" : r;
}

size_t CudnnAttention::workspace_bytes() const { return impl_->ws.capacity(); }
void CudnnAttention::release_workspace() { impl_->ws.release(); }

#undef MF_CUDNN

#else  // !MF_HAS_CUDNN: the class exists so callers compile; using it is a clear error.

struct CudnnAttention::Impl {};

namespace {
[[noreturn]] void no_cudnn() {
  MF_FAIL("this build has no cuDNN (CMake did not find cudnn.h / libcudnn; set CUDNN_ROOT and "
          "re-configure), so model.attention = \"cudnn\" is unavailable; use \"flash\"");
}
}  // namespace

CudnnAttention::CudnnAttention(cudaStream_t) { no_cudnn(); }
CudnnAttention::~CudnnAttention() = default;
bool CudnnAttention::compiled() { return false; }
int64_t CudnnAttention::runtime_version() { return 0; }
void CudnnAttention::prepare(const AttnShape&) { no_cudnn(); }
void CudnnAttention::fwd(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&,
                         const AttnShape&) {
  no_cudnn();
}
void CudnnAttention::bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, Tensor&, Tensor&, Tensor&,
                         const AttnShape&) {
  no_cudnn();
}
std::string CudnnAttention::plan_info(const AttnShape&) const { return "no cuDNN"; }
size_t CudnnAttention::workspace_bytes() const { return 0; }
void CudnnAttention::release_workspace() {}

#endif  // MF_HAS_CUDNN

// ================================================================================================
// AttentionDispatch
// ================================================================================================

AttentionDispatch::~AttentionDispatch() = default;

void AttentionDispatch::set_mode(const std::string& mode) {
  MF_CHECK(mode == "flash" || mode == "cudnn" || mode == "auto", "model.attention = \"", mode,
           "\": expected one of flash|cudnn|auto");
  if (mode == "cudnn" && !CudnnAttention::compiled())
    MF_FAIL("model.attention = \"cudnn\" but this build has no cuDNN (CMake did not find "
            "cudnn.h / libcudnn; set CUDNN_ROOT and re-configure); use \"flash\" or \"auto\"");
  if (mode == "auto" && !CudnnAttention::compiled())
    spdlog::info("model.attention = \"auto\": this build has no cuDNN, using flash attention");
  if (mode != mode_) cudnn_for_.clear();
  mode_ = mode;
}

std::string AttentionDispatch::choice(const AttnShape& s) const {
  auto it = cudnn_for_.find(key_of(s));
  if (it == cudnn_for_.end()) return "";
  return it->second ? "cudnn" : "flash";
}

CudnnAttention& AttentionDispatch::cudnn() {
  if (!cudnn_) cudnn_ = std::make_unique<CudnnAttention>(ctx_->stream);
  return *cudnn_;
}

namespace {

// Device buffer for the auto-selection timing (freed at scope end, after the stream drains).
struct DevBuf {
  void* p = nullptr;
  explicit DevBuf(size_t bytes) { CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 256))); }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

Tensor view(void* p, const Shape& s, DType t) {
  Tensor x;
  x.ptr = p;
  x.shape = s;
  x.dtype = t;
  x.device = Device::CUDA;
  return x;
}

// A device tensor (bf16 or f32) as host floats; the stream is drained first.
std::vector<float> host_floats(const Tensor& t, cudaStream_t stream) {
  CUDA_CHECK(cudaStreamSynchronize(stream));
  const size_t n = size_t(t.numel());
  std::vector<float> f(n);
  if (t.dtype == DType::F32) {
    CUDA_CHECK(cudaMemcpy(f.data(), t.ptr, n * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<uint16_t> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), t.ptr, n * 2, cudaMemcpyDeviceToHost));
    bf16_to_f32(h.data(), f.data(), n);
  }
  return f;
}

}  // namespace

// Runs flash and cuDNN (fwd + bwd) on scratch outputs, reading the caller's q, k, v (q doubles
// as dout): once each to compare their outputs, then timed. Returns true when cuDNN agrees with
// flash and is faster; any cuDNN failure or disagreement means flash.
bool AttentionDispatch::autotune(const AttnShape& s, const Tensor& q, const Tensor& k,
                                 const Tensor& v) {
  const std::string shape = shape_text(s);
  if (!CudnnAttention::compiled()) return false;
  try {
    cudnn().prepare(s);
  } catch (const Error& e) {
    spdlog::warn("model.attention = \"auto\": cuDNN cannot run attention {}; using flash ({})",
                 shape, e.what());
    return false;
  }
  const size_t qn = size_t(q.numel()), kn = size_t(k.numel());
  const size_t rows = size_t(s.B) * s.H * s.T;
  // The trial's own outputs, next to the run's activations: memory they cannot get means flash,
  // not a failed run.
  struct Bufs {
    DevBuf out, lse, dq, dk, dv;
  };
  std::unique_ptr<Bufs> b;
  try {
    b.reset(new Bufs{DevBuf(qn * 2), DevBuf(rows * 4), DevBuf(qn * 2), DevBuf(kn * 2), DevBuf(kn * 2)});
  } catch (const Error& e) {
    cudaGetLastError();  // an out-of-memory is not sticky
    spdlog::warn("model.attention = \"auto\": no memory to try cuDNN attention {}; using flash ({})",
                 shape, e.what());
    return false;
  }
  Tensor to = view(b->out.p, q.shape, DType::BF16), tl = view(b->lse.p, {s.B, s.H, s.T}, DType::F32);
  Tensor tdq = view(b->dq.p, q.shape, DType::BF16), tdk = view(b->dk.p, k.shape, DType::BF16),
         tdv = view(b->dv.p, k.shape, DType::BF16);
  // After a failed cuDNN call: a fault on the device (a sticky error) leaves the context unusable,
  // so flash cannot take over; say so instead of reporting a fallback that would fail next.
  auto context_intact = [&](const std::string& what) {
    const cudaError_t e = cudaStreamSynchronize(ctx_->stream);
    if (e != cudaSuccess)
      MF_FAIL("cuDNN attention ", shape, " broke the CUDA context (", cudaGetErrorString(e),
              ") after: ", what, "; rerun with model.attention = \"flash\" and please report it "
              "with the cuDNN version (", CudnnAttention::runtime_version(), ")");
  };
  // First the same fwd + bwd through both paths, read back and compared: cuDNN is only a
  // candidate when it computes what flash computes (attention_check.h).
  auto outputs = [&] {
    AttnOutputs o;
    o.out = host_floats(to, ctx_->stream);
    o.lse = host_floats(tl, ctx_->stream);
    o.dq = host_floats(tdq, ctx_->stream);
    o.dk = host_floats(tdk, ctx_->stream);
    o.dv = host_floats(tdv, ctx_->stream);
    return o;
  };
  std::string disagree;
  try {
    op_attention_fwd(*ctx_, q, k, v, to, tl, s);
    op_attention_bwd(*ctx_, q, q, k, v, to, tl, tdq, tdk, tdv, s);
    const AttnOutputs flash = outputs();
    cudnn_->fwd(q, k, v, to, tl, s);
    cudnn_->bwd(q, q, k, v, to, tl, tdq, tdk, tdv, s);
    disagree = attention_disagreement(flash, outputs());
  } catch (const Error& e) {
    context_intact(e.what());
    spdlog::warn("model.attention = \"auto\": cuDNN attention {} failed; using flash ({})",
                 shape, e.what());
    return false;
  }
  if (!disagree.empty()) {
    spdlog::warn("model.attention = \"auto\": cuDNN attention {} disagrees with flash on the same "
                 "inputs ({}); using flash. Please report it with the cuDNN version ({}).",
                 shape, disagree, CudnnAttention::runtime_version());
    return false;
  }
  struct Events {
    cudaEvent_t t0 = nullptr, t1 = nullptr;
    Events() {
      CUDA_CHECK(cudaEventCreate(&t0));
      const cudaError_t e = cudaEventCreate(&t1);
      if (e != cudaSuccess) cudaEventDestroy(t0);  // no destructor for a half-built object
      CUDA_CHECK(e);
    }
    ~Events() {
      if (t0) cudaEventDestroy(t0);
      if (t1) cudaEventDestroy(t1);
    }
  };
  std::unique_ptr<Events> ev;
  try {
    ev = std::make_unique<Events>();
  } catch (const Error& e) {
    spdlog::warn("model.attention = \"auto\": cannot time attention {}; using flash ({})", shape,
                 e.what());
    return false;
  }
  const cudaEvent_t t0 = ev->t0, t1 = ev->t1;
  constexpr int kWarmup = 2, kIters = 5;
  auto time_ms = [&](bool use_cudnn) {
    auto step = [&] {
      if (use_cudnn) {
        cudnn_->fwd(q, k, v, to, tl, s);
        cudnn_->bwd(q, q, k, v, to, tl, tdq, tdk, tdv, s);
      } else {
        op_attention_fwd(*ctx_, q, k, v, to, tl, s);
        op_attention_bwd(*ctx_, q, q, k, v, to, tl, tdq, tdk, tdv, s);
      }
    };
    for (int i = 0; i < kWarmup; ++i) step();
    CUDA_CHECK(cudaEventRecord(t0, ctx_->stream));
    for (int i = 0; i < kIters; ++i) step();
    CUDA_CHECK(cudaEventRecord(t1, ctx_->stream));
    CUDA_CHECK(cudaEventSynchronize(t1));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
    return double(ms) / kIters;
  };
  double flash_ms = 0, cudnn_ms = 0;
  bool cudnn_ok = true;
  std::string err;
  try {
    flash_ms = time_ms(false);
    try {
      cudnn_ms = time_ms(true);
    } catch (const Error& e) {
      cudnn_ok = false;
      err = e.what();
      context_intact(err);
    }
  } catch (...) {
    cudaStreamSynchronize(ctx_->stream);  // the scratch buffers and events go away at return
    throw;
  }
  cudaStreamSynchronize(ctx_->stream);
  if (!cudnn_ok) {
    spdlog::warn("model.attention = \"auto\": cuDNN attention {} failed while timing; using flash "
                 "({})",
                 shape, err);
    return false;
  }
  const bool pick = cudnn_ms < flash_ms;
  spdlog::info("attention {}: fwd+bwd flash {:.3f} ms, cuDNN {:.3f} ms ({}) -> {}", shape,
               flash_ms, cudnn_ms, cudnn_->plan_info(s), pick ? "cuDNN" : "flash");
  return pick;
}

bool AttentionDispatch::use_cudnn(const AttnShape& s, const Tensor& q, const Tensor& k,
                                  const Tensor& v) {
  if (mode_ == "flash") return false;
  auto it = cudnn_for_.find(key_of(s));
  bool pick;
  if (it != cudnn_for_.end()) {
    pick = it->second;
  } else {
    if (mode_ == "cudnn") {
      try {
        cudnn().prepare(s);
      } catch (const Error& e) {
        MF_FAIL("model.attention = \"cudnn\": ", e.what());
      }
      spdlog::info("attention {}: cuDNN ({})", shape_text(s), cudnn_->plan_info(s));
      pick = true;
    } else {
      contract::attention_shape("attention", s);
      pick = autotune(s, q, k, v);
    }
    cudnn_for_[key_of(s)] = pick;
    if (!pick && cudnn_ && std::none_of(cudnn_for_.begin(), cudnn_for_.end(),
                                        [](const auto& kv) { return kv.second; }))
      cudnn_->release_workspace();  // the trial's workspace, on a run that uses flash only
  }
  return pick;
}

namespace {
bool all_aligned(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (!aligned16(t->ptr)) return false;
  return true;
}
}  // namespace

void AttentionDispatch::fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                            Tensor& lse, const AttnShape& s) {
  if (use_cudnn(s, q, k, v)) {
    if (all_aligned({&q, &k, &v, &out, &lse})) return cudnn_->fwd(q, k, v, out, lse, s);
    if (!warned_unaligned_)
      spdlog::warn("cuDNN attention needs 16-byte aligned tensors; this call uses flash");
    warned_unaligned_ = true;
  }
  op_attention_fwd(*ctx_, q, k, v, out, lse, s);
}

void AttentionDispatch::bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& out, const Tensor& lse, Tensor& dq, Tensor& dk,
                            Tensor& dv, const AttnShape& s) {
  // lse is the same natural-log log-sum-exp on both paths, so either backward follows either
  // forward.
  if (use_cudnn(s, q, k, v)) {
    if (all_aligned({&dout, &q, &k, &v, &out, &lse, &dq, &dk, &dv}))
      return cudnn_->bwd(dout, q, k, v, out, lse, dq, dk, dv, s);
    if (!warned_unaligned_)
      spdlog::warn("cuDNN attention needs 16-byte aligned tensors; this call uses flash");
    warned_unaligned_ = true;
  }
  op_attention_bwd(*ctx_, dout, q, k, v, out, lse, dq, dk, dv, s);
}

}  // namespace mf::cuda
