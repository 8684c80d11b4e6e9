#include "io/atomic_file.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"

namespace mf {

namespace {
std::string errno_str() { return std::strerror(errno); }
}  // namespace

std::string parent_dir(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string atomic_temp_path(const std::string& path) {
  return path + ".tmp." + std::to_string(long(::getpid()));
}

namespace {
// Opens `path` read-only with `flags` and fsyncs it: the fsync's errno (0 on success), or -1 when
// the path does not exist and `missing_ok`. Failing to open it otherwise is an error naming it.
int fsync_path(const std::string& path, int flags, bool missing_ok, const char* what) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | flags);
  if (fd < 0 && missing_ok && errno == ENOENT) return -1;
  MF_CHECK(fd >= 0, "cannot open ", what, "'", path, "' to sync it: ", errno_str());
  const int err = ::fsync(fd) == 0 ? 0 : errno;
  ::close(fd);
  return err;
}
}  // namespace

void fsync_dir(const std::string& dir) {
  const int err = fsync_path(dir, O_DIRECTORY, false, "directory ");
  // Some file systems do not support fsync on directories; that is not a data-loss error here.
  MF_CHECK(err == 0 || err == EINVAL || err == ENOTSUP, "fsync of directory '", dir,
           "' failed: ", std::strerror(err));
}

void fsync_file(const std::string& path) {
  const int err = fsync_path(path, 0, true, "");
  MF_CHECK(err <= 0, "fsync of '", path, "' failed: ", std::strerror(err));
}

AtomicFile::AtomicFile(const std::string& path) : path_(path), tmp_(atomic_temp_path(path)) {
  MF_CHECK(!path.empty(), "AtomicFile: empty path");
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MF_CHECK(fd_ >= 0, "cannot create '", tmp_, "' (to write '", path_, "'): ", errno_str());
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t n) {
  MF_CHECK(fd_ >= 0 && !committed_, "AtomicFile: write to '", path_, "' after commit");
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    MF_CHECK(w > 0, "write to '", tmp_, "' failed: ", errno_str());
    p += w;
    n -= size_t(w);
  }
}

void AtomicFile::commit() {
  MF_CHECK(fd_ >= 0 && !committed_, "AtomicFile: '", path_, "' committed twice");
  MF_CHECK(::fsync(fd_) == 0, "fsync of '", tmp_, "' failed: ", errno_str());
  int rc = ::close(fd_);
  fd_ = -1;
  MF_CHECK(rc == 0, "close of '", tmp_, "' failed: ", errno_str());
  MF_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, "cannot rename '", tmp_, "' to '", path_,
           "': ", errno_str());
  committed_ = true;
  fsync_dir(parent_dir(path_));
}

void atomic_write_file(const std::string& path, const void* data, size_t n) {
  AtomicFile f(path);
  f.write(data, n);
  f.commit();
}

void atomic_write_text(const std::string& path, const std::string& text) {
  atomic_write_file(path, text.data(), text.size());
}

}  // namespace mf
