// The training loop (DESIGN §6): gradient accumulation, clipping, optimizer step, eval, metrics,
// checkpoints, resume, graceful stop on SIGINT/SIGTERM, and a clear stop on a non-finite loss.
#pragma once
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "config/config.h"
#include "model/params.h"

namespace mf {

class LlamaModel;
class Optimizer;
class DataLoader;
class Communicator;
class CommWork;
struct GradBucket;
class TcpStore;
class Diagnostics;

struct TrainOptions {
  std::string resume;      // checkpoint dir; "" = automatic (latest in the run dir, if any)
  bool no_resume = false;  // start fresh even when the run dir holds checkpoints
  bool must_resume = false;  // bare --resume: like automatic, but the run dir must hold one
  bool quiet = false;      // no step lines or tables on the console (log.txt keeps them)
  int stop_at = 0;         // > 0: checkpoint and stop after this step (time-limited sittings)
  bool init_only = false;  // write the initial weights as ckpt-000000 and stop (fresh runs only)
  std::string dump_batches;  // write every micro-batch's inputs and targets (int32) to this file
  std::string dump_routing;  // MoE: write every micro-batch's expert choices (int32) to this file
};

struct TrainResult {
  int steps_done = 0;                 // completed optimizer steps (including resumed ones)
  std::vector<double> losses;         // train loss of each step run in this call
  double final_val_loss = -1;         // last eval (-1 when never evaluated)
  std::string run_dir;
  std::string last_checkpoint;
  bool interrupted = false;           // stopped early by a signal (checkpoint saved)
};

class Trainer {
 public:
  Trainer(const Config& cfg, const TrainOptions& opts);
  ~Trainer();
  TrainResult run();

  LlamaModel& model();
  Backend& backend();

 private:
  void setup();
  // The mean val loss; nullopt when may_cut and a stop request (on any rank) cut it short.
  std::optional<double> evaluate(bool may_cut);
  nlohmann::json state_json(int step) const;
  void append_metrics(const nlohmann::json& rec);
  void setup_distributed();
  void setup_grad_buckets();
  void start_ready_buckets(int group);  // the model's grad-ready hook
  void allreduce_grads();               // starts the remaining buckets, waits for all
  bool zero_sliced(const Param& p) const;
  double grad_norm();                   // global, over ranks' shards where ZeRO-1 splits them
  void gather_params();                 // after the update: every rank gets every new weight
  void qk_clip_step(int* clipped);
  // Before each checkpoint: throws, naming the first such parameter, if a weight is non-finite
  // or (data parallel) unless every rank holds the same master weights. Cheap: one reduction
  // per parameter.
  void check_weights_agree(int done);
  void check_data_files() const;  // data.train / data.val match files (before the run dir changes)
  // The config.json of checkpoint `ckpt`, or a discarded value (older or hand-made checkpoint).
  static nlohmann::json saved_config(const std::string& ckpt);
  // "key old -> new; ..." vs a checkpoint's config (only the keys in `only` when given).
  std::string config_changes(const nlohmann::json& saved, const std::set<std::string>& only = {}) const;
  // Warns when the next step's lr differs from the one `saved` (ckpt's config) would give.
  void warn_schedule_jump(const nlohmann::json& saved, const std::string& ckpt) const;
  void lock_run_dir();  // rank 0: run_dir/.lock, or an error naming the process holding it
  std::string starting_checkpoint() const;  // what setup() loads ("": HF model or fresh init)
  void set_aside_later_checkpoints(const std::string& ckpt) const;  // rank 0: superseded-N/
  double mean_over_ranks(double x);

  Config cfg_;
  TrainOptions opts_;
  int rank_ = 0, world_ = 1;
  int local_world_ = 1;  // ranks on this machine (CPU ranks share its memory)
  int attempt_ = 0;  // DistEnv::attempt: 0, then +1 per launcher restart of the group
  // Rank 0's flock on the run directory's .lock, held for the Trainer's life. A member that
  // closes its descriptor itself: a constructor that throws after taking it releases it too.
  struct LockFd {
    int fd = -1;
    LockFd() = default;
    LockFd(const LockFd&) = delete;
    LockFd& operator=(const LockFd&) = delete;
    ~LockFd();
  } run_lock_;
  // Declared first so it is destroyed last: the communicators (NCCL waits on the compute stream
  // when a collective was left in flight), the model's and optimizer's tensors all need it.
  std::unique_ptr<Backend> be_;
  std::unique_ptr<TcpStore> store_;     // rank 0 hosts it; outlives comm_
  std::unique_ptr<Communicator> comm_;  // single-process, Gloo (CPU) or NCCL (CUDA)
  // Data-parallel optimizer sharding: owner_[i] = rank that updates params()[i] and holds its
  // optimizer state, or -1 when every rank updates it (replicated). Muon matrices are always
  // spread over the ranks (distributed Muon); AdamW params only with train.zero = 1.
  // ZeRO-1 (train.zero = 1): the AdamW-updated tensors' gradients are reduce-scattered by bucket
  // and each rank updates only its shard of each bucket, through fragments_ (1-D Params viewing
  // parts of the master and gradient arenas); their owner_ is kSliced. Then the updated shards are
  // all-gathered.
  static constexpr int kSliced = -2;
  std::vector<int> owner_;
  // The distributed matrix optimizer's master-arena range [first, second) per rank: its matrices
  // are one contiguous run (partition_contiguous). Empty when no rank owns matrices.
  std::vector<std::pair<size_t, size_t>> matrix_ranges_;
  std::vector<std::unique_ptr<Param>> fragments_;
  std::vector<Param*> slot_params_;  // the tensor of each gradient slot, in arena order
  bool sharded_ = false;
  // Gradient all-reduce: buckets of the model's gradient arena (train.bucket_mb), started from
  // the grad-ready hook during the last micro-batch's backward when train.overlap_comm is on.
  std::vector<GradBucket> buckets_;
  size_t next_bucket_ = 0;
  std::vector<std::unique_ptr<CommWork>> inflight_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Optimizer> opt_;
  std::unique_ptr<DataLoader> train_loader_, val_loader_;
  // train.eval_batches, or fewer when data.val holds fewer micro-batches (each is read once)
  int eval_batches_ = 0;
  std::unique_ptr<Diagnostics> diag_;  // train.diag_every records, QK-clip
  Tensor moe_stats_dev_;  // MoE step statistics summed over ranks on the device (NCCL); after be_
  std::string run_dir_;
  bool created_run_dir_ = false;  // rank 0 made run_dir_ (removed again if setup fails in it)
  int start_step_ = 0;
  long long tokens_seen_ = 0;
};

// The training loop's time left. Steps, evaluations and checkpoints are timed apart, so a run
// that evaluates rarely but at length has its evaluations in the estimate before the first one.
struct EtaClock {
  double step_s = 0, eval_s = 0, ckpt_s = 0;  // time spent in each so far (this call)
  int steps = 0, evals = 0, ckpts = 0;        // how many of each so far (this call)
};
// Seconds left once step `done` of `max_steps` has updated the weights: the steps left at the
// mean step time; the evaluations left, step `done`'s own included (every eval_every steps and
// at the last; none when eval_every is 0), at the mean evaluation time, or at `eval_in_steps`
// step times until one has been timed; the checkpoints left (every ckpt_every steps and at the
// last) at the mean checkpoint time (0 until one has been timed).
double eta_seconds(const EtaClock& c, int done, int max_steps, int eval_every, int ckpt_every,
                   double eval_in_steps);

// Stop requests from SIGINT/SIGTERM: the loop finishes its step, checkpoints and returns.
void install_stop_handlers();
bool stop_requested();
// The signal that asked for the stop (SIGINT, SIGTERM, SIGHUP), 0 when none.
int stop_signal();

}  // namespace mf
