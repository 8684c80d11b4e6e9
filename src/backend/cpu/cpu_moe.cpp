// CpuBackend: the Mixture-of-Experts ops. Each method checks its arguments (dtype, device,
// shapes, index ranges; the message names the op, the tensor and the shapes) and calls the float
// instantiation of the math in ref_moe.h, which the tests also run in double.
#include <cstdint>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_moe.h"

namespace mf {

namespace {

std::string desc(const char* name, const Tensor& t) {
  return std::string(name) + " " + shape_str(t.shape) + " " + dtype_name(t.dtype);
}

void check_t(const char* op, const char* name, const Tensor& t, DType want) {
  MF_CHECK(t.defined() || t.numel() == 0, op, ": ", name, " is not allocated");
  MF_CHECK(t.device == Device::CPU, op, ": ", name, " lives on the GPU but the backend is cpu");
  MF_CHECK(t.dtype == want, op, ": ", desc(name, t), " has the wrong dtype, expected ",
           dtype_name(want));
}

// t must be [rows, cols], or [cols] when rows == 1.
void check_mat(const char* op, const char* name, const Tensor& t, int64_t rows, int64_t cols,
               const std::string& what) {
  const bool ok = (t.ndim() == 2 && t.dim(0) == rows && t.dim(1) == cols) ||
                  (t.ndim() == 1 && rows == 1 && t.dim(0) == cols);
  MF_CHECK(ok, op, ": ", desc(name, t), " must be [", rows, ",", cols, "] (", what, ")");
}

void check_args(const char* op, const MoeRouterArgs& a) {
  MF_CHECK(a.E > 0 && a.k > 0 && a.k <= a.E, op, ": top_k ", a.k, " and n_experts ", a.E,
           " must satisfy 0 < top_k <= n_experts (model.moe)");
  MF_CHECK(a.route_scale > 0.f, op, ": route_scale ", a.route_scale,
           " must be positive (model.moe.route_scale)");
}

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
  const char* op = "moe_router_fwd";
  check_args(op, a);
  check_t(op, "x", x, DType::F32);
  check_t(op, "Wr", Wr, DType::F32);
  MF_CHECK(Wr.ndim() == 2 && Wr.dim(0) == a.E, op, ": ", desc("Wr", Wr), " must be [", a.E,
           ",d] (n_experts x d_model)");
  const int64_t d = Wr.dim(1);
  MF_CHECK(x.ndim() >= 1 && x.dim(-1) == d, op, ": ", desc("x", x), " must have last dim ", d,
           " to match ", desc("Wr", Wr));
  const int64_t N = x.numel() / d;
  if (bias) {
    check_t(op, "bias", *bias, DType::F32);
    check_mat(op, "bias", *bias, 1, a.E, "one per expert");
  }
  check_t(op, "probs", probs, DType::F32);
  check_mat(op, "probs", probs, N, a.E, "tokens x experts");
  check_t(op, "topk_idx", topk_idx, DType::I32);
  check_mat(op, "topk_idx", topk_idx, N, a.k, "tokens x top_k");
  check_t(op, "topk_w", topk_w, DType::F32);
  check_mat(op, "topk_w", topk_w, N, a.k, "tokens x top_k");
  check_t(op, "counts", counts, DType::I32);
  check_mat(op, "counts", counts, 1, a.E, "one per expert");
  check_t(op, "score_sum", score_sum, DType::F32);
  check_mat(op, "score_sum", score_sum, 1, a.E, "one per expert");
  ref::moe_router_fwd(x.f32(), Wr.f32(), bias ? bias->f32() : nullptr, N, d, route_of(a),
                      probs.f32(), topk_idx.i32(), topk_w.f32(), counts.i32(), score_sum.f32());
}

void CpuBackend::moe_router_bwd(const Tensor& dtopk_w, const Tensor* aux_grad, const Tensor& x,
                                const Tensor& Wr, const Tensor& probs, const Tensor& topk_idx,
                                const MoeRouterArgs& a, Tensor& dlogits, Tensor& dx,
                                Tensor& dWr) {
  const char* op = "moe_router_bwd";
  check_args(op, a);
  check_t(op, "x", x, DType::F32);
  check_t(op, "Wr", Wr, DType::F32);
  MF_CHECK(Wr.ndim() == 2 && Wr.dim(0) == a.E, op, ": ", desc("Wr", Wr), " must be [", a.E,
           ",d] (n_experts x d_model)");
  const int64_t d = Wr.dim(1);
  MF_CHECK(x.ndim() >= 1 && x.dim(-1) == d, op, ": ", desc("x", x), " must have last dim ", d,
           " to match ", desc("Wr", Wr));
  const int64_t N = x.numel() / d;
  check_t(op, "dtopk_w", dtopk_w, DType::F32);
  check_mat(op, "dtopk_w", dtopk_w, N, a.k, "tokens x top_k");
  if (aux_grad) {
    check_t(op, "aux_grad", *aux_grad, DType::F32);
    check_mat(op, "aux_grad", *aux_grad, 1, a.E, "one per expert");
  }
  check_t(op, "probs", probs, DType::F32);
  check_mat(op, "probs", probs, N, a.E, "tokens x experts");
  check_t(op, "topk_idx", topk_idx, DType::I32);
  check_mat(op, "topk_idx", topk_idx, N, a.k, "tokens x top_k");
  for (int64_t i = 0; i < topk_idx.numel(); ++i)
    MF_CHECK(topk_idx.i32()[i] >= 0 && topk_idx.i32()[i] < a.E, op, ": topk_idx[", i, "] = ",
             topk_idx.i32()[i], " is outside [0, ", a.E, ")");
  check_t(op, "dlogits", dlogits, DType::F32);
  check_mat(op, "dlogits", dlogits, N, a.E, "tokens x experts");
  check_t(op, "dx", dx, DType::F32);
  MF_CHECK(dx.shape == x.shape, op, ": ", desc("dx", dx), " must have the shape of ", desc("x", x));
  check_t(op, "dWr", dWr, DType::F32);
  MF_CHECK(dWr.shape == Wr.shape, op, ": ", desc("dWr", dWr), " must have the shape of ",
           desc("Wr", Wr));
  ref::moe_router_bwd(dtopk_w.f32(), aux_grad ? aux_grad->f32() : nullptr, x.f32(), Wr.f32(),
                      probs.f32(), topk_idx.i32(), N, d, route_of(a), dlogits.f32(), dx.f32(),
                      dWr.f32());
}

void CpuBackend::moe_permute(const Tensor& topk_idx, int E, int64_t capacity, Tensor& offsets,
                             Tensor& row_of, Tensor& row_token) {
  const char* op = "moe_permute";
  MF_CHECK(E > 0, op, ": n_experts ", E, " must be positive (model.moe.n_experts)");
  check_t(op, "topk_idx", topk_idx, DType::I32);
  MF_CHECK(topk_idx.ndim() == 2, op, ": ", desc("topk_idx", topk_idx), " must be [N,k]");
  const int64_t N = topk_idx.dim(0), k = topk_idx.dim(1);
  for (int64_t i = 0; i < topk_idx.numel(); ++i)
    MF_CHECK(topk_idx.i32()[i] >= 0 && topk_idx.i32()[i] < E, op, ": topk_idx[", i, "] = ",
             topk_idx.i32()[i], " is outside [0, ", E, ")");
  check_t(op, "offsets", offsets, DType::I32);
  check_mat(op, "offsets", offsets, 1, E + 1, "n_experts + 1");
  check_t(op, "row_of", row_of, DType::I32);
  MF_CHECK(row_of.shape == topk_idx.shape, op, ": ", desc("row_of", row_of),
           " must have the shape of ", desc("topk_idx", topk_idx));
  check_t(op, "row_token", row_token, DType::I32);
  MF_CHECK(row_token.numel() == N * k, op, ": ", desc("row_token", row_token), " must have ",
           N * k, " elements (N * top_k)");
  ref::moe_permute(topk_idx.i32(), N, k, E, capacity, offsets.i32(), row_of.i32(),
                   row_token.i32());
}

void CpuBackend::moe_gather(const Tensor& x, const Tensor& row_token, Tensor& xg) {
  const char* op = "moe_gather";
  check_t(op, "x", x, DType::F32);
  check_t(op, "xg", xg, DType::F32);
  check_t(op, "row_token", row_token, DType::I32);
  MF_CHECK(x.ndim() == 2 && xg.ndim() == 2 && xg.dim(1) == x.dim(1), op, ": ", desc("xg", xg),
           " and ", desc("x", x), " must be matrices of the same width");
  const int64_t M = xg.dim(0), N = x.dim(0), d = x.dim(1);
  MF_CHECK(row_token.numel() >= M, op, ": ", desc("row_token", row_token),
           " has fewer entries than the ", M, " rows of xg");
  for (int64_t r = 0; r < M; ++r)
    MF_CHECK(row_token.i32()[r] >= -1 && row_token.i32()[r] < N, op, ": row_token[", r, "] = ",
             row_token.i32()[r], " is outside [-1, ", N, ")");
  ref::moe_gather(x.f32(), row_token.i32(), M, d, xg.f32());
}

void CpuBackend::moe_gather_bwd(const Tensor& dxg, const Tensor& row_of, Tensor& dx) {
  const char* op = "moe_gather_bwd";
  check_t(op, "dxg", dxg, DType::F32);
  check_t(op, "dx", dx, DType::F32);
  check_t(op, "row_of", row_of, DType::I32);
  MF_CHECK(dx.ndim() == 2 && dxg.ndim() == 2 && dxg.dim(1) == dx.dim(1), op, ": ",
           desc("dxg", dxg), " and ", desc("dx", dx), " must be matrices of the same width");
  MF_CHECK(row_of.ndim() == 2 && row_of.dim(0) == dx.dim(0), op, ": ", desc("row_of", row_of),
           " must be [N,k] with N = ", dx.dim(0), " (rows of dx)");
  check_rows(op, row_of, dxg.dim(0));
  ref::moe_gather_bwd(dxg.f32(), row_of.i32(), dx.dim(0), row_of.dim(1), dx.dim(1), dx.f32());
}

void CpuBackend::moe_combine_fwd(const Tensor& yg, const Tensor& topk_w, const Tensor& row_of,
                                 Tensor& out, bool accumulate) {
  const char* op = "moe_combine_fwd";
  check_t(op, "yg", yg, DType::F32);
  check_t(op, "topk_w", topk_w, DType::F32);
  check_t(op, "row_of", row_of, DType::I32);
  check_t(op, "out", out, DType::F32);
  MF_CHECK(out.ndim() == 2 && yg.ndim() == 2 && yg.dim(1) == out.dim(1), op, ": ",
           desc("yg", yg), " and ", desc("out", out), " must be matrices of the same width");
  MF_CHECK(row_of.ndim() == 2 && row_of.dim(0) == out.dim(0), op, ": ", desc("row_of", row_of),
           " must be [N,k] with N = ", out.dim(0), " (rows of out)");
  MF_CHECK(topk_w.shape == row_of.shape, op, ": ", desc("topk_w", topk_w),
           " must have the shape of ", desc("row_of", row_of));
  check_rows(op, row_of, yg.dim(0));
  ref::moe_combine_fwd(yg.f32(), topk_w.f32(), row_of.i32(), out.dim(0), row_of.dim(1),
                       out.dim(1), out.f32(), accumulate);
}

void CpuBackend::moe_combine_bwd(const Tensor& dout, const Tensor& yg, const Tensor& topk_w,
                                 const Tensor& row_of, Tensor& dyg, Tensor& dtopk_w) {
  const char* op = "moe_combine_bwd";
  check_t(op, "dout", dout, DType::F32);
  check_t(op, "yg", yg, DType::F32);
  check_t(op, "topk_w", topk_w, DType::F32);
  check_t(op, "row_of", row_of, DType::I32);
  check_t(op, "dyg", dyg, DType::F32);
  check_t(op, "dtopk_w", dtopk_w, DType::F32);
  MF_CHECK(dout.ndim() == 2 && yg.ndim() == 2 && yg.dim(1) == dout.dim(1), op, ": ",
           desc("yg", yg), " and ", desc("dout", dout), " must be matrices of the same width");
  MF_CHECK(dyg.shape == yg.shape, op, ": ", desc("dyg", dyg), " must have the shape of ",
           desc("yg", yg));
  MF_CHECK(row_of.ndim() == 2 && row_of.dim(0) == dout.dim(0), op, ": ",
           desc("row_of", row_of), " must be [N,k] with N = ", dout.dim(0), " (rows of dout)");
  MF_CHECK(topk_w.shape == row_of.shape && dtopk_w.shape == row_of.shape, op, ": ",
           desc("topk_w", topk_w), " and ", desc("dtopk_w", dtopk_w),
           " must have the shape of ", desc("row_of", row_of));
  check_rows(op, row_of, yg.dim(0));
  ref::moe_combine_bwd(dout.f32(), yg.f32(), topk_w.f32(), row_of.i32(), dout.dim(0),
                       row_of.dim(1), dout.dim(1), dyg.f32(), dtopk_w.f32());
}

}  // namespace mf
