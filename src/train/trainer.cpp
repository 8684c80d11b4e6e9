#include "train/trainer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include "core/fault.h"
#include "core/log.h"
#include "core/version.h"
#include "data/loader.h"
#include "dist/buckets.h"
#include "dist/communicator.h"
#include "dist/env.h"
#include "dist/store.h"
#include "io/atomic_file.h"
#include "io/json_file.h"
#include "model/llama.h"
#include "model/moe.h"
#include "optim/mup.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "train/checkpoint.h"
#include "train/bench.h"
#include "train/diagnostics.h"
#include "train/export.h"
#ifdef MF_HAS_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace fs = std::filesystem;

namespace mf {

namespace {

std::atomic<int> g_stop_signal{0};

void on_signal(int sig) {
  // A second Ctrl-C aborts at once, as users expect. A repeated SIGTERM or SIGHUP is the same
  // request again: Slurm (scancel, the time limit) signals every process of a step, so a worker
  // under the launcher gets SIGTERM from Slurm and once more forwarded by the launcher; the
  // hard stop of process managers is SIGKILL.
  const int first = g_stop_signal.exchange(sig);
  if (first != 0 && sig == SIGINT) std::_Exit(128 + sig);
  if (first != 0) g_stop_signal.store(first);  // the first one names the stop
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string fmt_duration(double s) {
  char buf[32];
  if (!std::isfinite(s) || s < 0) return "?";
  long t = long(s + 0.5);
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

// Where to go back to after a blow-up: "The last good checkpoint is DIR." naming the newest
// checkpoint of run_dir below step `before` (the weights after `before` steps are the ones that
// just gave a non-finite value, so a checkpoint of them is not good), or says there is none.
std::string last_good_checkpoint(const std::string& run_dir, int before) {
  std::string best;
  for (int n : list_checkpoints(run_dir))
    if (n < before) best = (fs::path(run_dir) / checkpoint_dir_name(n)).string();
  std::string out = best.empty() ? std::string("No good checkpoint was written yet.")
                                 : "The last good checkpoint is " + best + ".";
  std::error_code ec;
  if (fs::exists(fs::path(run_dir) / checkpoint_dir_name(before), ec))
    out += " (" + checkpoint_dir_name(before) + " holds the weights that gave it: resuming from "
           "it fails the same way.)";
  return out;
}

std::string fmt_rate(double r) {
  char buf[32];
  if (r >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2fM", r / 1e6);
  else if (r >= 1e3)
    std::snprintf(buf, sizeof buf, "%.1fk", r / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.0f", r);
  return buf;
}

// The stream the backend queues its work on (a cudaStream_t), or null (CPU): NCCL collectives run
// on it, so they are ordered with the compute that produces and consumes their buffers.
void* compute_stream(Backend& be) {
#ifdef MF_HAS_CUDA
  if (auto* cuda = dynamic_cast<CudaBackend*>(&be)) return cuda->stream();
#endif
  return nullptr;
}

// Peak dense bf16 FLOP/s used for MFU (H100/H200 SXM: 989 TFLOP/s); none for the CPU.
double peak_flops(const Backend& be) { return be.device() == Device::CUDA ? 989e12 : 0.0; }

// What to try when training blows up after an update (non-finite loss, weights or val loss).
std::string blowup_hint(const Config& c, bool with_wd) {
  std::string h = std::string(" Try a lower optim.lr / optim.adamw.lr") +
                  (with_wd ? " / optim.wd" : "") + " or a longer schedule.warmup.";
  if (c.optim.name == "freon" && c.optim.freon.c > 0.5)
    h += " optim.freon.c = " + fmt::format("{}", c.optim.freon.c) +
         " > 0.5 gives updates whose singular values are all >= 1 and grow with width "
         "(docs/optimizers.md, \"Freon's range of c\"): try a c nearer 0.5.";
  return h;
}

// Is the process `pid` gone (no such process, or a zombie nobody has reaped yet)?
bool process_gone(long pid) {
  if (::kill(pid_t(pid), 0) != 0 && errno == ESRCH) return true;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return false;  // no procfs: kill() is all we can tell
  std::string stat((std::istreambuf_iterator<char>(f)), {});
  const size_t paren = stat.rfind(')');  // the name may hold spaces and parentheses
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
}

// Workers started by scripts/launch.py (MF_LAUNCHER_PID) stop when the launcher dies (SIGKILL,
// OOM killer, a lost ssh session): otherwise they would train on unsupervised, holding their
// GPUs, or die of SIGPIPE at their next log line with no checkpoint. A thread polls the launcher
// and, once it is gone, raises SIGTERM: the step finishes, a checkpoint is written, the run stops.
// SIGPIPE is ignored so that logging into the dead launcher's pipe cannot kill the process first.
void watch_launcher() {
  static std::once_flag once;
  const char* v = std::getenv("MF_LAUNCHER_PID");
  if (!v || !*v) return;
  char* end = nullptr;
  const long pid = std::strtol(v, &end, 10);
  MF_CHECK(*end == '\0' && pid > 1, "environment variable MF_LAUNCHER_PID='", v,
           "' is not a process id (scripts/launch.py sets it; unset it to run without a launcher)");
  std::call_once(once, [pid] {
    std::signal(SIGPIPE, SIG_IGN);
    // A direct child sees its parent change when the launcher dies (no pid-reuse doubt); through
    // a wrapper (sh -c ...) only the pid can be watched.
    const bool child = ::getppid() == pid_t(pid);
    std::thread([pid, child] {
      while (child ? ::getppid() == pid_t(pid) : !process_gone(pid))
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
      if (stop_requested()) return;  // already stopping (the launcher forwarded a signal first)
      spdlog::warn("the launcher (pid {}) has exited; stopping after this step with a checkpoint", pid);
      // As a signal would, but never a second one: on_signal's "twice means now" is for users.
      int none = 0;
      g_stop_signal.compare_exchange_strong(none, SIGTERM);
    }).detach();
  });
}

}  // namespace

void install_stop_handlers() {
  g_stop_signal = 0;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  // SIGHUP: a closed terminal, or the launcher forwarding one: checkpoint and stop. Unless it
  // was ignored when the process started (nohup, or a launcher under nohup): that says to run on.
  struct sigaction was {};
  if (::sigaction(SIGHUP, nullptr, &was) != 0 || was.sa_handler != SIG_IGN)
    std::signal(SIGHUP, on_signal);
  watch_launcher();
}
bool stop_requested() { return g_stop_signal.load() != 0; }
int stop_signal() { return g_stop_signal.load(); }

Trainer::Trainer(const Config& cfg, const TrainOptions& opts) : cfg_(cfg), opts_(opts) {
  try {
    setup();
  } catch (...) {
    // A start that failed (bad data, a vocabulary mismatch, a device missing...) in a run
    // directory it created leaves none behind: runs/ would fill with folders holding only a
    // lock and a log of the error (which the console has shown).
    if (created_run_dir_) {
      std::error_code ec;
      bool only_ours = true;
      for (const auto& e : fs::directory_iterator(run_dir_, ec)) {
        const std::string n = e.path().filename().string();
        only_ours = only_ours && (n == ".lock" || n == "log.txt");
      }
      if (!ec && only_ours) fs::remove_all(run_dir_, ec);
    }
    throw;
  }
}
Trainer::~Trainer() {
  // Collectives still in flight (a step that threw) finish before the gradients are freed.
  inflight_.clear();
  // The communicator goes before the model's and optimizer's memory: freeing device memory
  // waits for the device, and NCCL's teardown aborts a collective stuck on a dead peer.
  comm_.reset();
}

Trainer::LockFd::~LockFd() {
  if (fd >= 0) ::close(fd);  // releases the flock
}

nlohmann::json Trainer::saved_config(const std::string& ckpt) {
  return peek_json_file((fs::path(ckpt) / "config.json").string(), /*comments=*/true);
}

// What differs between a checkpoint's saved config and this run's ("" when nothing, or when the
// saved one could not be read: an older or hand-made checkpoint).
std::string Trainer::config_changes(const nlohmann::json& saved,
                                    const std::set<std::string>& only) const {
  if (saved.is_discarded()) return "";
  const auto was = json_leaves(saved), now = json_leaves(config_to_json(cfg_));
  std::string out;
  auto add = [&](const std::string& key, const std::string& a, const std::string& b) {
    if (only.empty() || only.count(key)) out += (out.empty() ? "" : "; ") + key + " " + a + " -> " + b;
  };
  for (auto& [k, v] : was) {
    auto it = now.find(k);
    if (it == now.end()) add(k, v, "(none)");
    else if (it->second != v) add(k, v, it->second);
  }
  for (auto& [k, v] : now)
    if (!was.count(k)) add(k, "(none)", v);
  return out;
}

// A resume with another train.max_steps, schedule or optim.lr moves the learning rate of the
// step it continues with: say by how much, since the run's loss may jump with it.
void Trainer::warn_schedule_jump(const nlohmann::json& saved, const std::string& ckpt) const {
  if (saved.is_discarded()) return;
  Config old;
  try {
    old = config_from_json(saved, ckpt + "/config.json");
  } catch (const Error&) {
    return;  // a config of an older version: the list of changed keys has to do
  }
  const int step = start_step_;  // the 0-based index of the next step
  const double was = old.optim.lr * lr_multiplier(old.schedule, old.train.max_steps, step);
  const double now = cfg_.optim.lr * lr_multiplier(cfg_.schedule, cfg_.train.max_steps, step);
  if (std::abs(now - was) <= 1e-6 * std::max(std::abs(was), std::abs(now))) return;
  spdlog::warn("the learning rate of step {} is {:.3g} under this config and would have been "
               "{:.3g} under the checkpoint's ({:.2f}x; optim.lr x the schedule at that step: "
               "train.max_steps stretches the whole schedule, decay included)",
               step + 1, now, was, was > 0 ? now / was : 0.0);
}

// One training process per run directory: two would overwrite each other's checkpoints and
// interleave metrics.jsonl. An flock on run_dir/.lock, released by the kernel when this process
// ends however it ends (no stale lock after a crash); the holder's pid is written in the file.
void Trainer::lock_run_dir() {
  const std::string path = (fs::path(run_dir_) / ".lock").string();
  int& fd = run_lock_.fd;
  fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  MF_CHECK(fd >= 0, "cannot open ", path, ": ", std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    std::string holder;
    std::ifstream(path) >> holder;
    ::close(fd);
    fd = -1;
    MF_CHECK(err != EWOULDBLOCK, "run directory ", run_dir_, " is in use by another training "
             "process", holder.empty() ? std::string() : " (pid " + holder + ")",
             ": two runs in one directory would overwrite each other's checkpoints; wait for it "
             "to end, or give this run another run.name (--set run.name=NAME)");
    MF_FAIL("cannot lock ", path, ": ", std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) < 0)
    spdlog::warn("cannot write the pid into {}: {}", path, std::strerror(errno));
}

LlamaModel& Trainer::model() { return *model_; }
Backend& Trainer::backend() { return *be_; }

void Trainer::check_data_files() const {
  MF_CHECK(!cfg_.data.train.empty(), cfg_.source, ": data.train is empty; point it at token shards "
           "(see data/README.md, e.g. scripts/prepare_data.py default)");
  try {
    expand_glob(cfg_.data.train, "data.train");
  } catch (const Error& e) {
    const std::string m = e.what();
    if (m.find("matched no files") == std::string::npos) throw;
    throw Error(m + "\n  (" + cfg_.source + " names data.train; make token shards with "
                "scripts/prepare_data.py — the embedded default corpus: python3 "
                "scripts/prepare_data.py default)");
  }
  if (!cfg_.data.val.empty() && cfg_.train.eval_every > 0) expand_glob(cfg_.data.val, "data.val");
}

std::string Trainer::starting_checkpoint() const {
  // A checkpoint of this run, a Hugging Face model (train.init_from), or fresh init ("").
  std::string ckpt;
  if (!opts_.resume.empty() && attempt_ > 0) {
    // As with --no-resume below: the launcher restarts a failed group with the same arguments,
    // and --resume CKPT named where the job starts, not where every restart goes back to (its
    // later checkpoints would be set aside, and CKPT may have been pruned since).
    ckpt = find_latest_checkpoint(run_dir_);
    if (!ckpt.empty())
      spdlog::info("restart {} of the group: resuming from the latest checkpoint {} rather than "
                   "--resume {}", attempt_, ckpt, opts_.resume);
  }
  if (ckpt.empty() && !opts_.resume.empty()) {
    // The same --resume command run again after the branch has trained on: its starting
    // checkpoint is in this run directory and may have been pruned (train.keep_ckpts) since.
    fs::path want(opts_.resume);
    if (!want.has_filename()) want = want.parent_path();  // ".../ckpt-000010/"
    std::error_code ec;
    if (!fs::exists(want) && fs::equivalent(want.parent_path(), fs::path(run_dir_), ec)) {
      const std::string newest = find_latest_checkpoint(run_dir_);
      MF_CHECK(newest.empty(), "train: --resume ", opts_.resume, " does not exist: it was "
               "probably pruned (train.keep_ckpts) by the run that branched from it, whose "
               "newest checkpoint is ", newest, ". To continue that run, drop --resume; to "
               "branch again, resume from a checkpoint that exists");
    }
    ckpt = resolve_checkpoint_dir(opts_.resume, "train: --resume");
  }
  bool fresh = opts_.no_resume;
  if (fresh && attempt_ > 0) {
    // The launcher restarts a failed group with the same arguments: --no-resume meant "start
    // this job over", not "throw away what the job itself has checkpointed since".
    spdlog::info("restart {} of the group: resuming from the latest checkpoint despite "
                 "--no-resume", attempt_);
    fresh = false;
  }
  if (ckpt.empty() && !fresh) {
    ckpt = find_latest_checkpoint(run_dir_);
    const int from = ckpt.empty() ? -1 : checkpoint_step_of(fs::path(ckpt).filename().string());
    const auto damaged = damaged_checkpoints_after(run_dir_, from);
    if (rank_ == 0 && !damaged.empty()) {
      std::string list;
      for (const std::string& d : damaged) list += (list.empty() ? "" : ", ") + d;
      spdlog::warn("skipping incomplete checkpoint(s) newer than the one resumed ({}): {}",
                   ckpt.empty() ? std::string("none: a fresh start") : ckpt, list);
    }
  }
  MF_CHECK(!ckpt.empty() || !opts_.must_resume, "train --resume: the run directory ", run_dir_,
           " holds no checkpoint to resume (drop --resume to start the run there, or give "
           "--resume CKPT_DIR)");
  return ckpt;
}

void Trainer::set_aside_later_checkpoints(const std::string& ckpt) const {
  // Checkpoints of this run directory past the starting point belong to a run this one does not
  // continue (--no-resume, or --resume of an earlier checkpoint): set them aside, never delete.
  std::error_code ec;
  const bool ours =
      !ckpt.empty() && fs::equivalent(fs::path(ckpt).parent_path(), fs::path(run_dir_), ec);
  int start = -1;
  if (ours) {
    // The step from its state.json; one that cannot be read is left to load_checkpoint to
    // report, with nothing moved.
    const nlohmann::json st = peek_json_file((fs::path(ckpt) / "state.json").string());
    if (st.is_discarded() || !st.is_object() || !st.contains("step") ||
        !st["step"].is_number_integer())
      return;
    start = st["step"].get<int>();
  }
  const std::string moved = supersede_checkpoints(run_dir_, start);
  if (!moved.empty())
    spdlog::warn("{}: the checkpoints of {}{} and metrics.jsonl moved to {} (delete that "
                 "folder when you no longer need it)",
                 ckpt.empty() ? "starting over" : "continuing from " + ckpt, run_dir_,
                 ours ? fmt::format(" past step {}", start) : std::string(), moved);
}

void Trainer::setup() {
  // Configs built in code (tests, sweeps, tools) get the same checks as files.
  validate_config(cfg_);
  const DistEnv env = read_dist_env();
  rank_ = env.rank;
  world_ = env.world_size;
  attempt_ = env.attempt;
  local_world_ = env.local_world_size;
  MF_CHECK(cfg_.train.world_size == world_, "train.world_size is ", cfg_.train.world_size,
           " but the environment says WORLD_SIZE=", world_);
  if (env.distributed()) setup_logging(rank_);
  // The dump options' own conditions, before the run directory is touched.
  for (const std::string* o : {&opts_.dump_batches, &opts_.dump_routing})
    MF_CHECK(o->empty() || world_ == 1, o == &opts_.dump_batches ? "--dump-batches" : "--dump-routing",
             " works in a single process (world size ", world_, ")");
  MF_CHECK(opts_.dump_routing.empty() || cfg_.model.moe.n_experts > 0,
           "--dump-routing: the model has no MoE layers (model.moe.n_experts 0)");
  run_dir_ = cfg_.run_dir();
  if (rank_ == 0) {
    std::error_code ec;
    created_run_dir_ = !fs::exists(run_dir_, ec);
    fs::create_directories(run_dir_, ec);
    MF_CHECK(!ec, "run.dir: cannot create the run directory ", run_dir_, ": ", ec.message());
    lock_run_dir();
    add_log_file((fs::path(run_dir_) / "log.txt").string());
    // What a crash or kill left behind, cleared in one pass (this process holds the run
    // directory's lock, so nothing here is being written): half-written checkpoints, never
    // renamed into place; checkpoints being deleted (pruned), renamed out of the way first; and
    // the temporary files of atomic writes (latest, metrics.jsonl, config.json, ...: NAME.tmp.PID,
    // see atomic_temp_path).
    for (auto& e : fs::directory_iterator(run_dir_)) {
      const std::string n = e.path().filename().string();
      if (n.rfind(".tmp-ckpt-", 0) == 0) {
        const bool old = n.size() > 4 && n.compare(n.size() - 4, 4, ".old") == 0;
        spdlog::warn("removing {} {} left by an earlier crash",
                     old ? "the partly deleted checkpoint" : "the incomplete checkpoint",
                     e.path().string());
        fs::remove_all(e.path());
        continue;
      }
      const size_t dot = n.rfind(".tmp.");
      if (dot == std::string::npos || dot == 0 || dot + 5 == n.size() || !e.is_regular_file() ||
          n.find_first_not_of("0123456789", dot + 5) != std::string::npos)
        continue;
      std::error_code ec;
      fs::remove(e.path(), ec);
    }
  }
  if (env.distributed()) spdlog::info("distributed: {}", env.str());
  // Where the weights come from, and setting aside what this run does not continue, before
  // anything slow or collective: a group restarted by the launcher after attempt 0 died in setup
  // (a peer that never joined, a kill) must find the run directory as this job left it, not the
  // earlier run's later checkpoints.
  // Quick checks first: the device is there, the data's files exist. A --no-resume (or a
  // branching --resume) that failed on them used to have set the old checkpoints aside already.
  // The backend itself comes after: its start-up takes seconds on CUDA, a window in which the
  // set-aside must already be done.
  check_device(cfg_.train.device);
  check_data_files();
  const std::string ckpt = starting_checkpoint();
  if (rank_ == 0) set_aside_later_checkpoints(ckpt);
  fault_point(FaultPoint::Setup, 0, rank_);

  be_ = make_backend(cfg_.train.device);
  be_->set_precision(cfg_.train.precision);
  be_->set_loss_chunk_mb(cfg_.train.loss_chunk_mb);
  select_attention(*be_, cfg_.model.attention, cfg_.train.deterministic);
  if (env.distributed()) store_ = TcpStore::from_env(env);
  comm_ = make_communicator(env, store_.get(), be_->device(), compute_stream(*be_));
  if (env.distributed()) check_same_json(*comm_, "config", config_to_json(cfg_));
  const int B = cfg_.train.micro_batch, T = cfg_.train.seq_len;
  // µP (or SP): model scalars first, then per-parameter lr / wd / init multipliers, which the
  // optimizer (constructed below) and init_weights read.
  model_ = std::make_unique<LlamaModel>(cfg_.model, *be_, B, T, mup_model_scales(cfg_));
  const MupResult mup = apply_mup(cfg_, model_->params());
  for (auto& w : mup.warnings) spdlog::warn("{}", w);
  diag_ = std::make_unique<Diagnostics>(cfg_);
  spdlog::info("muonforge {} (commit {})", version(), build_commit());
  const MoeConfig& moe = cfg_.model.moe;
  const std::string experts =
      moe.n_experts > 0
          ? fmt::format(", MoE {} experts top-{} +{} shared from layer {}: {} active per token",
                        moe.n_experts, moe.top_k, moe.n_shared, moe.first_dense,
                        int64_t(cfg_.model.active_param_count()))
          : std::string();
  spdlog::info("model: {} parameters ({} layers, d_model {}, {} heads / {} kv heads, d_ff {}, "
               "vocab {}{}), backend {}",
               model_->num_params(), cfg_.model.n_layers, cfg_.model.d_model, cfg_.model.n_heads,
               cfg_.model.n_kv_heads, cfg_.model.d_ff, cfg_.model.vocab_size, experts, be_->name());
  setup_grad_buckets();  // ZeRO-1 shards follow the buckets: plan them first
  setup_distributed();

  DataLoaderOptions lo;
  lo.B = B;
  lo.T = T;
  lo.rank = rank_;
  lo.world_size = world_;
  lo.shuffle = cfg_.data.shuffle;
  lo.seed = cfg_.train.seed;
  lo.vocab_size = cfg_.model.vocab_size;
  lo.label = "data.train";
  train_loader_ = std::make_unique<DataLoader>(cfg_.data.train, lo);  // check_data_files: there
  if (world_ > 1) {
    std::string fp;
    for (int i = 0; i < train_loader_->num_shards(); ++i)
      fp += fs::path(train_loader_->paths()[i]).filename().string() + ":" +
            std::to_string(train_loader_->shard_tokens(i)) + ";";
    check_same(*comm_, "training data (shard names and token counts)", fp);
  }
  if (!cfg_.data.val.empty() && cfg_.train.eval_every > 0) {
    lo.label = "data.val";
    lo.shuffle = false;
    val_loader_ = std::make_unique<DataLoader>(cfg_.data.val, lo);
    // Past the val set's last micro-batch the loader starts over, and a mean over re-read
    // batches weighs the first ones twice: evaluate each once instead, and say so.
    // train.eval_batches 0: the whole val set.
    eval_batches_ = val_loader_->eval_batches(cfg_.train.eval_batches);
    if (cfg_.train.eval_batches > eval_batches_ && rank_ == 0)
      spdlog::warn("train.eval_batches = {} but data.val holds {} micro-batch(es) of {} x {} "
                   "tokens{}: the val loss is the mean over those {}, each read once",
                   cfg_.train.eval_batches, eval_batches_, B, T,
                   world_ > 1 ? fmt::format(" ({} per rank)", eval_batches_ / world_)
                              : std::string(),
                   eval_batches_);
  }

  // Load what starting_checkpoint() chose above.
  if (!ckpt.empty()) {
    nlohmann::json st;
    try {
      st = load_checkpoint(ckpt, model_->params(), *be_, opt_.get(), rank_, world_, sharded_);
    } catch (const Error& e) {
      // A model of another shape fails on some tensor; the cause is the changed key.
      const auto& keys = ModelConfig::shape_key_names();
      const std::string shape = config_changes(saved_config(ckpt), {keys.begin(), keys.end()});
      if (shape.empty()) throw;
      MF_FAIL("cannot resume from ", ckpt, ": this run's model has another shape than the "
              "checkpoint's (", shape, "), and a resume keeps the model; resume with the "
              "checkpoint's model settings, or start a new run (--no-resume, or another run.name) "
              "[", e.what(), "]");
    }
    model_->sync_weights();
    start_step_ = st.at("step").get<int>();
    tokens_seen_ = st.value("tokens", 0LL);
    LoaderState ls = st.at("loader").get<LoaderState>();
    const int64_t reread = train_loader_->restore(ls);
    spdlog::info("resumed from {} at step {}", ckpt, start_step_);
    if (rank_ == 0) {
      const nlohmann::json saved = saved_config(ckpt);
      const std::string changed = config_changes(saved);
      if (!changed.empty()) {
        spdlog::warn("this run's config differs from the checkpoint's (the run goes on with "
                     "the new values): {}", changed);
        warn_schedule_jump(saved, ckpt);
      }
    }
    if (cfg_.train.init_from)
      spdlog::info("train.init_from ({}) is not used: the run continues from its checkpoint",
                   *cfg_.train.init_from);
    if (ls.world_size != world_)
      spdlog::warn("the checkpoint was written by {} rank(s), this run has {}: the data position "
                   "and the optimizer state carry over{}", ls.world_size, world_,
                   reread > 0 ? fmt::format(" ({} micro-batch(es) of the current shard are read "
                                            "again)", reread)
                              : std::string());
  } else {
    if (cfg_.train.init_from) {
      // Under µP the model's scalars (logit, residual, attention multipliers) are undone in the
      // weights, so the run starts from the function the Hugging Face model computes.
      load_hf_model(*cfg_.train.init_from, cfg_.model, model_->params(), *be_,
                    export_weight_factors(cfg_));
      model_->sync_weights();
      spdlog::info("initialised from Hugging Face model {}{}", *cfg_.train.init_from,
                   cfg_.mup.enabled ? " (µP multipliers divided out of the weights)" : "");
    } else {
      model_->init_weights(cfg_.train.seed);
    }
  }

  // metrics.jsonl: after a resume, drop records past the checkpoint so the file tells one story.
  const std::string mpath = (fs::path(run_dir_) / "metrics.jsonl").string();
  if (rank_ == 0) {
    std::ifstream in(mpath);
    std::ostringstream kept;
    std::string line;
    while (in && std::getline(in, line)) {
      if (line.empty()) continue;
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded()) continue;  // a torn last line from a crash
      if (j.value("step", 0) <= start_step_) kept << line << "\n";
    }
    atomic_write_text(mpath, start_step_ > 0 ? kept.str() : "");
    atomic_write_text((fs::path(run_dir_) / "config.json").string(),
                      config_to_string(cfg_) + "\n");
    atomic_write_text((fs::path(run_dir_) / "mup_table.csv").string(), mup.csv());
  }
  // Every parameter's row goes to log.txt (and mup_table.csv); the console gets one row per group
  // of parameters that are treated alike.
  log_file_only("resolved per-parameter hyper-parameters (also in mup_table.csv):\n" + mup.table());
  log_file_only("optimizer, every parameter:\n" + opt_->describe());
  if (!opts_.quiet)
    spdlog::info("optimizer groups (every parameter's lr, wd and init std: {} and log.txt):\n{}",
                 (fs::path(run_dir_) / "mup_table.csv").string(), opt_->describe(false));
  spdlog::info("batch: {} tokens = {} micro-batches x {} x {} x {} rank(s); {} steps; run dir {}",
               cfg_.train.batch_tokens, cfg_.grad_accum(), B, T, world_, cfg_.train.max_steps,
               run_dir_);
}

void Trainer::append_metrics(const nlohmann::json& rec) {
  if (rank_ != 0) return;
  std::ofstream f(fs::path(run_dir_) / "metrics.jsonl", std::ios::app);
  f << rec.dump() << "\n";
}

namespace {
// Of the steps [from, max_steps], how many are multiples of `every` or the last (only the last
// when every is 0).
int events_from(int from, int max_steps, int every) {
  if (from > max_steps) return 0;
  if (every <= 0) return 1;
  return max_steps / every - (from - 1) / every + (max_steps % every != 0 ? 1 : 0);
}
}  // namespace

double eta_seconds(const EtaClock& c, int done, int max_steps, int eval_every, int ckpt_every,
                   double eval_in_steps) {
  if (c.steps <= 0) return 0;
  const double step = c.step_s / c.steps;
  const double eval = c.evals > 0 ? c.eval_s / c.evals : eval_in_steps * step;
  const double ckpt = c.ckpts > 0 ? c.ckpt_s / c.ckpts : 0;
  return step * std::max(0, max_steps - done) +
         (eval_every > 0 ? eval * events_from(done, max_steps, eval_every) : 0) +
         ckpt * events_from(done, max_steps, ckpt_every);
}

std::optional<double> Trainer::evaluate(bool may_cut) {
  if (!val_loader_) return -1.0;
  // eval_batches counts micro-batches over all ranks: batch i is read by rank i % world (the
  // loader's run k*W + r), so the figure does not depend on the number of ranks.
  val_loader_->reset();
  const int64_t N = int64_t(cfg_.train.micro_batch) * cfg_.train.seq_len;
  std::vector<int32_t> in(N), tg(N);
  double s = 0;
  bool cut = false;
  for (int i = rank_; i < eval_batches_; i += world_) {
    if (may_cut && stop_requested()) {  // Ctrl-C: checkpoint now, not after the whole set
      cut = true;
      break;
    }
    val_loader_->next(in.data(), tg.data());
    s += model_->forward(in.data(), tg.data());
  }
  // One all-reduce whatever happened: every rank joins it; a loss over part of the set is none.
  const double mean = mean_over_ranks(s) * world_ / eval_batches_;
  if (world_ > 1) cut = mean_over_ranks(cut ? 1.0 : 0.0) > 0;
  if (cut) return std::nullopt;
  return mean;
}

double Trainer::mean_over_ranks(double x) {
  if (world_ == 1) return x;
  float v = float(x);
  if (be_->device() == Device::CUDA) {  // NCCL reduces device memory
    Tensor h = host_tensor({1});
    h.f32()[0] = v;
    Tensor d = be_->empty({1}, DType::F32);
    be_->upload(h, d);
    comm_->allreduce_avg(d.f32(), 1);
    be_->download(d, h);
    return h.f32()[0];
  }
  comm_->allreduce_avg(&v, 1);
  return v;
}

// Which tensors ZeRO-1 splits into element ranges: those AdamW updates (elementwise, so any range
// of a tensor can be updated on its own). Matrices under a matrix optimizer need the whole matrix
// and are spread over the ranks whole instead (distributed Muon).
bool Trainer::zero_sliced(const Param& p) const {
  const bool matrix = cfg_.optim.name != "adamw" && in_main_group(p.kind, cfg_.optim);
  return world_ > 1 && cfg_.train.zero == 1 && p.trainable && p.kind != ParamKind::Bias && !matrix;
}

void Trainer::setup_grad_buckets() {
  if (world_ == 1) return;
  const Tensor arena = model_->grad_arena();
  std::vector<GradSlot> slots;
  const std::vector<ParamList> groups = model_->grad_groups();
  slot_params_.clear();
  for (size_t g = 0; g < groups.size(); ++g)
    for (Param* p : groups[g]) {
      slots.push_back({int64_t(p->grad.f32() - arena.f32()), p->numel(), int(g), zero_sliced(*p)});
      slot_params_.push_back(p);
    }
  buckets_ = plan_grad_buckets(slots, cfg_.train.bucket_mb);
  if (cfg_.train.overlap_comm)
    model_->set_grad_ready_hook([this](int group) { start_ready_buckets(group); });
  int64_t largest = 0;
  int n_sharded = 0;
  for (const GradBucket& b : buckets_) {
    largest = std::max(largest, b.numel);
    n_sharded += b.sharded;
  }
  spdlog::info("gradient all-reduce: {} bucket(s) (train.bucket_mb = {}; largest {:.2f} MiB{}), {} ({})",
               buckets_.size(), cfg_.train.bucket_mb, double(largest) * 4 / (1 << 20),
               n_sharded ? fmt::format("; {} reduce-scattered for ZeRO-1", n_sharded) : "",
               cfg_.train.overlap_comm ? "overlapping backward" : "after backward", comm_->name());
}

void Trainer::setup_distributed() {
  ParamList all = model_->params();
  owner_.assign(all.size(), -1);
  fragments_.clear();
  matrix_ranges_.clear();
  if (world_ > 1) {
    // Distributed matrix optimizer: each matrix is updated whole by one rank. The matrices, in
    // master-arena order, are split into contiguous runs of balanced size, one per rank, so that
    // after the update each rank's matrices travel as one range of the arena (allgather_ranges).
    // What lies between them in a run (norm gains, routers, ZeRO-1 fragments, padding) is the
    // same on every rank by then, so sending it along changes nothing.
    const float* marena = model_->master_arena().f32();
    std::vector<size_t> mats;  // indices into `all`, by arena offset
    for (size_t i = 0; i < all.size(); ++i)
      if (all[i]->trainable && cfg_.optim.name != "adamw" && in_main_group(all[i]->kind, cfg_.optim))
        mats.push_back(i);
    std::stable_sort(mats.begin(), mats.end(), [&](size_t a, size_t b) {
      return all[a]->master.f32() < all[b]->master.f32();
    });
    std::vector<int64_t> sizes;
    for (size_t i : mats) sizes.push_back(all[i]->numel());
    const std::vector<int> rank_of = partition_contiguous(sizes, world_);
    if (!mats.empty()) matrix_ranges_.assign(size_t(world_), {0, 0});
    for (size_t k = 0; k < mats.size(); ++k) {
      const Param* p = all[mats[k]];
      const int r = rank_of[k];
      owner_[mats[k]] = r;
      const size_t lo = size_t(p->master.f32() - marena), hi = lo + size_t(p->numel());
      auto& range = matrix_ranges_[size_t(r)];
      if (range.second == range.first) range = {lo, hi};
      else range = {std::min(range.first, lo), std::max(range.second, hi)};
      sharded_ = true;
    }
    // ZeRO-1: every reduce-scattered bucket's range is split into world_size shards
    // (shard_range); this rank updates the parts of tensors that fall in its shard, as
    // 1-D fragment parameters viewing the master and gradient arenas.
    const float* garena = model_->grad_arena().f32();
    for (const GradBucket& b : buckets_) {
      if (!b.sharded) continue;
      const ShardRange sh = shard_range(size_t(b.numel), world_, rank_);
      const int64_t lo = b.offset + int64_t(sh.lo), hi = b.offset + int64_t(sh.hi);
      for (size_t s = b.first; s < b.last; ++s) {
        Param* p = slot_params_[s];
        for (size_t i = 0; i < all.size(); ++i)
          if (all[i] == p) owner_[i] = kSliced;
        const int64_t off = int64_t(p->grad.f32() - garena);
        const int64_t a = std::max(lo, off), e = std::min(hi, off + p->numel());
        if (a >= e) continue;
        auto f = std::make_unique<Param>(*p);
        f->name = p->name + "[" + std::to_string(a - off) + ":" + std::to_string(e - off) + "]";
        f->shape = {e - a};
        f->master = p->master.view({p->numel()}).slice0(a - off, e - off);
        f->grad = p->grad.view({p->numel()}).slice0(a - off, e - off);
        f->weight = f->master;  // the compute copy is refreshed after the all-gather
        fragments_.push_back(std::move(f));
      }
      sharded_ = true;
    }
  }
  ParamList mine;
  for (size_t i = 0; i < all.size(); ++i)
    if (owner_[i] == -1 || owner_[i] == rank_) mine.push_back(all[i]);
  for (auto& f : fragments_) mine.push_back(f.get());
  opt_ = std::make_unique<Optimizer>(cfg_, mine, *be_);
  // One cast over the weight arena after each step; with several ranks, gather_params does it
  // once the all-gathers have made the masters whole.
  if (world_ == 1)
    opt_->set_weight_refresh([this] { model_->sync_weights(); });
  else
    opt_->set_weight_refresh([] {});
  const nlohmann::json plan = memory_plan(*model_, *opt_, *be_);
  if (rank_ == 0) print_memory_plan(plan, /*console=*/!opts_.quiet);
  check_memory_plan(plan, local_world_);
  reserve_memory_plan(plan, *be_);
  if (sharded_) {
    int64_t n_mine = 0, n_all = 0;
    for (const OptEntry& e : opt_->entries()) n_mine += e.param->numel();
    for (const Param* p : all)
      if (p->trainable && p->kind != ParamKind::Bias) n_all += p->numel();
    spdlog::info("optimizer sharded over {} ranks: this rank updates {:.1f}% of the weights "
                 "({} whole tensors, {} ZeRO-1 fragments){}",
                 world_, 100.0 * double(n_mine) / double(std::max<int64_t>(n_all, 1)),
                 opt_->entries().size() - fragments_.size(), fragments_.size(),
                 cfg_.train.zero == 1 ? "" : " (distributed matrix optimizer)");
  }
}

void Trainer::start_ready_buckets(int group) {
  float* arena = model_->grad_arena().f32();
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].ready_group <= group) {
    const GradBucket& b = buckets_[next_bucket_++];
    inflight_.push_back(b.sharded ? comm_->reduce_scatter_avg_async(arena + b.offset, size_t(b.numel))
                                  : comm_->allreduce_avg_async(arena + b.offset, size_t(b.numel)));
  }
}

void Trainer::allreduce_grads() {
  if (world_ == 1) return;
  start_ready_buckets(std::numeric_limits<int>::max());  // all (overlap off: every bucket)
  // Wait in issue order; on CUDA this only makes the compute stream wait.
  for (auto& w : inflight_) w->wait();
  inflight_.clear();
  next_bucket_ = 0;
}

double Trainer::grad_norm() {
  if (fragments_.empty() && !std::count(owner_.begin(), owner_.end(), kSliced))
    return global_grad_norm(model_->params(), *be_);
  // ZeRO-1: a reduce-scattered gradient is only valid in each rank's shard; sum the shards'
  // squares over ranks and add the all-reduced tensors' (the same on every rank) once.
  ParamList whole, mine;
  ParamList all = model_->params();
  for (size_t i = 0; i < all.size(); ++i)
    if (owner_[i] != kSliced) whole.push_back(all[i]);
  for (auto& f : fragments_) mine.push_back(f.get());
  const double a = global_grad_norm(whole, *be_), m = global_grad_norm(mine, *be_);
  return std::sqrt(a * a + mean_over_ranks(m * m) * world_);
}

void Trainer::gather_params() {
  if (world_ == 1) return;
  float* masters = model_->master_arena().f32();
  for (const GradBucket& b : buckets_)
    if (b.sharded) comm_->allgather_shards(masters + b.offset, size_t(b.numel));
  // After the all-gathers above, so the fragments inside the ranges are already whole.
  if (!matrix_ranges_.empty()) comm_->allgather_ranges(masters, matrix_ranges_);
  model_->sync_weights();
}

void Trainer::qk_clip_step(int* clipped) {
  if (world_ == 1) {
    *clipped = diag_->qk_clip(*model_, *be_);  // 0 unless optim.qk_clip_tau > 0
    return;
  }
  // Each rank measures the max logits on its own batch; the clip uses the max over ranks, so every
  // rank scales the same rows of the same (identical) weights by the same factors.
  *clipped = diag_->qk_clip(*model_, *be_, [this](std::vector<std::vector<double>>& logits) {
    std::string mine;
    for (const auto& layer : logits)
      mine.append(reinterpret_cast<const char*>(layer.data()), layer.size() * sizeof(double));
    const std::vector<std::string> all = comm_->allgather_bytes(mine);
    for (int r = 0; r < world_; ++r) {
      MF_CHECK(all[size_t(r)].size() == mine.size(), "QK-clip: rank ", r, " sent ",
               all[size_t(r)].size(), " bytes of max logits, this rank ", mine.size());
      const double* v = reinterpret_cast<const double*>(all[size_t(r)].data());
      size_t i = 0;
      for (auto& layer : logits)
        for (double& x : layer) x = std::max(x, v[i++]);
    }
  });
}

void Trainer::check_weights_agree(int done) {
  // A fingerprint per parameter (its sum of squares: a fixed-order reduction, so identical
  // weights give identical bits on every rank), compared across ranks. It is also the check that
  // the step's update left the weights finite: the loss check before the update cannot see a
  // blow-up in the update itself (a huge lr, say), and a checkpoint of NaN weights would
  // be offered as "the last good checkpoint" and fail again on every resume.
  const ParamList& params = model_->params();
  std::vector<const Tensor*> masters;
  for (const Param* p : params) masters.push_back(&p->master);
  const std::vector<double> sums = be_->sum_squares_each(masters);
  for (size_t i = 0; i < params.size(); ++i)
    if (!std::isfinite(sums[i])) {
      if (done == 0)
        MF_FAIL("the initial weights are non-finite (first: ", params[i]->name,
                "); check model.init_std");
      MF_FAIL("step ", done, ": the update left non-finite weights (first: ", params[i]->name,
              "); not writing a checkpoint. ", last_good_checkpoint(run_dir_, done),
              blowup_hint(cfg_, true));
    }
  if (world_ == 1) return;
  std::string mine;
  for (double s : sums) mine.append(reinterpret_cast<const char*>(&s), sizeof(s));
  const std::vector<std::string> all = comm_->allgather_bytes(mine);
  for (int r = 1; r < world_; ++r) {
    if (all[size_t(r)] == all[0]) continue;
    std::string first = "?";
    for (size_t i = 0; i < params.size(); ++i)
      if (all[size_t(r)].compare(i * 8, 8, all[0], i * 8, 8) != 0) {
        first = params[i]->name;
        break;
      }
    MF_FAIL("after step ", done, " rank ", r, "'s weights differ from rank 0's (first: ", first,
            "); data-parallel ranks must hold identical weights. This is a bug in muonforge: "
            "please report it with the config (this is rank ", rank_, ")");
  }
}

nlohmann::json Trainer::state_json(int step) const {
  nlohmann::json st;
  st["step"] = step;
  st["tokens"] = tokens_seen_;
  st["loader"] = train_loader_->state();
  st["world_size"] = world_;
  st["muonforge"] = std::string(version()) + " " + build_commit();  // which binary wrote it
  return st;
}

TrainResult Trainer::run() {
  TrainResult res;
  res.run_dir = run_dir_;
  const int max_steps = cfg_.train.max_steps, accum = cfg_.grad_accum();
  const int B = cfg_.train.micro_batch, T = cfg_.train.seq_len;
  const int64_t N = int64_t(B) * T;
  const float loss_scale = float(1.0 / (double(N) * accum));
  std::vector<int32_t> in(N), tg(N);
  const double fpt = model_->flops_per_token(), peak = peak_flops(*be_);

  install_stop_handlers();
  if (opts_.init_only) {
    MF_CHECK(start_step_ == 0, "--init-only: ", run_dir_, " already holds a checkpoint at step ",
             start_step_, "; pass --no-resume to start over");
    check_weights_agree(0);
    res.last_checkpoint = save_checkpoint(run_dir_, 0, model_->params(), *opt_, *be_,
                                          state_json(0), cfg_, cfg_.train.keep_ckpts, *comm_,
                                          sharded_);
    spdlog::info("initial weights written to {} (--init-only)", res.last_checkpoint);
    return res;
  }
  if (start_step_ >= max_steps) {
    spdlog::info("run already complete ({} of {} steps)", start_step_, max_steps);
    res.steps_done = start_step_;
    return res;
  }
  if (opts_.stop_at > 0 && start_step_ >= opts_.stop_at) {
    spdlog::info("the run is at step {}, already at or past --stop-at {}: nothing to do (raise "
                 "--stop-at, or drop it to train to step {})", start_step_, opts_.stop_at,
                 max_steps);
    res.steps_done = start_step_;
    res.interrupted = true;
    return res;
  }
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> dump(nullptr, &std::fclose);
  if (!opts_.dump_batches.empty()) {
    dump.reset(std::fopen(opts_.dump_batches.c_str(), "wb"));
    MF_CHECK(dump, "--dump-batches: cannot open ", opts_.dump_batches, " for writing");
  }
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> routes(nullptr, &std::fclose);
  if (!opts_.dump_routing.empty()) {
    routes.reset(std::fopen(opts_.dump_routing.c_str(), "wb"));
    MF_CHECK(routes, "--dump-routing: cannot open ", opts_.dump_routing, " for writing");
  }
  auto t_start = Clock::now(), t_log = Clock::now();
  long long tokens_log = 0;
  EtaClock eta_clock;
  // Until an evaluation has been timed, one is taken to cost its micro-batches' forward passes
  // (about a third of a forward + backward) relative to a step's.
  const double eval_in_steps =
      double(eval_batches_) / world_ / std::max(accum, 1) / 3.0;
  const int eval_every = val_loader_ ? cfg_.train.eval_every : 0;
  int step = start_step_;
  for (; step < max_steps; ++step) {
    const auto t_step = Clock::now();
    const bool diag_step = diag_->due(step);
    if (diag_step) diag_->before_step(model_->params(), *be_);
    model_->zero_grads();
    for (int micro = 0; micro < accum; ++micro) {
      train_loader_->next(in.data(), tg.data());
      if (dump) {
        MF_CHECK(std::fwrite(in.data(), sizeof(int32_t), size_t(N), dump.get()) == size_t(N) &&
                     std::fwrite(tg.data(), sizeof(int32_t), size_t(N), dump.get()) == size_t(N) &&
                     std::fflush(dump.get()) == 0,
                 "--dump-batches: writing ", opts_.dump_batches, " failed");
      }
      // The last micro-batch's backward finishes the gradients: its grad-ready hook starts the
      // all-reduce of each bucket as soon as the bucket is final (train.overlap_comm). The loss
      // stays on the device until the step's micro-batches are all queued.
      model_->forward_backward_deferred(in.data(), tg.data(), loss_scale,
                                        /*grads_final=*/micro == accum - 1);
      if (routes) {  // the routing stays until the next forward (backward reads it)
        for (MoeLayer* m : model_->moe_layers()) {
          const std::vector<int32_t> r = m->last_routing();
          MF_CHECK(std::fwrite(r.data(), sizeof(int32_t), r.size(), routes.get()) == r.size() &&
                       std::fflush(routes.get()) == 0,
                   "--dump-routing: writing ", opts_.dump_routing, " failed");
        }
      }
    }
    allreduce_grads();
    double loss = mean_over_ranks(model_->take_loss());
    const double gnorm = grad_norm();
    if (!std::isfinite(loss) || !std::isfinite(gnorm)) {
      // At step 0 no update has run: the initial weights (or the data) are at fault, not the lr.
      MF_FAIL("step ", step + 1, ": non-finite ", (!std::isfinite(loss) ? "loss" : "gradient norm"),
              " (loss ", loss, ", grad norm ", gnorm, "); stopping before the update. ",
              last_good_checkpoint(run_dir_, step),
              step == 0 ? " No update has run yet, so the learning rate is not the cause: check "
                          "model.init_std, model.moe.route_scale and, if set, the weights of "
                          "train.init_from."
                        : blowup_hint(cfg_, false));
    }
    const double clip = clip_factor(gnorm, cfg_.optim.grad_clip);
    opt_->step(step, float(clip));
    gather_params();  // ZeRO-1 all-gather, distributed-Muon broadcasts
    int qk_clipped = 0;
    qk_clip_step(&qk_clipped);
    // MoE: bias balancing on the step's expert loads summed over ranks (no-op for dense models).
    model_->post_step([this](std::vector<float>& v) {
      if (world_ == 1 || v.empty()) return;
      Tensor h = host_tensor({int64_t(v.size())});
      std::copy(v.begin(), v.end(), h.f32());
      if (be_->device() == Device::CUDA) {  // NCCL reduces device memory
        if (moe_stats_dev_.numel() != h.numel()) moe_stats_dev_ = be_->empty(h.shape, DType::F32);
        be_->upload(h, moe_stats_dev_);
        comm_->allreduce_sum(moe_stats_dev_.f32(), v.size());
        be_->download(moe_stats_dev_, h);
      } else {
        comm_->allreduce_sum(h.f32(), v.size());
      }
      std::copy(h.f32(), h.f32() + v.size(), v.begin());
    });
    const long long step_tokens = cfg_.train.batch_tokens;
    tokens_seen_ += step_tokens;
    tokens_log += step_tokens;
    res.losses.push_back(loss);
    const int done = step + 1;

    const bool last = done == max_steps;
    if (done % cfg_.train.log_every == 0 || last || done == start_step_ + 1) {
      const double dt = seconds_since(t_log);
      const double tps = tokens_log / std::max(dt, 1e-9);
      const double elapsed = seconds_since(t_start);
      EtaClock now = eta_clock;  // this step's time so far counts as its whole
      now.step_s += seconds_since(t_step);
      now.steps += 1;
      const double eta = eta_seconds(now, done, max_steps, eval_every, cfg_.train.ckpt_every,
                                     eval_in_steps);
      nlohmann::json rec = {{"step", done},          {"tokens", tokens_seen_},
                            {"loss", loss},          {"lr", opt_->lr(step)},
                            {"grad_norm", gnorm},    {"tok_per_s", tps},
                            {"elapsed_s", elapsed}};
      rec["mfu"] = peak > 0 ? nlohmann::json(fpt * tps / peak) : nlohmann::json(nullptr);
      if (cfg_.optim.qk_clip_tau > 0) rec["qk_clipped"] = qk_clipped;
      if (model_->is_moe()) rec["moe"] = model_->moe_metrics();  // MoE: loads, aux loss, drops
      append_metrics(rec);
      // --quiet keeps the step lines off the console, not out of log.txt.
      log_info(fmt::format("step {:>{}}/{} | loss {:.4f} | lr {:.2e} | grad norm {:.3f} | {} "
                           "tok/s | ETA {}",
                           done, int(std::to_string(max_steps).size()), max_steps, loss,
                           opt_->lr(step), gnorm, fmt_rate(tps), fmt_duration(eta)),
               !opts_.quiet);
      t_log = Clock::now();
      tokens_log = 0;
    }
    if (diag_step) append_metrics(diag_->after_step(*model_, *be_, done));
    eta_clock.step_s += seconds_since(t_step);
    eta_clock.steps += 1;
    if (val_loader_ && (done % cfg_.train.eval_every == 0 || last)) {
      const auto t_eval = Clock::now();
      // The last step's is never cut: the run is complete after it, and a later start would
      // not evaluate again (its final val loss would be missing, an earlier one taken for it).
      const std::optional<double> got = evaluate(!last);
      if (!got) {
        spdlog::info("step {}: validation cut short by the stop; no val loss recorded", done);
      } else {
        const double vl = *got;
        // Before the checkpoint below: weights that give a non-finite loss are not worth keeping.
        MF_CHECK(std::isfinite(vl), "step ", done, ": non-finite validation loss (", vl,
                 "); not writing a checkpoint. ", last_good_checkpoint(run_dir_, done),
                 blowup_hint(cfg_, true));
        res.final_val_loss = vl;
        append_metrics({{"step", done}, {"val_loss", vl}});
        spdlog::info("step {} | val loss {:.4f}", done, vl);
        eta_clock.eval_s += seconds_since(t_eval);
        eta_clock.evals += 1;
      }
    }
    bool stopping = stop_requested() || (opts_.stop_at > 0 && done >= opts_.stop_at && !last);
    // Ranks may see a signal at different steps: agree, so all checkpoint and stop together.
    if (world_ > 1) stopping = mean_over_ranks(stopping ? 1.0 : 0.0) > 0;
    if ((cfg_.train.ckpt_every > 0 && done % cfg_.train.ckpt_every == 0) || last || stopping) {
      check_weights_agree(done);
      const auto t_ckpt = Clock::now();
      res.last_checkpoint =
          save_checkpoint(run_dir_, done, model_->params(), *opt_, *be_, state_json(done), cfg_,
                          cfg_.train.keep_ckpts, *comm_, sharded_);
      eta_clock.ckpt_s += seconds_since(t_ckpt);
      eta_clock.ckpts += 1;
      spdlog::info("checkpoint {}", res.last_checkpoint);
    }
    fault_point(FaultPoint::Step, done, rank_);
    if (stopping) {
      if (stop_requested())
        spdlog::warn("stopped by signal {} after step {}; resume with the same command",
                     g_stop_signal.load(), done);
      else if (world_ > 1 && opts_.stop_at == 0)
        spdlog::warn("stopped after step {}: another rank was asked to stop (a signal there); "
                     "resume with the same command", done);
      else
        spdlog::info("stopped after step {} as asked (--stop-at); continue with a larger "
                     "--stop-at, or without it", done);
      res.interrupted = true;
      ++step;
      break;
    }
  }
  res.steps_done = step;
  const double total = seconds_since(t_start);
  spdlog::info("done: {} steps in {}, {} tok/s average", step - start_step_, fmt_duration(total),
               fmt_rate(double(step - start_step_) * cfg_.train.batch_tokens / std::max(total, 1e-9)));
  return res;
}

}  // namespace mf
