#include "optim/matrix_opt.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "core/error.h"

namespace mf {

// ---- names and coefficients ---------------------------------------------------------------

const std::vector<std::string>& optimizer_names() {
  static const std::vector<std::string> names = {"muon",  "adamw", "normuon", "shampoo",
                                                 "soap",  "asgo",  "freon",   "kaon"};
  return names;
}

bool is_matrix_optimizer(const std::string& name) {
  return name != "adamw" &&
         std::find(optimizer_names().begin(), optimizer_names().end(), name) != optimizer_names().end();
}

bool is_muon_like(const std::string& name) {
  return name == "muon" || name == "normuon" || name == "freon" || name == "kaon";
}

std::vector<float> ns_coefficients(const std::string& ns, int steps) {
  MF_CHECK(steps >= 1, "optim.ns_steps must be >= 1, got ", steps);
  // Polar Express, degree 5, five iterations, safety margin 2e-2 (Amsel et al. 2025; the
  // schedule modded-nanogpt ships). Paired with the pre-normalisation X / (1.02 ||X||_F).
  static const float pe[5][3] = {
      {8.156554524902461f, -22.48329292557795f, 15.878769915207462f},
      {4.042929935166739f, -2.808917465908714f, 0.5000178451051316f},
      {3.8916678022926607f, -2.772484153217685f, 0.5060648178503393f},
      {3.285753657755655f, -2.3681294933425376f, 0.46449024233003106f},
      {2.3465413258596377f, -1.7097828382687081f, 0.42323551169305323f},
  };
  std::vector<float> out;
  for (int i = 0; i < steps; ++i) {
    if (ns == "quintic") {
      out.insert(out.end(), {3.4445f, -4.7750f, 2.0315f});
    } else if (ns == "polar_express") {
      const float* t = pe[std::min(i, 4)];
      out.insert(out.end(), {t[0], t[1], t[2]});
    } else {
      MF_FAIL("optim.ns is \"", ns, "\"; expected one of: quintic, polar_express");
    }
  }
  return out;
}

std::vector<float> kaon_coefficients(int steps) {
  MF_CHECK(steps >= 1, "optim.kaon.steps must be >= 1, got ", steps);
  std::vector<float> out;
  for (int i = 0; i < steps; ++i) out.insert(out.end(), {kKaonGain, -2.0f * kKaonGain, kKaonGain});
  return out;
}

// ---- blocks ---------------------------------------------------------------------------------

std::vector<MatBlock> make_blocks(const Shape& shape, int block_size, int64_t& total_l,
                                  int64_t& total_r) {
  MF_CHECK(shape.size() == 2 || shape.size() == 3,
           "matrix optimizer: expected a matrix [out, in] or a stack [E, out, in], got ",
           shape_str(shape));
  MF_CHECK(block_size >= 0, "block_size must be >= 0, got ", block_size);
  const int64_t E = shape.size() == 3 ? shape[0] : 1;
  const int64_t rows = shape[shape.size() - 2], cols = shape.back();
  const int64_t br = block_size > 0 ? std::min<int64_t>(block_size, rows) : rows;
  const int64_t bc = block_size > 0 ? std::min<int64_t>(block_size, cols) : cols;
  std::vector<MatBlock> out;
  total_l = total_r = 0;
  if (rows == 0 || cols == 0) return out;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows; r += br)
      for (int64_t c = 0; c < cols; c += bc) {
        MatBlock b;
        b.r0 = e * rows + r;
        b.c0 = c;
        b.rows = std::min(br, rows - r);
        b.cols = std::min(bc, cols - c);
        b.off_l = total_l;
        b.off_r = total_r;
        total_l += b.rows * b.rows;
        total_r += b.cols * b.cols;
        out.push_back(b);
      }
  return out;
}

namespace {

// The [E*out, in] matrix view of a parameter-shaped tensor.
Tensor as_matrix(const Tensor& t) {
  const int64_t cols = t.shape.back();
  return t.view({t.numel() / std::max<int64_t>(cols, 1), cols});
}

// A [r, c] view of the first r*c floats of a flat scratch tensor.
Tensor window(const Tensor& flat, int64_t r, int64_t c) { return flat.slice0(0, r * c).view({r, c}); }

// A square [n, n] view at `off` of a flat state tensor.
Tensor square_at(const Tensor& flat, int64_t off, int64_t n) {
  return flat.slice0(off, off + n * n).view({n, n});
}

double pow_t(double b, int64_t t) { return std::pow(b, double(t)); }

// State and scratch shared by the blocked preconditioners.
class BlockedBase : public MatrixPreconditioner {
 protected:
  BlockedBase(const Shape& shape, int block_size, Backend& be) : be_(be), shape_(shape) {
    blocks_ = make_blocks(shape, block_size, total_l_, total_r_);
    int64_t most = 1;
    for (const MatBlock& b : blocks_) most = std::max(most, b.rows * b.cols);
    for (const MatBlock& b : blocks_) block_side_ = std::max({block_side_, b.rows, b.cols});
    G_ = be.empty(shape, DType::F32);
    s1_ = be.empty({most}, DType::F32);
    s2_ = be.empty({most}, DType::F32);
    s3_ = be.empty({most}, DType::F32);
    s4_ = be.empty({most}, DType::F32);
  }

  int64_t work_bytes() const override {
    return held(G_) + held(s1_) + held(s2_) + held(s3_) + held(s4_);
  }

  // G_ (=) grad * grad_scale.
  void scaled_grad(const Tensor& grad, float grad_scale) {
    MF_CHECK(grad.shape == shape_, "matrix optimizer: gradient has shape ", shape_str(grad.shape),
             ", expected ", shape_str(shape_));
    be_.copy(grad, G_);
    if (grad_scale != 1.0f) be_.scale(G_, grad_scale);
  }
  // M (=) b1 M + (1 - b1) G_.
  void ema(Tensor& M, const Tensor& X, double b) {
    be_.scale(M, float(b));
    be_.axpy(float(1.0 - b), X, M);
  }
  int64_t held(const Tensor& t) const { return int64_t(be_.held_bytes(t)); }
  // dst [rows, cols] (=) block b of the parameter-shaped tensor src.
  void cut(const Tensor& src, const MatBlock& b, Tensor& dst) {
    Tensor m = as_matrix(src);
    be_.block_copy(m, b.r0, b.c0, dst, 0, 0, b.rows, b.cols);
  }
  void paste(const Tensor& src, const MatBlock& b, Tensor& dst) {
    Tensor m = as_matrix(dst);
    be_.block_copy(src, 0, 0, m, b.r0, b.c0, b.rows, b.cols);
  }
  std::string layout() const {
    std::ostringstream os;
    os << blocks_.size() << " block(s)";
    if (!blocks_.empty()) os << " up to " << blocks_.front().rows << "x" << blocks_.front().cols;
    return os.str();
  }

  Backend& be_;
  Shape shape_;
  std::vector<MatBlock> blocks_;
  int64_t total_l_ = 0, total_r_ = 0;
  int64_t block_side_ = 0;      // the largest block's larger side
  Tensor G_;                    // scaled gradient (parameter shape)
  Tensor s1_, s2_, s3_, s4_;    // block scratch
};

// ---- Shampoo ----------------------------------------------------------------------------------

class Shampoo final : public BlockedBase {
 public:
  Shampoo(const ShampooConfig& c, const Shape& shape, Backend& be)
      : BlockedBase(shape, c.block_size, be), c_(c) {
    M_ = be.empty(shape, DType::F32);
    L_ = be.empty({std::max<int64_t>(total_l_, 1)}, DType::F32);
    R_ = be.empty({std::max<int64_t>(total_r_, 1)}, DType::F32);
    PL_ = be.empty({std::max<int64_t>(total_l_, 1)}, DType::F32);
    PR_ = be.empty({std::max<int64_t>(total_r_, 1)}, DType::F32);
    if (c.graft == "adam") {
      V_ = be.empty(shape, DType::F32);
      A_ = be.empty(shape, DType::F32);
    }
  }

  void direction(const Tensor& grad, float grad_scale, int64_t t, Tensor& D) override {
    scaled_grad(grad, grad_scale);
    ema(M_, G_, c_.beta1);
    const double bc1 = 1.0 - pow_t(c_.beta1, t), bc2 = 1.0 - pow_t(c_.beta2, t);
    const bool graft = c_.graft == "adam";
    if (graft) be_.adam_precond(M_, G_, V_, A_, float(c_.beta2), float(c_.graft_eps), float(bc1), float(bc2));
    const bool refresh = (t - 1) % c_.precond_every == 0;
    for (const MatBlock& b : blocks_) {
      Tensor g = window(s1_, b.rows, b.cols), m = window(s2_, b.rows, b.cols);
      Tensor tmp = window(s3_, b.rows, b.cols), d = window(s4_, b.rows, b.cols);
      Tensor L = square_at(L_, b.off_l, b.rows), R = square_at(R_, b.off_r, b.cols);
      Tensor PL = square_at(PL_, b.off_l, b.rows), PR = square_at(PR_, b.off_r, b.cols);
      cut(G_, b, g);
      be_.gemm(g, false, g, true, L, float(1.0 - c_.beta2), float(c_.beta2));  // L = b2 L + (1-b2) g g^T
      be_.gemm(g, true, g, false, R, float(1.0 - c_.beta2), float(c_.beta2));  // R = b2 R + (1-b2) g^T g
      if (refresh) {
        SymFuncArgs a;
        a.input_scale = 1.0 / bc2;
        a.eps = c_.eps;
        a.power = -c_.exp_l;
        be_.sym_func(L, a, PL);
        a.power = -c_.exp_r;
        be_.sym_func(R, a, PR);
      }
      cut(M_, b, m);
      be_.gemm(PL, false, m, false, tmp, 1.0f, 0.0f);  // PL m
      be_.gemm(tmp, false, PR, false, d, 1.0f, 0.0f);  // PL m PR
      if (graft) {
        cut(A_, b, tmp);
        be_.scale_to_norm_of(d, tmp);  // the block's AdamW norm
      } else {
        be_.scale(d, float(1.0 / bc1));
      }
      paste(d, b, D);
    }
  }

  std::vector<std::pair<std::string, Tensor>> state() const override {
    std::vector<std::pair<std::string, Tensor>> s = {{".exp_avg", M_},
                                                     {".shampoo_L", L_},
                                                     {".shampoo_R", R_},
                                                     {".shampoo_PL", PL_},
                                                     {".shampoo_PR", PR_}};
    if (V_.defined()) s.emplace_back(".graft_exp_avg_sq", V_);
    return s;
  }
  std::string describe() const override {
    std::ostringstream os;
    os << "shampoo " << layout() << ", exp " << c_.exp_l << "/" << c_.exp_r << ", every "
       << c_.precond_every << ", graft " << c_.graft;
    return os.str();
  }
  int64_t work_bytes() const override {
    return BlockedBase::work_bytes() + held(A_);  // A_: Adam's direction, per step
  }
  SymSizes sym_sizes() const override { return {0, block_side_}; }  // L and R roots

 private:
  ShampooConfig c_;
  Tensor M_, L_, R_, PL_, PR_, V_, A_;
};

// ---- SOAP -------------------------------------------------------------------------------------

class Soap final : public BlockedBase {
 public:
  Soap(const SoapConfig& c, const Shape& shape, Backend& be) : BlockedBase(shape, c.block_size, be), c_(c) {
    M_ = be.empty(shape, DType::F32);
    V_ = be.empty(shape, DType::F32);
    L_ = be.empty({std::max<int64_t>(total_l_, 1)}, DType::F32);
    R_ = be.empty({std::max<int64_t>(total_r_, 1)}, DType::F32);
    QL_ = be.empty({std::max<int64_t>(total_l_, 1)}, DType::F32);
    QR_ = be.empty({std::max<int64_t>(total_r_, 1)}, DType::F32);
    s5_ = be.empty({s1_.numel()}, DType::F32);
  }

  bool updates_at(int64_t t) const override { return t > 1; }

  void direction(const Tensor& grad, float grad_scale, int64_t t, Tensor& D) override {
    scaled_grad(grad, grad_scale);
    if (t == 1) {
      // As in the reference implementation, the first gradient only initialises the
      // statistics and the eigenbases (no update): in the eigenbasis of its own statistics the
      // gradient is diagonal, so Adam's elementwise ratio would be 0/0 off the diagonal.
      for (const MatBlock& b : blocks_) {
        Tensor g = window(s1_, b.rows, b.cols);
        Tensor L = square_at(L_, b.off_l, b.rows), R = square_at(R_, b.off_r, b.cols);
        Tensor QL = square_at(QL_, b.off_l, b.rows), QR = square_at(QR_, b.off_r, b.cols);
        cut(G_, b, g);
        update_stats(g, L, R);
        be_.sym_eig(L, QL);
        be_.sym_eig(R, QR);
      }
      be_.zero(D);
      return;
    }
    const int64_t ta = t - 1;  // Adam's step count
    ema(M_, G_, c_.beta1);
    const double bc1 = 1.0 - pow_t(c_.beta1, ta), bc2 = 1.0 - pow_t(c_.beta2, ta);
    const float b2 = float(c_.beta2);
    for (const MatBlock& b : blocks_) {
      Tensor g = window(s1_, b.rows, b.cols), gr = window(s2_, b.rows, b.cols);
      Tensor tmp = window(s3_, b.rows, b.cols), mr = window(s4_, b.rows, b.cols);
      Tensor v = window(s5_, b.rows, b.cols);
      Tensor L = square_at(L_, b.off_l, b.rows), R = square_at(R_, b.off_r, b.cols);
      Tensor QL = square_at(QL_, b.off_l, b.rows), QR = square_at(QR_, b.off_r, b.cols);
      cut(G_, b, g);
      // Rotate the gradient and the first moment: X' = QL^T X QR.
      be_.gemm(QL, true, g, false, tmp, 1.0f, 0.0f);
      be_.gemm(tmp, false, QR, false, gr, 1.0f, 0.0f);
      cut(M_, b, g);  // g now holds the block of M
      be_.gemm(QL, true, g, false, tmp, 1.0f, 0.0f);
      be_.gemm(tmp, false, QR, false, mr, 1.0f, 0.0f);
      // Adam in the rotated basis (v lives there), then back: D = QL N' QR^T.
      cut(V_, b, v);
      be_.adam_precond(mr, gr, v, mr, b2, float(c_.eps), float(bc1), float(bc2));
      paste(v, b, V_);
      be_.gemm(QL, false, mr, false, tmp, 1.0f, 0.0f);
      be_.gemm(tmp, false, QR, true, gr, 1.0f, 0.0f);
      paste(gr, b, D);
      // Then the statistics take this gradient, and every f Adam steps the bases are refreshed.
      cut(G_, b, g);
      update_stats(g, L, R);
      if (ta % c_.precond_every == 0) {
        be_.sym_eig(L, QL);
        be_.sym_eig(R, QR);
      }
    }
  }

  std::vector<std::pair<std::string, Tensor>> state() const override {
    return {{".exp_avg", M_},   {".exp_avg_sq", V_}, {".soap_L", L_},
            {".soap_R", R_},    {".soap_QL", QL_},   {".soap_QR", QR_}};
  }
  std::string describe() const override {
    std::ostringstream os;
    os << "soap " << layout() << ", basis every " << c_.precond_every;
    return os.str();
  }
  int64_t work_bytes() const override { return BlockedBase::work_bytes() + held(s5_); }
  SymSizes sym_sizes() const override { return {block_side_, 0}; }  // the L and R bases

 private:
  void update_stats(const Tensor& g, Tensor& L, Tensor& R) {
    be_.gemm(g, false, g, true, L, float(1.0 - c_.beta2), float(c_.beta2));
    be_.gemm(g, true, g, false, R, float(1.0 - c_.beta2), float(c_.beta2));
  }
  SoapConfig c_;
  Tensor M_, V_, L_, R_, QL_, QR_, s5_;
};

// ---- ASGO -------------------------------------------------------------------------------------

class Asgo final : public BlockedBase {
 public:
  Asgo(const AsgoConfig& c, const Shape& shape, Backend& be) : BlockedBase(shape, c.block_size, be), c_(c) {
    int64_t total = 0;
    for (MatBlock& b : blocks_) {
      const int64_t n = std::min(b.rows, b.cols);
      b.off_l = total;  // one statistic per block, on the smaller side
      total += n * n;
    }
    M_ = be.empty(shape, DType::F32);
    V_ = be.empty({std::max<int64_t>(total, 1)}, DType::F32);
    P_ = be.empty({std::max<int64_t>(total, 1)}, DType::F32);
  }

  void direction(const Tensor& grad, float grad_scale, int64_t t, Tensor& D) override {
    scaled_grad(grad, grad_scale);
    ema(M_, G_, c_.beta1);
    const bool accumulate = c_.beta2 >= 1.0;
    const double bc1 = c_.beta1 > 0 ? 1.0 - pow_t(c_.beta1, t) : 1.0;
    const double bc2 = accumulate ? 1.0 : 1.0 - pow_t(c_.beta2, t);
    const bool refresh = (t - 1) % c_.precond_every == 0;
    for (const MatBlock& b : blocks_) {
      const bool left = b.rows <= b.cols;
      const int64_t n = left ? b.rows : b.cols;
      Tensor g = window(s1_, b.rows, b.cols), d = window(s2_, b.rows, b.cols);
      Tensor V = square_at(V_, b.off_l, n), P = square_at(P_, b.off_l, n);
      cut(G_, b, g);
      const float alpha = accumulate ? 1.0f : float(1.0 - c_.beta2);
      const float beta = accumulate ? 1.0f : float(c_.beta2);
      if (left)
        be_.gemm(g, false, g, true, V, alpha, beta);  // V (+)= g g^T
      else
        be_.gemm(g, true, g, false, V, alpha, beta);  // V (+)= g^T g
      if (refresh) {
        SymFuncArgs a;
        a.input_scale = 1.0 / bc2;
        a.root = 0.5;
        a.eps = c_.eps;
        a.power = -1.0;
        a.base_floor_rel = kAsgoFloorRel;
        be_.sym_func(V, a, P);  // (max(V^1/2 + eps I, 2^-24 sqrt(lambda_max)))^-1
      }
      cut(M_, b, g);
      if (left)
        be_.gemm(P, false, g, false, d, float(1.0 / bc1), 0.0f);
      else
        be_.gemm(g, false, P, false, d, float(1.0 / bc1), 0.0f);
      paste(d, b, D);
    }
  }

  std::vector<std::pair<std::string, Tensor>> state() const override {
    return {{".exp_avg", M_}, {".asgo_V", V_}, {".asgo_P", P_}};
  }
  std::string describe() const override {
    std::ostringstream os;
    os << "asgo " << layout() << (c_.beta2 >= 1.0 ? ", V accumulated" : ", V EMA") << ", every "
       << c_.precond_every;
    return os.str();
  }
  SymSizes sym_sizes() const override {  // one statistic per block, on its smaller side
    int64_t n = 0;
    for (const MatBlock& b : blocks_) n = std::max(n, std::min(b.rows, b.cols));
    return {0, n};
  }

 private:
  AsgoConfig c_;
  Tensor M_, V_, P_;
};

}  // namespace

std::unique_ptr<MatrixPreconditioner> make_preconditioner(const OptimConfig& o, const Shape& shape,
                                                          Backend& be) {
  if (o.name == "shampoo") return std::make_unique<Shampoo>(o.shampoo, shape, be);
  if (o.name == "soap") return std::make_unique<Soap>(o.soap, shape, be);
  if (o.name == "asgo") return std::make_unique<Asgo>(o.asgo, shape, be);
  MF_FAIL("make_preconditioner: optim.name \"", o.name, "\" has no preconditioner (expected shampoo, soap or asgo)");
}

// ---- Freon ------------------------------------------------------------------------------------

int64_t freon_workspace(const Shape& s) {
  const int64_t r = s[s.size() - 2], cols = s.back(), n = std::min(r, cols);
  return 2 * n * n + r * cols;  // S, P [n, n] and the product [r, cols]
}

void freon_orthogonalize(Backend& be, const Tensor& U, Tensor& O, double c, double eps,
                         Tensor* work) {
  MF_CHECK(U.ndim() == 2 && O.shape == U.shape, "freon: expected matrices of the same shape, got ",
           shape_str(U.shape), " and ", shape_str(O.shape));
  MF_CHECK(c >= 0 && c < 1, "optim.freon.c must be in [0, 1), got ", c);
  const int64_t r = U.dim(0), cols = U.dim(1);
  if (r == 0 || cols == 0) return;
  const bool left = r <= cols;
  const int64_t n = left ? r : cols;
  Tensor own;
  if (!work || work->numel() < freon_workspace(U.shape)) {
    own = be.empty({freon_workspace(U.shape)}, DType::F32);
    work = &own;
  }
  Tensor S = work->slice0(0, n * n).view({n, n});
  Tensor P = work->slice0(n * n, 2 * n * n).view({n, n});
  Tensor tmp = work->slice0(2 * n * n, 2 * n * n + r * cols).view(U.shape);
  if (left)
    be.gemm(U, false, U, true, S, 1.0f, 0.0f);
  else
    be.gemm(U, true, U, false, S, 1.0f, 0.0f);
  SymFuncArgs a;
  a.root = 1.0;
  a.power = -c;
  a.eps = eps;
  a.relative_eps = true;
  a.schatten_q = 2.0 - 2.0 * c;
  a.schatten_pow = 2.0 * c - 1.0;
  be.sym_func(S, a, P);
  if (left)
    be.gemm(P, false, U, false, tmp, 1.0f, 0.0f);
  else
    be.gemm(U, false, P, false, tmp, 1.0f, 0.0f);
  be.copy(tmp, O);
}

// ---- µP -----------------------------------------------------------------------------------------

double matrix_mup_lr_mult(const OptimConfig& o, const Shape& shape, double m) {
  MF_CHECK(m > 0, "µP width multiplier must be > 0, got ", m);
  if (is_muon_like(o.name)) return 1.0;  // Muon's rule: s from optim.scale (spectral) carries it
  if (o.name == "soap" || (o.name == "shampoo" && o.shampoo.graft == "adam")) return 1.0 / m;
  // Shampoo without grafting (total exponent e = e_L + e_R) and ASGO (e = 1/2): a rank-one
  // gradient spread over nb blocks gives an update of spectral norm ~ nb^e, so the lr scales as
  // (nb_base / nb)^e; unblocked (nb = 1 at both widths) the update is width-independent.
  const int block = o.name == "shampoo" ? o.shampoo.block_size : o.asgo.block_size;
  const double e = o.name == "shampoo" ? o.shampoo.exp_l + o.shampoo.exp_r : 0.5;
  const int64_t rows = shape[shape.size() - 2], cols = shape.back();
  auto nblocks = [&](int64_t r, int64_t c) {
    if (block <= 0) return 1.0;
    return double((r + block - 1) / block) * double((c + block - 1) / block);
  };
  const int64_t rb = std::max<int64_t>(1, int64_t(std::llround(double(rows) / m)));
  const int64_t cb = std::max<int64_t>(1, int64_t(std::llround(double(cols) / m)));
  return std::pow(nblocks(rb, cb) / nblocks(rows, cols), e);
}

}  // namespace mf
