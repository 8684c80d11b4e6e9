#include "data/shard.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/error.h"

namespace mf {

namespace fs = std::filesystem;

namespace {

// The format is little-endian; every platform we build for is too. Fail loudly otherwise.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token shards assume a little-endian host");

std::string errno_str() { return std::strerror(errno); }

// RAII file descriptor.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Validates the header ints against the file size; fills `info`.
void check_header(ShardInfo& info, const int32_t* h) {
  const std::string& p = info.path;
  info.magic = h[0];
  info.version = h[1];
  if (h[0] == kShardMagicU16) {
    MF_CHECK(h[1] == kShardVersionU16, "token shard '", p, "': magic ", h[0],
             " (uint16 tokens) needs version ", kShardVersionU16, ", but the header says version ",
             h[1]);
    info.token_bytes = 2;
  } else if (h[0] == kShardMagicU32) {
    MF_CHECK(h[1] == kShardVersionU32, "token shard '", p, "': magic ", h[0],
             " (uint32 tokens) needs version ", kShardVersionU32, ", but the header says version ",
             h[1]);
    info.token_bytes = 4;
  } else {
    MF_FAIL("token shard '", p, "': bad magic number ", h[0], " (expected ", kShardMagicU16,
            " for uint16 tokens or ", kShardMagicU32,
            " for uint32 tokens); is this an llm.c token file?");
  }
  MF_CHECK(h[2] >= 0, "token shard '", p, "': negative token count ", h[2], " in the header");
  info.count = h[2];
  const int64_t body = info.file_bytes - int64_t(kShardHeaderBytes);
  const int64_t want = info.count * info.token_bytes;
  if (body != want) {
    if (body % info.token_bytes != 0)
      MF_FAIL("token shard '", p, "': body of ", body, " bytes is not a multiple of the token width ",
              info.token_bytes, " (odd byte count; file corrupt?)");
    if (body < want)
      MF_FAIL("token shard '", p, "': truncated: the header says ", info.count, " tokens (",
              kShardHeaderBytes + want, " bytes) but the file has ", info.file_bytes,
              " bytes (", body / info.token_bytes, " tokens)");
    MF_FAIL("token shard '", p, "': trailing data: the header says ", info.count, " tokens (",
            kShardHeaderBytes + want, " bytes) but the file has ", info.file_bytes, " bytes (",
            (body - want) / info.token_bytes, " extra tokens)");
  }
}

// Opens `path` for reading and returns its size; errors name the file.
int64_t open_checked(const std::string& path, Fd& fd) {
  fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd.fd < 0) {
    if (errno == ENOENT) MF_FAIL("token shard '", path, "': no such file");
    MF_FAIL("token shard '", path, "': cannot open: ", errno_str());
  }
  struct stat st {};
  MF_CHECK(::fstat(fd.fd, &st) == 0, "token shard '", path, "': cannot stat: ", errno_str());
  MF_CHECK(S_ISREG(st.st_mode), "token shard '", path, "': not a regular file");
  MF_CHECK(st.st_size > 0, "token shard '", path, "': empty file (0 bytes)");
  MF_CHECK(st.st_size >= int64_t(kShardHeaderBytes), "token shard '", path, "': only ",
           st.st_size, " bytes, shorter than the ", kShardHeaderBytes, "-byte header");
  return st.st_size;
}

void read_exact(int fd, void* buf, size_t n, const std::string& path) {
  auto* p = static_cast<unsigned char*>(buf);
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::read(fd, p + done, n - done);
    if (r < 0 && errno == EINTR) continue;
    MF_CHECK(r > 0, "token shard '", path, "': read failed: ", r < 0 ? errno_str() : "end of file");
    done += size_t(r);
  }
}

}  // namespace

ShardInfo read_shard_info(const std::string& path) {
  Fd fd;
  ShardInfo info;
  info.path = path;
  info.file_bytes = open_checked(path, fd);
  int32_t h[kShardHeaderInts];
  read_exact(fd.fd, h, sizeof(h), path);
  check_header(info, h);
  return info;
}

TokenShard::TokenShard(const std::string& path, int64_t vocab_size) {
  Fd fd;
  info_.path = path;
  info_.file_bytes = open_checked(path, fd);
  void* m = ::mmap(nullptr, size_t(info_.file_bytes), PROT_READ, MAP_PRIVATE, fd.fd, 0);
  MF_CHECK(m != MAP_FAILED, "token shard '", path, "': mmap failed: ", errno_str());
  map_ = m;
  map_bytes_ = size_t(info_.file_bytes);
  try {
    check_header(info_, static_cast<const int32_t*>(map_));
  } catch (...) {
    release();
    throw;
  }
  body_ = static_cast<const unsigned char*>(map_) + kShardHeaderBytes;
  if (vocab_size > 0) check_vocab(vocab_size);
}

TokenShard::~TokenShard() { release(); }

void TokenShard::release() {
  if (map_) ::munmap(map_, map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
  body_ = nullptr;
}

TokenShard::TokenShard(TokenShard&& o) noexcept { *this = std::move(o); }

TokenShard& TokenShard::operator=(TokenShard&& o) noexcept {
  if (this != &o) {
    release();
    info_ = std::move(o.info_);
    map_ = o.map_;
    map_bytes_ = o.map_bytes_;
    body_ = o.body_;
    checked_vocab_ = o.checked_vocab_;
    o.map_ = nullptr;
    o.map_bytes_ = 0;
    o.body_ = nullptr;
    o.checked_vocab_ = 0;
  }
  return *this;
}

void TokenShard::copy(int64_t begin, int64_t n, int32_t* out) const {
  MF_CHECK(begin >= 0 && n >= 0 && begin + n <= info_.count, "token shard '", info_.path,
           "': read of tokens [", begin, ", ", begin + n, ") is outside its ", info_.count,
           " tokens");
  if (info_.token_bytes == 2) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(body_) + begin;
    for (int64_t i = 0; i < n; ++i) out[i] = int32_t(src[i]);
  } else {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(body_) + begin;
    for (int64_t i = 0; i < n; ++i) {
      MF_CHECK(src[i] <= 0x7fffffffu, "token shard '", info_.path, "': token id ", src[i],
               " at position ", begin + i, " does not fit int32");
      out[i] = int32_t(src[i]);
    }
  }
}

void TokenShard::check_vocab(int64_t vocab_size, const std::string& fixed_by) {
  MF_CHECK(vocab_size > 0, "token shard '", info_.path, "': vocab_size must be positive, got ",
           vocab_size);
  if (checked_vocab_ > 0 && checked_vocab_ <= vocab_size) return;
  const int64_t n = info_.count;
  // Fast pass for the maximum, then locate the first offender only when there is one.
  uint32_t mx = 0;
  if (info_.token_bytes == 2) {
    const uint16_t* t = reinterpret_cast<const uint16_t*>(body_);
    for (int64_t i = 0; i < n; ++i) mx = std::max<uint32_t>(mx, t[i]);
  } else {
    const uint32_t* t = reinterpret_cast<const uint32_t*>(body_);
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, t[i]);
  }
  if (n > 0 && int64_t(mx) >= vocab_size) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t id = (*this)[i];
      if (!fixed_by.empty())
        MF_CHECK(int64_t(id) < vocab_size, "token shard '", info_.path, "': token id ", id,
                 " at position ", i, " is >= vocab_size ", vocab_size, " of ", fixed_by,
                 " (this shard's largest id is ", mx, "): it was made with another tokenizer "
                 "than the model's; tokenize the text with the model's tokenizer");
      MF_CHECK(int64_t(id) < vocab_size, "token shard '", info_.path, "': token id ", id,
               " at position ", i, " is >= vocab_size ", vocab_size,
               " (was the shard made with another tokenizer? this shard's largest id is ", mx,
               ": set model.vocab_size to at least ", int64_t(mx) + 1,
               mx < 50257 && mx >= 50000 ? "; GPT-2's tokenizer: 50257, or 50304 padded to a "
                                           "multiple of 64"
                                         : "",
               ")");
    }
  }
  checked_vocab_ = vocab_size;
}

std::vector<uint32_t> TokenShard::to_vector() const {
  std::vector<uint32_t> v(size_t(info_.count));
  for (int64_t i = 0; i < info_.count; ++i) v[size_t(i)] = (*this)[i];
  return v;
}

void write_shard(const std::string& path, const uint32_t* tokens, int64_t n, int token_bytes) {
  MF_CHECK(token_bytes == 2 || token_bytes == 4, "write_shard '", path,
           "': token_bytes must be 2 or 4, got ", token_bytes);
  MF_CHECK(n >= 0 && n <= 0x7fffffff, "write_shard '", path, "': token count ", n,
           " does not fit the int32 header field (split into more shards)");
  int32_t h[kShardHeaderInts] = {};
  h[0] = token_bytes == 2 ? kShardMagicU16 : kShardMagicU32;
  h[1] = token_bytes == 2 ? kShardVersionU16 : kShardVersionU32;
  h[2] = int32_t(n);

  std::vector<unsigned char> body(size_t(n) * size_t(token_bytes));
  if (token_bytes == 2) {
    auto* d = reinterpret_cast<uint16_t*>(body.data());
    for (int64_t i = 0; i < n; ++i) {
      MF_CHECK(tokens[i] <= 0xffffu, "write_shard '", path, "': token id ", tokens[i],
               " at position ", i, " does not fit uint16 (use 4-byte tokens, version 7)");
      d[i] = uint16_t(tokens[i]);
    }
  } else if (n > 0) {
    std::memcpy(body.data(), tokens, body.size());
  }

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  Fd fd;
  fd.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MF_CHECK(fd.fd >= 0, "write_shard '", path, "': cannot create '", tmp, "': ", errno_str());
  auto write_all = [&](const void* buf, size_t len) {
    const auto* p = static_cast<const unsigned char*>(buf);
    size_t done = 0;
    while (done < len) {
      ssize_t w = ::write(fd.fd, p + done, len - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        std::string why = errno_str();
        ::unlink(tmp.c_str());
        MF_FAIL("write_shard '", path, "': write failed: ", why);
      }
      done += size_t(w);
    }
  };
  write_all(h, sizeof(h));
  write_all(body.data(), body.size());
  if (::fsync(fd.fd) != 0) {
    std::string why = errno_str();
    ::unlink(tmp.c_str());
    MF_FAIL("write_shard '", path, "': fsync failed: ", why);
  }
  ::close(fd.fd);
  fd.fd = -1;
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string why = errno_str();
    ::unlink(tmp.c_str());
    MF_FAIL("write_shard '", path, "': rename from '", tmp, "' failed: ", why);
  }
  // Make the rename itself durable.
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::vector<std::string> expand_glob(const std::string& pattern, const std::string& what) {
  const std::string label = what.empty() ? std::string("files") : what;
  MF_CHECK(!pattern.empty(), label, ": empty file pattern (set it to a glob such as "
           "'data/x/train_*.bin')");
  const bool wild = pattern.find_first_of("*?[") != std::string::npos;
  std::vector<std::string> out;
  if (!wild) {
    std::error_code ec;
    MF_CHECK(fs::exists(pattern, ec), label, ": file '", pattern, "' does not exist");
    MF_CHECK(fs::is_regular_file(pattern, ec), label, ": '", pattern, "' is not a regular file");
    out.push_back(pattern);
    return out;
  }
  glob_t g{};
  int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) {
      std::error_code ec;
      if (fs::is_regular_file(g.gl_pathv[i], ec)) out.emplace_back(g.gl_pathv[i]);
    }
  }
  globfree(&g);
  if (rc != 0 && rc != GLOB_NOMATCH)
    MF_FAIL(label, ": glob '", pattern, "' failed (", rc == GLOB_ABORTED ? "read error" : "out of memory",
            ")");
  if (out.empty()) {
    std::error_code ec;
    const std::string cwd = fs::current_path(ec).string();
    MF_FAIL(label, ": glob '", pattern, "' matched no files",
            fs::path(pattern).is_relative() && !ec
                ? " (a relative path: read from the working directory, " + cwd + ")"
                : std::string());
  }
  // Byte-wise order, independent of the locale (glob(3) collates by LC_COLLATE).
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> expand_globs(const std::vector<std::string>& patterns,
                                      const std::string& what) {
  MF_CHECK(!patterns.empty(), (what.empty() ? "files" : what), ": no file pattern given");
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const auto& p : patterns)
    for (auto& f : expand_glob(p, what))
      if (seen.insert(f).second) out.push_back(f);
  return out;
}

}  // namespace mf
