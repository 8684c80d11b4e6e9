// JSON -> typed Config (DESIGN §5).
//
// One schema table binds every key path ("model.moe.top_k") to a member of Config. Loading applies
// JSON objects onto a default-constructed Config in order: the deepest "base" file first, then each
// including file, then the --set overrides. Applying key by key onto the struct is exactly a deep
// merge of objects (arrays and scalars are replaced whole). Types are checked while applying, so a
// wrong type or unknown key is reported against the file that contains it; ranges, enums and
// cross-field rules are checked afterwards on the merged result by validate_config.
#include "config/config.h"

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"

namespace mf {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// ---- schema --------------------------------------------------------------------------------

enum class Kind { Int, Int64, UInt64, Double, Bool, String, OptString, Pair };

struct Field {
  const char* path;
  Kind kind;
  void* ptr;
  bool in_json = true;  // false: settable only by --set (train.world_size)
};

Field F(const char* p, int& x) { return {p, Kind::Int, &x}; }
Field F(const char* p, long long& x) { return {p, Kind::Int64, &x}; }
Field F(const char* p, unsigned long long& x) { return {p, Kind::UInt64, &x}; }
Field F(const char* p, double& x) { return {p, Kind::Double, &x}; }
Field F(const char* p, bool& x) { return {p, Kind::Bool, &x}; }
Field F(const char* p, std::string& x) { return {p, Kind::String, &x}; }
Field F(const char* p, std::optional<std::string>& x) { return {p, Kind::OptString, &x}; }
Field F(const char* p, std::array<double, 2>& x) { return {p, Kind::Pair, &x}; }

// Every key of the config, in the order it is printed, bound to the members of `c`.
std::vector<Field> schema(Config& c) {
  auto& m = c.model;
  auto& e = c.model.moe;
  auto& o = c.optim;
  auto& a = c.optim.adamw;
  auto& s = c.schedule;
  auto& t = c.train;
  Field world = F("train.world_size", t.world_size);
  world.in_json = false;
  return {
      F("model.arch", m.arch),
      F("model.vocab_size", m.vocab_size),
      F("model.d_model", m.d_model),
      F("model.n_layers", m.n_layers),
      F("model.n_heads", m.n_heads),
      F("model.n_kv_heads", m.n_kv_heads),
      F("model.d_ff", m.d_ff),
      F("model.max_seq_len", m.max_seq_len),
      F("model.rope_theta", m.rope_theta),
      F("model.norm_eps", m.norm_eps),
      F("model.tie_embeddings", m.tie_embeddings),
      F("model.init_std", m.init_std),
      F("model.attention", m.attention),
      F("model.recompute", m.recompute),
      F("model.stack_projections", m.stack_projections),
      F("model.moe.n_experts", e.n_experts),
      F("model.moe.top_k", e.top_k),
      F("model.moe.n_shared", e.n_shared),
      F("model.moe.d_expert", e.d_expert),
      F("model.moe.first_dense", e.first_dense),
      F("model.moe.score", e.score),
      F("model.moe.norm_topk", e.norm_topk),
      F("model.moe.route_scale", e.route_scale),
      F("model.moe.balance", e.balance),
      F("model.moe.aux_coef", e.aux_coef),
      F("model.moe.bias_rate", e.bias_rate),
      F("model.moe.capacity_factor", e.capacity_factor),
      F("mup.enabled", c.mup.enabled),
      F("mup.base_width", c.mup.base_width),
      F("mup.base_depth", c.mup.base_depth),
      F("mup.base_head_dim", c.mup.base_head_dim),
      F("optim.name", o.name),
      F("optim.lr", o.lr),
      F("optim.wd", o.wd),
      F("optim.wd_mode", o.wd_mode),
      F("optim.momentum", o.momentum),
      F("optim.nesterov", o.nesterov),
      F("optim.ns_steps", o.ns_steps),
      F("optim.scale", o.scale),
      F("optim.betas", o.betas),
      F("optim.eps", o.eps),
      F("optim.adamw.lr", a.lr),
      F("optim.adamw.betas", a.betas),
      F("optim.adamw.eps", a.eps),
      F("optim.adamw.wd", a.wd),
      F("optim.grad_clip", o.grad_clip),
      F("optim.qk_clip_tau", o.qk_clip_tau),
      F("optim.ns", o.ns),
      F("optim.cautious_wd", o.cautious_wd),
      F("optim.router", o.router),
      F("optim.normuon_beta2", o.normuon_beta2),
      F("optim.shampoo.block_size", o.shampoo.block_size),
      F("optim.shampoo.precond_every", o.shampoo.precond_every),
      F("optim.shampoo.exp_l", o.shampoo.exp_l),
      F("optim.shampoo.exp_r", o.shampoo.exp_r),
      F("optim.shampoo.eps", o.shampoo.eps),
      F("optim.shampoo.beta1", o.shampoo.beta1),
      F("optim.shampoo.beta2", o.shampoo.beta2),
      F("optim.shampoo.graft", o.shampoo.graft),
      F("optim.shampoo.graft_eps", o.shampoo.graft_eps),
      F("optim.soap.block_size", o.soap.block_size),
      F("optim.soap.precond_every", o.soap.precond_every),
      F("optim.soap.beta1", o.soap.beta1),
      F("optim.soap.beta2", o.soap.beta2),
      F("optim.soap.eps", o.soap.eps),
      F("optim.asgo.block_size", o.asgo.block_size),
      F("optim.asgo.precond_every", o.asgo.precond_every),
      F("optim.asgo.beta1", o.asgo.beta1),
      F("optim.asgo.beta2", o.asgo.beta2),
      F("optim.asgo.eps", o.asgo.eps),
      F("optim.freon.c", o.freon.c),
      F("optim.freon.eps", o.freon.eps),
      F("optim.kaon.steps", o.kaon.steps),
      F("schedule.warmup", s.warmup),
      F("schedule.decay", s.decay),
      F("schedule.min_lr_ratio", s.min_lr_ratio),
      F("schedule.wsd_decay_frac", s.wsd_decay_frac),
      F("train.seq_len", t.seq_len),
      F("train.micro_batch", t.micro_batch),
      F("train.batch_tokens", t.batch_tokens),
      F("train.max_steps", t.max_steps),
      F("train.seed", t.seed),
      F("train.eval_every", t.eval_every),
      F("train.eval_batches", t.eval_batches),
      F("train.ckpt_every", t.ckpt_every),
      F("train.keep_ckpts", t.keep_ckpts),
      F("train.log_every", t.log_every),
      F("train.diag_every", t.diag_every),
      F("train.init_from", t.init_from),
      F("train.device", t.device),
      F("train.precision", t.precision),
      F("train.deterministic", t.deterministic),
      F("train.zero", t.zero),
      F("train.bucket_mb", t.bucket_mb),
      F("train.loss_chunk_mb", t.loss_chunk_mb),
      F("train.overlap_comm", t.overlap_comm),
      world,
      F("data.train", c.data.train),
      F("data.val", c.data.val),
      F("data.shuffle", c.data.shuffle),
      F("run.dir", c.run.dir),
      F("run.name", c.run.name),
  };
}

// The schema of one Config, with lookups by path.
class Schema {
 public:
  explicit Schema(Config& c) : fields_(schema(c)) {
    for (auto& f : fields_) {
      std::string p = f.path;
      for (size_t dot = p.find('.'); dot != std::string::npos; dot = p.find('.', dot + 1))
        sections_.insert(p.substr(0, dot));
    }
  }
  const Field* field(const std::string& path) const {
    for (auto& f : fields_)
      if (path == f.path) return &f;
    return nullptr;
  }
  bool is_section(const std::string& path) const { return sections_.count(path) > 0; }
  const std::vector<Field>& fields() const { return fields_; }
  // Names directly below `prefix` ("" = top level) that may appear in a JSON file, in order.
  std::vector<std::string> children(const std::string& prefix) const {
    std::vector<std::string> out;
    std::string lead = prefix.empty() ? "" : prefix + ".";
    for (auto& f : fields_) {
      std::string p = f.path;
      if (!f.in_json || p.compare(0, lead.size(), lead) != 0) continue;
      std::string name = p.substr(lead.size(), p.find('.', lead.size()) - lead.size());
      if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
    }
    return out;
  }

 private:
  std::vector<Field> fields_;
  std::set<std::string> sections_;
};

// ---- messages ------------------------------------------------------------------------------

[[noreturn]] void fail(const std::string& where, const std::string& path, const std::string& what) {
  throw Error(where + ": " + path + ": " + what);
}

std::string type_word(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "integer";
    case json::value_t::number_float: return "number";
    case json::value_t::string: return "string";
    case json::value_t::array: return "array";
    case json::value_t::object: return "object";
    default: return "value";
  }
}

// "string \"768\"", "number 1.5", "null".
std::string describe(const json& v) {
  if (v.is_null()) return "null";
  std::string d = v.dump();
  if (d.size() > 60) d = d.substr(0, 57) + "...";
  return type_word(v) + " " + d;
}

// x as JSON writes it, whole numbers (an int field's value) without a ".0".
std::string num(double x) {
  if (std::isfinite(x) && x == std::trunc(x) && std::fabs(x) < 1e15) return json(int64_t(x)).dump();
  return json(x).dump();
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

// What other trainers (nanoGPT, Hugging Face, torchtitan, Megatron) call some of our keys.
const std::map<std::string, std::vector<std::string>>& key_aliases() {
  static const std::map<std::string, std::vector<std::string>> a = {
      {"learning_rate", {"optim.lr"}},
      {"weight_decay", {"optim.wd"}},
      {"max_grad_norm", {"optim.grad_clip"}},
      {"clip_grad", {"optim.grad_clip"}},
      {"batch_size", {"train.micro_batch", "train.batch_tokens"}},
      {"micro_batch_size", {"train.micro_batch"}},
      {"global_batch_size", {"train.batch_tokens"}},
      {"gradient_accumulation_steps", {"train.batch_tokens"}},
      {"grad_accum", {"train.batch_tokens"}},
      {"hidden_size", {"model.d_model"}},
      {"n_embd", {"model.d_model"}},
      {"dim", {"model.d_model"}},
      {"intermediate_size", {"model.d_ff"}},
      {"ffn_hidden_size", {"model.d_ff"}},
      {"hidden_dim", {"model.d_ff"}},
      {"num_hidden_layers", {"model.n_layers"}},
      {"n_layer", {"model.n_layers"}},
      {"num_layers", {"model.n_layers"}},
      {"num_attention_heads", {"model.n_heads"}},
      {"n_head", {"model.n_heads"}},
      {"num_key_value_heads", {"model.n_kv_heads"}},
      {"n_kv_head", {"model.n_kv_heads"}},
      {"rms_norm_eps", {"model.norm_eps"}},
      {"tie_word_embeddings", {"model.tie_embeddings"}},
      {"max_position_embeddings", {"model.max_seq_len"}},
      {"seq_length", {"train.seq_len"}},
      {"context_length", {"train.seq_len"}},
      {"max_iters", {"train.max_steps"}},
      {"train_iters", {"train.max_steps"}},
      {"total_steps", {"train.max_steps"}},
      {"warmup_steps", {"schedule.warmup"}},
      {"warmup_iters", {"schedule.warmup"}},
      {"lr_decay_style", {"schedule.decay"}},
      {"dtype", {"train.precision"}},
      {"eval_interval", {"train.eval_every"}},
      {"eval_iters", {"train.eval_batches"}},
      {"log_interval", {"train.log_every"}},
      {"save_interval", {"train.ckpt_every"}},
      {"out_dir", {"run.dir"}},
      {"num_experts", {"model.moe.n_experts"}},
      {"n_routed_experts", {"model.moe.n_experts"}},
      {"num_experts_per_tok", {"model.moe.top_k"}},
      {"n_shared_experts", {"model.moe.n_shared"}},
      {"moe_intermediate_size", {"model.moe.d_expert"}},
      {"first_k_dense_replace", {"model.moe.first_dense"}},
  };
  return a;
}

// The JSON keys whose last part is `name`, in any section.
std::vector<std::string> keys_ending_in(const Schema& s, const std::string& name) {
  std::vector<std::string> out;
  for (const Field& f : s.fields()) {
    const std::string path = f.path;
    const size_t dot = path.rfind('.');
    if (f.in_json && path.substr(dot == std::string::npos ? 0 : dot + 1) == name)
      out.push_back(path);
  }
  return out;
}

// The config keys a bare name may mean: every key whose last part is `name`, else the keys
// another trainer's name for it maps to (key_aliases). Only keys of the schema.
std::vector<std::string> keys_named(const Schema& s, const std::string& name) {
  std::vector<std::string> out = keys_ending_in(s, name);
  if (!out.empty()) return out;
  auto it = key_aliases().find(name);
  if (it != key_aliases().end())
    for (const std::string& k : it->second)
      if (const Field* f = s.field(k); f && f->in_json) out.push_back(k);
  return out;
}

// "unknown key (did you mean n_heads?)" or "unknown key (valid keys here: ...)".
std::string unknown_key(const Schema& s, const std::string& prefix, const std::string& name) {
  // Another trainer's name for one of ours ("weight_decay" for optim.wd).
  if (auto it = key_aliases().find(name); it != key_aliases().end()) {
    const std::vector<std::string> ours = keys_named(s, name);
    if (!ours.empty())
      return "unknown key (muonforge calls it " + join(ours, " or ") + ")";
  }
  auto names = s.children(prefix);
  std::string best;
  size_t best_d = SIZE_MAX;
  for (auto& n : names) {
    size_t d = edit_distance(name, n);
    if (d < best_d) best_d = d, best = n;
  }
  if (best_d > 1 + name.size() / 4) {  // not a typo: maybe an abbreviation or a longer spelling
    best.clear();
    for (auto& n : names)
      if (n.size() >= 2 && name.size() >= 2 && (n.rfind(name, 0) == 0 || name.rfind(n, 0) == 0)) best = n;
  }
  if (!best.empty()) return "unknown key (did you mean " + best + "?)";
  // The right name in another section ("model.n_experts" for model.moe.n_experts).
  const std::vector<std::string> elsewhere = keys_ending_in(s, name);
  if (!elsewhere.empty() && elsewhere.size() <= 4)
    return "unknown key (did you mean " + join(elsewhere, " or ") + "?)";
  return "unknown key (valid keys" + (prefix.empty() ? std::string() : " in " + prefix) + ": " +
         join(names, ", ") + ")";
}

// ---- applying JSON values onto the struct ----------------------------------------------------

bool as_integer(const json& v, long long& out) {
  if (v.is_number_unsigned()) {
    if (v.get<unsigned long long>() > (unsigned long long)LLONG_MAX) return false;
    out = (long long)v.get<unsigned long long>();
    return true;
  }
  if (v.is_number_integer()) {
    out = v.get<long long>();
    return true;
  }
  if (v.is_number_float()) {  // 5e5 or 768.0 are integers written as floats
    double d = v.get<double>();
    // Every whole double is an exact integer; [-2^63, 2^63) is what long long holds.
    if (!std::isfinite(d) || d != std::floor(d) || d < -9223372036854775808.0 ||
        d >= 9223372036854775808.0)
      return false;
    out = (long long)d;
    return true;
  }
  return false;
}

void assign(const Field& f, const json& v, const std::string& where) {
  auto bad = [&](const char* expected) {
    fail(where, f.path, std::string("expected ") + expected + ", got " + describe(v));
  };
  // A whole number too large for the field (2^63, 1e300) is out of range, not of the wrong type.
  auto bad_int = [&](const char* expected) {
    const double d = v.is_number_float() ? v.get<double>() : 0;
    const bool whole = v.is_number_unsigned() || (v.is_number_float() && std::isfinite(d) &&
                                                  d == std::floor(d) && !(d < 0 && f.kind == Kind::UInt64));
    if (whole) fail(where, f.path, "integer out of range: " + v.dump());
    bad(expected);
  };
  switch (f.kind) {
    case Kind::Int: {
      long long x;
      if (!as_integer(v, x)) bad_int("integer");
      if (x < INT_MIN || x > INT_MAX) fail(where, f.path, "integer out of range: " + v.dump());
      *static_cast<int*>(f.ptr) = (int)x;
      break;
    }
    case Kind::Int64: {
      long long x;
      if (!as_integer(v, x)) bad_int("integer");
      *static_cast<long long*>(f.ptr) = x;
      break;
    }
    case Kind::UInt64: {
      if (v.is_number_unsigned()) {
        *static_cast<unsigned long long*>(f.ptr) = v.get<unsigned long long>();
        break;
      }
      if (v.is_number_float() && v.get<double>() >= 9223372036854775808.0 &&
          v.get<double>() < 18446744073709551616.0 && v.get<double>() == std::floor(v.get<double>())) {
        *static_cast<unsigned long long*>(f.ptr) = (unsigned long long)v.get<double>();
        break;
      }
      long long x;
      if (!as_integer(v, x)) bad_int("non-negative integer");
      if (x < 0) bad("non-negative integer");
      *static_cast<unsigned long long*>(f.ptr) = (unsigned long long)x;
      break;
    }
    case Kind::Double:
      if (!v.is_number()) bad("number");
      *static_cast<double*>(f.ptr) = v.get<double>();
      break;
    case Kind::Bool:
      if (!v.is_boolean()) bad("boolean (true or false)");
      *static_cast<bool*>(f.ptr) = v.get<bool>();
      break;
    case Kind::String:
      if (!v.is_string()) bad("string");
      *static_cast<std::string*>(f.ptr) = v.get<std::string>();
      break;
    case Kind::OptString: {
      auto& o = *static_cast<std::optional<std::string>*>(f.ptr);
      if (v.is_null())
        o.reset();
      else if (v.is_string())
        o = v.get<std::string>();
      else
        bad("string or null");
      break;
    }
    case Kind::Pair: {
      if (!v.is_array() || v.size() != 2 || !v[0].is_number() || !v[1].is_number())
        bad("array of 2 numbers");
      auto& p = *static_cast<std::array<double, 2>*>(f.ptr);
      p = {v[0].get<double>(), v[1].get<double>()};
      break;
    }
  }
}

json field_to_json(const Field& f) {
  switch (f.kind) {
    case Kind::Int: return *static_cast<const int*>(f.ptr);
    case Kind::Int64: return *static_cast<const long long*>(f.ptr);
    case Kind::UInt64: return *static_cast<const unsigned long long*>(f.ptr);
    case Kind::Double: return *static_cast<const double*>(f.ptr);
    case Kind::Bool: return *static_cast<const bool*>(f.ptr);
    case Kind::String: return *static_cast<const std::string*>(f.ptr);
    case Kind::OptString: {
      auto& o = *static_cast<const std::optional<std::string>*>(f.ptr);
      return o ? json(*o) : json(nullptr);
    }
    case Kind::Pair: {
      auto& p = *static_cast<const std::array<double, 2>*>(f.ptr);
      return json::array({p[0], p[1]});
    }
  }
  return nullptr;
}

// Applies the members of object `obj` (found at `prefix`) onto the config; `where` names the
// file (and how it was included) for messages. The top-level "base" key is handled by the caller.
void apply_object(const json& obj, const std::string& prefix, const std::string& where,
                  const Schema& s, Config& c) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    const std::string& key = it.key();
    if (prefix.empty() && key == "base") continue;
    std::string path = prefix.empty() ? key : prefix + "." + key;
    if (const Field* f = s.field(path)) {
      if (!f->in_json)
        fail(where, path,
             "not a config key: the world size comes from the WORLD_SIZE environment variable "
             "(scripts/launch.py, torchrun; SLURM_NTASKS under srun)");
      assign(*f, it.value(), where);
      c.key_source[path] = where;
    } else if (s.is_section(path)) {
      if (!it.value().is_object()) fail(where, path, "expected object, got " + describe(it.value()));
      apply_object(it.value(), path, where, s, c);
    } else {
      fail(where, path, unknown_key(s, prefix, key));
    }
  }
}

// ---- files and "base" chains -----------------------------------------------------------------

json read_json_file(const fs::path& p, const std::string& who) {
  std::error_code ec;
  if (fs::is_directory(p, ec))
    throw Error(who + "config file '" + p.string() + "' is a directory; give a .json file in it");
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error(who + "cannot open config file '" + p.string() + "' (" + std::strerror(errno) + ")");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str(), nullptr, true, /*ignore_comments=*/true);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    std::string msg = e.what();
    auto close = msg.find("] ");  // drop nlohmann's "[json.exception.parse_error.101] " prefix
    if (close != std::string::npos) msg = msg.substr(close + 2);
    throw Error(p.string() + ": invalid JSON: " + msg);
  }
}

std::string display_path(const fs::path& dir, const std::string& rel) {
  fs::path p = fs::path(rel).is_absolute() ? fs::path(rel) : dir / rel;
  return p.lexically_normal().string();
}

fs::path identity(const fs::path& p) {
  std::error_code ec;
  fs::path c = fs::weakly_canonical(p, ec);
  return ec ? fs::absolute(p).lexically_normal() : c;
}

struct Chain {
  std::vector<fs::path> ids;       // canonical paths of the files being loaded
  std::vector<std::string> names;  // the same as shown to the user
};

// Applies file content `j` (named `file`, `where` for messages) after its base chain.
void apply_file(const json& j, const std::string& file, const std::string& where,
                const fs::path& dir, Chain& chain, const Schema& s, Config& c) {
  if (!j.is_object())
    throw Error(where + ": the top level must be a JSON object, got " + describe(j));
  auto b = j.find("base");
  if (b != j.end()) {
    if (!b->is_string() || b->get<std::string>().empty())
      fail(where, "base", "expected the path of another config file, got " + describe(*b));
    std::string name = display_path(dir, b->get<std::string>());
    fs::path id = identity(name);
    if (std::find(chain.ids.begin(), chain.ids.end(), id) != chain.ids.end()) {
      auto names = chain.names;
      names.push_back(name);
      fail(where, "base", "inheritance cycle: " + join(names, " -> "));
    }
    json bj = read_json_file(name, where + ": base: ");
    chain.ids.push_back(id);
    chain.names.push_back(name);
    apply_file(bj, name, name + " (base of " + file + ")", fs::path(name).parent_path(), chain, s, c);
    chain.ids.pop_back();
    chain.names.pop_back();
  }
  apply_object(j, "", where, s, c);
}

int world_size_from_env() {
  // As DistEnv reads it (src/dist/env.cpp): WORLD_SIZE (launch.py, torchrun), else, with
  // SLURM_PROCID set (srun starting the ranks itself), SLURM_NTASKS or SLURM_NPROCS.
  const char* w = std::getenv("WORLD_SIZE");
  const char* rank = std::getenv("RANK");
  const char* var = "WORLD_SIZE";
  if ((!w || !*w) && !(rank && *rank) && std::getenv("SLURM_PROCID")) {
    var = std::getenv("SLURM_NTASKS") ? "SLURM_NTASKS" : "SLURM_NPROCS";
    w = std::getenv(var);
  }
  if (!w || !*w) return 1;
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(w, &end, 10);
  if (*end || errno || v < 1 || v > INT_MAX)
    throw Error(std::string(var) + " environment variable: expected a positive integer, got '" + w +
                "'");
  return (int)v;
}

// "a.b=value": the value is parsed as JSON when it parses, else taken as a string. A string key
// keeps the raw text when the JSON parse gives another type (run.name=123 names the run "123").
void apply_override(const std::string& ov, const std::string& file, const Schema& s, Config& c) {
  std::string where = file + " (--set " + ov + ")";
  auto eq = ov.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error(where + ": expected key=value, e.g. --set optim.lr=3e-3");
  std::string key = ov.substr(0, eq), text = ov.substr(eq + 1);
  json v;
  bool parsed = true;
  try {
    v = json::parse(text);
  } catch (const json::out_of_range&) {  // a number past double's range (1e400)
    throw Error(where + ": " + text + " is out of range for a number");
  } catch (const json::parse_error&) {
    parsed = false;
    v = text;
  }
  if (key == "base") fail(where, key, "a base can only be set inside a config file");
  if (const Field* f = s.field(key)) {
    if (parsed && !v.is_string() && (f->kind == Kind::String || (f->kind == Kind::OptString && !v.is_null())))
      v = text;
    assign(*f, v, where);
    c.key_source[key] = where;
    return;
  }
  if (s.is_section(key)) {
    if (!v.is_object()) fail(where, key, "expected object, got " + describe(v));
    apply_object(v, key, where, s, c);
    return;
  }
  // Report the first segment of the path that does not exist.
  std::string prefix;
  size_t start = 0;
  while (true) {
    size_t dot = key.find('.', start);
    std::string seg = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    std::string path = prefix.empty() ? seg : prefix + "." + seg;
    if (!s.is_section(path) || dot == std::string::npos) {
      if (s.field(path)) fail(where, key, "unknown key (" + path + " is a value, not a section)");
      fail(where, path, unknown_key(s, prefix, seg));
    }
    prefix = path;
    start = dot + 1;
  }
}

// ---- validation helpers ----------------------------------------------------------------------

class Check {
 public:
  explicit Check(const Config& c) : c_(c) {}
  std::string where(const std::string& path) const {
    auto it = c_.key_source.find(path);
    if (it != c_.key_source.end()) return it->second;
    return c_.source.empty() ? "config" : c_.source;
  }
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    mf::fail(where(path), path, what);
  }
  // A rule between keys: reported at `path`, against the source the user most likely just edited
  // (an override, then the top file, then a base file).
  [[noreturn]] void fail_cross(const std::string& path, std::vector<std::string> others,
                               const std::string& what) const {
    auto rank = [&](const std::string& p) {
      auto it = c_.key_source.find(p);
      if (it == c_.key_source.end()) return 0;
      if (it->second.find("(--set ") != std::string::npos) return 3;
      return it->second.find(" (base of ") != std::string::npos ? 1 : 2;
    };
    std::string blame = path;
    for (auto& o : others)
      if (rank(o) > rank(blame)) blame = o;
    mf::fail(where(blame), path, what);
  }
  void positive(const std::string& path, double v) const {
    if (!(v > 0)) fail(path, "must be > 0, got " + num(v));
  }
  // > 0 and still > 0 where it is used: the kernels run in fp32, which rounds values below its
  // smallest normal number toward 0 (adamw.eps=1e-46 became 0: m / (sqrt(v) + 0) = 0/0 = NaN).
  void positive_fp32(const std::string& path, double v) const {
    positive(path, v);
    if (v < FLT_MIN)
      fail(path, "must be >= 1.2e-38 (the smallest normal fp32 number; the CPU and CUDA kernels "
                 "compute in fp32), got " + num(v));
  }
  void non_negative(const std::string& path, double v) const {
    if (!(v >= 0)) fail(path, "must be >= 0, got " + num(v));
  }
  // A scalar the kernels take as a float: past fp32's largest number it becomes inf (init_std
  // 1e300 drew inf weights, route_scale 1e308 made every MoE output inf).
  void fp32_finite(const std::string& path, double v) const {
    if (v > FLT_MAX)
      fail(path, "must be <= 3.4e38 (the largest fp32 number; the CPU and CUDA kernels compute "
                 "in fp32), got " + num(v));
  }
  void unit_closed(const std::string& path, double v) const {  // [0, 1]
    if (!(v >= 0 && v <= 1)) fail(path, "must be in [0, 1], got " + num(v));
  }
  void unit_open(const std::string& path, double v) const {  // [0, 1)
    if (!(v >= 0 && v < 1)) fail(path, "must be in [0, 1), got " + num(v));
  }
  void betas(const std::string& path, const std::array<double, 2>& b) const {
    for (double x : b)
      if (!(x >= 0 && x < 1))
        fail(path, "each beta must be in [0, 1), got [" + num(b[0]) + ", " + num(b[1]) + "]");
  }
  void one_of(const std::string& path, const std::string& v, std::vector<std::string> valid) const {
    if (std::find(valid.begin(), valid.end(), v) == valid.end())
      fail(path, "expected one of " + join(valid, "|") + ", got \"" + v + "\"");
  }

 private:
  const Config& c_;
};

// Every JSON key in schema order ("model.moe.top_k" -> /model/moe/top_k).
nlohmann::ordered_json to_ordered_json(const Config& c) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  Schema s(const_cast<Config&>(c));  // only read through
  for (auto& f : s.fields()) {
    if (!f.in_json) continue;
    std::string ptr = "/" + std::string(f.path);
    std::replace(ptr.begin(), ptr.end(), '.', '/');
    j[nlohmann::ordered_json::json_pointer(ptr)] = field_to_json(f);
  }
  return j;
}

}  // namespace

double ModelConfig::param_count() const {
  // The table of LlamaModel::build_params and MoeLayer (model/moe.h), shape by shape.
  const double d = d_model, hd = head_dim();
  const double qd = double(n_heads) * hd, kvd = double(n_kv_heads) * hd;
  const double attn = 2 * qd * d + 2 * kvd * d + 2 * d;  // q, o; k, v; two norms
  const double dense = attn + 3 * d * double(d_ff);
  const double E = moe.n_experts;
  const double experts = (E + double(moe.n_shared)) * 3 * d * double(moe.d_expert);
  const double sparse = attn + experts + d * E + (moe.balance == "bias" ? E : 0);
  const double n_moe = moe.n_experts > 0 ? double(n_layers) - moe.first_dense : 0;
  return (double(n_layers) - n_moe) * dense + n_moe * sparse +
         double(vocab_size) * d * (tie_embeddings ? 1 : 2) + d;
}

double ModelConfig::active_param_count() const {
  if (moe.n_experts <= 0) return param_count();
  const double n_moe = double(n_layers) - moe.first_dense;
  const double unused = double(moe.n_experts - std::min(moe.top_k, moe.n_experts));
  return param_count() - n_moe * unused * 3 * double(d_model) * double(moe.d_expert);
}

std::string ModelConfig::shape_keys() const {
  std::string s = "model.d_model " + std::to_string(d_model) + ", model.n_layers " +
                  std::to_string(n_layers) + ", model.d_ff " + std::to_string(d_ff) +
                  ", model.vocab_size " + std::to_string(vocab_size);
  if (moe.n_experts > 0)
    s += ", model.moe.n_experts " + std::to_string(moe.n_experts) + ", model.moe.n_shared " +
         std::to_string(moe.n_shared) + ", model.moe.d_expert " + std::to_string(moe.d_expert);
  return s;
}

const std::vector<std::string>& ModelConfig::shape_key_names() {
  static const std::vector<std::string> k = {
      "model.vocab_size", "model.d_model",       "model.n_layers",       "model.n_heads",
      "model.n_kv_heads", "model.d_ff",          "model.tie_embeddings", "model.moe.n_experts",
      "model.moe.n_shared", "model.moe.d_expert", "model.moe.first_dense", "model.moe.balance"};
  return k;
}

// ---- public API ------------------------------------------------------------------------------

int Config::grad_accum() const {
  long long per_step = (long long)train.micro_batch * train.seq_len * train.world_size;
  return per_step > 0 ? (int)(train.batch_tokens / per_step) : 0;
}

std::string Config::run_dir() const {
  std::string d = run.dir;
  const std::string tag = "{name}";
  for (size_t p = d.find(tag); p != std::string::npos; p = d.find(tag, p + run.name.size()))
    d.replace(p, tag.size(), run.name);
  return d;
}

void validate_config(const Config& c) {
  Check k(c);
  const auto& m = c.model;
  const auto& e = c.model.moe;
  const auto& o = c.optim;
  const auto& s = c.schedule;
  const auto& t = c.train;

  // Enums and ranges, one key at a time.
  k.one_of("model.arch", m.arch, {"llama"});
  k.positive("model.vocab_size", m.vocab_size);
  k.positive("model.d_model", m.d_model);
  k.positive("model.n_layers", m.n_layers);
  k.positive("model.n_heads", m.n_heads);
  k.positive("model.n_kv_heads", m.n_kv_heads);
  k.positive("model.d_ff", m.d_ff);
  k.positive("model.max_seq_len", m.max_seq_len);
  k.positive_fp32("model.rope_theta", m.rope_theta);
  k.positive_fp32("model.norm_eps", m.norm_eps);
  k.positive("model.init_std", m.init_std);
  k.fp32_finite("model.init_std", m.init_std);
  k.one_of("model.attention", m.attention, {"flash", "cudnn", "auto"});
  k.one_of("model.recompute", m.recompute, {"none", "mlp", "full"});
  k.non_negative("model.moe.n_experts", e.n_experts);
  k.positive("model.moe.top_k", e.top_k);
  k.non_negative("model.moe.n_shared", e.n_shared);
  k.positive("model.moe.d_expert", e.d_expert);
  k.non_negative("model.moe.first_dense", e.first_dense);
  k.one_of("model.moe.score", e.score, {"softmax", "sigmoid"});
  k.positive("model.moe.route_scale", e.route_scale);
  k.fp32_finite("model.moe.route_scale", e.route_scale);
  k.one_of("model.moe.balance", e.balance, {"aux_loss", "bias", "none"});
  k.non_negative("model.moe.aux_coef", e.aux_coef);
  k.fp32_finite("model.moe.aux_coef", e.aux_coef);
  k.non_negative("model.moe.bias_rate", e.bias_rate);
  k.fp32_finite("model.moe.bias_rate", e.bias_rate);
  k.non_negative("model.moe.capacity_factor", e.capacity_factor);
  k.fp32_finite("model.moe.capacity_factor", e.capacity_factor);

  k.positive("mup.base_width", c.mup.base_width);
  k.positive("mup.base_depth", c.mup.base_depth);
  k.non_negative("mup.base_head_dim", c.mup.base_head_dim);

  k.one_of("optim.name", o.name,
           {"muon", "adamw", "normuon", "shampoo", "soap", "asgo", "freon", "kaon"});
  k.positive("optim.lr", o.lr);
  k.non_negative("optim.wd", o.wd);
  k.one_of("optim.wd_mode", o.wd_mode, {"coupled", "independent"});
  k.one_of("optim.router", o.router, {"adamw", "matrix"});
  k.unit_open("optim.momentum", o.momentum);
  // The optimizer's own check (optimizer.cpp) allows [1, 100]: here too, so `muonforge config`
  // and sweep.py --dry-run refuse what train would.
  if (o.ns_steps < 1 || o.ns_steps > 100)
    k.fail("optim.ns_steps", "must be in [1, 100], got " + std::to_string(o.ns_steps));
  k.one_of("optim.scale", o.scale, {"shape", "rms", "spectral"});
  k.betas("optim.betas", o.betas);
  k.positive_fp32("optim.eps", o.eps);
  k.positive("optim.adamw.lr", o.adamw.lr);
  k.betas("optim.adamw.betas", o.adamw.betas);
  k.positive_fp32("optim.adamw.eps", o.adamw.eps);
  k.non_negative("optim.adamw.wd", o.adamw.wd);
  k.non_negative("optim.grad_clip", o.grad_clip);
  k.non_negative("optim.qk_clip_tau", o.qk_clip_tau);
  k.one_of("optim.ns", o.ns, {"quintic", "polar_express"});
  k.unit_open("optim.normuon_beta2", o.normuon_beta2);
  k.non_negative("optim.shampoo.block_size", o.shampoo.block_size);
  k.positive("optim.shampoo.precond_every", o.shampoo.precond_every);
  if (!(o.shampoo.exp_l > 0 && o.shampoo.exp_l <= 1))
    k.fail("optim.shampoo.exp_l", "must be in (0, 1] (0.25: Shampoo, 0.5: the 1/2 option), got " + num(o.shampoo.exp_l));
  if (!(o.shampoo.exp_r > 0 && o.shampoo.exp_r <= 1))
    k.fail("optim.shampoo.exp_r", "must be in (0, 1] (0.25: Shampoo, 0.5: the 1/2 option), got " + num(o.shampoo.exp_r));
  k.non_negative("optim.shampoo.eps", o.shampoo.eps);
  k.unit_open("optim.shampoo.beta1", o.shampoo.beta1);
  k.unit_open("optim.shampoo.beta2", o.shampoo.beta2);
  k.one_of("optim.shampoo.graft", o.shampoo.graft, {"adam", "none"});
  k.positive_fp32("optim.shampoo.graft_eps", o.shampoo.graft_eps);
  k.non_negative("optim.soap.block_size", o.soap.block_size);
  k.positive("optim.soap.precond_every", o.soap.precond_every);
  k.unit_open("optim.soap.beta1", o.soap.beta1);
  k.unit_open("optim.soap.beta2", o.soap.beta2);
  k.positive_fp32("optim.soap.eps", o.soap.eps);
  k.non_negative("optim.asgo.block_size", o.asgo.block_size);
  k.positive("optim.asgo.precond_every", o.asgo.precond_every);
  k.unit_open("optim.asgo.beta1", o.asgo.beta1);
  if (!(o.asgo.beta2 > 0 && o.asgo.beta2 <= 1))
    k.fail("optim.asgo.beta2", "must be in (0, 1] (1: accumulate V = V + G G^T), got " + num(o.asgo.beta2));
  k.positive_fp32("optim.asgo.eps", o.asgo.eps);
  // Freon's O = (U U^T)^-c U / ||U||_{S_q}^(1-2c) has singular values (sigma_i / ||U||_{S_q})^(1-2c):
  // at most 1 for c <= 1/2, but for c > 1/2 at least 1 and unbounded above (docs/optimizers.md,
  // "Freon's range of c"). c = 0.94 already gives a NaN loss on configs/tiny.json.
  if (!(o.freon.c >= 0 && o.freon.c <= 0.9))
    k.fail("optim.freon.c",
           "must be in [0, 0.9] (0: SGD, 0.5: Muon), got " + num(o.freon.c) +
               ". For c > 0.5 the update's singular values are (||U||_{S_q} / sigma_i)^(2c-1): the "
               "Schatten normalisation bounds them below by 1, not above, and a rank-n U with equal "
               "singular values already gives n^((2c-1)/(2-2c)) (for n = 128: 2.7e8 at c = 0.9, 9e18 "
               "at c = 0.95); past 0.9 the weights overflow within a step or two (docs/optimizers.md)");
  k.non_negative("optim.freon.eps", o.freon.eps);
  if (o.kaon.steps < 1 || o.kaon.steps > 100)
    k.fail("optim.kaon.steps", "must be in [1, 100], got " + std::to_string(o.kaon.steps));

  k.non_negative("schedule.warmup", s.warmup);
  k.one_of("schedule.decay", s.decay, {"constant", "cosine", "linear", "wsd"});
  k.unit_closed("schedule.min_lr_ratio", s.min_lr_ratio);
  k.unit_closed("schedule.wsd_decay_frac", s.wsd_decay_frac);

  k.positive("train.seq_len", t.seq_len);
  k.positive("train.micro_batch", t.micro_batch);
  k.positive("train.batch_tokens", (double)t.batch_tokens);
  k.positive("train.max_steps", t.max_steps);
  k.non_negative("train.eval_every", t.eval_every);
  k.non_negative("train.eval_batches", t.eval_batches);  // 0: all of data.val
  k.non_negative("train.ckpt_every", t.ckpt_every);
  if (t.keep_ckpts < 1) k.fail("train.keep_ckpts", "must be >= 1, got " + std::to_string(t.keep_ckpts));
  k.positive("train.log_every", t.log_every);
  k.non_negative("train.diag_every", t.diag_every);
  if (t.init_from && t.init_from->empty())
    k.fail("train.init_from", "must be a Hugging Face model directory or null, got \"\"");
  k.one_of("train.device", t.device, {"auto", "cpu", "cuda"});
  k.one_of("train.precision", t.precision, {"bf16", "fp32"});
  if (t.zero != 0 && t.zero != 1)
    k.fail("train.zero", "expected one of 0|1, got " + std::to_string(t.zero));
  if (!(t.bucket_mb >= 0 && t.bucket_mb <= 1e6))
    k.fail("train.bucket_mb", "must be in [0, 1e6] MiB (0: one all-reduce per tensor), got " +
                                  num(t.bucket_mb));
  if (!(t.loss_chunk_mb >= 1 && t.loss_chunk_mb <= 1e6))
    k.fail("train.loss_chunk_mb", "must be in [1, 1e6] MiB, got " + num(t.loss_chunk_mb));
  if (t.world_size < 1)
    k.fail("train.world_size", "must be >= 1, got " + std::to_string(t.world_size));

  if (c.run.dir.empty()) k.fail("run.dir", "must not be empty");
  if (c.run.name.empty()) k.fail("run.name", "must not be empty");

  // Cross-field rules.
  if (m.d_model % m.n_heads)
    k.fail_cross("model.d_model", {"model.n_heads"}, std::to_string(m.d_model) + " is not divisible by model.n_heads = " +
                                std::to_string(m.n_heads));
  if (m.head_dim() % 2)
    k.fail_cross("model.n_heads", {"model.d_model"}, "head_dim = d_model / n_heads = " + std::to_string(m.d_model) + " / " +
                                std::to_string(m.n_heads) + " = " + std::to_string(m.head_dim()) +
                                " must be even for RoPE");
  if (m.n_heads % m.n_kv_heads)
    k.fail_cross("model.n_kv_heads", {"model.n_heads"}, std::to_string(m.n_kv_heads) + " does not divide model.n_heads = " +
                                   std::to_string(m.n_heads));
  if (e.n_experts > 0 && e.top_k > e.n_experts)
    k.fail_cross("model.moe.top_k", {"model.moe.n_experts"}, std::to_string(e.top_k) + " exceeds model.moe.n_experts = " +
                                  std::to_string(e.n_experts));
  // An MoE model needs an MoE layer: first_dense = n_layers built a dense model that checkpoints,
  // inspect and export still labelled MoE (an export no loader could read).
  if (e.n_experts > 0 && e.first_dense >= m.n_layers)
    k.fail_cross("model.moe.first_dense", {"model.n_layers"},
                 std::to_string(e.first_dense) + (e.first_dense == m.n_layers ? " equals" : " exceeds") +
                     " model.n_layers = " + std::to_string(m.n_layers) +
                     ", which leaves no MoE layer; lower it, or set model.moe.n_experts to 0 for a "
                     "dense model");
  // The parameter count, in double (the shapes are ints; their products can pass 2^63, where the
  // gradient arena's int64 offsets wrapped: d_model=1e9 failed with "internal: parameter
  // model.embed_tokens.weight in no gradient group").
  {
    const double total = m.param_count();
    if (total > 9007199254740992.0)  // 2^53: 32 PiB of fp32 weights
      k.fail_cross("model.d_model",
                   {"model.vocab_size", "model.n_layers", "model.d_ff", "model.n_heads",
                    "model.n_kv_heads", "model.moe.n_experts", "model.moe.n_shared",
                    "model.moe.d_expert", "model.moe.first_dense"},
                   "the model would have " + num(total) + " parameters (" + m.shape_keys() +
                       "), more than 2^53");
  }
  // micro_batch * seq_len * world_size can pass 2^63 (three ints): then it exceeds any batch_tokens.
  long long unit = LLONG_MAX;
  const bool unit_fits =
      !__builtin_mul_overflow((long long)t.micro_batch, (long long)t.seq_len, &unit) &&
      !__builtin_mul_overflow(unit, (long long)t.world_size, &unit);
  if (!unit_fits) unit = LLONG_MAX;
  if (!unit_fits || t.batch_tokens % unit) {
    long long lo = t.batch_tokens / unit * unit, hi = 0;
    const bool hi_fits = unit_fits && !__builtin_add_overflow(lo, unit, &hi);
    std::string suggest = lo > 0 && hi_fits ? std::to_string(lo) + " or " + std::to_string(hi)
                          : lo > 0          ? std::to_string(lo)
                          : hi_fits         ? std::to_string(hi)
                                            : "a smaller micro_batch or seq_len";
    k.fail_cross("train.batch_tokens", {"train.micro_batch", "train.seq_len", "train.world_size"},
           std::to_string(t.batch_tokens) + " is not a multiple of micro_batch * seq_len * world_size = " +
               std::to_string(t.micro_batch) + " * " + std::to_string(t.seq_len) + " * " +
               std::to_string(t.world_size) + " = " + (unit_fits ? std::to_string(unit) : std::string("more than 2^63")) +
               "; use e.g. " + suggest + " (or change micro_batch or seq_len)");
  }
  // The trainer counts micro-batches per step in an int.
  if (t.batch_tokens / unit > INT_MAX)
    k.fail_cross("train.batch_tokens", {"train.micro_batch", "train.seq_len", "train.world_size"},
                 std::to_string(t.batch_tokens) + " is " + std::to_string(t.batch_tokens / unit) +
                     " micro-batches of micro_batch * seq_len * world_size = " + std::to_string(unit) +
                     " tokens per step, more than " + std::to_string(INT_MAX));
  if (t.seq_len > m.max_seq_len)
    k.fail_cross("train.seq_len", {"model.max_seq_len"}, std::to_string(t.seq_len) + " exceeds model.max_seq_len = " +
                                std::to_string(m.max_seq_len));
  if (s.warmup > t.max_steps)
    k.fail_cross("schedule.warmup", {"train.max_steps"}, std::to_string(s.warmup) + " exceeds train.max_steps = " +
                                  std::to_string(t.max_steps) + " (lower it too, e.g. --set schedule.warmup=" +
                                  std::to_string(t.max_steps / 10) + ")");
}

Config config_from_json(const json& j, const std::string& origin, const std::string& base_dir,
                        const std::vector<std::string>& overrides) {
  Config c;
  c.source = origin;
  Schema s(c);
  Chain chain;
  fs::path self = identity(origin);
  chain.ids.push_back(self);
  chain.names.push_back(origin);
  // model.n_kv_heads left out (by the file, its bases and the overrides) means n_heads, plain
  // multi-head attention, as Hugging Face's num_key_value_heads does: a fixed number would not
  // divide every n_heads a config may set.
  constexpr int kUnset = -1;
  c.model.n_kv_heads = kUnset;
  apply_file(j, origin, origin, base_dir.empty() ? fs::path(".") : fs::path(base_dir), chain, s, c);
  c.train.world_size = world_size_from_env();
  for (auto& ov : overrides) apply_override(ov, origin, s, c);
  if (c.model.n_kv_heads == kUnset) c.model.n_kv_heads = c.model.n_heads;
  validate_config(c);
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  json j = read_json_file(path, "");
  std::string dir = fs::path(path).parent_path().string();
  return config_from_json(j, path, dir.empty() ? "." : dir, overrides);
}

namespace {
void add_leaves(const json& j, const std::string& path, std::map<std::string, std::string>& out) {
  if (j.is_object() && !j.empty()) {
    for (auto it = j.begin(); it != j.end(); ++it)
      add_leaves(it.value(), path.empty() ? it.key() : path + "." + it.key(), out);
  } else {
    out[path.empty() ? "<root>" : path] = j.dump();
  }
}
}  // namespace

const std::map<std::string, std::vector<std::string>>& config_key_aliases() {
  return key_aliases();
}

std::vector<std::string> config_keys_for(const std::string& name) {
  Config c;
  return keys_named(Schema(c), name);
}

std::map<std::string, std::string> json_leaves(const json& j) {
  std::map<std::string, std::string> out;
  add_leaves(j, "", out);
  return out;
}

json config_to_json(const Config& c) {
  return nlohmann::json(to_ordered_json(c));
}

std::string config_to_string(const Config& c, int indent) { return to_ordered_json(c).dump(indent); }

}  // namespace mf
