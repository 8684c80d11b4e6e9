// Typed run configuration (DESIGN §5). JSON -> these structs, with defaults, "base" inheritance,
// --set overrides and validation that names the file and key path of every problem.
#pragma once
#include <array>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mf {

struct MoeConfig {
  int n_experts = 0;          // 0 = dense model
  int top_k = 2;
  int n_shared = 0;           // shared experts, always active
  int d_expert = 512;         // hidden width of each expert
  int first_dense = 0;        // leading layers that stay dense
  std::string score = "softmax";   // softmax | sigmoid
  bool norm_topk = true;      // renormalise the top-k weights to sum to 1
  double route_scale = 1.0;
  std::string balance = "aux_loss";  // aux_loss | bias | none
  double aux_coef = 0.01;
  double bias_rate = 0.001;
  double capacity_factor = 0.0;  // 0 = dropless
};

struct ModelConfig {
  std::string arch = "llama";
  int vocab_size = 50304;
  int d_model = 768;
  int n_layers = 12;
  int n_heads = 12;
  int n_kv_heads = 12;  // a JSON config that leaves it out gets n_heads (config_from_json)
  int d_ff = 2048;
  int max_seq_len = 1024;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  bool tie_embeddings = false;
  double init_std = 0.02;
  std::string attention = "auto";     // flash | cudnn | auto (CUDA only)
  std::string recompute = "none";     // none | mlp | full (both backends)
  // q, k and v as one GEMM against the stacked [Wq; Wk; Wv], and the dense MLP's gate and up as
  // one against [W_gate; W_up], when the weights sit next to each other in the arenas (each
  // one's size a multiple of 64 elements, which d_model a multiple of 64 guarantees). false: the
  // separate GEMMs (the same model; for comparing speed, and tests).
  bool stack_projections = true;
  MoeConfig moe;
  int head_dim() const { return d_model / n_heads; }
  // The number of parameters LlamaModel allocates (LlamaModel::num_params), in double: the shape
  // keys are ints and their products can pass 2^63. Exact below 2^53.
  double param_count() const;
  // The parameters one token uses, as MoE models are usually quoted ("532M total, 132M active"):
  // param_count() less the routed experts a token does not reach (all but top_k of n_experts
  // in every MoE layer). Equal to param_count() for a dense model.
  double active_param_count() const;
  // "model.d_model 64, model.n_layers 2, model.d_ff 256, model.vocab_size 256" (+ the MoE keys
  // when moe.n_experts > 0): the keys that set the parameter count, for error messages.
  std::string shape_keys() const;
  // The names of every key that changes a parameter's shape or the set of parameters
  // ("model.d_model", ..., "model.moe.balance": the bias tensor): what a resume cannot change.
  static const std::vector<std::string>& shape_key_names();
};

// µP (DESIGN §4, src/optim/mup.h): off = the standard parametrisation. Moonlight's RMS matching
// is optim.scale = "rms" with µP off.
struct MupConfig {
  bool enabled = false;
  int base_width = 256;       // d_model of the proxy model whose hyper-parameters transfer
  int base_depth = 12;        // n_layers of that proxy (CompleteP residual multiplier)
  // head_dim of that proxy: attention scale sqrt(base_head_dim)/head_dim, i.e. 1/sqrt(head_dim)
  // at the base head_dim and the µP 1/head_dim slope as head_dim grows. 0 = the model's own
  // head_dim (SP attention; right when width grows by adding heads, as in the shipped sweeps).
  int base_head_dim = 0;
};

struct AdamWGroupConfig {
  double lr = 3e-3;
  std::array<double, 2> betas{0.9, 0.95};
  double eps = 1e-8;
  double wd = 0.0;
};

// Matrix optimizers beyond Muon (src/optim/matrix_opt.h, docs/optimizers.md). Each section is
// read only when optim.name selects it.
struct ShampooConfig {
  int block_size = 1024;       // precondition b x b blocks of each matrix independently (0: whole)
  int precond_every = 10;      // recompute the inverse roots every k steps
  double exp_l = 0.25;         // L^-exp_l G R^-exp_r (0.25 each: Shampoo; 0.5 each: the 1/2 option)
  double exp_r = 0.25;
  double eps = 1e-12;          // (L + eps I), (R + eps I)
  double beta1 = 0.9;          // EMA of the gradient (the preconditioned direction)
  double beta2 = 0.95;         // EMA of L = G G^T, R = G^T G (and of the grafted Adam's v)
  std::string graft = "adam";  // adam (per-block norm of the Adam update) | none
  double graft_eps = 1e-8;
};

struct SoapConfig {
  int block_size = 1024;       // 0: whole matrix
  int precond_every = 10;      // refresh the eigenbases every f steps
  double beta1 = 0.95;
  double beta2 = 0.95;         // Adam's v and the L / R statistics
  double eps = 1e-8;
};

struct AsgoConfig {
  int block_size = 0;          // 0: whole matrix
  int precond_every = 1;       // recompute (V^1/2 + eps I)^-1 every k steps
  double beta1 = 0.9;          // momentum (EMA of the gradient); 0: plain G
  double beta2 = 0.95;         // EMA of V; 1: accumulate V = V + G G^T (the paper's Algorithm 1)
  double eps = 1e-6;           // absolute, in gradient units; 1e-8 trains badly at CPU scale
                               // (docs/optimizers.md, "ASGO's epsilon and root refresh");
                               // sqrt(lambda) + eps is floored at 2^-24 sqrt(lambda_max)
};

struct FreonConfig {
  double c = 0.5;              // O = (G G^T)^-c G: 0 = SGD (normalised), 0.5 = Muon, > 0.5 beyond;
                               // in [0, 0.9] (docs/optimizers.md, "Freon's range of c")
  double eps = 1e-7;           // relative to the largest eigenvalue of G G^T
};

struct KaonConfig {
  int steps = 5;               // iterations of the chaotic map X <- 4.1 (I - X X^T)^2 X
};

struct OptimConfig {
  std::string name = "muon";          // muon | adamw | normuon | shampoo | soap | asgo | freon | kaon
  double lr = 0.02;                   // Muon lr (or AdamW lr of hidden matrices when name=adamw)
  double wd = 0.0;
  std::string wd_mode = "coupled";    // coupled | independent
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  std::string scale = "shape";        // shape | rms | spectral
  std::array<double, 2> betas{0.9, 0.95};  // AdamW betas when name=adamw (hidden matrices)
  double eps = 1e-8;
  AdamWGroupConfig adamw;             // embeddings, lm_head, norm gains, router
  double grad_clip = 1.0;             // 0 disables clipping
  double qk_clip_tau = 0.0;           // > 0: MuonClip (Kimi K2) caps each head's max logit at tau
  // Muon family (muon, normuon): Newton-Schulz coefficients: quintic (Keller Jordan's fixed
  // (a,b,c)) | polar_express (Amsel et al., five per-step tuples, X / (1.02 ||X||_F)).
  std::string ns = "quintic";
  bool cautious_wd = false;           // decay only where update and weight agree in sign (CWD)
  std::string router = "adamw";       // MoE router: "adamw" (optim.adamw group) | "matrix" (as hidden)
  double normuon_beta2 = 0.95;        // NorMuon's per-neuron second-moment EMA
  ShampooConfig shampoo;
  SoapConfig soap;
  AsgoConfig asgo;
  FreonConfig freon;
  KaonConfig kaon;
};

struct ScheduleConfig {
  int warmup = 100;
  std::string decay = "cosine";       // constant | cosine | linear | wsd
  double min_lr_ratio = 0.1;
  double wsd_decay_frac = 0.2;        // wsd: fraction of steps in the final decay
};

struct TrainConfig {
  int seq_len = 1024;
  int micro_batch = 16;
  long long batch_tokens = 524288;
  int max_steps = 5000;
  unsigned long long seed = 1337;
  int eval_every = 250;               // 0 disables eval
  int eval_batches = 20;
  int ckpt_every = 1000;              // 0: only at the end
  int keep_ckpts = 3;
  int log_every = 10;
  int diag_every = 0;                 // > 0: spectral / attention diagnostics every N steps
  std::optional<std::string> init_from;  // Hugging Face Llama directory
  std::string device = "auto";        // auto | cpu | cuda
  std::string precision = "bf16";     // bf16 | fp32 (Backend::set_precision): CUDA computes in it; the CPU always in fp32
  bool deterministic = false;
  int zero = 0;                       // 0 | 1 (ZeRO-1 optimizer state sharding)
  double bucket_mb = 25;              // gradient all-reduce bucket size in MiB; 0 = one per tensor
  double loss_chunk_mb = 1024;        // CUDA fused lm-head xent: logits + dlogits MiB per chunk
  bool overlap_comm = true;           // start each bucket's all-reduce during backward
  int world_size = 1;                 // filled from the environment, not from JSON
};

struct DataConfig {
  std::string train = "";             // glob of llm.c shards
  std::string val = "";
  bool shuffle = true;
};

struct RunConfig {
  std::string dir = "runs/{name}";
  std::string name = "run";
};

struct Config {
  ModelConfig model;
  MupConfig mup;
  OptimConfig optim;
  ScheduleConfig schedule;
  TrainConfig train;
  DataConfig data;
  RunConfig run;

  std::string source;  // file the config came from (for messages)
  // Where each explicitly set key came from, as the prefix used in messages: "configs/x.json",
  // "configs/base.json (base of configs/x.json)" or "configs/x.json (--set optim.lr=1)".
  // Keys absent here hold defaults and are reported against `source`.
  std::map<std::string, std::string> key_source;
  int grad_accum() const;  // batch_tokens / (micro_batch * seq_len * world_size)
  std::string run_dir() const;  // run.dir with {name} substituted
};

// `train.world_size` is not a JSON key: load_config and config_from_json take it from the
// WORLD_SIZE environment variable (else, under srun, SLURM_NTASKS; default 1); an override
// "train.world_size=N" may replace it (useful in tests and `muonforge config` to preview another
// world size).
//
// Loads `path` (following "base" chains), applies `overrides` ("a.b=value", type-checked against
// the schema), validates, and returns the typed config. Throws mf::Error naming file and key path.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same from an in-memory JSON object (`origin` is used in messages; relative bases resolve
// against `base_dir`).
Config config_from_json(const nlohmann::json& j, const std::string& origin,
                        const std::string& base_dir = ".",
                        const std::vector<std::string>& overrides = {});
// Cross-field validation (also called by load_config); `world_size` from the environment.
void validate_config(const Config& c);
// The fully resolved config as JSON (every key, defaults included; train.world_size is left out
// because it is not a JSON key). config_from_json(config_to_json(c)) reproduces c.
nlohmann::json config_to_json(const Config& c);
// Every leaf of `j` by dotted key path ("model.n_layers", "<root>" for a non-object) -> its
// JSON text; an empty object counts as a leaf. For naming where two configs differ.
std::map<std::string, std::string> json_leaves(const nlohmann::json& j);
// The config keys a bare name may mean ("max_steps" -> train.max_steps; other trainers' names
// too: "weight_decay" -> optim.wd); empty when none. For hints on unknown CLI options.
std::vector<std::string> config_keys_for(const std::string& name);
// Other trainers' names -> our keys, as config_keys_for and the unknown-key errors use them.
const std::map<std::string, std::vector<std::string>>& config_key_aliases();
// The same, pretty-printed in schema order (model, mup, optim, ...) for humans and run dirs.
std::string config_to_string(const Config& c, int indent = 2);

}  // namespace mf
