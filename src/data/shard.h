// Token shards in the llm.c format, plus the glob expansion used to find them.
//
// File layout (all little-endian):
//   header: 256 x int32
//     [0] magic    20240520 -> version 1, tokens are uint16 (vocabularies up to 65536 ids)
//                  20240801 -> version 7, tokens are uint32
//     [1] version  1 or 7 (must match the magic)
//     [2] count    number of tokens that follow (>= 0, fits int32)
//     [3..255]     zero (ignored when reading)
//   body: count tokens of 2 or 4 bytes each; the file size is exactly 1024 + count * width.
//
// Anything else (missing file, empty file, short header, unknown magic or version, a body that
// is truncated, has trailing bytes or an odd byte count, a token id >= vocab_size when a vocab
// size is given) is an mf::Error that names the file and what is wrong with it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mf {

constexpr int kShardHeaderInts = 256;
constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);  // 1024
constexpr int32_t kShardMagicU16 = 20240520;
constexpr int32_t kShardVersionU16 = 1;
constexpr int32_t kShardMagicU32 = 20240801;
constexpr int32_t kShardVersionU32 = 7;

// The validated header of one shard file.
struct ShardInfo {
  std::string path;
  int32_t magic = 0;
  int32_t version = 0;
  int token_bytes = 0;  // 2 (v1) or 4 (v7)
  int64_t count = 0;    // number of tokens
  int64_t file_bytes = 0;
};

// Reads and validates the header and the file size (does not touch the tokens).
ShardInfo read_shard_info(const std::string& path);

// A read-only, memory-mapped shard. Move-only; the mapping lives as long as the object.
class TokenShard {
 public:
  TokenShard() = default;
  // Opens and validates `path`. With vocab_size > 0 every token id is checked to be < vocab_size
  // (the error names the file, the token position and the id).
  explicit TokenShard(const std::string& path, int64_t vocab_size = 0);
  ~TokenShard();
  TokenShard(TokenShard&& o) noexcept;
  TokenShard& operator=(TokenShard&& o) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const ShardInfo& info() const { return info_; }
  const std::string& path() const { return info_.path; }
  int64_t size() const { return info_.count; }
  int token_bytes() const { return info_.token_bytes; }

  // Token i (0 <= i < size()), widened to uint32.
  uint32_t operator[](int64_t i) const {
    return info_.token_bytes == 2 ? uint32_t(reinterpret_cast<const uint16_t*>(body_)[i])
                                  : reinterpret_cast<const uint32_t*>(body_)[i];
  }
  // Copies tokens [begin, begin + n) into out (as int32; ids are < 2^31 in practice, checked).
  void copy(int64_t begin, int64_t n, int32_t* out) const;
  // Throws unless every id < vocab_size (names file, position, id). Cheap to call twice: the
  // largest vocab already verified is remembered. `fixed_by` names what fixes the vocabulary
  // when it cannot change (eval of a checkpoint); empty: the error suggests model.vocab_size.
  void check_vocab(int64_t vocab_size, const std::string& fixed_by = "");
  // All tokens as uint32 (copies).
  std::vector<uint32_t> to_vector() const;

 private:
  void release();
  ShardInfo info_;
  void* map_ = nullptr;       // mmap base (whole file)
  size_t map_bytes_ = 0;
  const unsigned char* body_ = nullptr;  // first token
  int64_t checked_vocab_ = 0;            // 0: not checked
};

// Writes `n` tokens to `path` atomically (temp file in the same folder, fsync, rename).
// token_bytes = 2 writes magic 20240520 / version 1 (every id must be < 65536), 4 writes magic
// 20240801 / version 7. Creates no folders: the parent must exist.
void write_shard(const std::string& path, const uint32_t* tokens, int64_t n, int token_bytes);
inline void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                        int token_bytes) {
  write_shard(path, tokens.data(), int64_t(tokens.size()), token_bytes);
}

// Expands a glob pattern (glob(3): *, ?, [..]) to the sorted list of regular files it matches.
// A pattern without wildcards must name an existing file. `what` labels the error, e.g.
// "data.train: glob 'x/train_*.bin' matched no files".
std::vector<std::string> expand_glob(const std::string& pattern, const std::string& what);
// Several patterns (each must match something); results concatenated in the order given, each
// pattern's matches sorted, duplicates removed (first occurrence kept).
std::vector<std::string> expand_globs(const std::vector<std::string>& patterns,
                                      const std::string& what);

}  // namespace mf
