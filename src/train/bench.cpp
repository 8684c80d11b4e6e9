#include "train/bench.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <vector>

#include "backend/cuda/sizes.h"
#include "backend/profiler.h"
#include "core/log.h"
#include "core/rng.h"
#include "model/llama.h"
#include "optim/mup.h"
#include "optim/optimizer.h"

namespace mf {

namespace {

using Clock = std::chrono::steady_clock;
double secs(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / double(v.size());
}

double mib(double bytes) { return bytes / double(1 << 20); }

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

// Tracks the lowest free device memory and the largest held bytes seen at the sample points.
struct MemTracker {
  Backend& be;
  size_t min_free = SIZE_MAX, max_tensors = 0, max_workspace = 0, total = 0;
  explicit MemTracker(Backend& b) : be(b) {}
  void sample() {
    const MemoryInfo m = be.memory_info();
    total = m.total;
    if (m.total > 0) min_free = std::min(min_free, m.free);
    max_tensors = std::max(max_tensors, m.tensors);
    max_workspace = std::max(max_workspace, m.workspace);
  }
};

}  // namespace

double bench_peak_flops(const Backend& be) {
  return be.device() == Device::CUDA ? 989e12 : 0.0;
}

size_t peak_rss_bytes() {
  struct rusage ru {};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return size_t(ru.ru_maxrss) * 1024;  // Linux reports kilobytes
}

double measure_gemm_flops(Backend& be, int64_t n, int warmup, int reps, double* median_s) {
  MF_CHECK(n > 0 && reps > 0, "measure_gemm_flops: n and reps must be positive (n ", n,
           ", reps ", reps, ")");
  const DType t = be.act_dtype();
  Tensor x = be.empty({n, n}, t), W = be.empty({n, n}, t), y = be.empty({n, n}, t);
  {
    // Random operands (never zeros: a GEMM on zeros runs faster than on real data).
    Rng rng(20240520);
    Tensor h = host_tensor({n, n}, DType::F32);
    float* p = h.f32();
    for (int64_t i = 0; i < n * n; ++i) p[i] = float(rng.uniform() * 2.0 - 1.0);
    be.upload(h, x);
    for (int64_t i = 0; i < n * n; ++i) p[i] = float(rng.uniform() * 2.0 - 1.0);
    be.upload(h, W);
  }
  for (int i = 0; i < warmup; ++i) be.matmul_fwd(x, W, y);
  be.synchronize();
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    be.matmul_fwd(x, W, y);
    be.synchronize();
    ts.push_back(secs(t0, Clock::now()));
  }
  const double med = median(ts);
  if (median_s) *median_s = med;
  return 2.0 * double(n) * double(n) * double(n) / std::max(med, 1e-12);
}

AttnTiming measure_attention(Backend& be, const AttnShape& s, int warmup, int reps) {
  MF_CHECK(reps > 0, "measure_attention: reps must be positive");
  const DType t = be.act_dtype();
  const Shape qs{s.B, s.T, s.H, s.hd}, ks{s.B, s.T, s.Hkv, s.hd};
  Tensor q = be.empty(qs, t), k = be.empty(ks, t), v = be.empty(ks, t), dout = be.empty(qs, t);
  Tensor out = be.empty(qs, t), dq = be.empty(qs, t), dk = be.empty(ks, t), dv = be.empty(ks, t);
  Tensor lse = be.empty({s.B, s.H, s.T}, DType::F32);
  Rng rng(7);
  for (Tensor* x : {&q, &k, &v, &dout}) {
    Tensor h = host_tensor(x->shape, DType::F32);
    for (int64_t i = 0; i < h.numel(); ++i) h.f32()[i] = float(rng.uniform() * 2.0 - 1.0);
    be.upload(h, *x);
  }
  for (int i = 0; i < warmup; ++i) {
    be.attention_fwd(q, k, v, out, lse, s);
    be.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, s);
  }
  be.synchronize();
  std::vector<double> tf, tb;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    be.attention_fwd(q, k, v, out, lse, s);
    be.synchronize();
    auto t1 = Clock::now();
    be.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, s);
    be.synchronize();
    tf.push_back(secs(t0, t1));
    tb.push_back(secs(t1, Clock::now()));
  }
  AttnTiming r;
  r.fwd_s = median(tf);
  r.bwd_s = median(tb);
  r.fwd_flops = 2.0 * double(s.B) * s.H * double(s.T) * s.T * s.hd;
  r.bwd_flops = 2.5 * r.fwd_flops;
  return r;
}

// ---- memory plan -------------------------------------------------------------------------------

nlohmann::json memory_plan(LlamaModel& model, const Optimizer& opt, Backend& be) {
  const ModelConfig& c = model.config();
  const int64_t B = model.B(), T = model.T(), N = B * T;
  const int64_t V = c.vocab_size;

  // The parameter arenas as allocated (each tensor padded to 256 bytes).
  const int64_t weights = model.weight_bytes(), grads = model.grad_bytes();
  int64_t state = 0;
  // Every optimizer's state as it checkpoints it (AdamW m/v, Muon momentum, Shampoo/SOAP/ASGO
  // statistics and roots...).
  for (auto& [name, t] : opt.state_tensors()) state += int64_t(be.held_bytes(t));
  // The optimizer's U / NS stack (f32): one chunk of same-shape matrices orthogonalised in one
  // batched call, capped at max(largest matrix, 64 MiB).
  const int64_t muon_scratch = opt.muon_scratch_bytes();
  // The matrix preconditioners' scaled gradients and block buffers, Freon's temporaries.
  const int64_t opt_work = opt.work_bytes();
  // newton_schulz_coeffs (Polar Express, Kaon) runs in f32, the quintic in the act dtype (bf16,
  // or f32 in fp32 runs).
  bool ns_f32 = be.act_dtype() == DType::F32;
  for (const OptEntry& e : opt.entries())
    ns_f32 = ns_f32 || e.kind == OptKind::Kaon ||
             ((e.kind == OptKind::Muon || e.kind == OptKind::NorMuon) &&
              opt.config().ns == "polar_express");

  // The model's activation buffers for one micro-batch B x T, as allocated (activation
  // recompute shares buffers across layers; MoE layers and their shared scratch included).
  const int64_t acts = model.activation_bytes();
  // One decomposition's scratch for the largest matrix each kind decomposes (CUDA: double
  // copies and cuSOLVER's workspace; the query may grow the scratch, so before memory_info).
  const SymSizes sym = opt.sym_sizes();
  const int64_t sym_scratch = int64_t(std::max(be.sym_scratch_bytes(sym.eig_n, false),
                                               be.sym_scratch_bytes(sym.func_n, true)));

  const MemoryInfo mi = be.memory_info();
  const bool cuda = be.device() == Device::CUDA;
  // Expected workspace peak on CUDA (kernels/ Scratch is one grow-only buffer; the largest user
  // sets it): the fused lm-head xent chunk (f32 logits + dlogits in the act dtype, within
  // train.loss_chunk_mb: the kernel's own sizing, backend/cuda/sizes.h), the Newton-Schulz
  // buffers of one batched chunk (X ping-pong, A, A^2 per matrix: at most 2x the chunk's f32
  // bytes in bf16, 4x in f32, plus the norm partials), the MoE router's f32 copies, the
  // largest eigendecomposition of the matrix preconditioners or Freon, plus the cuBLASLt
  // workspace. The trainer reserves the scratch part before the first step (reserve_memory_plan).
  int64_t ws_expected = 0, scratch_expected = 0;
  if (cuda) {
    const size_t act_bytes = be.act_dtype() == DType::BF16 ? 2 : 4;
    const int64_t xent =
        int64_t(cuda::xent_scratch_bytes(N, V, be.loss_chunk_bytes(), act_bytes, true));
    const int64_t ns =
        !opt.runs_newton_schulz()
            ? 0
            : (ns_f32 ? 4 : 2) * opt.muon_scratch_numel() * 4 +
                  opt.max_ns_batch() * int64_t(cuda::kNsScratchPerSliceBytes) +
                  int64_t(cuda::kNsScratchFixedBytes);
    // MoE router backward (kernels/moe.cu): x widened to f32, and dx's GEMM through an f32
    // temporary when dx is bf16.
    const bool bf16 = be.act_dtype() == DType::BF16;
    const int64_t router =
        c.moe.n_experts > 0 ? int64_t(cuda::moe_router_bwd_scratch_bytes(N, c.d_model, bf16, bf16)) : 0;
    scratch_expected = std::max({xent, ns, router, sym_scratch});
    ws_expected = scratch_expected + int64_t(cuda::kCublasLtWorkspaceBytes);
  }
  const int64_t workspace_now = int64_t(mi.workspace);
  const int64_t total =
      weights + grads + state + muon_scratch + opt_work + acts +
      std::max(workspace_now, ws_expected);

  nlohmann::json j;
  j["device"] = be.name();
  j["B"] = B;
  j["T"] = T;
  j["weights"] = weights;
  j["grads"] = grads;
  j["optimizer_state"] = state;
  j["muon_scratch"] = muon_scratch;
  j["optimizer_work"] = opt_work;
  j["sym_scratch"] = sym_scratch;  // part of scratch_expected on CUDA (0 on the CPU)
  j["activations"] = acts;
  j["recompute"] = c.recompute;
  j["workspace_now"] = workspace_now;
  j["workspace_expected"] = ws_expected;
  j["scratch_expected"] = scratch_expected;  // its scratch part (reserve_memory_plan)
  j["total"] = total;
  j["free"] = int64_t(mi.free);
  j["device_total"] = int64_t(mi.total);
  j["tensors_measured"] = int64_t(mi.tensors);  // 0 when the backend does not track (CPU)
  return j;
}

std::string memory_plan_table(const nlohmann::json& p) {
  std::ostringstream o;
  auto row = [&](const char* name, double bytes, const std::string& note = "") {
    char buf[64];  // the name and figure; the note, of any length, after them
    std::snprintf(buf, sizeof buf, "  %-22s %12.1f MiB", name, mib(bytes));
    o << buf << (note.empty() ? "" : "  ") << note << "\n";
  };
  const bool cuda = p.at("device") == "cuda";
  o << "memory plan (" << p.at("device").get<std::string>() << ", micro-batch "
    << p.at("B").get<int64_t>() << " x " << p.at("T").get<int64_t>() << "):\n";
  row("weights", p.at("weights").get<double>(), cuda ? "f32 master + bf16 compute copy" : "f32");
  row("gradients", p.at("grads").get<double>(), "f32");
  row("optimizer state", p.at("optimizer_state").get<double>(), "every state tensor (f32)");
  row("muon scratch", p.at("muon_scratch").get<double>(), "batched Newton-Schulz chunk, f32");
  if (p.value("optimizer_work", int64_t(0)) > 0)
    row("optimizer work", p.at("optimizer_work").get<double>(),
        "preconditioner block buffers / Freon temporaries, f32");
  row("activations", p.at("activations").get<double>(),
      "as allocated (model.recompute = " + p.value("recompute", std::string("none")) + ")");
  if (cuda) {
    row("workspace now", p.at("workspace_now").get<double>(), "scratch + cuBLASLt 32 MiB");
    row("workspace (expected)", p.at("workspace_expected").get<double>(),
        "max(xent chunk (train.loss_chunk_mb), NS buffers, MoE router, eigendecomposition), "
        "reserved before the first step, + 32 MiB; estimate");
  }
  row("total", p.at("total").get<double>());
  if (cuda && p.at("tensors_measured").get<int64_t>() > 0)
    row("held by tensors", p.at("tensors_measured").get<double>(),
        "measured (CudaBackend::bytes_allocated)");
  if (p.at("device_total").get<int64_t>() > 0) {
    row("free now", p.at("free").get<double>(),
        std::string(cuda ? "cudaMemGetInfo, after the allocations above"
                         : "MemAvailable; large tensors take memory once first written") + "; of " +
            fmt("%.0f", mib(p.at("device_total").get<double>())) + " MiB");
  }
  return o.str();
}

void print_memory_plan(const nlohmann::json& p, bool console) {
  log_info(memory_plan_table(p), console);
  // What is still to come after construction: workspace growth (everything else is allocated).
  const int64_t growth =
      std::max<int64_t>(0, p.at("workspace_expected").get<int64_t>() - p.at("workspace_now").get<int64_t>());
  const int64_t free_b = p.at("free").get<int64_t>();
  if (p.at("device_total").get<int64_t>() > 0 && growth > free_b)
    spdlog::warn("memory plan: the workspace is expected to grow by {:.0f} MiB but only {:.0f} MiB "
                 "are free: reduce train.micro_batch or train.seq_len",
                 mib(double(growth)), mib(double(free_b)));
}

void reserve_memory_plan(const nlohmann::json& p, Backend& be) {
  be.reserve_scratch(size_t(p.value("scratch_expected", int64_t(0))));
}

void check_memory_plan(const nlohmann::json& p, int procs_here) {
  const double machine = p.at("device_total").get<double>();
  if (p.at("device") == "cuda" || machine <= 0) return;
  const double procs = std::max(procs_here, 1);
  const double one = p.at("total").get<double>(), need = one * procs;
  const auto size = format_bytes;
  if (need > machine) {
    const std::string each =
        procs > 1 ? fmt::format(" per process, x {} processes on this machine = {}",
                                procs_here, size(need))
                  : std::string();
    MF_FAIL("the run does not fit in host memory: it needs ", size(one), each, " (weights ",
            size(p.at("weights").get<double>()), ", gradients ", size(p.at("grads").get<double>()),
            ", optimizer state ",
            size(p.at("optimizer_state").get<double>() + p.at("muon_scratch").get<double>() +
                 p.value("optimizer_work", 0.0)),
            ", activations ", size(p.at("activations").get<double>()), " for micro-batch ",
            p.at("B").get<int64_t>(), " x seq_len ", p.at("T").get<int64_t>(),
            " with model.recompute \"", p.value("recompute", std::string("none")),
            "\"), more than the ", size(machine),
            " this machine has; lower train.micro_batch or train.seq_len, set model.recompute "
            "to \"full\", or use a smaller model or an optimizer with less state");
  }
  // Resident before the first step: the weights (written when initialised or loaded, right
  // after this check in the trainer); the rest is first written by the first step.
  const double to_come = (one - p.at("weights").get<double>()) * procs;
  const double free_b = p.at("free").get<double>();
  if (to_come > free_b)
    spdlog::warn("memory plan: the first step will need about {} more host memory but only {} "
                 "is available now; the run may be killed for lack of memory",
                 size(to_come), size(free_b));
}

// ---- bench -------------------------------------------------------------------------------------

nlohmann::json run_bench(const Config& cfg, const BenchOptions& o) {
  MF_CHECK(o.steps >= 1, "bench: --steps must be at least 1 (got ", o.steps, ")");
  MF_CHECK(o.warmup >= 0, "bench: --warmup must be >= 0 (got ", o.warmup, ")");
  MF_CHECK(cfg.train.world_size == 1, "bench: runs one process; unset WORLD_SIZE (it is ",
           cfg.train.world_size, ")");
  auto be = make_backend(cfg.train.device);
  be->set_precision(cfg.train.precision);
  be->set_loss_chunk_mb(cfg.train.loss_chunk_mb);
  select_attention(*be, cfg.model.attention, cfg.train.deterministic);
  const bool cuda = be->device() == Device::CUDA;
  MemTracker mem(*be);
  const MemoryInfo at_start = be->memory_info();
  mem.sample();

  const int B = cfg.train.micro_batch, T = cfg.train.seq_len, accum = cfg.grad_accum();
  const int64_t N = int64_t(B) * T;
  LlamaModel model(cfg.model, *be, B, T, mup_model_scales(cfg));
  apply_mup(cfg, model.params());
  model.init_weights(cfg.train.seed);
  Optimizer opt(cfg, model.params(), *be);
  opt.set_weight_refresh([&model] { model.sync_weights(); });
  const nlohmann::json plan = memory_plan(model, opt, *be);
  mem.sample();
  if (o.verbose) spdlog::info("{}", memory_plan_table(plan));
  check_memory_plan(plan, 1);
  reserve_memory_plan(plan, *be);

  // Synthetic data: a few distinct micro-batches of uniform random tokens, cycled.
  const int nbatches = std::max(1, std::min(accum, 4));
  const std::vector<int32_t> zeros(static_cast<size_t>(N), 0);
  std::vector<std::vector<int32_t>> in(static_cast<size_t>(nbatches), zeros);
  std::vector<std::vector<int32_t>> tg = in;
  Rng rng(cfg.train.seed);
  const uint32_t V = uint32_t(cfg.model.vocab_size);
  for (int b = 0; b < nbatches; ++b)
    for (int64_t i = 0; i < N; ++i) {
      in[size_t(b)][size_t(i)] = int32_t(rng.below(V));
      tg[size_t(b)][size_t(i)] = int32_t(rng.below(V));
    }
  const float loss_scale = float(1.0 / (double(N) * accum));
  const double fpt = model.flops_per_token();
  const ParamList params = model.params();

  // One optimizer step; returns the loss, t (seconds: fwd+bwd, grad norm, optimizer, whole step).
  struct StepTimes {
    double loss = 0, fb = 0, norm = 0, opt = 0, step = 0;
  };
  auto one_step = [&](int s) {
    be->synchronize();
    const auto t0 = Clock::now();
    {
      ProfRegion r(*be, "zero_grads");
      model.zero_grads();
    }
    StepTimes st;
    for (int m = 0; m < accum; ++m) {
      const int b = m % nbatches;
      model.forward_backward_deferred(in[size_t(b)].data(), tg[size_t(b)].data(), loss_scale);
    }
    st.loss = model.take_loss();
    be->synchronize();
    const auto t1 = Clock::now();
    ProfRegion r(*be, "grad_norm");
    const double gnorm = global_grad_norm(params, *be);
    const double clip = clip_factor(gnorm, cfg.optim.grad_clip);
    be->synchronize();
    const auto t2 = Clock::now();
    r.end();
    opt.step(s, float(clip));
    r.next("post_step");
    model.post_step();
    be->synchronize();
    const auto t3 = Clock::now();
    st.fb = secs(t0, t1);
    st.norm = secs(t1, t2);
    st.opt = secs(t2, t3);
    st.step = secs(t0, t3);
    return st;
  };

  std::vector<double> t_step, t_fb, t_norm, t_opt, losses;
  const int total = o.warmup + o.steps;
  for (int s = 0; s < total; ++s) {
    const StepTimes st = one_step(s);
    mem.sample();
    MF_CHECK(std::isfinite(st.loss), "bench: non-finite loss ", st.loss, " at step ", s + 1);
    losses.push_back(st.loss);
    const bool timed = s >= o.warmup;
    if (timed) {
      t_step.push_back(st.step);
      t_fb.push_back(st.fb);
      t_norm.push_back(st.norm);
      t_opt.push_back(st.opt);
    }
    if (o.verbose)
      spdlog::info("bench step {}/{}{} | loss {:.4f} | {:.1f} ms (fwd+bwd {:.1f}, norm {:.1f}, "
                   "opt {:.1f})",
                   s + 1, total, timed ? "" : " (warm-up)", st.loss, 1e3 * st.step, 1e3 * st.fb,
                   1e3 * st.norm, 1e3 * st.opt);
  }

  // Profiled steps (--profile N): the same step with a mark at every region boundary, after the
  // timed ones (marks cost a little; they never touch the figures above).
  nlohmann::json profile = nullptr;
  if (o.profile_steps > 0) {
    OpProfiler prof(*be);
    std::vector<double> t_prof;
    for (int s = 0; s < o.profile_steps; ++s) {
      t_prof.push_back(one_step(total + s).step);
      prof.flush();
    }
    const double n = double(o.profile_steps), step_ms = 1e3 * mean(t_prof);
    nlohmann::json regions = nlohmann::json::array();
    for (const OpProfiler::Region& g : prof.regions())
      regions.push_back({{"region", g.path}, {"ms", g.ms / n}, {"calls", double(g.calls) / n},
                         {"share", g.ms / n / std::max(step_ms, 1e-12)}});
    profile = {{"steps", o.profile_steps}, {"step_ms", step_ms},
               {"regions_ms", prof.total_ms() / n}, {"regions", regions}};
  }

  // Forward alone over the same micro-batches (backward is derived from it).
  const int fwd_reps = o.fwd_reps > 0 ? o.fwd_reps : std::min(accum, 8);
  model.forward(in[0].data(), tg[0].data());  // warm
  be->synchronize();
  std::vector<double> t_fwd;
  for (int r = 0; r < fwd_reps; ++r) {
    const int b = r % nbatches;
    const auto t0 = Clock::now();
    model.forward(in[size_t(b)].data(), tg[size_t(b)].data());
    be->synchronize();
    t_fwd.push_back(secs(t0, Clock::now()));
  }
  mem.sample();
  const size_t rss = peak_rss_bytes();

  // Muon's share: a second optimizer over the hidden matrices only (all Muon), stepped on the
  // gradients of the last step. Timed after the memory figures (its momentum is extra memory).
  double muon_s = -1;
  int muon_params = 0;
  if (o.muon_split && cfg.optim.name == "muon") {
    ParamList hidden;
    for (Param* p : params)
      if (in_main_group(p->kind, cfg.optim) && p->trainable) hidden.push_back(p);
    muon_params = int(hidden.size());
    if (!hidden.empty()) {
      Optimizer muon(cfg, hidden, *be);
      muon.step(0, 1.f);  // warm (plan caches, NS scratch)
      be->synchronize();
      std::vector<double> ts;
      for (int r = 0; r < std::max(3, std::min(o.steps, 10)); ++r) {
        const auto t0 = Clock::now();
        muon.step(r + 1, 1.f);
        be->synchronize();
        ts.push_back(secs(t0, Clock::now()));
      }
      muon_s = median(ts);
    }
  }

  // Achieved GEMM rate through the backend (cuBLASLt on CUDA, OpenBLAS sgemm on CPU).
  int64_t gn = o.gemm_size == 0 ? (cuda ? 8192 : 1024) : o.gemm_size;
  double gemm_flops = 0, gemm_s = 0;
  if (gn > 0) gemm_flops = measure_gemm_flops(*be, gn, cuda ? 3 : 1, cuda ? 10 : 3, &gemm_s);

  nlohmann::json attn = nullptr;
  if (o.attention) {
    AttnShape as;
    as.B = B;
    as.T = T;
    as.H = cfg.model.n_heads;
    as.Hkv = cfg.model.n_kv_heads;
    as.hd = cfg.model.head_dim();
    as.scale = float(model.attn_scale());
    const AttnTiming at = measure_attention(*be, as, cuda ? 3 : 1, cuda ? 10 : 2);
    attn = {{"B", as.B}, {"T", as.T}, {"H", as.H}, {"Hkv", as.Hkv}, {"hd", as.hd},
            {"fwd_ms", 1e3 * at.fwd_s}, {"bwd_ms", 1e3 * at.bwd_s},
            {"fwd_tflops", at.fwd_flops / at.fwd_s / 1e12},
            {"bwd_tflops", at.bwd_flops / at.bwd_s / 1e12}};
  }

  const double step_mean = mean(t_step), step_med = median(t_step);
  const double tokens = double(N) * accum;
  const double tps = tokens / std::max(step_mean, 1e-12);
  const double peak = bench_peak_flops(*be);
  const double fwd_step = median(t_fwd) * accum, fb_step = median(t_fb);

  nlohmann::json r;
  r["config"] = cfg.source;
  r["device"] = be->name();
  r["act_dtype"] = dtype_name(be->act_dtype());
  r["params"] = model.num_params();
  r["active_params"] = int64_t(model.active_matmul_params());
  if (cfg.model.moe.n_experts > 0)
    r["moe"] = {{"n_experts", cfg.model.moe.n_experts}, {"top_k", cfg.model.moe.top_k},
                {"n_shared", cfg.model.moe.n_shared}, {"d_expert", cfg.model.moe.d_expert}};
  r["flops_per_token"] = fpt;
  r["micro_batch"] = B;
  r["seq_len"] = T;
  r["grad_accum"] = accum;
  r["batch_tokens"] = int64_t(tokens);
  r["optimizer"] = cfg.optim.name;
  r["warmup"] = o.warmup;
  r["steps"] = o.steps;
  r["step_ms_mean"] = 1e3 * step_mean;
  r["step_ms_median"] = 1e3 * step_med;
  r["step_ms_min"] = 1e3 * *std::min_element(t_step.begin(), t_step.end());
  r["tok_per_s"] = tps;
  r["tok_per_s_median_step"] = tokens / std::max(step_med, 1e-12);
  r["achieved_tflops"] = fpt * tps / 1e12;
  r["peak_tflops"] = peak > 0 ? nlohmann::json(peak / 1e12) : nlohmann::json(nullptr);
  r["mfu"] = peak > 0 ? nlohmann::json(fpt * tps / peak) : nlohmann::json(nullptr);
  if (gn > 0) {
    r["gemm"] = {{"n", gn}, {"dtype", dtype_name(be->act_dtype())}, {"median_ms", 1e3 * gemm_s},
                 {"tflops", gemm_flops / 1e12}};
    r["mfu_vs_gemm"] = fpt * tps / gemm_flops;
  }
  r["attention"] = attn;
  r["time_ms"] = {{"fwd_bwd", 1e3 * fb_step},
                  {"fwd", 1e3 * fwd_step},
                  {"bwd", 1e3 * (fb_step - fwd_step)},
                  {"bwd_derived", true},
                  {"fwd_reps", fwd_reps},
                  {"grad_norm", 1e3 * median(t_norm)},
                  {"optimizer", 1e3 * median(t_opt)},
                  {"muon", muon_s >= 0 ? nlohmann::json(1e3 * muon_s) : nlohmann::json(nullptr)},
                  {"muon_params", muon_params}};
  r["share"] = {{"fwd", fwd_step / step_med},
                {"bwd", (fb_step - fwd_step) / step_med},
                {"grad_norm", median(t_norm) / step_med},
                {"optimizer", median(t_opt) / step_med},
                {"muon", muon_s >= 0 ? nlohmann::json(muon_s / step_med) : nlohmann::json(nullptr)}};
  nlohmann::json m;
  m["plan"] = plan;
  if (cuda) {
    m["device_total"] = int64_t(mem.total);
    m["free_at_start"] = int64_t(at_start.free);
    m["min_free"] = int64_t(mem.min_free);
    m["peak_device_used"] = int64_t(mem.total - mem.min_free);       // everything on the GPU
    m["peak_run_delta"] = int64_t(at_start.free - mem.min_free);     // this run, after context
    m["peak_tensors"] = int64_t(mem.max_tensors);
    m["peak_workspace"] = int64_t(mem.max_workspace);
    m["peak_allocated"] = int64_t(mem.max_tensors + mem.max_workspace);  // ~ torch max_allocated
  }
  m["peak_rss"] = int64_t(rss);
  r["memory"] = m;
  r["profile"] = profile;
  r["loss_first"] = losses.front();
  r["loss_last"] = losses.back();
  return r;
}

std::string profile_table(const nlohmann::json& p) {
  std::ostringstream o;
  const double step = p.at("step_ms").get<double>(), covered = p.at("regions_ms").get<double>();
  o << "  profile      " << p.at("steps").get<int>() << " profiled step(s), "
    << fmt("%.2f", step) << " ms each; regions cover " << fmt("%.2f", covered) << " ms ("
    << fmt("%.1f%%", 100 * covered / std::max(step, 1e-12))
    << "; the rest: host gaps between regions)\n";
  char buf[256];
  std::snprintf(buf, sizeof buf, "    %-36s %10s %7s %9s\n", "region (exclusive time)", "ms/step",
                "share", "calls");
  o << buf;
  for (const auto& g : p.at("regions")) {
    std::snprintf(buf, sizeof buf, "    %-36s %10.3f %6.1f%% %9.0f\n",
                  g.at("region").get<std::string>().c_str(), g.at("ms").get<double>(),
                  100 * g.at("share").get<double>(), g.at("calls").get<double>());
    o << buf;
  }
  return o.str();
}

std::string bench_report(const nlohmann::json& r) {
  std::ostringstream o;
  auto line = [&](const std::string& s) { o << s << "\n"; };
  const auto& tm = r.at("time_ms");
  const auto& sh = r.at("share");
  const double step = r.at("step_ms_median").get<double>();
  line("bench: " + r.at("config").get<std::string>() + " on " + r.at("device").get<std::string>() +
       " (" + r.at("act_dtype").get<std::string>() + "), " +
       fmt("%.1fM", r.at("params").get<double>() / 1e6) + " params, micro-batch " +
       std::to_string(r.at("micro_batch").get<int>()) + " x " +
       std::to_string(r.at("seq_len").get<int>()) + " x " +
       std::to_string(r.at("grad_accum").get<int>()) + " accumulation = " +
       std::to_string(r.at("batch_tokens").get<int64_t>()) + " tokens/step, optimizer " +
       r.at("optimizer").get<std::string>());
  line("  steps        " + std::to_string(r.at("steps").get<int>()) + " timed after " +
       std::to_string(r.at("warmup").get<int>()) + " warm-up; step " + fmt("%.2f", step) +
       " ms median, " + fmt("%.2f", r.at("step_ms_mean").get<double>()) + " mean, " +
       fmt("%.2f", r.at("step_ms_min").get<double>()) + " min");
  line("  throughput   " + fmt("%.0f", r.at("tok_per_s").get<double>()) + " tokens/s (" +
       fmt("%.2f", r.at("achieved_tflops").get<double>()) + " TFLOP/s at " +
       fmt("%.0f", r.at("flops_per_token").get<double>()) + " FLOP/token)");
  if (!r.at("mfu").is_null())
    line("  MFU          " + fmt("%.1f%%", 100 * r.at("mfu").get<double>()) + " of " +
         fmt("%.0f", r.at("peak_tflops").get<double>()) + " TFLOP/s dense bf16 (datasheet)");
  if (r.contains("gemm")) {
    const auto& g = r.at("gemm");
    const double tf = g.at("tflops").get<double>();
    const bool cpu = r.at("device") == "cpu";
    line("  GEMM         " + std::to_string(g.at("n").get<int64_t>()) + "^3 " +
         g.at("dtype").get<std::string>() + " via matmul_fwd: " +
         (cpu ? fmt("%.1f GFLOP/s", tf * 1e3) : fmt("%.1f TFLOP/s", tf)) + " (" +
         fmt("%.3f", g.at("median_ms").get<double>()) + " ms); model at " +
         fmt("%.1f%%", 100 * r.at("mfu_vs_gemm").get<double>()) + " of that rate");
  }
  auto part = [&](const char* name, const char* key, const char* note) {
    const auto& v = tm.at(key);
    if (v.is_null()) return;
    line(std::string("  ") + name + fmt("%10.2f ms", v.get<double>()) +
         fmt("  %5.1f%% of the step", 100 * sh.at(key).get<double>()) + note);
  };
  line("  time split (per step, medians):");
  part("  forward   ", "fwd", "  (forward() timed alone x accumulation)");
  part("  backward  ", "bwd", "  (derived: fwd_bwd - forward)");
  part("  grad norm ", "grad_norm", "");
  part("  optimizer ", "optimizer", "  (all groups + master->compute copy)");
  part("  Muon      ", "muon", "  (Muon-only optimizer over the hidden matrices, timed apart)");
  if (r.contains("attention") && !r.at("attention").is_null()) {
    const auto& a = r.at("attention");
    line("  attention    alone at B " + std::to_string(a.at("B").get<int>()) + ", T " +
         std::to_string(a.at("T").get<int>()) + ", " + std::to_string(a.at("H").get<int>()) + "/" +
         std::to_string(a.at("Hkv").get<int>()) + " heads, hd " + std::to_string(a.at("hd").get<int>()) +
         ": fwd " + fmt("%.3f ms", a.at("fwd_ms").get<double>()) + " (" +
         fmt("%.1f TFLOP/s", a.at("fwd_tflops").get<double>()) + "), bwd " +
         fmt("%.3f ms", a.at("bwd_ms").get<double>()) + " (" +
         fmt("%.1f TFLOP/s", a.at("bwd_tflops").get<double>()) + "), causal FLOPs");
  }
  const auto& m = r.at("memory");
  if (m.contains("peak_device_used")) {
    line("  memory       peak device used " + fmt("%.0f MiB", mib(m.at("peak_device_used").get<double>())) +
         " of " + fmt("%.0f", mib(m.at("device_total").get<double>())) + "; this run " +
         fmt("%.0f MiB", mib(m.at("peak_run_delta").get<double>())) + "; tensors " +
         fmt("%.0f MiB", mib(m.at("peak_tensors").get<double>())) + " + workspace " +
         fmt("%.0f MiB", mib(m.at("peak_workspace").get<double>())));
  }
  line("  host         peak RSS " + fmt("%.0f MiB", mib(m.at("peak_rss").get<double>())));
  if (r.contains("profile") && !r.at("profile").is_null()) o << profile_table(r.at("profile"));
  line("  loss         " + fmt("%.4f", r.at("loss_first").get<double>()) + " -> " +
       fmt("%.4f", r.at("loss_last").get<double>()) + " (random tokens)");
  return o.str();
}

}  // namespace mf
