// The matrix-optimizer family beyond Muon (docs/optimizers.md). Selected by optim.name; each
// handles the hidden 2-D matrices (and [E, out, in] expert stacks, one [out, in] matrix at a
// time) while AdamW keeps the embeddings, lm_head, norm gains and router, as with Muon.
//
//   muon     M = mu M + G; U = nesterov ? G + mu M : M; O = NS(U)           (optimizer.h)
//            optim.ns = quintic | polar_express; optim.cautious_wd
//   normuon  Muon's O, then per-neuron (row) second moment v = b2 v + (1-b2) mean_j O_ij^2,
//            O_ij /= sqrt(v_i) + eps, rescaled to keep ||O||_F (Li et al., arXiv 2510.05491)
//   freon    Muon's U, O = (U U^T)^-c U / ||U||_{S_q}^(1-2c), q = 2 - 2c (Schatten family;
//            c = 0: normalised SGD, c = 1/2: the exact polar factor), by eigendecomposition
//   kaon     Muon's U, X = U / ||U||_F, `steps` times X = 4.1 (I - X X^T)^2 X, O = X / 1.175
//   shampoo  blocked Shampoo: L = b2 L + (1-b2) G G^T, R likewise with G^T G per block;
//            D = L^-e_L M R^-e_R (inverse roots by eigendecomposition every k steps, eps I);
//            graft = adam: D scaled per block to the Frobenius norm of Adam's update
//   soap     blocked SOAP (Vyas et al., arXiv 2409.11321): Adam run in the eigenbasis of the
//            Shampoo statistics, basis refreshed every f steps
//   asgo     one-sided (An et al., arXiv 2503.20762): V = b2 V + (1-b2) G G^T on the smaller side
//            (b2 = 1: V = V + G G^T), D = (V^1/2 + eps I)^-1 M (or M (...)^-1 when rows > cols)
//
// The update is p <- p (1 - decay) - lr_eff * s * D, with s = Muon's optim.scale for the
// Muon-like kinds (muon, normuon, freon, kaon) and s = 1 for shampoo, soap and asgo.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"

namespace mf {

// The values of optim.name, in the order of the docs table.
const std::vector<std::string>& optimizer_names();
// Every optim.name except adamw puts the hidden matrices on a matrix optimizer.
bool is_matrix_optimizer(const std::string& name);
// muon, normuon, freon, kaon: Muon's momentum buffer and update scale s (optim.scale).
bool is_muon_like(const std::string& name);

// Polar Express (Amsel et al., arXiv 2505.16932): the five per-step (a, b, c) of the degree-5
// schedule with the 2% safety margin (as published in modded-nanogpt), and the
// pre-normalisation X / (1.02 ||X||_F).
constexpr float kPolarExpressNormMult = 1.02f;
// The coefficient list for optim.ns = "quintic" | "polar_express" and `steps` iterations
// (polar_express: the first min(steps, 5) tuples, then the last one repeated).
std::vector<float> ns_coefficients(const std::string& ns, int steps);

// Kaon's chaotic map sigma -> 4.1 sigma (1 - sigma^2)^2 as Newton-Schulz coefficients
// (a, b, c) = (4.1, -8.2, 4.1), and the final division by 1.175 (the map's maximum on [0, 1]).
constexpr float kKaonGain = 4.1f, kKaonNorm = 1.175f;
std::vector<float> kaon_coefficients(int steps);

// ASGO's preconditioner (sqrt(V) + eps I)^-1 scales no direction by more than 2^24 (1 / the
// fp32 unit roundoff) relative to the top one: sqrt(lambda) + eps is floored at
// 2^-24 sqrt(lambda_max). The momentum M is fp32, so its components below 2^-24 of its size are
// rounding, and V's eigenvalues that rounding leaves at or below zero would otherwise get the
// factor 1 / eps (1e30 at eps = 1e-30). At eps >= 2^-24 sqrt(lambda_max) the floor is inactive.
constexpr double kAsgoFloorRel = 1.0 / 16777216.0;

// One block of a (possibly stacked) matrix: rows [r0, r0 + rows) and columns [c0, c0 + cols)
// of the [E * out, in] view of the parameter; off_l / off_r = offsets of its left / right
// statistics (rows^2 / cols^2 floats) in the flat state buffers.
struct MatBlock {
  int64_t r0 = 0, c0 = 0, rows = 0, cols = 0;
  int64_t off_l = 0, off_r = 0;
};
// Blocks of size <= block_size (0: whole matrices) in row-major order; edge blocks are smaller
// when block_size does not divide a dimension. Expert matrices of a [E, out, in] stack are
// blocked one after the other. total_l / total_r: the flat sizes of the statistics.
std::vector<MatBlock> make_blocks(const Shape& shape, int block_size, int64_t& total_l,
                                  int64_t& total_r);

// The largest n x n matrix one optimizer step decomposes with Backend::sym_eig (SOAP's bases)
// and with Backend::sym_func (Shampoo's and ASGO's roots, Freon's polar factor); 0: none. Memory
// plans size the CUDA scratch from them (Backend::sym_scratch_bytes).
struct SymSizes {
  int64_t eig_n = 0, func_n = 0;
};

// Stateful direction of Shampoo, SOAP or ASGO for one parameter (f32 state on the backend).
class MatrixPreconditioner {
 public:
  virtual ~MatrixPreconditioner() = default;
  // D (=) the update direction for the gradient grad * grad_scale at update number t (1-based).
  // D has the parameter's shape; grad is left untouched.
  virtual void direction(const Tensor& grad, float grad_scale, int64_t t, Tensor& D) = 0;
  // False when update number t only gathers statistics: the parameter is then left as it is,
  // weight decay included (SOAP's first step, as in its reference implementation).
  virtual bool updates_at(int64_t t) const { (void)t; return true; }
  // The state tensors with their name suffixes (".exp_avg", ".shampoo_L", ...).
  virtual std::vector<std::pair<std::string, Tensor>> state() const = 0;
  // One line: block layout and state size, for Optimizer::describe.
  virtual std::string describe() const = 0;
  // Bytes of the tensors it holds besides state() (the scaled gradient, the block buffers):
  // allocated once, at construction.
  virtual int64_t work_bytes() const = 0;
  virtual SymSizes sym_sizes() const = 0;
};

// optim.name = shampoo | soap | asgo. Throws mf::Error for other names or non-matrix shapes.
std::unique_ptr<MatrixPreconditioner> make_preconditioner(const OptimConfig& o, const Shape& shape,
                                                          Backend& be);

// Freon on one matrix U [r, c]: O (=) (U U^T)^-c U / ||U||_{S_q}^(1-2c), q = 2 - 2c (the Gram
// matrix of the smaller side is decomposed). O may alias U. `work` (f32, at least
// freon_workspace(U.shape) elements) holds the temporaries; without it they are allocated per
// call, which costs a device allocation per matrix per step on the GPU.
void freon_orthogonalize(Backend& be, const Tensor& U, Tensor& O, double c, double eps,
                         Tensor* work = nullptr);
int64_t freon_workspace(const Shape& matrix_shape);

// µP learning-rate multiplier of a hidden matrix under optim.name (DESIGN §4, Qiu et al.):
// width_mult m = d_model / base_width; the base shape is shape / m (every hidden dimension
// scales with d_model). See docs/optimizers.md for the derivations.
double matrix_mup_lr_mult(const OptimConfig& o, const Shape& shape, double m);

}  // namespace mf
