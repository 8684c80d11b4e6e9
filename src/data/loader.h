// Distributed, deterministic, resumable loader over llm.c token shards.
//
// THE CONTRACT (tests/test_data.cpp checks it against an independent re-implementation)
// ------------------------------------------------------------------------------------
// Notation: shards s = 0..S-1 are the files matched by the glob(s), sorted byte-wise; shard s
// holds N_s tokens; BT = B*T; W = world size; r = this rank (0 <= r < W).
//
// Runs. A micro-batch is one contiguous run of BT+1 tokens. Run j of shard s covers tokens
// [j*BT, j*BT + BT + 1): runs start at offset 0 with stride BT, so adjacent runs share one
// boundary token (the llm.c convention). Shard s has R_s = floor((N_s - 1) / BT) runs.
// inputs  = tokens [j*BT,     j*BT + BT)     viewed as B x T (row b = the b-th block of T)
// targets = tokens [j*BT + 1, j*BT + BT + 1) (inputs shifted by one)
//
// Groups. Each micro-step consumes one group of W runs, one per rank. Shard s provides
// G_s = floor(R_s / W) groups; the R_s mod W runs left over at its end are skipped (never read
// by anyone), so all ranks move to the next shard together.
//
// Exact mode (shuffle = false). The shards are visited in order 0..S-1, then wrap to 0 (the
// next epoch). In shard s, group g gives rank r run number (g*W + r). Equivalently: list the
// runs of every shard (0..G_s*W-1 of shard 0, then of shard 1, ...), repeat forever; rank r at
// global micro-step k reads element (k*W + r) of that list. Hence ranks never read the same run
// within a pass, and the union of the W ranks at step k is exactly what a single process with
// W = 1 reading that same list at positions k*W .. k*W+W-1 would get.
//
// Shuffle mode (shuffle = true). Epoch e visits the shards in the order of a permutation of
// 0..S-1 drawn from Rng(mix(seed, e)); inside shard s during epoch e, the R_s runs are permuted
// with Rng(mix(seed, e, s)) to a list P, and group g gives rank r run P[g*W + r] (the first
// G_s*W entries of P are used). Every used run is read exactly once per pass, by one rank.
//
// Resume. state() is a small POD (epoch, position in the shard order, group inside the shard,
// micro-batches served) plus the settings it was taken under; it is the same on every rank.
// restore(state) on a loader built with the same files, B, T, world size, shuffle and seed
// makes the following next() calls return exactly what they would have returned; a mismatch is
// an error naming the field. A different world size is allowed: the runs already used in the
// current shard (group * W_saved of its order) are kept and the new ranks continue from
// group = that / W_new, so the global order of runs is unchanged (when W_new does not divide it,
// the last few runs are read again; restore() returns how many). reset() returns to the very start (used for the validation set,
// which is evaluated from its beginning each time).
//
// Errors (mf::Error, naming the file): a glob that matches nothing, any malformed shard (see
// shard.h), a shard with fewer than BT+1 tokens, a shard with fewer than W runs, a token id
// >= vocab_size. Token ids are checked when the loader is built if all shards together are at
// most 1 GiB, otherwise the first time each shard is read.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/shard.h"

namespace mf {

struct LoaderState {
  uint64_t epoch = 0;      // completed passes over all shards
  uint64_t shard_pos = 0;  // index into this epoch's shard order
  uint64_t group = 0;      // micro-step (group of W runs) inside the current shard
  uint64_t step = 0;       // micro-batches served since construction / reset (informational)
  // The settings the state belongs to (checked by restore()).
  int64_t B = 0;
  int64_t T = 0;
  int64_t world_size = 0;
  bool shuffle = false;
  uint64_t seed = 0;
  uint64_t n_shards = 0;
  uint64_t total_tokens = 0;  // sum of N_s: a cheap fingerprint of the data set
};
bool operator==(const LoaderState& a, const LoaderState& b);
inline bool operator!=(const LoaderState& a, const LoaderState& b) { return !(a == b); }
void to_json(nlohmann::json& j, const LoaderState& s);
void from_json(const nlohmann::json& j, LoaderState& s);

struct DataLoaderOptions {
  int64_t B = 1;              // micro-batch rows
  int64_t T = 1;              // sequence length
  int rank = 0;
  int world_size = 1;
  bool shuffle = false;
  uint64_t seed = 0;
  int64_t vocab_size = 0;     // > 0: every token id must be < vocab_size
  std::string label = "data"; // names the setting in errors, e.g. "data.train"
  std::string vocab_fixed_by;  // e.g. "checkpoint X" when vocab_size cannot change (eval)
};

// Where one micro-batch comes from.
struct RunRef {
  int shard = 0;        // index into paths()
  int64_t run = 0;      // run number j inside the shard
  int64_t offset = 0;   // first token = run * B * T
};

class DataLoader {
 public:
  // `files`: globs or plain paths (each must match something); see expand_globs().
  DataLoader(const std::vector<std::string>& files, const DataLoaderOptions& opt);
  DataLoader(const std::string& glob, const DataLoaderOptions& opt)
      : DataLoader(std::vector<std::string>{glob}, opt) {}
  DataLoader(const std::string& glob, int64_t B, int64_t T, int rank, int world_size, bool shuffle,
             uint64_t seed, int64_t vocab_size);

  // Fills inputs[B*T] and targets[B*T] with the next micro-batch of this rank and advances.
  void next(int32_t* inputs, int32_t* targets);
  // The run the next call to next() will read (does not advance).
  RunRef peek() const;

  LoaderState state() const;
  // Returns the number of runs that will be read a second time (0 unless the world size
  // changed and W_new does not divide the runs already used in the current shard).
  int64_t restore(const LoaderState& s);
  void reset();

  const std::vector<std::string>& paths() const { return paths_; }
  int num_shards() const { return int(shards_.size()); }
  int64_t shard_tokens(int s) const { return shards_.at(size_t(s)).size(); }
  // R_s and G_s of the contract.
  int64_t runs_in_shard(int s) const;
  int64_t groups_in_shard(int s) const;
  // Micro-steps in one pass over all shards (sum of G_s).
  int64_t steps_per_epoch() const;
  // Distinct micro-batches all ranks together read in that pass (steps_per_epoch * world_size):
  // what a validation pass can cover before the loader starts over.
  int64_t micro_batches_per_pass() const { return steps_per_epoch() * opt_.world_size; }
  // The micro-batches (over all ranks) an evaluation of `asked` reads: `asked`, or every one of
  // the pass, each once, when asked is 0 or more than the pass holds.
  int eval_batches(int asked) const {
    const int64_t avail = std::min<int64_t>(micro_batches_per_pass(), std::numeric_limits<int>::max());
    return asked > 0 && asked < avail ? asked : int(avail);
  }
  int64_t total_tokens() const { return total_tokens_; }
  const DataLoaderOptions& options() const { return opt_; }

 private:
  void enter_epoch();   // recomputes the shard order for state_.epoch
  void enter_shard();   // recomputes the run order for the current shard
  int current_shard() const { return order_[size_t(state_.shard_pos)]; }

  DataLoaderOptions opt_;
  std::vector<std::string> paths_;
  std::vector<TokenShard> shards_;
  int64_t total_tokens_ = 0;
  LoaderState state_;
  std::vector<int> order_;        // shard visiting order of the current epoch
  std::vector<int64_t> runs_;     // run order of the current shard (shuffle mode only)
};

}  // namespace mf
