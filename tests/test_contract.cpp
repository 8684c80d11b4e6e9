// The op contracts (src/backend/op_contract.h) on their own: what each backend's `Where` accepts
// (devices; f32 only on the CPU, f32 or bf16 with one dtype per call on CUDA), the sizes they
// return, and that their errors name the op and the tensor. The contracts never read tensor
// memory, so CUDA tensors here are descriptors that point at a host buffer; the CUDA backend's
// entries run the same functions (test_ops / test_cuda_smoke compare both backends' errors).
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "backend/op_contract.h"

using namespace mf;
using Catch::Contains;
namespace c = mf::contract;

namespace {

// A descriptor of shape s on device d; the memory is a shared dummy (never read).
Tensor fake(const Shape& s, DType t = DType::F32, Device d = Device::CUDA) {
  static std::vector<char> mem(size_t(1) << 20);
  static size_t next = 0;
  Tensor x;
  x.shape = s;
  x.dtype = t;
  x.device = d;
  // Distinct, non-overlapping addresses for distinct tensors (gemm checks overlap).
  const size_t bytes = (x.nbytes() + 63) / 64 * 64 + 64;
  if (next + bytes > mem.size()) next = 0;
  x.ptr = mem.data() + next;
  next += bytes;
  return x;
}
Tensor cpu(const Shape& s, DType t = DType::F32) { return fake(s, t, Device::CPU); }

}  // namespace

TEST_CASE("contract: devices and float dtypes per backend", "[contract]") {
  const Tensor xb = fake({6, 4}, DType::BF16), Wb = fake({5, 4}, DType::BF16);
  const Tensor yb = fake({6, 5}, DType::BF16), yf = fake({6, 5});
  // CUDA: bf16 activations and weights, an f32 or bf16 output.
  CHECK_NOTHROW(c::matmul_fwd(c::kCuda, xb, Wb, yb));
  CHECK_NOTHROW(c::matmul_fwd(c::kCuda, xb, Wb, yf));
  // ... but x and W share a dtype.
  CHECK_THROWS_WITH(c::matmul_fwd(c::kCuda, fake({6, 4}), Wb, yf),
                    Contains("matmul_fwd") && Contains("x [6,4] f32 must have the dtype of W"));
  // An i32 tensor is never a float operand.
  CHECK_THROWS_WITH(c::matmul_fwd(c::kCuda, xb, Wb, fake({6, 5}, DType::I32)),
                    Contains("y [6,5] i32 must be f32 or bf16"));
  // CPU: f32 only.
  const Tensor x = cpu({6, 4}), W = cpu({5, 4}), y = cpu({6, 5});
  CHECK_NOTHROW(c::matmul_fwd(c::kCpu, x, W, y));
  CHECK_THROWS_WITH(c::matmul_fwd(c::kCpu, cpu({6, 4}, DType::BF16), cpu({5, 4}, DType::BF16), y),
                    Contains("W [5,4] bf16 has the wrong dtype, expected f32"));
  // Each backend names the other's tensors.
  CHECK_THROWS_WITH(c::matmul_fwd(c::kCuda, x, W, y), Contains("host tensor") && Contains("cuda"));
  CHECK_THROWS_WITH(c::matmul_fwd(c::kCpu, xb, Wb, yb), Contains("lives on the GPU"));
  // Unallocated: named; an empty tensor needs no memory.
  Tensor none = cpu({6, 5});
  none.ptr = nullptr;
  CHECK_THROWS_WITH(c::matmul_fwd(c::kCpu, x, W, none), Contains("y is not allocated"));
  Tensor empty_x = cpu({0, 4}), empty_y = cpu({0, 5});
  empty_x.ptr = empty_y.ptr = nullptr;
  CHECK(c::matmul_fwd(c::kCpu, empty_x, W, empty_y).N == 0);
}

TEST_CASE("contract: sizes returned to the backends", "[contract]") {
  const auto m = c::matmul_fwd(c::kCuda, fake({2, 3, 4}, DType::BF16), fake({5, 4}, DType::BF16),
                               fake({6, 5}));
  CHECK((m.N == 6 && m.in == 4 && m.out == 5));
  const auto mb = c::matmul_bwd(c::kCuda, fake({6, 5}, DType::BF16), fake({2, 3, 4}, DType::BF16),
                                fake({5, 4}, DType::BF16), nullptr, nullptr);
  CHECK((mb.N == 6 && mb.in == 4 && mb.out == 5));
  const auto e = c::embedding_fwd(c::kCuda, fake({2, 3}, DType::I32), fake({50, 8}, DType::BF16),
                                  fake({2, 3, 8}, DType::BF16));
  CHECK((e.N == 6 && e.V == 50 && e.d == 8));
  const auto r = c::add_rmsnorm_fwd(c::kCuda, fake({4, 16}, DType::BF16), nullptr,
                                    fake({4, 16}, DType::BF16), fake({16}), 1e-5f,
                                    fake({4, 16}, DType::BF16), fake({4}));
  CHECK((r.N == 4 && r.d == 16));
  const auto g = c::swiglu_fwd(c::kCpu, cpu({2, 3, 8}), cpu({2, 3, 8}), cpu({2, 3, 8}));
  CHECK((g.rows == 6 && g.f == 8));
  const auto p = c::swiglu_packed_bwd(c::kCpu, cpu({5, 8}), cpu({5, 16}), cpu({5, 16}));
  CHECK((p.rows == 5 && p.f == 8));
  const auto x = c::lmhead_xent(c::kCpu, cpu({2, 3, 8}), cpu({11, 8}), cpu({6}, DType::I32),
                                cpu({6}), nullptr, nullptr);
  CHECK((x.N == 6 && x.V == 11 && x.d == 8));
  const auto s = c::moe_permute(c::kCpu, cpu({7, 2}, DType::I32), 4, cpu({5}, DType::I32),
                                cpu({7, 2}, DType::I32), cpu({14}, DType::I32));
  CHECK((s.N == 7 && s.k == 2));
  const auto gm = c::gemm(c::kCpu, cpu({4, 3}), true, cpu({5, 4}), true, cpu({3, 5}));
  CHECK((gm.m == 3 && gm.n == 5 && gm.k == 4));
}

TEST_CASE("contract: the grouped expert GEMMs", "[contract]") {
  // Three experts [5,4]; 7 rows of x, 6 of y: the op covers the fewer.
  const Tensor w0 = fake({5, 4}, DType::BF16), w1 = fake({5, 4}, DType::BF16),
               w2 = fake({5, 4}, DType::BF16), off = fake({4}, DType::I32);
  const std::vector<const Tensor*> W = {&w0, &w1, &w2};
  const c::ExpertDims d =
      c::moe_expert_fwd(c::kCuda, fake({7, 4}, DType::BF16), W, off, fake({6, 5}, DType::BF16));
  CHECK(d.E == 3);
  CHECK(d.R == 6);
  CHECK(d.out == 5);
  CHECK(d.in == 4);
  // Any leading dims are rows.
  CHECK(c::moe_expert_fwd(c::kCuda, fake({2, 3, 4}, DType::BF16), W, off,
                          fake({2, 4, 5}, DType::BF16)).R == 6);
  // One shape and one dtype for all experts; the operands share it.
  const Tensor w_tall = fake({6, 4}, DType::BF16), w_f32 = fake({5, 4});
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCuda, fake({7, 4}, DType::BF16), {&w0, &w_tall}, fake({3}, DType::I32),
                                      fake({7, 5}, DType::BF16)),
                    Contains("moe_expert_fwd") && Contains("W[1] [6,4] bf16 must have the shape of W[0]"));
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCuda, fake({7, 4}, DType::BF16), {&w0, &w_f32}, fake({3}, DType::I32),
                                      fake({7, 5}, DType::BF16)),
                    Contains("W[1] [5,4] f32 must have the dtype of W[0]"));
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCuda, fake({7, 4}), W, off, fake({7, 5}, DType::BF16)),
                    Contains("x [7,4] f32 must have the dtype of W[0]"));
  // The CPU reference is f32 only.
  const Tensor c0 = cpu({5, 4}, DType::BF16);
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCpu, cpu({7, 4}, DType::BF16), {&c0}, cpu({2}, DType::I32),
                                      cpu({7, 5}, DType::BF16)),
                    Contains("W[0] [5,4] bf16 has the wrong dtype, expected f32"));
  // Widths, the plan's length, no experts, an empty expert.
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCuda, fake({7, 5}, DType::BF16), W, off, fake({7, 5}, DType::BF16)),
                    Contains("x [7,5] bf16 must have last dim 4"));
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCuda, fake({7, 4}, DType::BF16), W, fake({3}, DType::I32),
                                      fake({7, 5}, DType::BF16)),
                    Contains("offsets [3] i32 must have 4 elements (experts + 1)"));
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCuda, fake({7, 4}, DType::BF16), {}, off, fake({7, 5}, DType::BF16)),
                    Contains("moe_expert_fwd: no expert weights given"));
  const Tensor w_empty = fake({0, 4}, DType::BF16);
  CHECK_THROWS_WITH(c::moe_expert_fwd(c::kCuda, fake({7, 4}, DType::BF16), {&w_empty}, fake({2}, DType::I32),
                                      fake({7, 0}, DType::BF16)),
                    Contains("must be a non-empty [out,in] matrix"));
  // Backward: dx like x's width, R the fewest rows; dW one f32 gradient per expert of W's shape.
  Tensor g0 = fake({5, 4}), g1 = fake({5, 4}), g2 = fake({5, 4}), g_bf = fake({5, 4}, DType::BF16);
  const std::vector<Tensor*> dW = {&g0, &g1, &g2};
  const Tensor dx = fake({5, 4}, DType::BF16);
  CHECK(c::moe_expert_bwd(c::kCuda, fake({7, 5}, DType::BF16), fake({7, 4}, DType::BF16), W, off,
                          &dx, &dW).R == 5);
  const std::vector<Tensor*> dW2 = {&g0, &g1};
  CHECK_THROWS_WITH(c::moe_expert_bwd(c::kCuda, fake({7, 5}, DType::BF16), fake({7, 4}, DType::BF16), W,
                                      off, nullptr, &dW2),
                    Contains("moe_expert_bwd: 2 weight gradients for 3 experts"));
  const std::vector<Tensor*> dW_bf = {&g0, &g_bf, &g2};
  CHECK_THROWS_WITH(c::moe_expert_bwd(c::kCuda, fake({7, 5}, DType::BF16), fake({7, 4}, DType::BF16), W,
                                      off, nullptr, &dW_bf),
                    Contains("dW[1] [5,4] bf16 has the wrong dtype, expected f32"));
  Tensor g_t = fake({4, 5});
  const std::vector<Tensor*> dW_t = {&g0, &g1, &g_t};
  CHECK_THROWS_WITH(c::moe_expert_bwd(c::kCuda, fake({7, 5}, DType::BF16), fake({7, 4}, DType::BF16), W,
                                      off, nullptr, &dW_t),
                    Contains("dW[2] [4,5] f32 must have the shape of W[0] [5,4] bf16"));
  const Tensor dx_wide = fake({7, 5}, DType::BF16);
  CHECK_THROWS_WITH(c::moe_expert_bwd(c::kCuda, fake({7, 5}, DType::BF16), fake({7, 4}, DType::BF16), W,
                                      off, &dx_wide, nullptr),
                    Contains("dx [7,5] bf16 must have last dim 4"));
}

TEST_CASE("contract: shape errors name the op, the tensor and the shapes", "[contract]") {
  // rstd: one per row.
  CHECK_THROWS_WITH(c::add_rmsnorm_fwd(c::kCpu, cpu({4, 16}), nullptr, cpu({4, 16}), cpu({16}),
                                       1e-5f, cpu({4, 16}), cpu({5})),
                    Contains("add_rmsnorm_fwd") && Contains("rstd [5] f32 must have 4 elements"));
  // The branch has resid_in's rows.
  const Tensor branch = fake({3, 16}, DType::BF16);
  CHECK_THROWS_WITH(c::add_rmsnorm_fwd(c::kCuda, fake({4, 16}, DType::BF16), &branch,
                                       fake({4, 16}, DType::BF16), fake({16}), 1e-5f,
                                       fake({4, 16}, DType::BF16), fake({4})),
                    Contains("branch [3,16] bf16 must be [4,16]"));
  // rmsnorm_bwd's dw is the f32 gradient.
  CHECK_THROWS_WITH(c::rmsnorm_bwd(c::kCuda, fake({4, 16}, DType::BF16), fake({4, 16}, DType::BF16),
                                   fake({16}, DType::BF16), fake({4}), fake({4, 16}, DType::BF16),
                                   fake({16}, DType::BF16)),
                    Contains("rmsnorm_bwd") && Contains("dw [16] bf16 has the wrong dtype"));
  // Odd head_dim; non-positive theta.
  CHECK_THROWS_WITH(c::rope(c::kCpu, "rope_fwd", "x", cpu({1, 2, 2, 5}), "y", cpu({1, 2, 2, 5}), 1e4f),
                    Contains("rope_fwd: head_dim 5 must be even"));
  CHECK_THROWS_WITH(c::rope(c::kCpu, "rope_bwd", "dy", cpu({1, 2, 2, 4}), "dx", cpu({1, 2, 2, 4}), 0.f),
                    Contains("rope_bwd: rope_theta 0") && Contains("model.rope_theta"));
  // qkv: the packed tensor has H + 2 Hkv heads.
  CHECK_THROWS_WITH(c::qkv_rope(c::kCpu, "qkv_rope_split", "qkv", cpu({1, 2, 5, 4}), "q",
                                cpu({1, 2, 4, 4}), "k", cpu({1, 2, 1, 4}), "v", cpu({1, 2, 1, 4}),
                                1e4f),
                    Contains("qkv [1,2,5,4] f32 must be [B,T,H+2Hkv,hd]"));
  // Packed SwiGLU: dgu must not be gu.
  const Tensor gu = cpu({5, 16});
  CHECK_THROWS_WITH(c::swiglu_packed_bwd(c::kCpu, cpu({5, 8}), gu, gu), Contains("must not alias"));
  // xent: dx of x's dtype on CUDA.
  const Tensor dxf = fake({6, 8});
  CHECK_THROWS_WITH(c::lmhead_xent(c::kCuda, fake({6, 8}, DType::BF16), fake({11, 8}, DType::BF16),
                                   fake({6}, DType::I32), fake({6}), &dxf, nullptr),
                    Contains("lmhead_xent") && Contains("dx [6,8] f32 must have the dtype of x"));
  // Attention: H a multiple of Hkv; lse B*H*T.
  AttnShape sh{1, 4, 3, 2, 8, 0.35f};
  CHECK_THROWS_WITH(c::attention_fwd(c::kCpu, "attention_fwd", cpu({1, 4, 3, 8}), cpu({1, 4, 2, 8}),
                                     cpu({1, 4, 2, 8}), cpu({1, 4, 3, 8}), cpu({12}), sh),
                    Contains("n_heads 3 is not a multiple of n_kv_heads 2"));
  sh.Hkv = 1;
  CHECK_THROWS_WITH(c::attention_fwd(c::kCpu, "attention_fwd", cpu({1, 4, 3, 8}), cpu({1, 4, 1, 8}),
                                     cpu({1, 4, 1, 8}), cpu({1, 4, 3, 8}), cpu({11}), sh),
                    Contains("lse [11] f32 must have 12 elements (B*H*T)"));
  CHECK_NOTHROW(c::attention_fwd(c::kCpu, "attention_fwd", cpu({1, 4, 3, 8}), cpu({1, 4, 1, 8}),
                                 cpu({1, 4, 1, 8}), cpu({1, 4, 3, 8}), cpu({12}), sh));
  // MoE: the router's weight is [E,d]; gather's rows share a width.
  MoeRouterArgs a;
  a.E = 4;
  a.k = 2;
  CHECK_THROWS_WITH(c::moe_router_fwd(c::kCpu, cpu({6, 8}), cpu({3, 8}), nullptr, a, cpu({6, 4}),
                                      cpu({6, 2}, DType::I32), cpu({6, 2}), cpu({4}, DType::I32),
                                      cpu({4})),
                    Contains("moe_router_fwd: Wr [3,8] f32 must be [4,d]"));
  a.k = 5;
  CHECK_THROWS_WITH(c::moe_route_args("moe_router_bwd", a), Contains("top_k 5") && Contains("model.moe"));
  CHECK_THROWS_WITH(c::moe_gather(c::kCuda, fake({6, 8}, DType::BF16), fake({12}, DType::I32),
                                  fake({12, 7}, DType::BF16)),
                    Contains("moe_gather") && Contains("same width"));
  // gemm: C may not overlap an operand.
  const Tensor A = cpu({4, 4});
  CHECK_THROWS_WITH(c::gemm(c::kCpu, A, false, cpu({4, 4}), false, A.view({4, 4})),
                    Contains("must not alias"));
  Tensor part = A.slice0(2, 4);  // overlaps A's last two rows
  CHECK_THROWS_WITH(c::gemm(c::kCpu, A, false, cpu({4, 2}), false, part.view({4, 2})),
                    Contains("must not alias"));
  // Optimizer state: f32, the parameter's shape; bias corrections positive.
  AdamWArgs aw;
  aw.bc1 = aw.bc2 = 1.f;
  CHECK_THROWS_WITH(c::adamw_update(c::kCuda, fake({3, 4}), fake({3, 4}), fake({4, 3}), fake({3, 4}), aw),
                    Contains("exp_avg [4,3] f32 must have the shape of param [3,4]"));
  aw.bc2 = 0.f;
  CHECK_THROWS_WITH(c::adamw_update(c::kCpu, cpu({3}), cpu({3}), cpu({3}), cpu({3}), aw),
                    Contains("bias corrections"));
  CHECK_THROWS_WITH(c::newton_schulz(c::kCpu, cpu({2, 2, 3, 3}), cpu({2, 2, 3, 3}), 5),
                    Contains("stack [k,r,c]") && Contains("[2,2,3,3]"));
  CHECK_THROWS_WITH(c::sym_square(c::kCpu, "sym_eig", cpu({3, 4}), "Q", cpu({3, 4})),
                    Contains("sym_eig: S [3,4] f32 must be a square matrix"));
}
