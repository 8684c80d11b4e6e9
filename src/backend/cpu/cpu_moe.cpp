// CpuBackend: the Mixture-of-Experts ops. Each method checks its arguments against the op's
// contract (backend/op_contract.h, shared with the CUDA kernels) and the index ranges it reads,
// and calls the float instantiation of the math in ref_moe.h, which the tests also run in double.
#include <cstdint>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_moe.h"
#include "backend/op_contract.h"

namespace mf {

namespace {

constexpr const contract::Where& kHere = contract::kCpu;

// Every slot's expert in [0, E) (the reference indexes with them).
void check_experts(const char* op, const Tensor& topk_idx, int E) {
  const int32_t* p = topk_idx.i32();
  for (int64_t i = 0; i < topk_idx.numel(); ++i)
    MF_CHECK(p[i] >= 0 && p[i] < E, op, ": topk_idx[", i, "] = ", p[i], " is outside [0, ", E,
             ")");
}

// Every row index in [-1, M) (-1: a slot dropped by the capacity).
void check_rows(const char* op, const Tensor& row_of, int64_t M) {
  const int32_t* r = row_of.i32();
  for (int64_t i = 0; i < row_of.numel(); ++i)
    MF_CHECK(r[i] >= -1 && r[i] < M, op, ": row_of[", i, "] = ", r[i], " is outside [-1, ", M,
             ") (rows of the expert-sorted tensor)");
}

ref::MoeRoute route_of(const MoeRouterArgs& a) {
  return {a.E, a.k, a.sigmoid, a.norm_topk, double(a.route_scale)};
}

}  // namespace

void CpuBackend::moe_router_fwd(const Tensor& x, const Tensor& Wr, const Tensor* bias,
                                const MoeRouterArgs& a, Tensor& probs, Tensor& topk_idx,
                                Tensor& topk_w, Tensor& counts, Tensor& score_sum) {
  const auto r = contract::moe_router_fwd(kHere, x, Wr, bias, a, probs, topk_idx, topk_w, counts,
                                          score_sum);
  ref::moe_router_fwd(x.f32(), Wr.f32(), bias ? bias->f32() : nullptr, r.N, r.d, route_of(a),
                      probs.f32(), topk_idx.i32(), topk_w.f32(), counts.i32(), score_sum.f32());
}

void CpuBackend::moe_router_bwd(const Tensor& dtopk_w, const Tensor* aux_grad, const Tensor& x,
                                const Tensor& Wr, const Tensor& probs, const Tensor& topk_idx,
                                const MoeRouterArgs& a, Tensor& dlogits, Tensor& dx,
                                Tensor& dWr) {
  const auto r = contract::moe_router_bwd(kHere, dtopk_w, aux_grad, x, Wr, probs, topk_idx, a,
                                          dlogits, dx, dWr);
  check_experts("moe_router_bwd", topk_idx, a.E);
  ref::moe_router_bwd(dtopk_w.f32(), aux_grad ? aux_grad->f32() : nullptr, x.f32(), Wr.f32(),
                      probs.f32(), topk_idx.i32(), r.N, r.d, route_of(a), dlogits.f32(), dx.f32(),
                      dWr.f32());
}

void CpuBackend::moe_permute(const Tensor& topk_idx, int E, int64_t capacity, Tensor& offsets,
                             Tensor& row_of, Tensor& row_token) {
  const auto [N, k] = contract::moe_permute(kHere, topk_idx, E, offsets, row_of, row_token);
  check_experts("moe_permute", topk_idx, E);
  ref::moe_permute(topk_idx.i32(), N, k, E, capacity, offsets.i32(), row_of.i32(),
                   row_token.i32());
}

void CpuBackend::moe_gather(const Tensor& x, const Tensor& row_token, Tensor& xg) {
  contract::moe_gather(kHere, x, row_token, xg);
  const int64_t M = xg.dim(0), N = x.dim(0);
  for (int64_t r = 0; r < M; ++r)
    MF_CHECK(row_token.i32()[r] >= -1 && row_token.i32()[r] < N, "moe_gather: row_token[", r,
             "] = ", row_token.i32()[r], " is outside [-1, ", N, ")");
  ref::moe_gather(x.f32(), row_token.i32(), M, x.dim(1), xg.f32());
}

void CpuBackend::moe_gather_bwd(const Tensor& dxg, const Tensor& row_of, Tensor& dx) {
  contract::moe_gather_bwd(kHere, dxg, row_of, dx);
  check_rows("moe_gather_bwd", row_of, dxg.dim(0));
  ref::moe_gather_bwd(dxg.f32(), row_of.i32(), dx.dim(0), row_of.dim(1), dx.dim(1), dx.f32());
}

void CpuBackend::moe_combine_fwd(const Tensor& yg, const Tensor& topk_w, const Tensor& row_of,
                                 Tensor& out, bool accumulate) {
  contract::moe_combine_fwd(kHere, yg, topk_w, row_of, out);
  check_rows("moe_combine_fwd", row_of, yg.dim(0));
  ref::moe_combine_fwd(yg.f32(), topk_w.f32(), row_of.i32(), out.dim(0), row_of.dim(1),
                       out.dim(1), out.f32(), accumulate);
}

void CpuBackend::moe_combine_bwd(const Tensor& dout, const Tensor& yg, const Tensor& topk_w,
                                 const Tensor& row_of, Tensor& dyg, Tensor& dtopk_w) {
  contract::moe_combine_bwd(kHere, dout, yg, topk_w, row_of, dyg, dtopk_w);
  check_rows("moe_combine_bwd", row_of, yg.dim(0));
  ref::moe_combine_bwd(dout.f32(), yg.f32(), topk_w.f32(), row_of.i32(), dout.dim(0),
                       row_of.dim(1), dout.dim(1), dyg.f32(), dtopk_w.f32());
}

}  // namespace mf
