// `muonforge bench` and the start-of-training memory plan.
//
// run_bench builds the model and optimizer of a config on train.device exactly as the trainer
// does (µP scalars and multipliers, init), feeds synthetic random tokens (no data files), runs
// warm-up steps and then timed steps, and reports throughput, MFU, memory and a time split.
// Forward and backward are fused in LlamaModel::forward_backward, so the backward time is
// derived: forward() is timed on its own over the same micro-batches and
// backward = forward_backward - forward (the JSON says "bwd_derived": true).
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "config/config.h"

namespace mf {

class LlamaModel;
class Optimizer;

struct BenchOptions {
  int steps = 10;          // timed optimizer steps
  int warmup = 3;          // untimed steps first (plan caches, scratch growth, clocks)
  int fwd_reps = 0;        // micro-batch forwards timed on their own; 0 = min(grad_accum, 8)
  int64_t gemm_size = 0;   // n of the n x n x n GEMM timed through matmul_fwd; 0 = 8192 on
                           // CUDA, 1024 on CPU; < 0 skips it
  bool muon_split = true;  // time a Muon-only optimizer over the hidden matrices afterwards
  bool attention = true;   // time attention_fwd / attention_bwd alone at the model's shape
  bool verbose = true;     // per-step lines on the console
  int profile_steps = 0;   // > 0: that many extra steps with the region profiler on
                           // (backend/profiler.h), reported as "profile"
};

// Everything measured, as one JSON object (the keys are documented in docs/gpu.md).
nlohmann::json run_bench(const Config& cfg, const BenchOptions& opts);
// The human-readable report of a run_bench result.
std::string bench_report(const nlohmann::json& r);
// The region table of a run_bench result's "profile" (part of bench_report).
std::string profile_table(const nlohmann::json& profile);

// One dense n x n x n GEMM (y = x W^T, act_dtype operands, random data) through
// Backend::matmul_fwd: median seconds of `reps` after `warmup` calls. Returns FLOP/s (2 n^3 / t).
double measure_gemm_flops(Backend& be, int64_t n, int warmup, int reps, double* median_s = nullptr);

// Causal attention alone at shape s (random q, k, v, dout): median seconds of the forward and of
// the backward over `reps` calls each. FLOPs counted as 4 B H T^2 hd / 2 (forward, causal half)
// and 2.5x that for the backward (the FlashAttention-2 paper's convention).
struct AttnTiming {
  double fwd_s = 0, bwd_s = 0, fwd_flops = 0, bwd_flops = 0;
};
AttnTiming measure_attention(Backend& be, const AttnShape& s, int warmup, int reps);

// Peak dense bf16 FLOP/s used for MFU: 989e12 (H100/H200 SXM datasheet) on CUDA, 0 on the CPU.
double bench_peak_flops(const Backend& be);

// Peak resident set size of this process in bytes (getrusage).
size_t peak_rss_bytes();

// Memory plan of a built model + optimizer on its backend: bytes of weights (fp32 master plus
// the compute copy when separate), gradients, optimizer state (+ Muon's scratch), activations
// (the model's buffers for B x T as allocated, MoE layers included), workspace (held now; and
// the expected peak after the first step on CUDA), their total, and the device's free / total
// memory. On CUDA also the bytes held by tensors as measured.
nlohmann::json memory_plan(LlamaModel& model, const Optimizer& opt, Backend& be);
std::string memory_plan_table(const nlohmann::json& plan);
// Logs memory_plan_table via spdlog::info and warns when the expected peak exceeds free memory.
// The trainer calls it right after the optimizer is built.
void print_memory_plan(const nlohmann::json& plan, bool console = true);  // false: log.txt only
// Refuses, before the first step, a CPU run whose plan needs more than the machine's memory
// (every process of the run on this machine, `procs_here`, counted: they share it), naming each
// part and what to lower. The host pages of large tensors are mapped lazily (host_tensor), so
// until then little of the plan is resident and the error comes before the OOM killer would.
// Warns when the part not yet resident exceeds the memory free now. On CUDA an allocation that
// does not fit fails by itself, so only the warning of print_memory_plan applies.
void check_memory_plan(const nlohmann::json& plan, int procs_here);
// Allocates the scratch part of the plan's expected workspace now (CUDA; Backend::reserve_scratch),
// so the first step does not grow it and the plan's total is what the run holds.
void reserve_memory_plan(const nlohmann::json& plan, Backend& be);

}  // namespace mf
