// Checkpoints (DESIGN §6): run_dir/ckpt-NNNNNN/ holding
//   model.safetensors      master weights (F32) under the Hugging Face names
//   optimizer.safetensors  optimizer state tensors ("<param>.exp_avg", ...); when the state is
//                          sharded over ranks, optimizer-rank<R>.safetensors per rank
//   state.json             step, tokens, optimizer scalars, data-loader state, world size
//                          (no RNG stream is consumed after initialisation: the model has no
//                          dropout, and the shuffle order is a function of (seed, epoch,
//                          shard) that the loader state pins down, so there is none to save)
//   config.json            the resolved config of the run
// A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed
// into place; `latest` (a one-line text file) is replaced atomically last. A crash at any point
// leaves the previous checkpoints and `latest` intact.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "config/config.h"
#include "model/params.h"

namespace mf {

class Optimizer;
class Communicator;

std::string checkpoint_dir_name(int step);  // "ckpt-000123"
// The step a checkpoint directory's name stands for, or -1 when checkpoint_dir_name would not
// give that name ("ckpt-backup", "ckpt-00001x", "ckpt-0000123").
int checkpoint_step_of(const std::string& name);
// Steps of the complete checkpoints (ckpt-NNNNNN with a state.json) in run_dir, ascending.
std::vector<int> list_checkpoints(const std::string& run_dir);

// Writes a checkpoint for `step` (the number of completed steps) and keeps the newest `keep`.
// Collective over `comm`: rank 0 writes the model, state and config; the optimizer state is
// written by rank 0 alone, or, when `sharded`, by every rank into optimizer-rank<R>.safetensors.
// Returns the checkpoint directory.
std::string save_checkpoint(const std::string& run_dir, int step, const ParamList& params,
                            const Optimizer& opt, Backend& be, const nlohmann::json& state,
                            const Config& cfg, int keep, Communicator& comm, bool sharded);
// Single-process convenience.
std::string save_checkpoint(const std::string& run_dir, int step, const ParamList& params,
                            const Optimizer& opt, Backend& be, const nlohmann::json& state,
                            const Config& cfg, int keep);

// The newest complete checkpoint in run_dir ("" when there is none): the ckpt-* directory of the
// highest step with a state.json and a model.safetensors. `latest` names it too, except after a
// crash between a checkpoint's rename into place and the rewrite of `latest`.
std::string find_latest_checkpoint(const std::string& run_dir);
// The checkpoint-named directories of run_dir past `step` that find_latest_checkpoint passes
// over (no state.json or no model.safetensors: damaged by hand or by a failing disk), each as
// "PATH (what is missing)", oldest first.
std::vector<std::string> damaged_checkpoints_after(const std::string& run_dir, int step);

// Moves the complete checkpoints of run_dir with a step above `keep_upto` (all of them when it is
// -1) and the metrics.jsonl beside them into a new folder run_dir/superseded-N (N = 1, 2, ...),
// and points `latest` at ckpt-<keep_upto> (or removes it). For a run that starts over
// (--no-resume) or branches from an earlier checkpoint: their checkpoints would otherwise
// outrank the new run's (pruning keeps the highest steps; a stale `latest` falls back to the
// highest). Returns the folder, or "" when nothing was moved.
std::string supersede_checkpoints(const std::string& run_dir, int keep_upto);

// A checkpoint directory (it has config.json and model.safetensors) as given, or a run
// directory's newest complete checkpoint (the run directory's `latest` file stands for it);
// otherwise an error that starts with `who` (the
// command and option, e.g. "eval") and says which of the two to give.
std::string resolve_checkpoint_dir(const std::string& path, const std::string& who);

// Loads master weights (compute copies are synced by the caller), optimizer state when opt is
// given, and returns state.json. When the checkpoint was written with the same sharding, each
// rank reads its own optimizer file; otherwise (another world size, train.zero or bucket size)
// every rank reads the parts it needs from all the files: whole tensors as stored, AdamW's
// elementwise state rebuilt from the ZeRO-1 fragments and cut to this run's. Errors name the
// checkpoint file and the tensor.
nlohmann::json load_checkpoint(const std::string& ckpt_dir, const ParamList& params, Backend& be,
                               Optimizer* opt, int rank = 0, int world_size = 1,
                               bool sharded = false);

// Loads weights from a safetensors file by name into params (shape-checked). Missing names are
// an error unless allow_missing lists them.
void load_weights(const std::string& path, const ParamList& params, Backend& be);
// Throws, naming the file, the tensor and the first bad element, when the host f32 tensor h
// holds a NaN or an infinity: weights that no training step could start from.
void check_finite_weights(const Tensor& h, const std::string& name, const std::string& path);

// Writes params' master weights to a safetensors file (F32 or BF16) under their names.
void save_weights(const std::string& path, const ParamList& params, Backend& be,
                  DType store_as = DType::F32);

}  // namespace mf
