#include "train/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <unistd.h>

#include "core/fault.h"
#include "core/log.h"
#include "io/atomic_file.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "dist/communicator.h"
#include "optim/matrix_opt.h"
#include "optim/optimizer.h"

namespace fs = std::filesystem;

namespace mf {

std::string checkpoint_dir_name(int step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "ckpt-%06d", step);
  return buf;
}

int checkpoint_step_of(const std::string& name) {
  // Only a name checkpoint_dir_name gives: "ckpt-" and 6 to 9 digits, no extra leading zero
  // (steps past 999999 take more digits). A copy such as ckpt-backup or ckpt-00001x is the
  // user's, not a step of this run.
  if (name.size() < 11 || name.size() > 14 || name.rfind("ckpt-", 0) != 0) return -1;
  if (!std::all_of(name.begin() + 5, name.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
    return -1;
  const int step = std::stoi(name.substr(5));
  return checkpoint_dir_name(step) == name ? step : -1;
}

std::vector<int> list_checkpoints(const std::string& run_dir) {
  std::vector<int> steps;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return steps;
  for (auto& e : fs::directory_iterator(run_dir, ec)) {
    const int step = checkpoint_step_of(e.path().filename().string());
    if (step >= 0 && e.is_directory() && fs::exists(e.path() / "state.json"))
      steps.push_back(step);
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

namespace {

// The way out of an optimizer mismatch on resume, ending each such error.
constexpr const char* kFreshRun =
    "or start a fresh run: --no-resume, or another run.name; or one from its weights: muonforge "
    "export, then train.init_from";

// Deletes the checkpoint directory `dir` (of the save of step `step`). It is first renamed to a
// .tmp-ckpt-* name, which the next start clears away as it does half-written ones: removed in
// place, a crash part-way left a ckpt-NNNNNN directory holding some of its files, and once its
// state.json was gone no later pruning saw it (list_checkpoints skips it), so it stayed.
void remove_checkpoint_dir(const fs::path& dir, int step) {
  const fs::path trash = dir.parent_path() / (".tmp-" + dir.filename().string() + ".old");
  std::error_code ec;
  fs::remove_all(trash, ec);
  fs::rename(dir, trash, ec);
  const fs::path gone = ec ? dir : trash;  // could not rename: delete in place as before
  fs::remove(gone / "state.json", ec);
  fault_point(FaultPoint::Prune, step, 0);
  fs::remove_all(gone, ec);
}

void write_json(const std::string& path, const nlohmann::json& j) {
  atomic_write_text(path, j.dump(1) + "\n");
}

}  // namespace

void save_weights(const std::string& path, const ParamList& params, Backend& be, DType store_as) {
  SafetensorsWriter w;
  std::vector<Tensor> keep;  // host copies must outlive write()
  for (Param* p : params) {
    Tensor h = host_tensor(p->shape);
    be.download(p->master, h);
    keep.push_back(h);
    w.add(p->name, h, store_as);
  }
  w.write(path);
}

void check_finite_weights(const Tensor& h, const std::string& name, const std::string& path) {
  const float* x = h.f32();
  const int64_t n = h.numel();
  int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) bad += !std::isfinite(x[i]);
  if (bad == 0) return;
  int64_t first = 0;
  while (std::isfinite(x[first])) ++first;
  MF_FAIL(path, ": tensor ", name, " holds ", bad, " non-finite value(s) of ", n, " (the first, ",
          x[first], ", at element ", first, "): the file is damaged or was saved from a run that "
          "had diverged; load an earlier checkpoint");
}

void load_weights(const std::string& path, const ParamList& params, Backend& be) {
  SafetensorsReader r(path);
  // A tensor the model does not have would be dropped without a word: a resume that turned
  // model.moe.balance from "bias" to "none" lost the learned router biases that way.
  std::set<std::string> wanted;
  for (const Param* p : params) wanted.insert(p->name);
  std::vector<std::string> extra;
  for (const std::string& n : r.names())
    if (!wanted.count(n)) extra.push_back(n);
  if (!extra.empty()) {
    std::string list;
    for (size_t i = 0; i < extra.size() && i < 3; ++i) list += (i ? ", " : "") + extra[i];
    if (extra.size() > 3) list += ", ... (" + std::to_string(extra.size()) + " in all)";
    MF_FAIL(path, ": holds tensor(s) this model does not have: ", list,
            "; the checkpoint was written by a model of other settings");
  }
  for (Param* p : params) {
    MF_CHECK(r.contains(p->name), path, ": tensor ", p->name, " is missing");
    const auto& e = r.entry(p->name);
    MF_CHECK(e.shape == p->shape, path, ": tensor ", p->name, " has shape ", shape_str(e.shape),
             ", the model expects ", shape_str(p->shape));
    Tensor h = r.read_f32(p->name);
    check_finite_weights(h, p->name, path);
    be.upload(h, p->master);
  }
}

static std::string optimizer_file(bool sharded, int rank) {
  return sharded ? "optimizer-rank" + std::to_string(rank) + ".safetensors"
                 : "optimizer.safetensors";
}

std::string save_checkpoint(const std::string& run_dir, int step, const ParamList& params,
                            const Optimizer& opt, Backend& be, const nlohmann::json& state,
                            const Config& cfg, int keep) {
  auto single = make_single_communicator(be.device());
  return save_checkpoint(run_dir, step, params, opt, be, state, cfg, keep, *single, false);
}

std::string save_checkpoint(const std::string& run_dir, int step, const ParamList& params,
                            const Optimizer& opt, Backend& be, const nlohmann::json& state,
                            const Config& cfg, int keep, Communicator& comm, bool sharded) {
  const int rank = comm.rank(), world = comm.size();
  const std::string name = checkpoint_dir_name(step);
  const fs::path final_dir = fs::path(run_dir) / name;
  // The same temporary name on every rank (ranks may be separate processes on a shared file
  // system); a stale one from a crash is removed first.
  const fs::path tmp_dir = fs::path(run_dir) / (".tmp-" + name);
  if (rank == 0) {
    fs::create_directories(run_dir);
    fs::remove_all(tmp_dir);
    fs::create_directories(tmp_dir);
  }
  comm.barrier();
  if (sharded || rank == 0) {
    SafetensorsWriter w;
    std::vector<Tensor> keep_alive;
    for (auto& [n, t] : opt.state_tensors()) {
      Tensor h = host_tensor(t.shape);
      be.download(t, h);
      keep_alive.push_back(h);
      w.add(n, h, DType::F32);
    }
    w.write((tmp_dir / optimizer_file(sharded, rank)).string());
  }
  comm.barrier();
  if (rank == 0) {
    save_weights((tmp_dir / "model.safetensors").string(), params, be);
    nlohmann::json st = state;
    st["step"] = step;
    st["optimizer"] = opt.state_json();
    st["optimizer_shards"] = sharded ? world : 0;
    write_json((tmp_dir / "state.json").string(), st);
    atomic_write_text((tmp_dir / "config.json").string(), config_to_string(cfg) + "\n");
    fsync_dir(tmp_dir.string());
    // metrics.jsonl's records up to this step reach the disk before the checkpoint exists, so
    // after a power loss the newest checkpoint never has a metrics file that stops short of it.
    fsync_file((fs::path(run_dir) / "metrics.jsonl").string());

    // Re-saving the same step (e.g. the final step after a resume) replaces the old directory.
    std::error_code ec;
    if (fs::exists(final_dir)) remove_checkpoint_dir(final_dir, step);
    fs::rename(tmp_dir, final_dir, ec);
    MF_CHECK(!ec, "cannot rename ", tmp_dir.string(), " to ", final_dir.string(), ": ",
             ec.message());
    fsync_dir(run_dir);
    atomic_write_text((fs::path(run_dir) / "latest").string(), name + "\n");

    // Keep the newest `keep` checkpoints.
    auto steps = list_checkpoints(run_dir);
    for (size_t i = 0; i + size_t(std::max(keep, 1)) < steps.size(); ++i)
      remove_checkpoint_dir(fs::path(run_dir) / checkpoint_dir_name(steps[i]), step);
  }
  comm.barrier();
  return final_dir.string();
}

std::string find_latest_checkpoint(const std::string& run_dir) {
  // The highest step wins, whatever `latest` says: a checkpoint directory is renamed into place
  // whole, and a crash between that rename and the rewrite of `latest` leaves `latest` naming the
  // one before. Resuming that one would set the newer, complete checkpoint aside (superseded-N)
  // and train its steps again.
  auto steps = list_checkpoints(run_dir);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    const fs::path p = fs::path(run_dir) / checkpoint_dir_name(*it);
    if (fs::exists(p / "model.safetensors")) return p.string();
  }
  return "";
}

std::vector<std::string> damaged_checkpoints_after(const std::string& run_dir, int step) {
  std::vector<std::pair<int, std::string>> found;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(run_dir, ec)) {
    const int st = checkpoint_step_of(e.path().filename().string());
    if (st <= step || !e.is_directory()) continue;
    if (!fs::exists(e.path() / "state.json"))
      found.emplace_back(st, e.path().string() + " (no state.json)");
    else if (!fs::exists(e.path() / "model.safetensors"))
      found.emplace_back(st, e.path().string() + " (no model.safetensors)");
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

std::string supersede_checkpoints(const std::string& run_dir, int keep_upto) {
  std::vector<int> later;
  for (int st : list_checkpoints(run_dir))
    if (st > keep_upto) later.push_back(st);
  if (later.empty()) return "";
  fs::path dest;
  for (int n = 1;; ++n) {
    dest = fs::path(run_dir) / ("superseded-" + std::to_string(n));
    if (!fs::exists(dest)) break;
  }
  fs::create_directories(dest);
  const fs::path metrics = fs::path(run_dir) / "metrics.jsonl";
  if (fs::exists(metrics)) {  // whole or not at all, should a kill come mid-copy
    fs::copy_file(metrics, dest / "metrics.jsonl.part");
    fs::rename(dest / "metrics.jsonl.part", dest / "metrics.jsonl");
  }
  for (int st : later) {
    const std::string name = checkpoint_dir_name(st);
    std::error_code ec;
    fs::rename(fs::path(run_dir) / name, dest / name, ec);
    MF_CHECK(!ec, "cannot move ", (fs::path(run_dir) / name).string(), " to ", dest.string(),
             ": ", ec.message());
  }
  const fs::path latest = fs::path(run_dir) / "latest";
  if (keep_upto >= 0 && fs::exists(fs::path(run_dir) / checkpoint_dir_name(keep_upto)))
    atomic_write_text(latest.string(), checkpoint_dir_name(keep_upto) + "\n");
  else
    fs::remove(latest);
  fsync_dir(dest.string());
  fsync_dir(run_dir);
  return dest.string();
}

std::string resolve_checkpoint_dir(const std::string& path_in, const std::string& who) {
  // A run directory's `latest` file (it names the newest checkpoint) stands for the run.
  std::string path = path_in;
  if (fs::path(path).filename() == "latest" && fs::is_regular_file(path)) {
    path = fs::path(path).parent_path().string();
    if (path.empty()) path = ".";
  }
  MF_CHECK(fs::is_directory(path), who, ": ", path, " is not a directory (give a checkpoint "
           "directory runs/NAME/ckpt-NNNNNN or a run directory runs/NAME)");
  fs::path p(path);
  // "runs/x/ckpt-000010/" -> "runs/x/ckpt-000010": callers take parent_path() as the run
  // directory (a trailing slash made it the checkpoint itself, and --resume of it moved the
  // checkpoint aside as "a later one" before loading it).
  while (!p.has_filename() && p.has_parent_path() && p != p.root_path()) p = p.parent_path();
  if (fs::exists(p / "config.json") && fs::exists(p / "model.safetensors")) {
    // A Hugging Face model directory has the same two files, with its own config.json: say so
    // before that config fails to parse as ours ("architectures: unknown key").
    const nlohmann::json c = peek_json_file((p / "config.json").string());
    if (c.is_discarded()) return p.string();  // our reader reports what is wrong with it
    if (c.is_object() && !c.contains("model") &&
        (c.contains("architectures") || c.contains("model_type"))) {
      MF_FAIL(who, ": ", p.string(), " is a Hugging Face model directory (its config.json has ",
              c.contains("model_type") ? "\"model_type\": " + c["model_type"].dump()
                                       : std::string("\"architectures\""),
              "), not a muonforge checkpoint: convert it with muonforge import ", p.string(),
              " OUTDIR, then give OUTDIR; or train from it with --set train.init_from=",
              p.string());
    }
    return p.string();
  }
  const std::string latest = find_latest_checkpoint(p.string());
  MF_CHECK(!latest.empty(), who, ": ", path, " holds no checkpoint (no config.json + "
           "model.safetensors, and no ckpt-NNNNNN directory)");
  return latest;
}

namespace {

// An optimizer state tensor's name, "<param>.<state>" or, for a ZeRO-1 fragment of elements
// [a, b) of the flattened parameter, "<param>[a:b].<state>".
struct StateName {
  std::string param, state;
  int64_t a = -1, b = -1;  // -1: the whole tensor
  std::string key() const { return param + "." + state; }
};

bool parse_state_name(const std::string& n, const std::map<std::string, int64_t>& numel_of,
                      StateName* out) {
  const size_t lb = n.find('[');
  if (lb != std::string::npos) {
    const size_t colon = n.find(':', lb), rb = n.find("].", lb);
    if (colon == std::string::npos || rb == std::string::npos || colon > rb) return false;
    try {
      out->a = std::stoll(n.substr(lb + 1, colon - lb - 1));
      out->b = std::stoll(n.substr(colon + 1, rb - colon - 1));
    } catch (const std::exception&) {
      return false;
    }
    out->param = n.substr(0, lb);
    out->state = n.substr(rb + 2);
    auto it = numel_of.find(out->param);
    return it != numel_of.end() && 0 <= out->a && out->a < out->b && out->b <= it->second &&
           !out->state.empty();
  }
  // The longest parameter name followed by '.': parameter names contain dots themselves.
  for (size_t dot = n.rfind('.'); dot != std::string::npos && dot > 0; dot = n.rfind('.', dot - 1)) {
    if (numel_of.count(n.substr(0, dot))) {
      out->param = n.substr(0, dot);
      out->state = n.substr(dot + 1);
      out->a = out->b = -1;
      return true;
    }
    if (dot == 0) break;
  }
  return false;
}

// The optimizer state this run expects, assembled from every optimizer file of a checkpoint
// written with another sharding (world size, train.zero, bucket sizes): whole tensors are taken
// as they are; elementwise state (AdamW's m and v) is rebuilt from the fragments that cover it and
// cut to this run's fragments. Only what this rank needs is read and kept.
std::vector<std::pair<std::string, Tensor>> reshard_optimizer_state(
    const std::vector<std::string>& files, const ParamList& params,
    const std::vector<std::pair<std::string, Tensor>>& expected) {
  std::map<std::string, int64_t> numel_of;
  for (const Param* p : params) numel_of[p->name] = p->numel();
  // What is needed: for each "<param>.<state>", the element range [lo, hi) this rank's
  // fragments span, or the whole tensor.
  struct Need {
    int64_t lo = -1, hi = -1;
    std::vector<float> data;      // elements [lo, hi)
    std::vector<char> covered;    // per element
    Tensor whole;                 // a whole tensor by that name, as stored
  };
  std::map<std::string, Need> need;
  for (const auto& [name, t] : expected) {
    StateName sn;
    MF_CHECK(parse_state_name(name, numel_of, &sn), "internal: optimizer state name '", name,
             "' names no parameter of the model");
    Need& nd = need[sn.key()];
    const int64_t a = sn.a < 0 ? 0 : sn.a, b = sn.b < 0 ? t.numel() : sn.b;
    nd.lo = nd.lo < 0 ? a : std::min(nd.lo, a);
    nd.hi = std::max(nd.hi, b);
  }
  for (auto& [key, nd] : need) {
    nd.data.assign(size_t(nd.hi - nd.lo), 0.0f);
    nd.covered.assign(size_t(nd.hi - nd.lo), 0);
  }
  for (const std::string& f : files) {
    SafetensorsReader r(f);
    for (const std::string& name : r.names()) {
      StateName sn;
      MF_CHECK(parse_state_name(name, numel_of, &sn), f, ": optimizer state tensor '", name,
               "' names no parameter of this model (a checkpoint of another model?)");
      auto it = need.find(sn.key());
      if (it == need.end()) continue;
      Need& nd = it->second;
      const int64_t a = sn.a < 0 ? 0 : sn.a, b = sn.b < 0 ? r.entry(name).numel() : sn.b;
      if (b <= nd.lo || a >= nd.hi) continue;  // no overlap with what this rank needs
      Tensor t = r.read_f32(name);
      MF_CHECK(t.numel() == b - a, f, ": optimizer state tensor '", name, "' has ", t.numel(),
               " elements, its name says ", b - a);
      if (sn.a < 0) nd.whole = t;
      const int64_t from = std::max(a, nd.lo), to = std::min(b, nd.hi);
      std::copy(t.f32() + (from - a), t.f32() + (to - a), nd.data.begin() + (from - nd.lo));
      std::fill(nd.covered.begin() + (from - nd.lo), nd.covered.begin() + (to - nd.lo), 1);
    }
  }
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [name, t] : expected) {
    StateName sn;
    parse_state_name(name, numel_of, &sn);
    const Need& nd = need.at(sn.key());
    if (sn.a < 0 && nd.whole.defined() && nd.whole.shape == t.shape) {  // stored whole, as needed
      out.emplace_back(name, nd.whole);
      continue;
    }
    const int64_t a = sn.a < 0 ? 0 : sn.a, b = sn.b < 0 ? t.numel() : sn.b;
    const bool complete = std::all_of(nd.covered.begin() + (a - nd.lo),
                                      nd.covered.begin() + (b - nd.lo), [](char c) { return c; });
    MF_CHECK(complete, "optimizer state: the checkpoint's optimizer files (", files.size(),
             " of them, e.g. ", files.front(), ") do not hold all of '", name,
             "' (elements ", a, " to ", b, " of ", sn.key(), "): was it written with another "
             "optim.name?");
    Tensor h = host_tensor(t.shape);
    std::copy(nd.data.begin() + (a - nd.lo), nd.data.begin() + (b - nd.lo), h.f32());
    out.emplace_back(name, h);
  }
  return out;
}

}  // namespace

namespace {
// Whether two values of a layout key `key` (Optimizer::state_json) cut every matrix the main
// group preconditions into the same blocks: a block size is clamped to each matrix's sides
// (make_blocks), so on small models 256 and 512 may both mean "whole matrices".
bool same_blocks(const std::string& key, const nlohmann::json& a, const nlohmann::json& b,
                 const ParamList& params, const OptimConfig& o) {
  const std::string suffix = ".block_size";
  if (key.size() < suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix))
    return false;
  if (!a.is_number_integer() || !b.is_number_integer()) return false;
  const int ba = a.get<int>(), bb = b.get<int>();
  // Ungrafted Shampoo's and ASGO's µP lr multiplier counts the blocks of the base-width shapes
  // too (matrix_mup_lr_mult), which the same cut of this model's matrices does not make equal,
  // and the width multiplier is not known here: not judged, refused.
  if (o.name == "asgo" || (o.name == "shampoo" && o.shampoo.graft != "adam")) return false;
  for (const Param* p : params) {
    if (!in_main_group(p->kind, o) || p->shape.size() < 2) continue;
    int64_t l, r;  // make_blocks' own cut under each size (it clamps them to the sides)
    const std::vector<MatBlock> x = make_blocks(p->shape, ba, l, r), y = make_blocks(p->shape, bb, l, r);
    if (!std::equal(x.begin(), x.end(), y.begin(), y.end(), [](const MatBlock& u, const MatBlock& v) {
          return u.r0 == v.r0 && u.c0 == v.c0 && u.rows == v.rows && u.cols == v.cols;
        }))
      return false;
  }
  return true;
}
}  // namespace

nlohmann::json load_checkpoint(const std::string& ckpt_dir, const ParamList& params, Backend& be,
                               Optimizer* opt, int rank, int world_size, bool sharded) {
  MF_CHECK(fs::is_directory(ckpt_dir), "checkpoint ", ckpt_dir, " is not a directory");
  const std::string state_path = (fs::path(ckpt_dir) / "state.json").string();
  MF_CHECK(fs::exists(state_path), "checkpoint ", ckpt_dir, " has no state.json (incomplete?)");
  nlohmann::json st = read_json_file(state_path, "checkpoint state");
  MF_CHECK(st.contains("step") && st["step"].is_number_integer(), state_path,
           ": missing integer \"step\"");
  load_weights((fs::path(ckpt_dir) / "model.safetensors").string(), params, be);
  if (opt) {
    MF_CHECK(st.contains("optimizer"), state_path, ": missing \"optimizer\" state");
    // Before the tensors: another optimizer's state has other tensors, and the error about a
    // missing one would only guess at the cause.
    const nlohmann::json& saved = st["optimizer"];
    if (saved.is_object() && saved.contains("optimizer") && saved["optimizer"].is_string()) {
      const nlohmann::json mine = opt->state_json();
      const std::string was = saved["optimizer"].get<std::string>(),
                        now = mine.value("optimizer", std::string());
      MF_CHECK(was == now, "checkpoint ", ckpt_dir, ": its optimizer state was saved with optim.name=",
               was, " but this run uses optim.name=", now, " (resume with optim.name=", was,
               ", ", kFreshRun, ")");
      // Which group stepped the MoE routers (checkpoints before optim.router existed: adamw).
      const std::string rwas = saved.value("router", std::string("adamw")),
                        rnow = mine.value("router", std::string("adamw"));
      const bool routers = std::any_of(params.begin(), params.end(),
                                       [](const Param* p) { return p->kind == ParamKind::Router; });
      MF_CHECK(rwas == rnow || !routers || now == "adamw", "checkpoint ", ckpt_dir,
               ": its routers were stepped with optim.router=", rwas, " but this run uses "
               "optim.router=", rnow, " (resume with optim.router=", rwas, ", ", kFreshRun, ")");
      // Block sizes and the like (Optimizer::state_json): checkpoints from before they were
      // recorded have no "layout" and are not checked.
      if (saved.contains("layout") && saved["layout"].is_object()) {
        const nlohmann::json ours = mine.value("layout", nlohmann::json::object());
        for (const auto& [key, val] : saved["layout"].items()) {
          const nlohmann::json cur = ours.value(key, nlohmann::json());
          if (cur != val && same_blocks(key, val, cur, params, opt->config())) {
            spdlog::info("checkpoint {}: {} {} -> {} cuts every matrix into the same blocks; "
                         "the optimizer state carries over", ckpt_dir, key, val.dump(), cur.dump());
            continue;
          }
          MF_CHECK(cur == val, "checkpoint ", ckpt_dir, ": its optimizer state was saved with ",
                   key, "=", val.dump(), " but this run uses ", key, "=", cur.dump(),
                   "; the statistics are laid out by it (resume with ", key, "=", val.dump(),
                   ", ", kFreshRun, ")");
        }
      }
    }
    const int shards = st.value("optimizer_shards", 0);
    MF_CHECK(shards >= 0, state_path, ": optimizer_shards is ", shards);
    std::vector<std::string> files;
    for (int r = 0; r < std::max(shards, 1); ++r)
      files.push_back((fs::path(ckpt_dir) / optimizer_file(shards > 0, r)).string());
    for (const std::string& f : files)
      MF_CHECK(fs::exists(f), ckpt_dir, ": optimizer state file ", fs::path(f).filename().string(),
               " is missing (the checkpoint says the state is in ", files.size(), " file(s))");
    const auto expected = opt->state_tensors();
    // Same layout: this rank's own file holds exactly the tensors it expects.
    bool direct = false;
    std::string own;
    if ((shards == 0 && !sharded) || (shards == world_size && sharded)) {
      own = files[shards > 0 ? size_t(rank) : 0];
      std::set<std::string> want, have;
      for (const auto& kv : expected) want.insert(kv.first);
      for (const auto& n : SafetensorsReader(own).names()) have.insert(n);
      direct = want == have;
    }
    std::vector<std::pair<std::string, Tensor>> tensors;
    if (direct) {
      SafetensorsReader r(own);
      for (auto& n : r.names()) tensors.emplace_back(n, r.read_f32(n));
    } else {
      tensors = reshard_optimizer_state(files, params, expected);
      if (rank == 0)
        spdlog::info("optimizer state of {} written {}; re-sharded for this run ({} rank(s){})",
                     ckpt_dir, shards > 0 ? "by " + std::to_string(shards) + " ranks" : "unsharded",
                     world_size, sharded ? ", sharded" : "");
    }
    opt->load_state(tensors, st["optimizer"], direct ? own : ckpt_dir + " (optimizer files)");
  }
  return st;
}

}  // namespace mf
