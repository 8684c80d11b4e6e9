// muonforge bench, the memory plan and the PyTorch baseline script (CPU; cheap settings).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "backend/profiler.h"
#include "config/config.h"
#include "model/llama.h"
#include "optim/mup.h"
#include "optim/optimizer.h"
#include "train/bench.h"
#include "test_util.h"

using namespace mf;

namespace {

namespace fs = std::filesystem;
const std::string kRoot = std::string(MF_TEST_DIR) + "/..";
const std::string kTiny = kRoot + "/configs/tiny.json";

// Small and fast: T 64, micro-batch 4 (256 tokens), one micro-batch per step unless overridden.
Config tiny_config(std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = {"train.device=cpu", "train.seq_len=64", "model.max_seq_len=64",
                                   "train.micro_batch=4", "train.batch_tokens=256",
                                   "train.world_size=1"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config(kTiny, sets);
}

// One untimed-extras step: no warm-up, GEMM check, attention timing or Muon split.
BenchOptions bare_options(int profile_steps = 0) {
  BenchOptions o;
  o.steps = 1;
  o.warmup = 0;
  o.gemm_size = -1;
  o.attention = false;
  o.muon_split = false;
  o.verbose = false;
  o.profile_steps = profile_steps;
  return o;
}

std::string run_capture(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  std::array<char, 4096> buf{};
  while (fgets(buf.data(), int(buf.size()), p)) out += buf.data();
  const int st = pclose(p);
  *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

nlohmann::json last_json_line(const std::string& out) {
  size_t end = out.size();
  while (end > 0) {
    size_t start = out.rfind('\n', end - 1);
    start = start == std::string::npos ? 0 : start + 1;
    const std::string line = out.substr(start, end - start);
    if (!line.empty() && line[0] == '{') return nlohmann::json::parse(line);
    if (start == 0) break;
    end = start - 1;
  }
  FAIL("no JSON line in the output:\n" << out);
  return {};
}

}  // namespace

TEST_CASE("memory plan: exact byte counts of weights, grads and optimizer state on the CPU",
          "[bench]") {
  for (const char* optim : {"muon", "adamw"}) {
    const Config cfg = tiny_config({std::string("optim.name=") + optim});
    auto be = make_backend("cpu");
    LlamaModel model(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len,
                     mup_model_scales(cfg));
    apply_mup(cfg, model.params());
    Optimizer opt(cfg, model.params(), *be);
    const nlohmann::json p = memory_plan(model, opt, *be);
    int64_t n = 0, hidden = 0, largest_hidden = 0;
    for (Param* q : model.params()) {
      n += q->numel();
      if (q->kind == ParamKind::Hidden) {
        hidden += q->numel();
        largest_hidden = std::max(largest_hidden, q->numel());
      }
    }
    INFO(optim << "\n" << memory_plan_table(p));
    CHECK(p.at("weights").get<int64_t>() == 4 * n);  // CPU: compute copy == master
    CHECK(p.at("grads").get<int64_t>() == 4 * n);
    const bool muon = std::string(optim) == "muon";
    // Muon: one momentum per hidden matrix, AdamW m and v for the rest; AdamW: m and v for all.
    CHECK(p.at("optimizer_state").get<int64_t>() == (muon ? 4 * hidden + 8 * (n - hidden) : 8 * n));
    // Muon's scratch holds one batched Newton-Schulz chunk: here (far below the 64 MiB cap)
    // every hidden matrix of the most common shape at once.
    std::map<Shape, int64_t> by_shape;
    for (Param* q : model.params())
      if (q->kind == ParamKind::Hidden) by_shape[q->shape] += q->numel();
    int64_t largest_group = 0;
    for (auto& [shape, numel] : by_shape) largest_group = std::max(largest_group, numel);
    CHECK(largest_group > largest_hidden);  // the tiny model has several matrices of one shape
    CHECK(p.at("muon_scratch").get<int64_t>() == (muon ? 4 * largest_group : 0));
    // Activations: LlamaModel's buffers for 4 x 64, f32 on the CPU: at least the per-layer
    // residual, q, k, v and MLP buffers, and no more than twice the formula's dominant terms.
    const int64_t N = 4 * 64, d = cfg.model.d_model, f = cfg.model.d_ff;
    const int64_t acts = p.at("activations").get<int64_t>();
    CHECK(acts > cfg.model.n_layers * N * (4 * d + 3 * f) * 4);
    CHECK(acts < cfg.model.n_layers * N * (8 * d + 6 * f) * 4 * 2);
    CHECK(p.at("total").get<int64_t>() ==
          p.at("weights").get<int64_t>() + p.at("grads").get<int64_t>() +
              p.at("optimizer_state").get<int64_t>() + p.at("muon_scratch").get<int64_t>() + acts);
    CHECK(p.at("device_total").get<int64_t>() > 0);  // /proc/meminfo
    CHECK(p.at("free").get<int64_t>() > 0);
    CHECK(p.at("free").get<int64_t>() <= p.at("device_total").get<int64_t>());
    const std::string table = memory_plan_table(p);
    for (const char* row : {"weights", "gradients", "optimizer state", "activations", "total", "free now"})
      CHECK(table.find(row) != std::string::npos);
  }
}

TEST_CASE("memory plan: the matrix optimizers' work buffers are counted in the total",
          "[bench]") {
  // tiny: every hidden matrix is at most 384 wide, one block under the 1024 default (ASGO
  // unblocked by default), so each preconditioner holds a scaled gradient of the parameter's
  // size and block buffers of one [rows, cols] matrix each: Shampoo four plus Adam's direction
  // (graft adam), SOAP five, ASGO four. Freon holds one workspace for its largest matrix:
  // S and P on the smaller side and the product.
  for (const char* optim : {"shampoo", "soap", "asgo", "freon", "muon"}) {
    const Config cfg = tiny_config({std::string("optim.name=") + optim});
    auto be = make_backend("cpu");
    LlamaModel model(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len,
                     mup_model_scales(cfg));
    Optimizer opt(cfg, model.params(), *be);
    const nlohmann::json p = memory_plan(model, opt, *be);
    const std::string name = optim;
    int64_t want = 0, freon = 0;
    for (Param* q : model.params()) {
      if (q->kind != ParamKind::Hidden) continue;
      const int64_t r = q->shape[q->shape.size() - 2], c = q->shape.back(), n = q->numel();
      REQUIRE(std::max(r, c) <= 1024);
      if (name == "shampoo") want += 4 * (2 * n + 4 * r * c);
      if (name == "soap") want += 4 * (n + 5 * r * c);
      if (name == "asgo") want += 4 * (n + 4 * r * c);
      freon = std::max(freon, 4 * (2 * std::min(r, c) * std::min(r, c) + r * c));
    }
    if (name == "freon") want = freon;
    INFO(optim << "\n" << memory_plan_table(p));
    CHECK(p.at("optimizer_work").get<int64_t>() == want);
    CHECK(p.at("sym_scratch").get<int64_t>() == 0);  // the CPU decomposes on the heap
    CHECK(p.at("total").get<int64_t>() ==
          p.at("weights").get<int64_t>() + p.at("grads").get<int64_t>() +
              p.at("optimizer_state").get<int64_t>() + p.at("muon_scratch").get<int64_t>() +
              want + p.at("activations").get<int64_t>());
    CHECK((memory_plan_table(p).find("optimizer work") != std::string::npos) == (want > 0));
  }
}

TEST_CASE("memory plan: weights and gradients as the padded arenas hold them", "[bench]") {
  // Widths that are not multiples of 64 floats: every parameter starts 256-byte aligned in the
  // arenas, so each takes its element count rounded up to 64 (the norms' 72 take 128).
  const Config cfg = tiny_config({"model.d_model=72", "model.n_heads=2", "model.n_kv_heads=1",
                                  "model.d_ff=200", "model.vocab_size=250",
                                  "mup.base_width=72"});
  auto be = make_backend("cpu");
  LlamaModel model(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len,
                   mup_model_scales(cfg));
  Optimizer opt(cfg, model.params(), *be);
  const nlohmann::json p = memory_plan(model, opt, *be);
  int64_t exact = 0, padded = 0;
  for (Param* q : model.params()) {
    exact += q->numel();
    padded += (q->numel() + 63) / 64 * 64;
  }
  REQUIRE(padded > exact);
  CHECK(p.at("weights").get<int64_t>() == 4 * padded);  // CPU: the compute copy is the master
  CHECK(p.at("grads").get<int64_t>() == 4 * padded);
}

TEST_CASE("memory_info: the CPU default reads /proc/meminfo", "[bench]") {
  auto be = make_backend("cpu");
  const MemoryInfo m = be->memory_info();
  CHECK(m.total > (size_t(64) << 20));
  CHECK(m.free > 0);
  CHECK(m.free <= m.total);
  CHECK(m.tensors == 0);
}

TEST_CASE("host_memory_info: MemTotal / MemAvailable bounded by the process's cgroup and its "
          "ancestors (v2 and v1)*", "[bench][memory]") {
  const fs::path root = fs::temp_directory_path() / ("mf_cgroup_" + std::to_string(getpid()));
  fs::remove_all(root);
  auto put = [&](const fs::path& rel, const std::string& text) {
    fs::create_directories((root / rel).parent_path());
    std::ofstream(root / rel) << text;
  };
  const size_t GiB = size_t(1) << 30;
  put("meminfo", "MemTotal:       " + std::to_string(64 * GiB / 1024) + " kB\n"
                 "MemFree:        1000 kB\n"
                 "MemAvailable:   " + std::to_string(40 * GiB / 1024) + " kB\n");
  const std::string meminfo = (root / "meminfo").string(), cg = (root / "cg").string();

  // No cgroup file, no limits: the meminfo figures.
  MemoryInfo m = host_memory_info(meminfo, cg, (root / "none").string());
  CHECK(m.total == 64 * GiB);
  CHECK(m.free == 40 * GiB);

  // v2: the job's own cgroup is unlimited ("max"); its parent (a Slurm job's step, say) holds
  // 8 GiB, 3 GiB of it in use; the grandparent has a looser limit with less room left.
  put("self_v2", "0::/slurm/job_7/step_0\n");
  put("cg/slurm/job_7/step_0/memory.max", "max\n");
  put("cg/slurm/job_7/step_0/memory.current", "1000\n");
  put("cg/slurm/job_7/memory.max", std::to_string(8 * GiB) + "\n");
  put("cg/slurm/job_7/memory.current", std::to_string(3 * GiB) + "\n");
  put("cg/slurm/memory.max", std::to_string(16 * GiB) + "\n");
  put("cg/slurm/memory.current", std::to_string(14 * GiB) + "\n");
  m = host_memory_info(meminfo, cg, (root / "self_v2").string());
  CHECK(m.total == 8 * GiB);
  CHECK(m.free == 2 * GiB);  // the grandparent's 16 - 14
  // A container root (cgroup namespace: "0::/") reads the hierarchy's root files.
  put("cg/memory.max", std::to_string(4 * GiB) + "\n");
  put("cg/memory.current", std::to_string(1 * GiB) + "\n");
  put("self_root", "0::/\n");
  m = host_memory_info(meminfo, cg, (root / "self_root").string());
  CHECK(m.total == 4 * GiB);
  CHECK(m.free == 3 * GiB);

  // v1 (hybrid hierarchies list both; v2 files absent there): the memory controller's line,
  // possibly shared with others ("5:memory,hugetlb:..."); unlimited reads as a huge number.
  put("self_v1", "0::/\n9:pids:/x\n5:hugetlb,memory:/process_api/abc\n");
  fs::remove(root / "cg/memory.max");
  put("cg/memory/memory.limit_in_bytes", "9223372036854771712\n");
  put("cg/memory/process_api/memory.limit_in_bytes", std::to_string(6 * GiB) + "\n");
  put("cg/memory/process_api/memory.usage_in_bytes", std::to_string(5 * GiB) + "\n");
  put("cg/memory/process_api/abc/memory.limit_in_bytes", "9223372036854771712\n");
  put("cg/memory/process_api/abc/memory.usage_in_bytes", std::to_string(GiB) + "\n");
  m = host_memory_info(meminfo, cg, (root / "self_v1").string());
  CHECK(m.total == 6 * GiB);
  CHECK(m.free == 1 * GiB);
  fs::remove_all(root);
}

// Sets an environment variable for one scope.
struct ScopedEnv {
  std::string name;
  ScopedEnv(const char* n, const std::string& v) : name(n) { setenv(n, v.c_str(), 1); }
  ~ScopedEnv() { unsetenv(name.c_str()); }
};

TEST_CASE("memory_info: MF_FAULT_HOST_MEMORY pretends a smaller machine; bad values are errors",
          "[bench][memory]") {
  auto be = make_backend("cpu");
  {
    ScopedEnv e("MF_FAULT_HOST_MEMORY", std::to_string(size_t(300) << 20));
    const MemoryInfo m = be->memory_info();
    CHECK(m.total == (size_t(300) << 20));
    CHECK(m.free > 0);
    CHECK(m.free <= m.total);
  }
  for (const char* bad : {"0", "-5", "1e9", "12GiB"}) {
    ScopedEnv e("MF_FAULT_HOST_MEMORY", bad);
    const std::string msg = mf::test::error_of([&] { be->memory_info(); });
    INFO(msg);
    CHECK(msg.find(std::string("MF_FAULT_HOST_MEMORY='") + bad + "'") != std::string::npos);
  }
}

TEST_CASE("check_memory_plan: a CPU run larger than the machine fails, counting its processes",
          "[bench][memory][errors]") {
  nlohmann::json p;
  p["device"] = "cpu";
  p["B"] = 8;
  p["T"] = 256;
  p["recompute"] = "none";
  p["weights"] = int64_t(10) << 20;
  p["grads"] = int64_t(10) << 20;
  p["optimizer_state"] = int64_t(20) << 20;
  p["muon_scratch"] = int64_t(0);
  p["activations"] = int64_t(60) << 20;
  p["total"] = int64_t(100) << 20;
  p["device_total"] = int64_t(250) << 20;
  p["free"] = int64_t(250) << 20;
  CHECK_NOTHROW(check_memory_plan(p, 1));
  CHECK_NOTHROW(check_memory_plan(p, 2));
  std::string msg = mf::test::error_of([&] { check_memory_plan(p, 3); });
  INFO(msg);
  CHECK(msg.find("does not fit in host memory") != std::string::npos);
  CHECK(msg.find("100 MiB per process, x 3 processes on this machine = 300 MiB") != std::string::npos);
  CHECK(msg.find("more than the 250 MiB this machine has") != std::string::npos);
  p["device_total"] = int64_t(90) << 20;
  msg = mf::test::error_of([&] { check_memory_plan(p, 1); });
  CHECK(msg.find("it needs 100 MiB (weights 10 MiB, gradients 10 MiB, optimizer state 20 MiB, "
                 "activations 60 MiB for micro-batch 8 x seq_len 256") != std::string::npos);
  CHECK(msg.find("train.micro_batch") != std::string::npos);
  // On CUDA an allocation that does not fit fails by itself; the plan adds no error.
  p["device"] = "cuda";
  CHECK_NOTHROW(check_memory_plan(p, 1));
}

TEST_CASE("bench refuses a model whose memory plan exceeds the machine, before its first step",
          "[bench][memory][errors]") {
  // Wide MLP, long micro-batch: the weights and residual stream (LlamaModel's check: ~35 MiB)
  // fit in 256 MiB, the MLP activations (6 x 2048 x 8192 f32, ~400 MiB, mapped but never
  // touched) do not.
  const Config cfg = tiny_config({"model.d_ff=8192", "train.micro_batch=32",
                                  "train.batch_tokens=2048", "model.n_layers=1"});
  ScopedEnv e("MF_FAULT_HOST_MEMORY", std::to_string(size_t(256) << 20));
  BenchOptions o = bare_options();
  const std::string msg = mf::test::error_of([&] { run_bench(cfg, o); });
  INFO(msg);
  CHECK(msg.find("the run does not fit in host memory") != std::string::npos);
  CHECK(msg.find("micro-batch 32 x seq_len 64") != std::string::npos);
}

TEST_CASE("run_bench on the CPU: every figure present and consistent", "[bench]") {
  const Config cfg = tiny_config({"train.batch_tokens=512"});  // 2 micro-batches per step
  BenchOptions o;
  o.steps = 2;
  o.warmup = 1;
  o.gemm_size = 96;
  o.verbose = false;
  const nlohmann::json r = run_bench(cfg, o);
  INFO(r.dump(2));
  CHECK(r.at("device") == "cpu");
  CHECK(r.at("grad_accum") == 2);
  CHECK(r.at("batch_tokens") == 512);
  CHECK(r.at("mfu").is_null());  // no datasheet peak on the CPU
  CHECK(r.at("tok_per_s").get<double>() > 0);
  const double step = r.at("step_ms_median").get<double>();
  const auto& t = r.at("time_ms");
  CHECK(step > 0);
  CHECK(t.at("fwd").get<double>() > 0);
  CHECK(t.at("bwd").get<double>() ==
        Approx(t.at("fwd_bwd").get<double>() - t.at("fwd").get<double>()));
  CHECK(t.at("bwd_derived") == true);
  CHECK(t.at("fwd_bwd").get<double>() <= step * 1.5);
  CHECK(t.at("optimizer").get<double>() > 0);
  CHECK(t.at("muon").get<double>() > 0);
  CHECK(t.at("muon_params") == 7 * cfg.model.n_layers);  // q k v o gate up down per layer
  CHECK(r.at("gemm").at("n") == 96);
  CHECK(r.at("gemm").at("tflops").get<double>() > 0);
  CHECK(r.at("mfu_vs_gemm").get<double>() > 0);
  CHECK(r.at("attention").at("hd") == cfg.model.head_dim());
  CHECK(r.at("attention").at("fwd_ms").get<double>() > 0);
  CHECK(r.at("memory").at("peak_rss").get<int64_t>() > 0);
  CHECK(std::isfinite(r.at("loss_first").get<double>()));
  // flops_per_token is the model's own.
  auto be = make_backend("cpu");
  LlamaModel m(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len);
  CHECK(r.at("flops_per_token").get<double>() == Approx(m.flops_per_token()));
  CHECK(r.at("params").get<int64_t>() == m.num_params());
  CHECK(r.at("achieved_tflops").get<double>() ==
        Approx(m.flops_per_token() * r.at("tok_per_s").get<double>() / 1e12));
  const std::string rep = bench_report(r);
  for (const char* s : {"throughput", "GEMM", "forward", "backward", "derived", "Muon", "peak RSS"})
    CHECK(rep.find(s) != std::string::npos);
}

TEST_CASE("region profiler: nested paths, exclusive time, calls, misuse", "[bench][profile]") {
  auto be = make_backend("cpu");
  CHECK(be->profiler() == nullptr);
  {
    ProfRegion none(*be, "ignored");  // no profiler: nothing recorded, nothing thrown
  }
  {
    OpProfiler prof(*be);
    CHECK(be->profiler() == &prof);
    CHECK_THROWS_WITH(OpProfiler(*be), Catch::Contains("already attached"));
    for (int i = 0; i < 2; ++i) {
      ProfRegion a(*be, "outer");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      {
        ProfRegion b(*be, "inner");
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      a.next("other");
    }
    prof.flush();
    std::map<std::string, OpProfiler::Region> got;
    for (const auto& g : prof.regions()) got[g.path] = g;
    REQUIRE(got.size() == 3);
    CHECK(got.at("outer").calls == 2);
    CHECK(got.at("outer/inner").calls == 2);
    CHECK(got.at("other").calls == 2);
    CHECK(got.at("outer/inner").ms >= 200);
    CHECK(got.at("outer").ms >= 40);
    CHECK(got.at("outer").ms < 200);  // exclusive: inclusive time would be >= 240
    CHECK(prof.regions().front().path == "outer/inner");  // largest first
    CHECK(prof.total_ms() == Approx(got.at("outer").ms + got.at("outer/inner").ms + got.at("other").ms));
    // A region open across a flush keeps counting into the next one.
    prof.reset();
    CHECK(prof.total_ms() == 0);
    {
      ProfRegion c(*be, "across");
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      prof.flush();
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
    }
    prof.flush();
    CHECK(prof.regions().front().path == "across");
    CHECK(prof.regions().front().ms >= 60);
    CHECK_THROWS_WITH(prof.leave(), Catch::Contains("without an open region"));
  }
  CHECK(be->profiler() == nullptr);  // detached on destruction
}

TEST_CASE("run_bench --profile: the model's regions, per step, covering the step", "[bench][profile]") {
  BenchOptions o = bare_options(2);
  const Config cfg = tiny_config({"train.batch_tokens=512", "model.recompute=mlp"});  // 2 micro-batches
  const nlohmann::json r = run_bench(cfg, o);
  const auto& p = r.at("profile");
  INFO(p.dump(1));
  CHECK(p.at("steps") == 2);
  std::map<std::string, nlohmann::json> got;
  double sum = 0;
  for (const auto& g : p.at("regions")) {
    got[g.at("region").get<std::string>()] = g;
    sum += g.at("ms").get<double>();
  }
  const int L = cfg.model.n_layers, accum = 2;
  for (const char* name : {"fwd.attention", "bwd.attention", "fwd.qkv", "bwd.qkv", "fwd.mlp_down"})
    CHECK(got.at(name).at("calls").get<double>() == L * accum);  // per step
  CHECK(got.at("loss.lm_head_xent").at("calls").get<double>() == accum);
  // The losses stay on the device until the step's micro-batches are queued: one readback.
  CHECK(got.at("loss.accumulate").at("calls").get<double>() == accum);
  CHECK(got.at("loss.readback").at("calls").get<double>() == 1);
  // recompute = mlp: every layer but the last rebuilds its MLP input inside the backward.
  CHECK(got.at("bwd.recompute/fwd.mlp_up").at("calls").get<double>() == (L - 1) * accum);
  CHECK(got.count("opt.matrix_batched") == 1);
  CHECK(got.at("opt.adamw").at("calls").get<double>() == 1);  // one region per kind, per step
  CHECK(got.count("grad_norm") == 1);
  CHECK(sum == Approx(p.at("regions_ms").get<double>()));
  // On the CPU the regions tile the step but for host bookkeeping between them.
  CHECK(p.at("regions_ms").get<double>() <= p.at("step_ms").get<double>() * 1.001);
  CHECK(p.at("regions_ms").get<double>() >= p.at("step_ms").get<double>() * 0.5);
  const std::string rep = bench_report(r);
  CHECK(rep.find("bwd.attention") != std::string::npos);
  CHECK(rep.find("exclusive time") != std::string::npos);
  o.profile_steps = 0;
  CHECK(run_bench(cfg, o).at("profile").is_null());
}

TEST_CASE("run_bench --profile on a MoE model: router, experts and combine apart", "[bench][profile][moe]") {
  BenchOptions o = bare_options(1);
  const Config cfg = load_config(kRoot + "/configs/moe-tiny.json",
                                 {"train.device=cpu", "train.seq_len=32", "model.max_seq_len=32",
                                  "train.micro_batch=2", "train.batch_tokens=64", "train.world_size=1"});
  const nlohmann::json r = run_bench(cfg, o);
  std::map<std::string, double> calls;
  for (const auto& g : r.at("profile").at("regions"))
    calls[g.at("region").get<std::string>()] = g.at("calls").get<double>();
  INFO(r.at("profile").dump(1));
  const int moe_layers = cfg.model.n_layers - cfg.model.moe.first_dense;
  for (const char* name : {"fwd.moe/router", "fwd.moe/experts", "fwd.moe/combine", "bwd.moe/experts",
                           "bwd.moe/router"})
    CHECK(calls[name] == moe_layers);
}

TEST_CASE("run_bench: AdamW config has no Muon split; bad options are errors", "[bench]") {
  BenchOptions o = bare_options();
  o.muon_split = true;  // the AdamW config must report no Muon split by itself
  const nlohmann::json r = run_bench(tiny_config({"optim.name=adamw"}), o);
  CHECK(r.at("time_ms").at("muon").is_null());
  CHECK(r.at("share").at("muon").is_null());
  CHECK_FALSE(r.contains("gemm"));
  CHECK(r.at("attention").is_null());
  o.steps = 0;
  CHECK_THROWS_WITH(run_bench(tiny_config(), o), Catch::Contains("--steps"));
}

TEST_CASE("muonforge bench CLI: report, --json line, errors", "[bench][cli]") {
  const std::string bin = MF_BINARY;
  int rc = -1;
  std::string out = run_capture("OMP_NUM_THREADS=1 '" + bin + "' bench '" + kTiny +
                                    "' --device cpu --seq-len 64 --micro-batch 4 --batch-tokens 512"
                                    " --steps 1 --warmup 1 --gemm-size 64 --quiet --json",
                                &rc);
  INFO(out);
  REQUIRE(rc == 0);
  const nlohmann::json j = last_json_line(out);
  CHECK(j.at("seq_len") == 64);
  CHECK(j.at("micro_batch") == 4);
  CHECK(j.at("tok_per_s").get<double>() > 0);
  CHECK(out.find("throughput") != std::string::npos);
  CHECK(out.find("memory plan") == std::string::npos);  // --quiet

  // `muonforge ARGS` must exit 1 with an error containing `text`.
  auto fails_with = [&](const std::string& cmd_args, const std::string& text) {
    int code = -1;
    const std::string o = run_capture("'" + bin + "' " + cmd_args, &code);
    INFO("muonforge " << cmd_args << "\n" << o);
    CHECK(code == 1);
    CHECK(o.find(text) != std::string::npos);
  };
  const std::string tiny = "'" + kTiny + "'";
  fails_with("bench " + tiny + " --steps x", "--steps needs an integer");
  // Shortcut options are checked themselves: the error names them, not the --set they expand to.
  fails_with("bench " + tiny + " --seq-len 0", "bench: --seq-len must be >= 1, got 0");
  fails_with("bench " + tiny + " --micro-batch -2", "bench: --micro-batch must be >= 1, got -2");
  fails_with("bench " + tiny + " --frobnicate", "unknown option --frobnicate");
  // An option named like a config key points at --set; a --set without '=' is not read on.
  fails_with("bench " + tiny + " --max-steps 3",
             "bench: unknown option --max-steps (see muonforge bench --help; config keys are set "
             "with --set: --set train.max_steps=VALUE)");
  fails_with("bench " + tiny + " --weight_decay 0.1", "--set optim.wd=VALUE)");
  fails_with("bench " + tiny + " --set optim.lr 0.01",
             "bench: --set needs KEY=VALUE, got 'optim.lr' (write --set optim.lr=VALUE)");
  fails_with("bench " + tiny + " --set", "bench: --set needs KEY=VALUE");
  // The console shows the message without its source location, unless asked.
  {
    int code = 0;
    std::string o = run_capture("'" + bin + "' bench " + tiny + " --steps x", &code);
    INFO(o);
    CHECK(code == 1);
    CHECK(o.find("--steps needs an integer, got 'x'\n") != std::string::npos);
    CHECK(o.find("[src/") == std::string::npos);
    o = run_capture("MF_ERROR_SOURCE=1 '" + bin + "' bench " + tiny + " --steps x", &code);
    CHECK(o.find("--steps needs an integer, got 'x' [src/cli/args.h:") != std::string::npos);
  }
  out = run_capture("'" + bin + "' bench --help", &rc);
  CHECK(rc == 0);
  CHECK(out.find("--warmup") != std::string::npos);
  // Integer options are range-checked as 64-bit values, never wrapped to 32 bits.
  fails_with("bench " + tiny + " --steps 4294967297",
             "--steps must be at most 2147483647, got 4294967297");
  fails_with("train " + tiny + " --stop-at -3", "--stop-at must be >= 1, got -3");
  fails_with("train " + tiny + " --resume x --no-resume", "--resume and --no-resume contradict");
  fails_with("eval a b", "more than one checkpoint given (a, b)");
  fails_with("config " + tiny + " --set optim.lr=1e400",
             "(--set optim.lr=1e400): 1e400 is out of range");
}

TEST_CASE("scripts/bench_torch.py smoke test (skips without torch)", "[bench][torch]") {
  const char* env = std::getenv("MF_TORCH_PYTHON");
  const std::string py = env && *env ? env : "/usr/bin/python3";
  int rc = -1;
  run_capture("'" + py + "' -c 'import torch'", &rc);
  if (rc != 0) {
    WARN("no torch for " << py << " (set MF_TORCH_PYTHON): skipping the bench_torch.py smoke test");
    return;
  }
  const std::string out = run_capture(
      "OMP_NUM_THREADS=1 '" + py + "' '" + kRoot + "/scripts/bench_torch.py' '" + kTiny +
          "' --device cpu --threads 1 --seq-len 64 --micro-batch 4 --batch-tokens 512 --steps 1"
          " --warmup 1 --gemm-size 64 --json --binary '" + MF_BINARY + "'",
      &rc);
  INFO(out);
  REQUIRE(rc == 0);
  const nlohmann::json j = last_json_line(out);
  CHECK(j.at("impl") == "pytorch");
  CHECK(j.at("resolved_by") == "muonforge config");
  CHECK(j.at("grad_accum") == 2);
  CHECK(j.at("tok_per_s").get<double>() > 0);
  CHECK(j.at("time_ms").at("muon").get<double>() > 0);
  CHECK(std::isfinite(j.at("loss_first").get<double>()));
  // The same model: parameter count and FLOPs per token as muonforge's.
  const Config cfg = tiny_config();
  auto be = make_backend("cpu");
  LlamaModel m(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len);
  CHECK(j.at("params").get<int64_t>() == m.num_params());
  CHECK(j.at("flops_per_token").get<double>() == Approx(m.flops_per_token()));
  // Untrained, the loss is near ln V for both (same init scheme).
  CHECK(std::fabs(j.at("loss_first").get<double>() - std::log(double(cfg.model.vocab_size))) < 0.1);
}

TEST_CASE("bench_compare.py --moe: a MoE case beside its dense partner (CPU)", "[bench][moe][python]") {
  const std::string out = (fs::temp_directory_path() / ("mf_bc_" + std::to_string(getpid()))).string();
  fs::remove_all(out);
  int rc = 0;
  const std::string cmd = "cd '" + kRoot + "' && OMP_NUM_THREADS=1 python3 scripts/bench_compare.py run --out '" +
                          out + "' --moe --cases moe,dense --moe-case-spec moe=configs/moe-tiny.json:64:2:256:dense "
                          "--moe-case-spec dense=configs/tiny.json:64:2:256 --device cpu --steps 1 --warmup 1 "
                          "--binary '" + std::string(MF_BINARY) + "'";
  std::string log = run_capture(cmd, &rc);
  INFO(log);
  REQUIRE(rc == 0);
  std::ifstream f(out + "/results.jsonl");
  std::string line;
  std::map<std::string, nlohmann::json> res;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.value("kind", "") == "result") res[j["case"].get<std::string>()] = j;
  }
  REQUIRE(res.size() == 2);
  for (auto& [name, r] : res) {
    INFO(name << ": " << r.dump());
    CHECK(r["group"] == "moe");
    CHECK(r["impl"] == "muonforge");
    REQUIRE(r.contains("data"));
  }
  const auto& moe = res["moe"]["data"];
  const auto& dense = res["dense"]["data"];
  CHECK(res["moe"]["partner"] == "dense");
  REQUIRE(moe.contains("moe"));
  CHECK(!dense.contains("moe"));
  // Routed experts count at top_k / n_experts: active < total for the MoE model only... and the
  // FLOPs the MFU uses follow the active count.
  CHECK(moe["active_params"].get<double>() < 0.8 * moe["params"].get<double>());
  CHECK(moe["flops_per_token"].get<double>() > 6.0 * moe["active_params"].get<double>());
  CHECK(moe["flops_per_token"].get<double>() < 6.0 * moe["active_params"].get<double>() * 1.5);
  std::ifstream md(out + "/benchmarks.md");
  std::stringstream ss;
  ss << md.rdbuf();
  const std::string rep = ss.str();
  CHECK_THAT(rep, Catch::Contains("## MoE beside a dense model of the same active size"));
  CHECK_THAT(rep, Catch::Contains("| moe | configs/moe-tiny.json | 8 (2 + 1) |"));
  // The profiled step (bench_compare passes --profile 1): its largest regions, per case.
  REQUIRE(moe.contains("profile"));
  CHECK(moe["profile"]["steps"] == 1);
  CHECK_THAT(rep, Catch::Contains("## Where muonforge's step goes"));
  CHECK_THAT(rep, Catch::Contains("| moe | "));
  CHECK_THAT(rep, Catch::Contains("fwd.moe/"));
  // Torch is never asked to run a MoE model, and an unknown partner is an error.
  CHECK(log.find("torch") == std::string::npos);
  rc = 0;
  log = run_capture("cd '" + kRoot + "' && python3 scripts/bench_compare.py run --out '" + out +
                    "' --moe --moe-case-spec x=configs/moe-tiny.json:64:2:256:nobody --binary '" +
                    std::string(MF_BINARY) + "'", &rc);
  CHECK(rc != 0);
  CHECK_THAT(log, Catch::Contains("nobody"));
  fs::remove_all(out);
}
