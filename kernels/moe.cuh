// Mixture-of-Experts ops: router (scores, top-k, combine weights, counts, score sums) and its
// backward, the permutation plan, gather / gather backward, combine forward / backward.
// The contracts are the moe_* comments of src/backend/backend.h; the math is
// src/backend/cpu/ref_moe.h. Everything is deterministic: no float atomics (the only atomics are
// integer histogram increments), every output row has one owner that sums in a fixed order.
#pragma once
#include "backend/backend.h"
#include "common.cuh"

#include <vector>

namespace mf::cuda {

// Largest expert count the router kernel handles (one warp per token keeps a 64-bit "taken"
// mask per lane: 32 x 64 experts).
constexpr int kMoeMaxExperts = 2048;

// probs f32 [N,E] (=) score(x Wr^T) (fp32 GEMM: a bf16 x is widened to f32 in scratch);
// topk_idx i32 [N,k], topk_w f32 [N,k], counts i32 [E], score_sum f32 [E]. x f32/bf16 [.., d],
// Wr f32 [E,d], bias f32 [E] or nullptr (selection only).
void op_moe_router_fwd(const Ctx& ctx, const Tensor& x, const Tensor& Wr, const Tensor* bias,
                       const MoeRouterArgs& a, Tensor& probs, Tensor& topk_idx, Tensor& topk_w,
                       Tensor& counts, Tensor& score_sum);
// dlogits f32 [N,E] (=); dx (f32/bf16, shape of x) (+=) dlogits Wr; dWr f32 [E,d] (+=) dlogits^T x.
void op_moe_router_bwd(const Ctx& ctx, const Tensor& dtopk_w, const Tensor* aux_grad,
                       const Tensor& x, const Tensor& Wr, const Tensor& probs,
                       const Tensor& topk_idx, const MoeRouterArgs& a, Tensor& dlogits,
                       Tensor& dx, Tensor& dWr);
// Plan: offsets i32 [E+1], row_of i32 [N,k], row_token i32 [N*k]. Counting sort: histogram,
// scan with the capacity clamp, then a stable sort of the slots by expert places each slot in
// token order.
// A topk_idx entry outside [0,E) is treated as dropped (row_of -1); the kernel cannot throw.
void op_moe_permute(const Ctx& ctx, const Tensor& topk_idx, int E, int64_t capacity,
                    Tensor& offsets, Tensor& row_of, Tensor& row_token);
// xg[r,:] (=) x[row_token[r],:], r < M = rows of xg. A token outside [0,N) gives a NaN row.
void op_moe_gather(const Ctx& ctx, const Tensor& x, const Tensor& row_token, Tensor& xg);
// dx[n,:] (+=) sum_j dxg[row_of[n,j],:], j in order (row -1 or >= rows of dxg: skipped).
void op_moe_gather_bwd(const Ctx& ctx, const Tensor& dxg, const Tensor& row_of, Tensor& dx);
// out[n,:] (= / +=) sum_j topk_w[n,j] yg[row_of[n,j],:], j in order.
void op_moe_combine_fwd(const Ctx& ctx, const Tensor& yg, const Tensor& topk_w,
                        const Tensor& row_of, Tensor& out, bool accumulate);
// dyg[row_of[n,j],:] (=) topk_w[n,j] dout[n,:];  dtopk_w[n,j] (=) dout[n,:] . yg[row_of[n,j],:]
// (0 for dropped slots; the dot in double).
void op_moe_combine_bwd(const Ctx& ctx, const Tensor& dout, const Tensor& yg,
                        const Tensor& topk_w, const Tensor& row_of, Tensor& dyg,
                        Tensor& dtopk_w);


// Grouped expert GEMMs (kernels/moe_gemm.cu), the contract of Backend::moe_expert_fwd/bwd with
// bf16 x, dy, y, dx and W, f32 dW. w_table / dw_table: device arrays holding the E expert
// pointers of W / dW in order (CudaBackend keeps one per list). Offsets are read on the device;
// a plan outside [0, rows] is clamped rather than trusted.
void op_moe_expert_fwd(const Ctx& ctx, const Tensor& x, const std::vector<const Tensor*>& W,
                       const void* const* w_table, const Tensor& offsets, Tensor& y);
void op_moe_expert_bwd(const Ctx& ctx, const Tensor& dy, const Tensor& x,
                       const std::vector<const Tensor*>& W, const void* const* w_table,
                       const Tensor& offsets, Tensor* dx, const std::vector<Tensor*>* dW,
                       void* const* dw_table, bool accumulate_dx);

}  // namespace mf::cuda
