// Crash-safe file replacement: write to `<path>.tmp.<pid>` in the same directory, fsync it,
// rename over `path`, fsync the directory. A reader sees either the old file or the complete
// new one, never a torn write; a crash before commit() leaves `path` untouched.
#pragma once
#include <cstddef>
#include <string>

namespace mf {

// Streaming writer for large files (safetensors, checkpoints).
//   AtomicFile f(path); f.write(p, n); ...; f.commit();
// Destroying it without commit() removes the temporary and leaves `path` as it was.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void commit();  // fsync + close + rename + fsync(dir); throws mf::Error naming the path
  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

// The temporary name AtomicFile uses for `path` in this process.
std::string atomic_temp_path(const std::string& path);
// Whole-buffer conveniences.
void atomic_write_file(const std::string& path, const void* data, size_t n);
void atomic_write_text(const std::string& path, const std::string& text);
// fsync a directory so a rename inside it is durable (also used after renaming checkpoint dirs).
void fsync_dir(const std::string& dir);
// fsync an existing file's data (e.g. an append-only log before a checkpoint that follows it
// becomes visible); a missing file is not an error.
void fsync_file(const std::string& path);
// Directory part of `path` ("." when it has none).
std::string parent_dir(const std::string& path);

}  // namespace mf
