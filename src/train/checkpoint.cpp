#include "train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "dist/communicator.h"
#include "optim/optimizer.h"

namespace fs = std::filesystem;

namespace mf {

std::string checkpoint_dir_name(int step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "ckpt-%06d", step);
  return buf;
}

namespace {

// Steps of the complete checkpoints in run_dir, ascending.
std::vector<int> list_checkpoints(const std::string& run_dir) {
  std::vector<int> steps;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return steps;
  for (auto& e : fs::directory_iterator(run_dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() == 11 && n.rfind("ckpt-", 0) == 0 && e.is_directory() &&
        fs::exists(e.path() / "state.json"))
      steps.push_back(std::stoi(n.substr(5)));
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

void write_json(const std::string& path, const nlohmann::json& j) {
  atomic_write_text(path, j.dump(1) + "\n");
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  MF_CHECK(f, "cannot open ", path);
  try {
    return nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    MF_FAIL(path, ": not valid JSON (", e.what(), ")");
  }
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

void load_weights(const std::string& path, const ParamList& params, Backend& be) {
  SafetensorsReader r(path);
  for (Param* p : params) {
    MF_CHECK(r.contains(p->name), path, ": tensor ", p->name, " is missing");
    const auto& e = r.entry(p->name);
    MF_CHECK(e.shape == p->shape, path, ": tensor ", p->name, " has shape ", shape_str(e.shape),
             ", the model expects ", shape_str(p->shape));
    Tensor h = r.read_f32(p->name);
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

    // Re-saving the same step (e.g. the final step after a resume) replaces the old directory.
    std::error_code ec;
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(tmp_dir, final_dir, ec);
    MF_CHECK(!ec, "cannot rename ", tmp_dir.string(), " to ", final_dir.string(), ": ",
             ec.message());
    fsync_dir(run_dir);
    atomic_write_text((fs::path(run_dir) / "latest").string(), name + "\n");

    // Keep the newest `keep` checkpoints.
    auto steps = list_checkpoints(run_dir);
    for (size_t i = 0; i + size_t(std::max(keep, 1)) < steps.size(); ++i)
      fs::remove_all(fs::path(run_dir) / checkpoint_dir_name(steps[i]), ec);
  }
  comm.barrier();
  return final_dir.string();
}

std::string find_latest_checkpoint(const std::string& run_dir) {
  std::ifstream f(fs::path(run_dir) / "latest");
  std::string name;
  if (f && std::getline(f, name)) {
    fs::path p = fs::path(run_dir) / name;
    if (fs::exists(p / "state.json") && fs::exists(p / "model.safetensors")) return p.string();
  }
  auto steps = list_checkpoints(run_dir);
  if (steps.empty()) return "";
  return (fs::path(run_dir) / checkpoint_dir_name(steps.back())).string();
}

nlohmann::json load_checkpoint(const std::string& ckpt_dir, const ParamList& params, Backend& be,
                               Optimizer* opt, int rank, int world_size, bool sharded) {
  MF_CHECK(fs::is_directory(ckpt_dir), "checkpoint ", ckpt_dir, " is not a directory");
  const std::string state_path = (fs::path(ckpt_dir) / "state.json").string();
  MF_CHECK(fs::exists(state_path), "checkpoint ", ckpt_dir, " has no state.json (incomplete?)");
  nlohmann::json st = read_json(state_path);
  MF_CHECK(st.contains("step") && st["step"].is_number_integer(), state_path,
           ": missing integer \"step\"");
  load_weights((fs::path(ckpt_dir) / "model.safetensors").string(), params, be);
  if (opt) {
    const int shards = st.value("optimizer_shards", 0);
    if (shards > 0 || sharded)
      MF_CHECK(shards == world_size && sharded, state_path, ": the optimizer state was ",
               shards > 0 ? "sharded over " + std::to_string(shards) + " ranks"
                          : std::string("written unsharded"),
               " but this run ", sharded ? "shards it over " + std::to_string(world_size) + " ranks"
                                         : std::string("does not shard it"),
               "; resume with the same world size (and train.zero / optim.name) as the run "
               "that wrote it");
    const std::string opath = (fs::path(ckpt_dir) / optimizer_file(shards > 0, rank)).string();
    SafetensorsReader r(opath);
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (auto& n : r.names()) tensors.emplace_back(n, r.read_f32(n));
    MF_CHECK(st.contains("optimizer"), state_path, ": missing \"optimizer\" state");
    opt->load_state(tensors, st["optimizer"], opath);
  }
  return st;
}

}  // namespace mf
