// End-to-end training checks of the CUDA backend against the CPU reference: 20 optimizer steps
// (2 micro-batches of accumulation, clipping, schedule) of a small Llama from the same init and
// the same synthetic data, for AdamW and for Muon, on CUDA (bf16 activations / compute weights,
// fp32 master, grads and state) and on the CPU (fp32). The per-step losses must agree within
// kLossTol; two CUDA runs in deterministic mode must give bit-identical losses.
//
// The [gpu] cases skip themselves (WARN + return) without a device or in a CPU-only build. The
// [e2e] case runs the same harness on the CPU only (always), so the harness itself is tested in
// CI: two CPU runs are identical and the synthetic data is learnable (the loss falls).
#include <catch2/catch.hpp>

#include "gpu_test_util.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "core/rng.h"
#include "dist/communicator.h"
#include "model/kv_decoder.h"
#include "model/llama.h"
#include "optim/mup.h"
#include "optim/optimizer.h"
#include "train/bench.h"
#ifdef MF_HAS_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#ifdef MF_HAS_NCCL
#include "dist/env.h"
#include "dist/nccl_comm.h"
#include "dist/store.h"
#endif

using namespace mf;

namespace {

constexpr double kLossTol = 2e-2;  // |loss_cuda - loss_cpu| per step (absolute, loss ~ ln V)
constexpr int kSteps = 20;
// train.precision "fp32": CUDA in f32 (f32 GEMMs without TF32, the f32 attention and
// cross-entropy kernels, Newton-Schulz in f32) against the CPU's fp32. Only the order of
// summation differs, so the runs stay close over all 20 steps (measured in the emulator: see the
// printed worst differences).
constexpr double kFp32LossTol = 1e-4;
constexpr double kFp32GnormRel = 1e-3;

// hd = 64 (the tensor-core attention path), GQA 2:1, T = 96 (a partial 64-row tile), d_ff a
// multiple of 8, 2 layers; batch 2 micro-batches of 3 x 96.
Config e2e_config(const std::string& optim) {
  Config c;
  c.source = "test_gpu_e2e";
#ifndef MF_CUEMU_TEST
  c.model.vocab_size = 512;
  c.model.d_model = 256;
  c.model.n_layers = 2;
  c.model.n_heads = 4;
  c.model.n_kv_heads = 2;
  c.model.d_ff = 688;
  c.model.max_seq_len = 96;
  c.train.seq_len = 96;
  c.train.micro_batch = 3;
#else
  // Emulated on the CPU (tests/cuemu, ~1000x slower than the device): the same structure (hd 64,
  // GQA 2:1, a partial 64-row tile, 2 layers, 2 micro-batches) at an eighth of the work.
  c.model.vocab_size = 256;
  c.model.d_model = 128;
  c.model.n_layers = 2;
  c.model.n_heads = 2;
  c.model.n_kv_heads = 1;
  c.model.d_ff = 344;
  c.model.max_seq_len = 80;
  c.train.seq_len = 80;
  c.train.micro_batch = 1;
#endif
  c.model.init_std = 0.02;
  c.train.batch_tokens = 2 * c.train.micro_batch * c.train.seq_len;
  c.train.max_steps = kSteps;
  c.train.seed = 4242;
  c.train.deterministic = true;
  c.schedule.warmup = 3;
  c.schedule.decay = "cosine";
  c.optim.name = optim;
  if (optim == "adamw") {
    c.optim.lr = 3e-3;
  } else {
    c.optim.lr = 0.02;
  }
  c.optim.adamw.lr = 3e-3;
  c.optim.grad_clip = 1.0;
  validate_config(c);
  return c;
}

// A learnable stream: next = (5 t + 3) mod V with probability 0.8, else uniform.
std::vector<int32_t> synthetic_stream(size_t n, uint32_t V, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> s(n);
  uint32_t t = uint32_t(rng.below(V));
  for (size_t i = 0; i < n; ++i) {
    s[i] = int32_t(t);
    t = rng.uniform() < 0.8 ? (5 * t + 3) % V : uint32_t(rng.below(V));
  }
  return s;
}

struct RunOut {
  std::vector<double> losses, gnorms;
  size_t gemm_fallbacks = 0;  // CUDA: GEMMs that ran on the SIMT fallback instead of cuBLASLt
  // CUDA: the scratch the memory plan expects, what the backend held once it was reserved, and
  // after the last step (0 on the CPU).
  size_t scratch_expected = 0, scratch_reserved = 0, scratch_after = 0;
  nlohmann::json plan;  // memory_plan before the first step
  size_t tensors_after = 0;  // CUDA: bytes held by tensors after the last step
};

// The CUDA backend's counters (0 on the CPU): GEMMs that ran on the SIMT fallback, bytes held
// by tensors, bytes of the ops' scratch.
struct CudaCounters {
  size_t gemm_fallbacks = 0, tensors = 0, scratch = 0;
};
CudaCounters cuda_counters(Backend* be) {
  CudaCounters c;
#ifdef MF_HAS_CUDA
  if (auto* cb = dynamic_cast<CudaBackend*>(be)) {
    c.gemm_fallbacks = cb->cublas().fallback_calls();
    c.tensors = cb->bytes_allocated();
    c.scratch = cb->scratch_bytes();
  }
#endif
  (void)be;
  return c;
}

// comm != nullptr: gradients go through comm->allreduce_avg after accumulation (a one-rank
// NCCL communicator must leave them unchanged).
RunOut train_run(const Config& cfg, const std::string& device, Communicator* comm = nullptr,
                 Backend* shared_be = nullptr) {
  std::unique_ptr<Backend> own;
  if (!shared_be) own = make_backend(device);
  Backend* be = shared_be ? shared_be : own.get();
  REQUIRE(be->name() == device);
  if (!shared_be) be->set_precision(cfg.train.precision);
  if (comm) REQUIRE(be->device() == Device::CUDA);
  const int B = cfg.train.micro_batch, T = cfg.train.seq_len, accum = cfg.grad_accum();
  const int64_t N = int64_t(B) * T;
  LlamaModel model(cfg.model, *be, B, T, mup_model_scales(cfg));
  apply_mup(cfg, model.params());
  model.init_weights(cfg.train.seed);
  Optimizer opt(cfg, model.params(), *be);
  // As the trainer does: one cast over the weight arena after each step, and the scratch the
  // memory plan expects reserved before the first.
  opt.set_weight_refresh([&model] { model.sync_weights(); });
  const nlohmann::json plan = memory_plan(model, opt, *be);
  reserve_memory_plan(plan, *be);
  RunOut out;
  out.scratch_expected = plan.at("scratch_expected").get<size_t>();
  out.scratch_reserved = cuda_counters(be).scratch;
  out.plan = plan;
  const int steps = cfg.train.max_steps;
  const std::vector<int32_t> stream =
      synthetic_stream(size_t(steps * accum) * size_t(N) + 1, uint32_t(cfg.model.vocab_size), 99);
  const float loss_scale = float(1.0 / (double(N) * accum));
  const size_t fallbacks_before = cuda_counters(be).gemm_fallbacks;
  size_t pos = 0;
  for (int s = 0; s < steps; ++s) {
    model.zero_grads();
    double loss = 0;
    for (int m = 0; m < accum; ++m) {
      loss += model.forward_backward(&stream[pos], &stream[pos + 1], loss_scale) / accum;
      pos += size_t(N);
    }
    if (comm)
      for (Param* p : model.params()) comm->allreduce_avg(p->grad.f32(), size_t(p->numel()));
    const double g = global_grad_norm(model.params(), *be);
    opt.step(s, float(clip_factor(g, cfg.optim.grad_clip)));
    out.losses.push_back(loss);
    out.gnorms.push_back(g);
  }
  be->synchronize();
  const CudaCounters after = cuda_counters(be);
  out.gemm_fallbacks = after.gemm_fallbacks - fallbacks_before;
  out.scratch_after = after.scratch;
  out.tensors_after = after.tensors;
  return out;
}

void print_table(const char* title, const RunOut& a, const char* an, const RunOut& b,
                 const char* bn) {
  std::printf("%s\n  step  %-10s %-10s |diff|     gnorm %s / %s\n", title, an, bn, an, bn);
  for (size_t i = 0; i < a.losses.size(); ++i)
    std::printf("  %4zu  %.6f   %.6f   %.2e   %.4f / %.4f\n", i + 1, a.losses[i], b.losses[i],
                std::fabs(a.losses[i] - b.losses[i]), a.gnorms[i], b.gnorms[i]);
  std::fflush(stdout);
}

// The memory plan of a CUDA run: the scratch it expects was reserved before the first step, at
// that size, and no op outgrew it (an op missing from the estimate grows it by half or more);
// its tensor terms add up to what the backend's tensors held before the first step, and the
// steps left no tensor behind.
void check_memory_plan_held(const RunOut& r) {
  const nlohmann::json& p = r.plan;
  INFO(memory_plan_table(p));
  CHECK(r.scratch_expected > 0);
  CHECK(r.scratch_reserved >= r.scratch_expected);
  CHECK(r.scratch_reserved < r.scratch_expected + r.scratch_expected / 2);
  CHECK(r.scratch_after == r.scratch_reserved);
  const int64_t counted = p.at("weights").get<int64_t>() + p.at("grads").get<int64_t>() +
                          p.at("optimizer_state").get<int64_t>() +
                          p.at("muon_scratch").get<int64_t>() +
                          p.at("optimizer_work").get<int64_t>() +
                          p.at("activations").get<int64_t>();
  CHECK(p.at("tensors_measured").get<int64_t>() == counted);
  CHECK(int64_t(r.tensors_after) == counted);
  // One line per row, however long its note (the CUDA workspace note is the longest).
  const std::string table = memory_plan_table(p);
  for (const char* row : {"\n  workspace (expected) ", "\n  total ", "\n  held by tensors "})
    CHECK(table.find(row) != std::string::npos);
}

// precision "bf16": losses within kLossTol. "fp32" (train.precision): both sides compute in
// fp32, so the losses agree within kFp32LossTol and the gradient norms within kFp32GnormRel.
void check_cuda_vs_cpu(const std::string& optim, const std::string& precision = "bf16") {
  Config cfg = e2e_config(optim);
  cfg.train.precision = precision;
  const bool fp32 = precision == "fp32";
  const double tol = fp32 ? kFp32LossTol : kLossTol;
  const RunOut cpu = train_run(cfg, "cpu");
  const RunOut gpu = train_run(cfg, "cuda");
  print_table(("e2e " + optim + ": CUDA " + precision + " vs CPU fp32").c_str(), gpu, "cuda", cpu,
              "cpu");
  double worst = 0, worst_g = 0;
  for (int s = 0; s < kSteps; ++s) {
    INFO(optim << " " << precision << " step " << s + 1 << ": cuda " << gpu.losses[size_t(s)]
               << " cpu " << cpu.losses[size_t(s)] << ", grad norm cuda " << gpu.gnorms[size_t(s)]
               << " cpu " << cpu.gnorms[size_t(s)]);
    REQUIRE(std::isfinite(gpu.losses[size_t(s)]));
    const double d = std::fabs(gpu.losses[size_t(s)] - cpu.losses[size_t(s)]);
    const double dg = std::fabs(gpu.gnorms[size_t(s)] - cpu.gnorms[size_t(s)]) / cpu.gnorms[size_t(s)];
    worst = std::max(worst, d);
    worst_g = std::max(worst_g, dg);
    CHECK(d <= tol);
    if (fp32) CHECK(dg <= kFp32GnormRel);
  }
  std::printf("e2e %s %s: worst |loss diff| %.3e (tolerance %.1e), worst relative grad-norm "
              "diff %.3e; loss %.4f -> %.4f\n",
              optim.c_str(), precision.c_str(), worst, tol, worst_g, cpu.losses.front(),
              cpu.losses.back());
  // Training must actually have happened on both.
  CHECK(gpu.losses.back() < gpu.losses.front() - 0.1);
  // Every GEMM of the model, the loss and the optimizer (all widths multiples of 8) found a
  // cuBLASLt algorithm: none fell back to the SIMT kernel, which is correct but far slower.
  CHECK(gpu.gemm_fallbacks == 0);
  check_memory_plan_held(gpu);
}

}  // namespace

TEST_CASE("e2e harness on the CPU: two runs identical, the loss falls", "[e2e]") {
  for (const char* optim : {"adamw", "muon"}) {
    const Config cfg = e2e_config(optim);
    const RunOut a = train_run(cfg, "cpu"), b = train_run(cfg, "cpu");
    INFO(optim);
    REQUIRE(a.losses.size() == size_t(kSteps));
    for (int s = 0; s < kSteps; ++s) CHECK(a.losses[size_t(s)] == b.losses[size_t(s)]);
    // Starts near ln V (init std 0.02) and learns the affine-successor rule.
    CHECK(std::fabs(a.losses.front() - std::log(double(cfg.model.vocab_size))) < 0.1);
    CHECK(a.losses.back() < a.losses.front() - 0.1);
  }
}

TEST_CASE("e2e AdamW: 20 steps CUDA bf16 vs CPU fp32 losses", "[gpu][e2e]") {
  MF_SKIP_WITHOUT_GPU();
  check_cuda_vs_cpu("adamw");
}

TEST_CASE("e2e Muon: 20 steps CUDA bf16 vs CPU fp32 losses", "[gpu][e2e]") {
  MF_SKIP_WITHOUT_GPU();
  check_cuda_vs_cpu("muon");
}

TEST_CASE("e2e fp32: 20 steps CUDA fp32 vs CPU fp32, AdamW and Muon, close enough to check step "
          "by step", "[gpu][e2e]") {
  MF_SKIP_WITHOUT_GPU();
  check_cuda_vs_cpu("adamw", "fp32");
  check_cuda_vs_cpu("muon", "fp32");
}

TEST_CASE("e2e memory plan of the matrix optimizers on CUDA: the eigendecompositions' scratch "
          "is reserved, the work buffers counted", "[gpu][e2e]") {
  MF_SKIP_WITHOUT_GPU();
  // Three steps: SOAP's bases, Shampoo's and ASGO's roots and Freon's polar factors are all
  // decomposed in the first (unblocked at these widths: the largest matrix is 344 x 128).
  for (const char* optim : {"normuon", "kaon", "freon", "shampoo", "soap", "asgo"}) {
    Config cfg = e2e_config(optim);
    cfg.train.max_steps = 3;
    const std::string name = optim;
    const bool decomposes = name != "normuon" && name != "kaon";
    if (name == "shampoo" || name == "soap" || name == "asgo") cfg.optim.lr = 3e-3;
    const RunOut r = train_run(cfg, "cuda");
    INFO(optim);
    for (double l : r.losses) CHECK(std::isfinite(l));
    CHECK((r.plan.at("sym_scratch").get<int64_t>() > 0) == decomposes);
    CHECK((r.plan.at("optimizer_work").get<int64_t>() > 0) == decomposes);
    // Only the eigendecomposition needs that much: it sets the expected scratch.
    if (decomposes)
      CHECK(r.plan.at("scratch_expected").get<int64_t>() == r.plan.at("sym_scratch").get<int64_t>());
    check_memory_plan_held(r);
  }
}

TEST_CASE("e2e determinism: two CUDA runs give identical losses", "[gpu][e2e]") {
  MF_SKIP_WITHOUT_GPU();
  for (const char* optim : {"adamw", "muon"}) {
    const Config cfg = e2e_config(optim);
    const RunOut a = train_run(cfg, "cuda"), b = train_run(cfg, "cuda");
    INFO(optim);
    int differ = 0;
    for (int s = 0; s < kSteps; ++s) {
      differ += a.losses[size_t(s)] != b.losses[size_t(s)];
      CHECK(a.losses[size_t(s)] == b.losses[size_t(s)]);
      CHECK(a.gnorms[size_t(s)] == b.gnorms[size_t(s)]);
    }
    std::printf("e2e determinism %s: %d of %d steps differ\n", optim, differ, kSteps);
  }
}

TEST_CASE("e2e recompute on CUDA: mlp and full train like none, dense and MoE, in less memory",
          "[gpu][e2e]") {
  MF_SKIP_WITHOUT_GPU();
  for (const bool moe : {false, true}) {
    Config base = e2e_config("muon");
    if (moe) {  // one dense layer, then two MoE layers that share their rebuilt activations
      base.model.n_layers = 3;
      base.model.moe.n_experts = 4;
      base.model.moe.top_k = 2;
      base.model.moe.n_shared = 1;
      base.model.moe.d_expert = 128;
      base.model.moe.first_dense = 1;
    }
    const RunOut none = train_run(base, "cuda");
    // The memory plan holds for MoE too: its scratch, reserved before the first step, was not
    // outgrown (the router's f32 copies and the permutation's sort buffers included), and its
    // activations count the MoE layers' buffers.
    check_memory_plan_held(none);
    int64_t bytes_none = 0;
    {
      auto be = make_backend("cuda");
      bytes_none = LlamaModel(base.model, *be, base.train.micro_batch, base.train.seq_len)
                       .activation_bytes();
    }
    for (const char* rc : {"mlp", "full"}) {
      Config c = base;
      c.model.recompute = rc;
      const RunOut got = train_run(c, "cuda");
      INFO((moe ? "moe" : "dense") << " recompute " << rc);
      // The rebuilt activations are the forward's (deterministic kernels, same shapes): the
      // same losses up to the last bits; a stale rebuild would part within a few steps.
      for (int s = 0; s < kSteps; ++s)
        CHECK(std::fabs(got.losses[size_t(s)] - none.losses[size_t(s)]) <= 1e-5);
      auto be = make_backend("cuda");
      const int64_t bytes =
          LlamaModel(c.model, *be, c.train.micro_batch, c.train.seq_len).activation_bytes();
      CHECK(bytes < bytes_none);
      std::printf("e2e recompute %s %s: activations %.1f -> %.1f MiB, last loss %.6f vs %.6f\n",
                  moe ? "moe" : "dense", rc, bytes_none / 1048576.0, bytes / 1048576.0,
                  got.losses.back(), none.losses.back());
    }
  }
}

TEST_CASE("KvDecoder reads a CUDA model's weights: the same logits as from the CPU model",
          "[gpu][sample]") {
  MF_SKIP_WITHOUT_GPU();
  const Config cfg = e2e_config("muon");
  auto cuda = make_backend("cuda"), cpu = make_backend("cpu");
  LlamaModel mg(cfg.model, *cuda, 1, 16), mc(cfg.model, *cpu, 1, 16);
  mg.init_weights(7);  // the init is drawn on the host: identical masters on both backends
  mc.init_weights(7);
  KvDecoder dg(mg, *cuda, 16), dc(mc, *cpu, 16);
  for (int t = 0; t < 16; ++t) {
    const int32_t tok = int32_t((t * 37 + 11) % cfg.model.vocab_size);
    CHECK(dg.push(tok) == dc.push(tok));
  }
}

#ifdef MF_HAS_NCCL
TEST_CASE("e2e NCCL: a one-rank communicator on the device, collectives and training", "[gpu][nccl]") {
  MF_SKIP_WITHOUT_GPU();
  CudaBackend be;
  DistEnv env;  // rank 0 of 1
  TcpStore store("127.0.0.1", 0, /*is_server=*/true);
  auto comm = make_nccl_communicator(env, store, be.stream());
  REQUIRE(std::string(comm->name()) == "nccl");
  REQUIRE(comm->size() == 1);
  // Collectives on device memory: with one rank each is the identity (avg divides by 1).
  const int64_t n = 1000;
  Tensor h = host_tensor({n});
  for (int64_t i = 0; i < n; ++i) h.f32()[i] = float(i % 97) * 0.25f - 3.f;
  Tensor d = be.empty({n}, DType::F32), r = be.empty({n}, DType::F32);
  be.upload(h, d);
  comm->allreduce_sum(d.f32(), size_t(n));
  comm->allreduce_avg(d.f32(), size_t(n));
  comm->broadcast(d.f32(), size_t(n), 0);
  comm->allgather(d.f32(), r.f32(), size_t(n));
  comm->reduce_scatter_sum(r.f32(), d.f32(), size_t(n));
  comm->barrier();
  Tensor back = host_tensor({n});
  be.download(d, back);
  for (int64_t i = 0; i < n; ++i) REQUIRE(back.f32()[i] == h.f32()[i]);
  // Host bytes go through the store: one rank gets its own back; a root out of range is named.
  std::string bytes("config hash \0 with a zero", 26);
  comm->broadcast_bytes(bytes, 0);
  CHECK(bytes == std::string("config hash \0 with a zero", 26));
  CHECK(comm->allgather_bytes(bytes) == std::vector<std::string>{bytes});
  CHECK_THROWS_WITH(comm->broadcast_bytes(bytes, 1),
                    Catch::Contains("broadcast root 1 is out of range for 1 ranks"));
  // The asynchronous path (the communication stream, its events, the compute stream's wait):
  // a kernel queued after wait() on the compute stream sees the collective's result.
  {
    Tensor e = be.empty({n}, DType::F32);
    be.upload(h, e);
    auto w1 = comm->allreduce_avg_async(d.f32(), size_t(n));
    auto w2 = comm->allreduce_avg_async(e.f32(), size_t(n / 2));
    w1->wait();
    w2->wait();
    be.axpy(2.f, e, d);  // d (=) d + 2e on the compute stream
    be.download(d, back);
    for (int64_t i = 0; i < n; ++i) REQUIRE(back.f32()[i] == 3.f * h.f32()[i]);
    auto w3 = comm->reduce_scatter_avg_async(d.f32(), size_t(n));
    w3->wait();
    be.download(d, back);
    for (int64_t i = 0; i < n; ++i) REQUIRE(back.f32()[i] == 3.f * h.f32()[i]);
  }
  // Training with the all-reduce in the loop gives the same losses as without it.
  const Config cfg = e2e_config("muon");
  const RunOut with = train_run(cfg, "cuda", comm.get(), &be);
  const RunOut without = train_run(cfg, "cuda", nullptr, &be);
  for (int s = 0; s < kSteps; ++s) CHECK(with.losses[size_t(s)] == without.losses[size_t(s)]);
  std::printf("e2e nccl: one-rank collectives exact; %d training steps compared\n", kSteps);
}
#endif
