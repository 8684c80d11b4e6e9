#include "backend/backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_contract.h"
#include "core/error.h"
#include "core/fault.h"
#include "core/log.h"

#ifdef MF_HAS_CUDA
namespace mf {
std::unique_ptr<Backend> make_cuda_backend();  // src/backend/cuda
int cuda_device_count();
}  // namespace mf
#endif

namespace mf {

MemoryInfo host_memory_info(const std::string& meminfo, const std::string& cgroup_root,
                            const std::string& self_cgroup) {
  MemoryInfo m;
  if (FILE* f = std::fopen(meminfo.c_str(), "r")) {
    char line[256], key[64];
    unsigned long long kb = 0;
    while (std::fgets(line, sizeof line, f)) {
      if (std::sscanf(line, "%63s %llu", key, &kb) != 2) continue;
      if (!std::strcmp(key, "MemTotal:")) m.total = size_t(kb) * 1024;
      if (!std::strcmp(key, "MemAvailable:")) m.free = size_t(kb) * 1024;
    }
    std::fclose(f);
  }
  // A container's or Slurm job's memory limit bounds both figures. The process's cgroup comes
  // from self_cgroup (/proc/self/cgroup: "0::PATH" for v2, "N:...memory...:PATH" for v1); a
  // limit may sit on any ancestor, so every level from there up to the root counts, and the
  // tightest one wins. An unlimited level reads "max" (v2) or a huge number (v1).
  std::string v2_path, v1_path;
  bool v2 = false, v1 = false;
  if (std::ifstream f{self_cgroup}) {
    std::string line;
    while (std::getline(f, line)) {
      const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
      if (b == std::string::npos) continue;
      const std::string ctrl = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
      if (line.compare(0, a, "0") == 0 && ctrl.empty()) {
        v2 = true;
        v2_path = path;
      }
      std::stringstream cs(ctrl);
      for (std::string c; std::getline(cs, c, ',');)
        if (c == "memory") {
          v1 = true;
          v1_path = path;
        }
    }
  }
  auto read_bytes = [](const std::string& file, unsigned long long& out) {
    FILE* g = std::fopen(file.c_str(), "r");
    if (!g) return false;
    const bool ok = std::fscanf(g, "%llu", &out) == 1;
    std::fclose(g);
    return ok;
  };
  // The cgroup at base + rel, then each ancestor up to base itself.
  auto bound = [&](const std::string& base, std::string rel, const char* limit_file,
                   const char* usage_file) {
    while (!rel.empty() && rel.back() == '/') rel.pop_back();
    while (true) {
      const std::string d = base + rel;
      unsigned long long limit = 0, used = 0;
      if (read_bytes(d + "/" + limit_file, limit) && limit > 0) {
        // The tightest limit bounds the total; the least room left at any level bounds what
        // is free (a parent's limit may be shared with siblings that use it).
        if (m.total == 0 || limit < m.total) m.total = size_t(limit);
        read_bytes(d + "/" + usage_file, used);
        const size_t room = used < limit ? size_t(limit - used) : 0;
        if (m.free == 0 || room < m.free) m.free = room;
      }
      if (rel.empty()) break;
      const size_t slash = rel.find_last_of('/');
      rel.resize(slash == std::string::npos ? 0 : slash);
    }
  };
  if (v2) bound(cgroup_root, v2_path, "memory.max", "memory.current");
  if (v1) bound(cgroup_root + "/memory", v1_path, "memory.limit_in_bytes", "memory.usage_in_bytes");
  if (!v1 && !v2) {  // no /proc/self/cgroup: the hierarchies' roots only
    bound(cgroup_root, "", "memory.max", "memory.current");
    bound(cgroup_root + "/memory", "", "memory.limit_in_bytes", "memory.usage_in_bytes");
  }
  if (const size_t fake = fault_host_memory()) {  // a testing aid (core/fault.h)
    m.total = fake;
    m.free = m.free == 0 ? fake : std::min(m.free, fake);
  }
  return m;
}

MemoryInfo Backend::memory_info() const {
  return host_memory_info("/proc/meminfo", "/sys/fs/cgroup", "/proc/self/cgroup");
}

size_t Backend::record_mark() {
  host_marks_.push_back(std::chrono::steady_clock::now());
  return host_marks_.size() - 1;
}

double Backend::marks_elapsed_ms(size_t a, size_t b) {
  MF_CHECK(a < host_marks_.size() && b < host_marks_.size(), "marks_elapsed_ms: mark ",
           std::max(a, b), " was not recorded (", host_marks_.size(), " marks)");
  return std::chrono::duration<double, std::milli>(host_marks_[b] - host_marks_[a]).count();
}

void Backend::clear_marks() { host_marks_.clear(); }

namespace {
class SyncReadback final : public Backend::Readback {
 public:
  SyncReadback(Backend& be, const std::vector<const Tensor*>& src) : be_(be), src_(src) {
    for (const Tensor* t : src) host_.push_back(host_tensor(t->shape, t->dtype));
  }
  void start() override {
    for (size_t i = 0; i < src_.size(); ++i) be_.download(*src_[i], host_[i]);
  }
  void wait() override {}

 private:
  Backend& be_;
  std::vector<const Tensor*> src_;
};
}  // namespace

std::unique_ptr<Backend::Readback> Backend::make_readback(
    const std::vector<const Tensor*>& sources) {
  return std::make_unique<SyncReadback>(*this, sources);
}

void Backend::scale_to_norm_of(Tensor& x, const Tensor& ref) {
  const double nr = sum_squares(ref), nx = sum_squares(x);
  scale(x, nx > 0 ? float(std::sqrt(nr / nx)) : 0.0f);
}

std::vector<double> Backend::sum_squares_each(const std::vector<const Tensor*>& xs) {
  std::vector<double> out;
  out.reserve(xs.size());
  for (const Tensor* x : xs) out.push_back(sum_squares(*x));
  return out;
}

// ---- default MoE entries: a backend without MoE kernels still compiles and says so ------------

#define MF_MOE_UNIMPLEMENTED(op) MF_FAIL(op, " is not implemented on the ", name(), " backend")

void Backend::moe_router_fwd(const Tensor&, const Tensor&, const Tensor*, const MoeRouterArgs&,
                             Tensor&, Tensor&, Tensor&, Tensor&, Tensor&) {
  MF_MOE_UNIMPLEMENTED("moe_router_fwd");
}
void Backend::moe_router_bwd(const Tensor&, const Tensor*, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, const MoeRouterArgs&, Tensor&, Tensor&,
                             Tensor&) {
  MF_MOE_UNIMPLEMENTED("moe_router_bwd");
}
void Backend::moe_permute(const Tensor&, int, int64_t, Tensor&, Tensor&, Tensor&) {
  MF_MOE_UNIMPLEMENTED("moe_permute");
}
void Backend::moe_gather(const Tensor&, const Tensor&, Tensor&) {
  MF_MOE_UNIMPLEMENTED("moe_gather");
}
void Backend::moe_gather_bwd(const Tensor&, const Tensor&, Tensor&) {
  MF_MOE_UNIMPLEMENTED("moe_gather_bwd");
}
void Backend::moe_combine_fwd(const Tensor&, const Tensor&, const Tensor&, Tensor&, bool) {
  MF_MOE_UNIMPLEMENTED("moe_combine_fwd");
}
void Backend::moe_combine_bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                              Tensor&) {
  MF_MOE_UNIMPLEMENTED("moe_combine_bwd");
}

#undef MF_MOE_UNIMPLEMENTED

namespace {
// The contract of a backend that runs these defaults: the CPU reference, or CUDA's fallback
// for operands its grouped kernel does not take (f32).
contract::Where where_of(const Backend& be) {
  return be.device() == Device::CUDA ? contract::kCuda : contract::kCpu;
}

// The expert row blocks of a moe_permute plan (shape checked by the contract), on the host,
// checked against the rows the operands cover.
std::vector<int32_t> expert_offsets(Backend& be, const char* op, const Tensor& offsets,
                                    size_t E, int64_t rows) {
  Tensor h = host_tensor({int64_t(E) + 1}, DType::I32);
  be.download(offsets, h);
  std::vector<int32_t> off(h.i32(), h.i32() + E + 1);
  MF_CHECK(off[0] == 0, op, ": offsets[0] = ", off[0], ", expected 0");
  for (size_t e = 0; e < E; ++e)
    MF_CHECK(off[e + 1] >= off[e], op, ": offsets decrease at expert ", e, " (", off[e], " > ",
             off[e + 1], ")");
  MF_CHECK(off[E] <= rows, op, ": offsets[E] = ", off[E], " rows but the operands have ", rows);
  return off;
}

// A [..., width] operand as the [rows, width] matrix the per-expert matmuls slice.
Tensor rows_view(const Tensor& t, int64_t width) { return t.view({t.numel() / width, width}); }
}  // namespace

void Backend::moe_expert_fwd(const Tensor& x, const std::vector<const Tensor*>& W,
                             const Tensor& offsets, Tensor& y) {
  const auto d = contract::moe_expert_fwd(where_of(*this), x, W, offsets, y);
  const auto off = expert_offsets(*this, "moe_expert_fwd", offsets, W.size(), d.R);
  const Tensor xm = rows_view(x, d.in), ym = rows_view(y, d.out);
  for (size_t e = 0; e < W.size(); ++e) {
    if (off[e + 1] == off[e]) continue;
    Tensor ye = ym.slice0(off[e], off[e + 1]);
    matmul_fwd(xm.slice0(off[e], off[e + 1]), *W[e], ye);
  }
}

void Backend::moe_expert_bwd(const Tensor& dy, const Tensor& x,
                             const std::vector<const Tensor*>& W, const Tensor& offsets,
                             Tensor* dx, const std::vector<Tensor*>* dW, bool accumulate_dx) {
  const auto d = contract::moe_expert_bwd(where_of(*this), dy, x, W, offsets, dx, dW);
  const auto off = expert_offsets(*this, "moe_expert_bwd", offsets, W.size(), d.R);
  const Tensor dym = rows_view(dy, d.out), xm = rows_view(x, d.in);
  const Tensor dxm = dx ? rows_view(*dx, d.in) : Tensor();
  for (size_t e = 0; e < W.size(); ++e) {
    if (off[e + 1] == off[e]) continue;
    Tensor dxe;
    if (dx) dxe = dxm.slice0(off[e], off[e + 1]);
    matmul_bwd(dym.slice0(off[e], off[e + 1]), xm.slice0(off[e], off[e + 1]), *W[e],
               dx ? &dxe : nullptr, dW ? (*dW)[e] : nullptr, accumulate_dx);
  }
}

void Backend::set_attention_impl(const std::string& mode) {
  static bool said = false;
  if (mode == "cudnn" && !said)
    spdlog::info("model.attention = \"cudnn\" only applies to the CUDA backend; the {} backend "
                 "uses its own attention",
                 name());
  if (mode == "cudnn") said = true;
}

void select_attention(Backend& be, const std::string& mode, bool deterministic) {
  std::string m = mode;
  // Why cuDNN's attention cannot serve this run, if it cannot ("" when it can).
  std::string why;
  if (be.device() == Device::CUDA && be.act_dtype() == DType::F32)
    why = "train.precision = \"fp32\": cuDNN's attention takes bf16 only";
  else if (be.device() == Device::CUDA && deterministic)
    why = "train.deterministic = true: cuDNN's attention backward accumulates dQ with atomics, "
          "so runs are not bitwise reproducible";
  if (!why.empty()) {
    MF_CHECK(m != "cudnn", "model.attention = \"cudnn\" with ", why,
             "; use model.attention = \"flash\" (or \"auto\", which then picks flash)");
    if (m == "auto") {
      m = "flash";
      spdlog::info("model.attention = \"auto\" uses the flash kernels: {}", why);
    }
  }
  be.set_attention_impl(m);
}

bool cuda_available() {
#ifdef MF_HAS_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

bool check_device(const std::string& device) {
  if (device == "cpu") return false;
  MF_CHECK(device == "cuda" || device == "auto", "unknown device \"", device,
           "\"; expected one of: auto, cpu, cuda");
  if (cuda_available()) return true;
  MF_CHECK(device == "auto", "train.device is \"cuda\" but ",
#ifdef MF_HAS_CUDA
           "no CUDA device is visible",
#else
           "this build has no CUDA backend (configure with nvcc present)",
#endif
           "; use \"cpu\" or \"auto\"");
  return false;
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
#ifdef MF_HAS_CUDA
  if (check_device(device)) return make_cuda_backend();
#else
  check_device(device);
#endif
  return std::make_unique<CpuBackend>();
}


void Backend::set_loss_chunk_mb(double mb) {
  MF_CHECK(std::isfinite(mb) && mb > 0, "train.loss_chunk_mb must be > 0 MiB, got ", mb);
  loss_chunk_bytes_ = std::max<size_t>(1, size_t(mb * 1024.0 * 1024.0));
}

void Backend::set_precision(const std::string& precision) {
  MF_CHECK(precision == "bf16" || precision == "fp32", "train.precision \"", precision,
           "\": expected \"bf16\" or \"fp32\"");
}

// ---- default matrix-optimizer entries (src/optim/matrix_opt.h) -------------------------------

#define MF_OPT2_UNIMPLEMENTED(op) MF_FAIL(op, " is not implemented on the ", name(), " backend")

void Backend::gemm(const Tensor&, bool, const Tensor&, bool, Tensor&, float, float) {
  MF_OPT2_UNIMPLEMENTED("gemm");
}
void Backend::block_copy(const Tensor&, int64_t, int64_t, Tensor&, int64_t, int64_t, int64_t,
                         int64_t) {
  MF_OPT2_UNIMPLEMENTED("block_copy");
}
void Backend::sym_eig(const Tensor&, Tensor&) { MF_OPT2_UNIMPLEMENTED("sym_eig"); }
void Backend::sym_func(const Tensor&, const SymFuncArgs&, Tensor&) {
  MF_OPT2_UNIMPLEMENTED("sym_func");
}
void Backend::newton_schulz_coeffs(const Tensor&, Tensor&, const std::vector<float>&, float) {
  MF_OPT2_UNIMPLEMENTED("newton_schulz_coeffs");
}
void Backend::normuon_normalize(Tensor&, Tensor&, float, float) {
  MF_OPT2_UNIMPLEMENTED("normuon_normalize");
}
void Backend::cautious_decay(Tensor&, const Tensor&, float) {
  MF_OPT2_UNIMPLEMENTED("cautious_decay");
}
void Backend::adam_precond(const Tensor&, const Tensor&, Tensor&, Tensor&, float, float, float,
                           float) {
  MF_OPT2_UNIMPLEMENTED("adam_precond");
}

}  // namespace mf
