#include "data/loader.h"

#include <nlohmann/json.hpp>

#include <numeric>

#include "core/error.h"
#include "core/rng.h"

namespace mf {

namespace {

// SplitMix64 finaliser: decorrelates (seed, epoch, shard) before they seed a PCG32 stream.
uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
// Separate domains so the shard order and the run orders never share a stream.
constexpr uint64_t kShardOrderStream = 1;
constexpr uint64_t kRunOrderStream = 2;

template <typename T>
void shuffle_in_place(std::vector<T>& v, Rng& rng) {
  for (size_t i = v.size(); i > 1; --i) {
    size_t j = size_t(rng.below(i));
    std::swap(v[i - 1], v[j]);
  }
}

constexpr int64_t kEagerVocabCheckBytes = int64_t(1) << 30;

}  // namespace

bool operator==(const LoaderState& a, const LoaderState& b) {
  return a.epoch == b.epoch && a.shard_pos == b.shard_pos && a.group == b.group &&
         a.step == b.step && a.B == b.B && a.T == b.T && a.world_size == b.world_size &&
         a.shuffle == b.shuffle && a.seed == b.seed && a.n_shards == b.n_shards &&
         a.total_tokens == b.total_tokens;
}

void to_json(nlohmann::json& j, const LoaderState& s) {
  j = nlohmann::json{{"epoch", s.epoch},       {"shard_pos", s.shard_pos},
                     {"group", s.group},       {"step", s.step},
                     {"B", s.B},               {"T", s.T},
                     {"world_size", s.world_size}, {"shuffle", s.shuffle},
                     {"seed", s.seed},         {"n_shards", s.n_shards},
                     {"total_tokens", s.total_tokens}};
}

void from_json(const nlohmann::json& j, LoaderState& s) {
  MF_CHECK(j.is_object(), "data loader state: expected a JSON object, got ", j.dump());
  auto get = [&](const char* key, auto& field) {
    MF_CHECK(j.contains(key), "data loader state: missing key '", key, "' in ", j.dump());
    try {
      j.at(key).get_to(field);
    } catch (const nlohmann::json::exception& e) {
      MF_FAIL("data loader state: key '", key, "' has the wrong type: ", j.at(key).dump());
    }
  };
  get("epoch", s.epoch);
  get("shard_pos", s.shard_pos);
  get("group", s.group);
  get("step", s.step);
  get("B", s.B);
  get("T", s.T);
  get("world_size", s.world_size);
  get("shuffle", s.shuffle);
  get("seed", s.seed);
  get("n_shards", s.n_shards);
  get("total_tokens", s.total_tokens);
}

DataLoader::DataLoader(const std::string& glob, int64_t B, int64_t T, int rank, int world_size,
                       bool shuffle, uint64_t seed, int64_t vocab_size)
    : DataLoader(std::vector<std::string>{glob}, [&] {
        DataLoaderOptions o;
        o.B = B;
        o.T = T;
        o.rank = rank;
        o.world_size = world_size;
        o.shuffle = shuffle;
        o.seed = seed;
        o.vocab_size = vocab_size;
        return o;
      }()) {}

DataLoader::DataLoader(const std::vector<std::string>& files, const DataLoaderOptions& opt)
    : opt_(opt) {
  const std::string& L = opt_.label;
  MF_CHECK(opt_.B >= 1, L, ": micro-batch size B must be >= 1, got ", opt_.B);
  MF_CHECK(opt_.T >= 1, L, ": sequence length T must be >= 1, got ", opt_.T);
  MF_CHECK(opt_.world_size >= 1, L, ": world size must be >= 1, got ", opt_.world_size);
  MF_CHECK(opt_.rank >= 0 && opt_.rank < opt_.world_size, L, ": rank ", opt_.rank,
           " is outside [0, ", opt_.world_size, ")");
  MF_CHECK(opt_.vocab_size >= 0, L, ": vocab_size must be >= 0, got ", opt_.vocab_size);

  paths_ = expand_globs(files, L);
  const int64_t BT = opt_.B * opt_.T;
  int64_t bytes = 0;
  shards_.reserve(paths_.size());
  for (const auto& p : paths_) {
    TokenShard sh(p);
    MF_CHECK(sh.size() >= BT + 1, L, ": token shard '", p, "' has ", sh.size(),
             " tokens, fewer than B*T+1 = ", opt_.B, "*", opt_.T, "+1 = ", BT + 1,
             " needed for one micro-batch (use a smaller micro_batch / seq_len, or more data)");
    const int64_t runs = (sh.size() - 1) / BT;
    MF_CHECK(runs >= opt_.world_size, L, ": token shard '", p, "' has ", sh.size(),
             " tokens = ", runs, " runs of B*T+1 tokens, but ", opt_.world_size,
             " ranks need one run each (it needs at least world_size*B*T+1 = ",
             opt_.world_size * BT + 1, " tokens)");
    total_tokens_ += sh.size();
    bytes += sh.info().file_bytes;
    shards_.push_back(std::move(sh));
  }
  if (opt_.vocab_size > 0 && bytes <= kEagerVocabCheckBytes)
    for (auto& sh : shards_) sh.check_vocab(opt_.vocab_size, opt_.vocab_fixed_by);
  reset();
}

int64_t DataLoader::runs_in_shard(int s) const {
  return (shards_.at(size_t(s)).size() - 1) / (opt_.B * opt_.T);
}

int64_t DataLoader::groups_in_shard(int s) const { return runs_in_shard(s) / opt_.world_size; }

int64_t DataLoader::steps_per_epoch() const {
  int64_t n = 0;
  for (int s = 0; s < num_shards(); ++s) n += groups_in_shard(s);
  return n;
}

void DataLoader::enter_epoch() {
  order_.resize(shards_.size());
  std::iota(order_.begin(), order_.end(), 0);
  if (opt_.shuffle) {
    Rng rng(splitmix(splitmix(opt_.seed) ^ state_.epoch), kShardOrderStream);
    shuffle_in_place(order_, rng);
  }
}

void DataLoader::enter_shard() {
  runs_.clear();
  if (!opt_.shuffle) return;
  const int s = current_shard();
  runs_.resize(size_t(runs_in_shard(s)));
  std::iota(runs_.begin(), runs_.end(), int64_t(0));
  Rng rng(splitmix(splitmix(splitmix(opt_.seed) ^ state_.epoch) ^ uint64_t(s)), kRunOrderStream);
  shuffle_in_place(runs_, rng);
}

RunRef DataLoader::peek() const {
  RunRef r;
  r.shard = current_shard();
  const int64_t idx = int64_t(state_.group) * opt_.world_size + opt_.rank;
  r.run = opt_.shuffle ? runs_[size_t(idx)] : idx;
  r.offset = r.run * opt_.B * opt_.T;
  return r;
}

void DataLoader::next(int32_t* inputs, int32_t* targets) {
  const RunRef r = peek();
  TokenShard& sh = shards_[size_t(r.shard)];
  if (opt_.vocab_size > 0) sh.check_vocab(opt_.vocab_size, opt_.vocab_fixed_by);  // no-op once checked
  const int64_t BT = opt_.B * opt_.T;
  sh.copy(r.offset, BT, inputs);
  sh.copy(r.offset + 1, BT, targets);

  // Advance: next group, else next shard (all ranks together), else next epoch.
  ++state_.step;
  if (int64_t(++state_.group) >= groups_in_shard(r.shard)) {
    state_.group = 0;
    if (++state_.shard_pos >= shards_.size()) {
      state_.shard_pos = 0;
      ++state_.epoch;
      enter_epoch();
    }
    enter_shard();
  }
}

LoaderState DataLoader::state() const {
  LoaderState s = state_;
  s.B = opt_.B;
  s.T = opt_.T;
  s.world_size = opt_.world_size;
  s.shuffle = opt_.shuffle;
  s.seed = opt_.seed;
  s.n_shards = shards_.size();
  s.total_tokens = uint64_t(total_tokens_);
  return s;
}

int64_t DataLoader::restore(const LoaderState& s) {
  const std::string& L = opt_.label;
  const LoaderState cur = state();
  auto same = [&](const char* name, auto saved, auto now) {
    MF_CHECK(saved == now, L, ": cannot restore the data position: it was saved with ", name, " = ",
             saved, " but this loader has ", name, " = ", now,
             " (resume with the same data, micro_batch, seq_len, shuffle and seed)");
  };
  same("B", s.B, cur.B);
  same("T", s.T, cur.T);
  MF_CHECK(s.world_size >= 1, L, ": cannot restore the data position: saved world_size ",
           s.world_size, " is not positive");
  same("shuffle", s.shuffle, cur.shuffle);
  if (s.shuffle) same("seed", s.seed, cur.seed);
  same("number of shards", s.n_shards, cur.n_shards);
  same("total tokens", s.total_tokens, cur.total_tokens);
  MF_CHECK(s.shard_pos < shards_.size(), L, ": saved shard position ", s.shard_pos,
           " is outside the ", shards_.size(), " shards");
  state_ = LoaderState{};
  state_.epoch = s.epoch;
  state_.shard_pos = s.shard_pos;
  state_.step = s.step;
  enter_epoch();
  const int64_t W_old = s.world_size, W = opt_.world_size;
  MF_CHECK(int64_t(s.group) * W_old < runs_in_shard(current_shard()) || s.group == 0, L,
           ": saved group ", s.group, " (of ", W_old, " runs each) is outside the ",
           runs_in_shard(current_shard()), " runs of shard '", paths_[size_t(current_shard())], "'");
  // The runs of this shard's order already used, continued by the new ranks.
  const int64_t used = int64_t(s.group) * W_old;
  const int64_t reread = used % W;
  int64_t group = used / W;
  if (W == W_old)
    MF_CHECK(group < groups_in_shard(current_shard()), L, ": saved group ", s.group,
             " is outside the ", groups_in_shard(current_shard()), " micro-steps of shard '",
             paths_[size_t(current_shard())], "'");
  if (group >= groups_in_shard(current_shard())) {  // the rest of this shard is too short for W
    group = 0;
    if (++state_.shard_pos >= shards_.size()) {
      state_.shard_pos = 0;
      ++state_.epoch;
      enter_epoch();
    }
  }
  state_.group = uint64_t(group);
  enter_shard();
  return reread;
}

void DataLoader::reset() {
  state_ = LoaderState{};
  enter_epoch();
  enter_shard();
}

}  // namespace mf
