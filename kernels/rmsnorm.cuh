// Fused residual add + RMSNorm forward, and the RMSNorm backward.
#pragma once
#include "common.cuh"

namespace mf::cuda {

// resid_out (=) resid_in (+ branch) (stored in the activation dtype; resid_out may alias
// resid_in); rstd f32 [N] (=) rsqrt(mean(resid_out^2) + eps) of the stored values;
// y (=) resid_out * rstd * w.  resid_in, branch, resid_out, y [N,d] one dtype; w [d] f32/bf16.
void op_add_rmsnorm_fwd(const Ctx& ctx, const Tensor& resid_in, const Tensor* branch,
                        Tensor& resid_out, const Tensor& w, float eps, Tensor& y, Tensor& rstd);
// dx (+=) rstd * (w dy - x * rstd^2 * mean(w dy x));  dw f32 (+=) sum_n dy x rstd.
// dw is deterministic: kRmsBwdBlocks fixed blocks write per-block partial sums, a second kernel
// adds them per column in a fixed order.
void op_rmsnorm_bwd(const Ctx& ctx, const Tensor& dy, const Tensor& x, const Tensor& w,
                    const Tensor& rstd, Tensor& dx, Tensor& dw);

}  // namespace mf::cuda
