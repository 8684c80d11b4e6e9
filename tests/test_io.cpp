// safetensors reader/writer, atomic files, bf16 conversion and Hugging Face Llama interop.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>

#include <unistd.h>

#include "core/bf16.h"
#include "core/error.h"
#include "core/rng.h"
#include "io/atomic_file.h"
#include "io/hf.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using Catch::Matchers::Contains;

namespace {

using mf::test::TempDir;

// The message of the mf::Error `f` throws ("" when it does not throw).
using mf::test::error_of;

mf::Tensor random_tensor(const mf::Shape& shape, uint64_t seed) {
  mf::Tensor t = mf::host_tensor(shape, mf::DType::F32);
  mf::Rng rng(seed);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = float(rng.normal() * 3.0 + 0.25);
  return t;
}

bool bitwise_equal(const mf::Tensor& a, const mf::Tensor& b) {
  return a.shape == b.shape && std::memcmp(a.ptr, b.ptr, a.nbytes()) == 0;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// u64 LE header length + header text + data, exactly as given.
std::string st_bytes(const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char((uint64_t(header.size()) >> (8 * i)) & 0xff);
  return s + header + data;
}

template <typename T>
std::string le_bytes(std::initializer_list<T> values) {
  std::string s;
  for (T v : values) s.append(reinterpret_cast<const char*>(&v), sizeof v);
  return s;
}

// Reference f32 -> bf16 (round to nearest, ties to even) by comparing the two neighbours in
// double precision; Inf is treated as 2^128 so overflow follows IEEE.
uint16_t ref_bf16(float x) {
  uint32_t u = mf::float_bits(x);
  uint32_t lo = u & 0xffff0000u;
  uint32_t hi = lo + 0x10000u;
  auto value = [](uint32_t bits) {
    if ((bits & 0x7f800000u) == 0x7f800000u)
      return std::ldexp((bits >> 31) ? -1.0 : 1.0, 128);
    return double(mf::bits_float(bits));
  };
  double dx = x, dlo = value(lo), dhi = value(hi);
  double elo = std::fabs(dx - dlo), ehi = std::fabs(dhi - dx);
  if (elo < ehi) return uint16_t(lo >> 16);
  if (ehi < elo) return uint16_t(hi >> 16);
  return ((lo >> 16) & 1u) ? uint16_t(hi >> 16) : uint16_t(lo >> 16);
}

mf::ModelConfig small_llama() {
  mf::ModelConfig m;
  m.vocab_size = 97;
  m.d_model = 48;
  m.n_layers = 2;
  m.n_heads = 6;
  m.n_kv_heads = 2;
  m.d_ff = 72;
  m.max_seq_len = 64;
  m.rope_theta = 500000.0;
  m.norm_eps = 1e-5;
  m.tie_embeddings = false;
  return m;
}

}  // namespace

// ---- bf16 / f16 ----------------------------------------------------------------------------------

TEST_CASE("bf16 conversion rounds to nearest even", "[io][bf16]") {
  using mf::f32_to_bf16;
  const float one = 1.0f;
  // Ties: 1 + 2^-8 lies half-way between 1 (even) and 1 + 2^-7 (odd) -> 1; 1 + 3*2^-8 lies
  // half-way between 1 + 2^-7 (odd) and 1 + 2^-6 (even) -> 1 + 2^-6.
  CHECK(f32_to_bf16(one + std::ldexp(1.0f, -8)) == 0x3f80);
  CHECK(f32_to_bf16(one + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  CHECK(f32_to_bf16(one + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3f81);  // above tie
  CHECK(f32_to_bf16(-(one + std::ldexp(1.0f, -8))) == 0xbf80);
  CHECK(f32_to_bf16(-(one + 3 * std::ldexp(1.0f, -8))) == 0xbf82);
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  CHECK(f32_to_bf16(-2.0f) == 0xc000);
  CHECK(f32_to_bf16(0.0f) == 0x0000);
  CHECK(f32_to_bf16(-0.0f) == 0x8000);
  CHECK(f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(f32_to_bf16(-std::numeric_limits<float>::infinity()) == 0xff80);
  // Largest finite float rounds past bf16's max finite (0x7f7f) to +Inf.
  CHECK(f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
  CHECK(mf::bf16_to_f32(0x7f7f) == mf::bits_float(0x7f7f0000u));
  // NaN stays NaN and keeps its sign, even when the payload sits in the low bits only.
  for (uint32_t nan_bits : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu}) {
    uint16_t h = f32_to_bf16(mf::bits_float(nan_bits));
    CHECK(std::isnan(mf::bf16_to_f32(h)));
    CHECK((h >> 15) == (nan_bits >> 31));
  }
  // Subnormal input.
  CHECK(f32_to_bf16(mf::bits_float(0x00018000u)) == 0x0002);  // tie, odd lower -> up
  CHECK(f32_to_bf16(mf::bits_float(0x00008000u)) == 0x0000);  // tie, even lower -> down

  // Random bit patterns against the double-precision reference.
  mf::Rng rng(2024);
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = rng.next_u32();
    if (i % 4 == 0) bits = (bits & 0xffff0000u) | 0x8000u;  // force exact ties
    float x = mf::bits_float(bits);
    if (std::isnan(x)) continue;
    INFO("bits " << std::hex << bits);
    REQUIRE(f32_to_bf16(x) == ref_bf16(x));
  }
  // Every bf16 value survives widening and narrowing unchanged (NaNs stay NaN).
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = mf::bf16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    REQUIRE(f32_to_bf16(f) == h);
  }
}

TEST_CASE("f16 widening is exact for every half value", "[io][bf16]") {
  CHECK(mf::f16_to_f32(0x3c00) == 1.0f);
  CHECK(mf::f16_to_f32(0xc500) == -5.0f);
  CHECK(mf::f16_to_f32(0x7bff) == 65504.0f);
  CHECK(mf::f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(std::isinf(mf::f16_to_f32(0xfc00)));
  CHECK(std::isnan(mf::f16_to_f32(0x7e00)));
  for (uint32_t h = 0; h < 65536; ++h) {
    uint32_t e = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (e == 0x1f) continue;
    double v = e == 0 ? std::ldexp(double(man), -24) : std::ldexp(1.0 + man / 1024.0, int(e) - 15);
    if (h & 0x8000) v = -v;
    INFO("half bits " << std::hex << h);
    REQUIRE(double(mf::f16_to_f32(uint16_t(h))) == v);
    REQUIRE(std::signbit(mf::f16_to_f32(uint16_t(h))) == bool(h & 0x8000));
  }
}

// ---- safetensors round trips -------------------------------------------------------------------

TEST_CASE("safetensors F32 round trip is bitwise exact", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  std::vector<std::pair<std::string, mf::Tensor>> ts = {
      {"model.layers.0.self_attn.q_proj.weight", random_tensor({7, 33}, 1)},
      {"model.norm.weight", random_tensor({127}, 2)},
      {"a", random_tensor({1}, 3)},
      {"scalar", random_tensor({}, 4)},
      {"empty", random_tensor({0, 5}, 5)},
      {"cube", random_tensor({3, 1, 5}, 6)},
  };
  mf::SafetensorsWriter w;
  for (auto& [n, t] : ts) w.add(n, t, mf::DType::F32);
  w.write(path);

  mf::SafetensorsReader r(path);
  CHECK(r.names().size() == ts.size());
  for (auto& [n, t] : ts) {
    INFO(n);
    REQUIRE(r.contains(n));
    CHECK(r.entry(n).dtype == "F32");
    CHECK(r.entry(n).shape == t.shape);
    mf::Tensor back = r.read_f32(n);
    CHECK(bitwise_equal(back, t));
  }
  // Only the final file remains: the temporary was renamed.
  CHECK(dir.entries() == std::set<std::string>{"model.safetensors"});
}

TEST_CASE("safetensors BF16 storage rounds to nearest even and round-trips bf16 values",
          "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir / "bf16.safetensors";
  mf::Tensor exact = random_tensor({33, 7}, 11);
  for (int64_t i = 0; i < exact.numel(); ++i) exact.f32()[i] = mf::round_to_bf16(exact.f32()[i]);
  mf::Tensor any = random_tensor({5, 13}, 12);  // odd numel: 130 bytes
  any.f32()[0] = 1.0f + std::ldexp(1.0f, -8);   // tie -> 1
  any.f32()[1] = 1.0f + 3 * std::ldexp(1.0f, -8);
  any.f32()[2] = std::numeric_limits<float>::quiet_NaN();
  mf::Tensor f32 = random_tensor({3, 3}, 13);

  mf::SafetensorsWriter w;
  w.add("exact", exact, mf::DType::BF16);
  w.add("any", any, mf::DType::BF16);
  w.add("z_f32", f32, mf::DType::F32);
  w.set_metadata("step", "42");
  w.write(path);

  mf::SafetensorsReader r(path);
  CHECK(r.entry("exact").dtype == "BF16");
  CHECK(r.entry("z_f32").dtype == "F32");
  CHECK(bitwise_equal(r.read_f32("exact"), exact));
  CHECK(bitwise_equal(r.read_f32("z_f32"), f32));
  mf::Tensor back = r.read_f32("any");
  CHECK(back.f32()[0] == 1.0f);
  CHECK(back.f32()[1] == 1.0f + std::ldexp(1.0f, -6));
  CHECK(std::isnan(back.f32()[2]));
  for (int64_t i = 3; i < any.numel(); ++i) {
    INFO(i);
    REQUIRE(mf::float_bits(back.f32()[i]) == mf::float_bits(mf::round_to_bf16(any.f32()[i])));
  }
  // Larger elements first: the F32 tensor sits at offset 0 (aligned) before the BF16 ones,
  // which are in name order.
  CHECK(r.entry("z_f32").begin == 0);
  CHECK(r.entry("any").begin == 36);
  CHECK(r.entry("exact").begin == 36 + 65 * 2);
  // Metadata: ours plus the "format": "pt" that transformers requires.
  CHECK(r.metadata().at("step") == "42");
  CHECK(r.metadata().at("format") == "pt");
  // read_f32_into fills an existing tensor and checks its shape.
  mf::Tensor dst = mf::host_tensor({33, 7});
  r.read_f32_into("exact", dst);
  CHECK(bitwise_equal(dst, exact));
  mf::Tensor wrong = mf::host_tensor({7, 33});
  CHECK_THAT(error_of([&] { r.read_f32_into("exact", wrong); }),
             Contains(path) && Contains("exact") && Contains("[33,7]") && Contains("[7,33]"));
}

TEST_CASE("safetensors header layout: length, padding, sorted JSON", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir / "layout.safetensors";
  mf::SafetensorsWriter w;
  w.add("b", random_tensor({3}, 1));
  w.add("a", random_tensor({2, 2}, 2));
  w.add("c", random_tensor({1}, 3), mf::DType::BF16);
  w.write(path);
  std::string bytes = read_file(path);
  REQUIRE(bytes.size() >= 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[i]);
  CHECK(n % 8 == 0);
  REQUIRE(8 + n <= bytes.size());
  std::string header = bytes.substr(8, n);
  CHECK(header.front() == '{');
  json j = json::parse(header);  // trailing spaces are valid JSON whitespace
  CHECK(j["a"]["data_offsets"] == json::array({0, 16}));
  CHECK(j["b"]["data_offsets"] == json::array({16, 28}));
  CHECK(j["c"]["data_offsets"] == json::array({28, 30}));
  CHECK(j["c"]["dtype"] == "BF16");
  CHECK(j["a"]["shape"] == json::array({2, 2}));
  CHECK(j["__metadata__"]["format"] == "pt");
  CHECK(bytes.size() == 8 + n + 30);
  // Keys appear sorted in the header text.
  CHECK(header.find("\"a\"") < header.find("\"b\""));
  CHECK(header.find("\"b\"") < header.find("\"c\""));
}

TEST_CASE("safetensors reads a hand-built file", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir / "hand.safetensors";
  // Not padded and with the metadata last: readers must not depend on either.
  const std::string header =
      R"({"a.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]},)"
      R"("c":{"dtype":"F16","shape":[2],"data_offsets":[30,34]},)"
      R"("d":{"dtype":"F64","shape":[1],"data_offsets":[40,48]},)"
      R"("ids":{"dtype":"I64","shape":[0],"data_offsets":[34,34]},)"
      R"("__metadata__":{"format":"pt","note":"hand made"}})";
  std::string data = le_bytes<float>({1.5f, -2.0f, 3.25f, 0.0f, -0.125f, 1e-3f}) +
                     le_bytes<uint16_t>({0x3f80, 0xc000, 0x3fc0}) +
                     le_bytes<uint16_t>({0x3c00, 0xc500}) + std::string(6, '\0') +
                     le_bytes<double>({-7.75});
  write_file(path, st_bytes(header, data));

  mf::SafetensorsReader r(path);
  CHECK(r.names() == std::vector<std::string>{"a.weight", "b", "c", "d", "ids"});
  CHECK(r.metadata().at("note") == "hand made");
  mf::Tensor a = r.read_f32("a.weight");
  CHECK(a.shape == mf::Shape{2, 3});
  const float want_a[] = {1.5f, -2.0f, 3.25f, 0.0f, -0.125f, 1e-3f};
  for (int i = 0; i < 6; ++i) CHECK(a.f32()[i] == want_a[i]);
  mf::Tensor b = r.read_f32("b");
  CHECK(b.f32()[0] == 1.0f);
  CHECK(b.f32()[1] == -2.0f);
  CHECK(b.f32()[2] == 1.5f);
  mf::Tensor c = r.read_f32("c");
  CHECK(c.f32()[0] == 1.0f);
  CHECK(c.f32()[1] == -5.0f);
  CHECK(r.read_f32("d").f32()[0] == -7.75f);
  // I64 is a valid safetensors dtype, but not a float.
  CHECK(r.entry("ids").dtype == "I64");
  CHECK_THAT(error_of([&] { r.read_f32("ids"); }),
             Contains(path) && Contains("ids") && Contains("I64"));
  CHECK_THAT(error_of([&] { r.entry("nope"); }), Contains(path) && Contains("nope"));
  // Raw bytes.
  std::string raw(6, '\0');
  r.read_raw("b", &raw[0], 6);
  CHECK(raw == le_bytes<uint16_t>({0x3f80, 0xc000, 0x3fc0}));
}

TEST_CASE("corrupt safetensors files give errors naming the file and tensor",
          "[io][safetensors]") {
  TempDir dir;
  const std::string data24(24, '\x11');
  struct Case {
    const char* what;
    std::string bytes;
    std::vector<std::string> expect;  // substrings of the message (besides the path)
  };
  auto ok_header = [](const std::string& entry) { return "{" + entry + "}"; };
  std::vector<Case> cases = {
      {"file shorter than 8 bytes", std::string("\x05\x00\x00", 3), {"too short"}},
      {"header length larger than file",
       std::string("\xff\x00\x00\x00\x00\x00\x00\x00{}", 10), {"header length 255", "larger"}},
      {"huge header length", std::string("\x00\x00\x00\x00\x00\x00\x00\x80", 8) +
                                 std::string(16, ' '),
       {"larger"}},
      {"invalid JSON", st_bytes("{\"a\": {\"dtype\": ", ""), {"invalid JSON"}},
      {"header not an object", st_bytes("[1,2]", ""), {"not a JSON object"}},
      {"missing dtype", st_bytes(ok_header(R"("w":{"shape":[6],"data_offsets":[0,24]})"), data24),
       {"'w'", "missing \"dtype\""}},
      {"missing shape", st_bytes(ok_header(R"("w":{"dtype":"F32","data_offsets":[0,24]})"), data24),
       {"'w'", "missing \"shape\""}},
      {"missing offsets", st_bytes(ok_header(R"("w":{"dtype":"F32","shape":[6]})"), data24),
       {"'w'", "missing \"data_offsets\""}},
      {"unknown dtype",
       st_bytes(ok_header(R"("w":{"dtype":"F33","shape":[6],"data_offsets":[0,24]})"), data24),
       {"'w'", "unknown dtype 'F33'", "BF16"}},
      {"negative shape",
       st_bytes(ok_header(R"("w":{"dtype":"F32","shape":[-6],"data_offsets":[0,24]})"), data24),
       {"'w'", "non-negative"}},
      {"offsets out of bounds",
       st_bytes(ok_header(R"("w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]})"), data24),
       {"'w'", "past the end", "24 bytes"}},
      {"offsets reversed",
       st_bytes(ok_header(R"("w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]})"), data24),
       {"'w'", "begin > end"}},
      {"bad offsets type",
       st_bytes(ok_header(R"("w":{"dtype":"F32","shape":[6],"data_offsets":[0]})"), data24),
       {"'w'", "data_offsets"}},
      {"size mismatch with shape",
       st_bytes(ok_header(R"("w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,24]})"), data24),
       {"'w'", "[2,3]", "needs 12 bytes", "span 24"}},
      {"overlapping tensors",
       st_bytes(ok_header(R"("w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                          R"("v":{"dtype":"F32","shape":[3],"data_offsets":[8,20]})"),
                data24),
       {"'w'", "'v'", "overlap"}},
      {"duplicate names",
       st_bytes(ok_header(R"("w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                          R"("w":{"dtype":"F32","shape":[3],"data_offsets":[12,24]})"),
                data24),
       {"'w'", "twice"}},
      {"metadata not strings",
       st_bytes(ok_header(R"("__metadata__":{"step":3})"), ""), {"metadata 'step'"}},
  };
  int i = 0;
  for (const auto& c : cases) {
    const std::string path = dir / ("bad" + std::to_string(i++) + ".safetensors");
    write_file(path, c.bytes);
    INFO(c.what);
    std::string msg = error_of([&] { mf::SafetensorsReader r(path); });
    REQUIRE(!msg.empty());
    CHECK_THAT(msg, Contains(path));
    for (const auto& e : c.expect) CHECK_THAT(msg, Contains(e));
  }

  // Truncated data: a valid file that lost its tail.
  const std::string path = dir / "truncated.safetensors";
  mf::SafetensorsWriter w;
  w.add("w1", random_tensor({4, 4}, 7));
  w.add("w2", random_tensor({9}, 8));
  w.write(path);
  CHECK_NOTHROW(mf::SafetensorsReader(path));
  fs::resize_file(path, fs::file_size(path) - 3);
  CHECK_THAT(error_of([&] { mf::SafetensorsReader r(path); }),
             Contains(path) && Contains("'w2'") && Contains("truncated"));
  // Missing file.
  CHECK_THAT(error_of([&] { mf::SafetensorsReader r(dir / "absent.safetensors"); }),
             Contains("absent.safetensors") && Contains("cannot open"));
}

TEST_CASE("safetensors writer rejects bad input", "[io][safetensors]") {
  TempDir dir;
  mf::SafetensorsWriter w;
  w.add("x", random_tensor({2}, 1));
  CHECK_THAT(error_of([&] { w.add("x", random_tensor({2}, 2)); }), Contains("'x' added twice"));
  CHECK_THAT(error_of([&] { w.add("__metadata__", random_tensor({2}, 2)); }),
             Contains("invalid tensor name"));
  mf::Tensor ids = mf::host_tensor({3}, mf::DType::I32);
  CHECK_THAT(error_of([&] { w.add("ids", ids, mf::DType::BF16); }),
             Contains("'ids'") && Contains("i32"));
  w.add("ids", ids, mf::DType::I32);
  const std::string bad = dir / "no_such_dir/out.safetensors";
  CHECK_THAT(error_of([&] { w.write(bad); }), Contains(bad));
  CHECK(!fs::exists(bad));
}

// ---- atomic files --------------------------------------------------------------------------------

TEST_CASE("atomic writes never leave a torn or temporary file", "[io][atomic]") {
  TempDir dir;
  const std::string path = dir / "state.json";
  mf::atomic_write_text(path, "old contents");
  CHECK(read_file(path) == "old contents");
  CHECK(dir.entries() == std::set<std::string>{"state.json"});

  // A writer that dies before commit (exception, crash unwinding) leaves the old file.
  {
    mf::AtomicFile f(path);
    f.write("new but incomplete", 18);
    CHECK(fs::exists(f.temp_path()));
    CHECK(read_file(path) == "old contents");
  }
  CHECK(read_file(path) == "old contents");
  CHECK(dir.entries() == std::set<std::string>{"state.json"});

  // A process killed mid-write leaves only its temp; the real file is untouched and the next
  // atomic write still succeeds.
  write_file(path + ".tmp.99999999", "garbage from a crashed writer");
  CHECK(read_file(path) == "old contents");
  mf::atomic_write_text(path, "new contents");
  CHECK(read_file(path) == "new contents");
  CHECK(dir.entries() == std::set<std::string>{"state.json", "state.json.tmp.99999999"});

  // Safetensors written over an existing file replaces it atomically too.
  const std::string st = dir / "m.safetensors";
  mf::Tensor t1 = random_tensor({4}, 1), t2 = random_tensor({5}, 2);
  {
    mf::SafetensorsWriter w;
    w.add("t", t1);
    w.write(st);
  }
  {
    mf::SafetensorsWriter w;
    w.add("t", t2);
    w.write(st);
  }
  CHECK(bitwise_equal(mf::SafetensorsReader(st).read_f32("t"), t2));
  CHECK(!fs::exists(mf::atomic_temp_path(st)));

  CHECK(mf::parent_dir("a/b/c.txt") == "a/b");
  CHECK(mf::parent_dir("c.txt") == ".");
  CHECK(mf::parent_dir("/c.txt") == "/");
  CHECK_THAT(error_of([&] { mf::atomic_write_text(dir / "missing/x.txt", "x"); }),
             Contains("missing/x.txt"));
}

// ---- Hugging Face --------------------------------------------------------------------------------

TEST_CASE("HF Llama config round trip and mismatch reports", "[io][hf]") {
  const mf::ModelConfig m = small_llama();
  json hf = mf::hf_llama_config(m);
  CHECK(hf["architectures"] == json::array({"LlamaForCausalLM"}));
  CHECK(hf["model_type"] == "llama");
  CHECK(hf["hidden_size"] == 48);
  CHECK(hf["intermediate_size"] == 72);
  CHECK(hf["num_hidden_layers"] == 2);
  CHECK(hf["num_attention_heads"] == 6);
  CHECK(hf["num_key_value_heads"] == 2);
  CHECK(hf["head_dim"] == 8);
  CHECK(hf["vocab_size"] == 97);
  CHECK(hf["max_position_embeddings"] == 64);
  CHECK(hf["rope_theta"] == 500000.0);
  CHECK(hf["tie_word_embeddings"] == false);
  CHECK(hf["hidden_act"] == "silu");
  CHECK(hf["torch_dtype"] == "float32");
  CHECK(hf["attention_bias"] == false);
  CHECK(hf["mlp_bias"] == false);
  CHECK(hf["bos_token_id"].is_null());

  CHECK_NOTHROW(mf::check_hf_config(hf, m, "x/config.json"));
  // Through text, as a file would be.
  CHECK_NOTHROW(mf::check_hf_config(json::parse(hf.dump(2)), m, "x/config.json"));

  // One changed key: named, with both values.
  json bad = hf;
  bad["hidden_size"] = 64;
  CHECK_THAT(error_of([&] { mf::check_hf_config(bad, m, "x/config.json"); }),
             Contains("x/config.json") && Contains("hidden_size is 64") &&
                 Contains("model.d_model is 48"));
  // Several problems are all reported in one message.
  bad["num_key_value_heads"] = 3;
  bad["tie_word_embeddings"] = true;
  bad["rms_norm_eps"] = 1e-6;
  bad["rope_scaling"] = {{"rope_type", "llama3"}};
  bad.erase("vocab_size");
  std::string msg = error_of([&] { mf::check_hf_config(bad, m, "x/config.json"); });
  CHECK_THAT(msg, Contains("hidden_size") && Contains("num_key_value_heads is 3") &&
                      Contains("model.n_kv_heads is 2") && Contains("tie_word_embeddings") &&
                      Contains("rms_norm_eps") && Contains("rope_scaling") &&
                      Contains("vocab_size is missing"));

  // HF defaults for omitted keys: kv heads = heads, theta 10000, eps 1e-6, untied.
  mf::ModelConfig mha = m;
  mha.n_kv_heads = mha.n_heads;
  mha.rope_theta = 10000.0;
  mha.norm_eps = 1e-6;
  json minimal = {{"model_type", "llama"},     {"hidden_size", 48},    {"intermediate_size", 72},
                  {"num_hidden_layers", 2},    {"num_attention_heads", 6},
                  {"vocab_size", 97}};
  CHECK_NOTHROW(mf::check_hf_config(minimal, mha, "min/config.json"));
  CHECK_THAT(error_of([&] { mf::check_hf_config(minimal, m, "min/config.json"); }),
             Contains("num_key_value_heads is 6") && Contains("rope_theta is 10000"));

  // Unsupported features are named.
  json biased = hf;
  biased["attention_bias"] = true;
  biased["hidden_act"] = "gelu";
  CHECK_THAT(error_of([&] { mf::check_hf_config(biased, m, "b/config.json"); }),
             Contains("attention_bias") && Contains("hidden_act"));
  json wrong_type = hf;
  wrong_type["num_hidden_layers"] = "two";
  CHECK_THAT(error_of([&] { mf::check_hf_config(wrong_type, m, "t/config.json"); }),
             Contains("num_hidden_layers should be an integer"));

  // HF -> muonforge mapping inverts hf_llama_config.
  mf::ModelConfig back = mf::model_config_from_hf(hf, "x/config.json");
  CHECK(back.vocab_size == m.vocab_size);
  CHECK(back.d_model == m.d_model);
  CHECK(back.n_layers == m.n_layers);
  CHECK(back.n_heads == m.n_heads);
  CHECK(back.n_kv_heads == m.n_kv_heads);
  CHECK(back.d_ff == m.d_ff);
  CHECK(back.max_seq_len == m.max_seq_len);
  CHECK(back.rope_theta == m.rope_theta);
  CHECK(back.norm_eps == m.norm_eps);
  CHECK(back.tie_embeddings == m.tie_embeddings);
  json odd_hd = hf;
  odd_hd["head_dim"] = 16;
  CHECK_THAT(error_of([&] { mf::model_config_from_hf(odd_hd, "o/config.json"); }),
             Contains("o/config.json") && Contains("head_dim is 16"));

  // MoE models have no Llama config.
  mf::ModelConfig moe = m;
  moe.moe.n_experts = 4;
  CHECK_THAT(error_of([&] { mf::hf_llama_config(moe); }), Contains("model.moe.n_experts"));
}

TEST_CASE("expected HF parameter names and shapes", "[io][hf]") {
  mf::ModelConfig m = small_llama();
  auto names = mf::expected_param_names(m);
  REQUIRE(names.size() == size_t(1 + 9 * m.n_layers + 1 + 1));
  CHECK(names.front() == std::make_pair(std::string("model.embed_tokens.weight"), mf::Shape{97, 48}));
  CHECK(names.back() == std::make_pair(std::string("lm_head.weight"), mf::Shape{97, 48}));
  std::map<std::string, mf::Shape> byname(names.begin(), names.end());
  CHECK(byname.size() == names.size());
  CHECK(byname.at("model.layers.1.input_layernorm.weight") == mf::Shape{48});
  CHECK(byname.at("model.layers.1.self_attn.q_proj.weight") == mf::Shape{48, 48});
  CHECK(byname.at("model.layers.1.self_attn.k_proj.weight") == mf::Shape{16, 48});
  CHECK(byname.at("model.layers.1.self_attn.v_proj.weight") == mf::Shape{16, 48});
  CHECK(byname.at("model.layers.1.self_attn.o_proj.weight") == mf::Shape{48, 48});
  CHECK(byname.at("model.layers.0.post_attention_layernorm.weight") == mf::Shape{48});
  CHECK(byname.at("model.layers.0.mlp.gate_proj.weight") == mf::Shape{72, 48});
  CHECK(byname.at("model.layers.0.mlp.up_proj.weight") == mf::Shape{72, 48});
  CHECK(byname.at("model.layers.0.mlp.down_proj.weight") == mf::Shape{48, 72});
  CHECK(byname.at("model.norm.weight") == mf::Shape{48});
  m.tie_embeddings = true;
  auto tied = mf::expected_param_names(m);
  CHECK(tied.size() == names.size() - 1);
  for (const auto& [n, s] : tied) CHECK(n != "lm_head.weight");
}

TEST_CASE("HF model directories: single file, sharded index, errors", "[io][hf]") {
  TempDir dir;
  const mf::ModelConfig m = small_llama();
  const auto params = mf::expected_param_names(m);
  std::map<std::string, mf::Tensor> values;
  uint64_t seed = 100;
  for (const auto& [n, s] : params) values[n] = random_tensor(s, seed++);

  // Missing directory, missing config, missing weights.
  CHECK_THAT(error_of([&] { mf::hf_model_files(dir / "nope"); }),
             Contains("nope") && Contains("does not exist"));
  const std::string d1 = dir / "single";
  fs::create_directories(d1);
  CHECK_THAT(error_of([&] { mf::hf_model_files(d1); }), Contains(d1) && Contains("config.json"));
  CHECK_THAT(error_of([&] { mf::read_hf_config(d1); }), Contains(d1) && Contains("config.json"));
  mf::atomic_write_text(d1 + "/config.json", mf::hf_llama_config(m).dump(2));
  CHECK_THAT(error_of([&] { mf::hf_model_files(d1); }),
             Contains(d1) && Contains("model.safetensors"));
  write_file(d1 + "/pytorch_model.bin", "not read");
  CHECK_THAT(error_of([&] { mf::hf_model_files(d1); }), Contains("safe_serialization"));

  // Single file, lm_head stored in bf16.
  {
    mf::SafetensorsWriter w;
    for (const auto& [n, t] : values)
      w.add(n, t, n == "lm_head.weight" ? mf::DType::BF16 : mf::DType::F32);
    w.write(d1 + "/model.safetensors");
  }
  CHECK(mf::hf_model_files(d1) == std::vector<std::string>{d1 + "/model.safetensors"});
  CHECK_NOTHROW(mf::check_hf_config(mf::read_hf_config(d1), m, d1 + "/config.json"));
  {
    mf::HfWeights hw(d1);
    CHECK(hw.names().size() == params.size());
    for (const auto& [n, s] : params) {
      INFO(n);
      mf::Tensor t = hw.read_f32(n, s);
      if (n == "lm_head.weight") {
        for (int64_t i = 0; i < t.numel(); ++i)
          REQUIRE(t.f32()[i] == mf::round_to_bf16(values[n].f32()[i]));
      } else {
        REQUIRE(bitwise_equal(t, values[n]));
      }
    }
    // Shape mismatch names tensor, both shapes and the file.
    CHECK_THAT(error_of([&] { hw.read_f32("model.layers.1.self_attn.k_proj.weight", {48, 48}); }),
               Contains("model.layers.1.self_attn.k_proj.weight") &&
                   Contains("expected shape [48,48]") && Contains("found [16,48]") &&
                   Contains(d1 + "/model.safetensors"));
    CHECK_THAT(error_of([&] { hw.read_f32("model.layers.9.mlp.up_proj.weight", {72, 48}); }),
               Contains("model.layers.9.mlp.up_proj.weight") && Contains("not found") &&
                   Contains(d1));
  }

  // Sharded: layer 0 and the embedding in shard 1, the rest in shard 2.
  const std::string d2 = dir / "sharded";
  fs::create_directories(d2);
  mf::atomic_write_text(d2 + "/config.json", mf::hf_llama_config(m).dump(2));
  const std::string s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors";
  json weight_map = json::object();
  {
    mf::SafetensorsWriter w1, w2;
    for (const auto& [n, t] : values) {
      bool first = n == "model.embed_tokens.weight" || n.rfind("model.layers.0.", 0) == 0;
      (first ? w1 : w2).add(n, t);
      weight_map[n] = first ? s1 : s2;
    }
    w1.write(d2 + "/" + s1);
    w2.write(d2 + "/" + s2);
  }
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  mf::atomic_write_text(d2 + "/model.safetensors.index.json", index.dump(2));
  CHECK(mf::hf_model_files(d2) == std::vector<std::string>{d2 + "/" + s1, d2 + "/" + s2});
  {
    mf::HfWeights hw(d2);
    CHECK(hw.names().size() == params.size());
    CHECK(hw.file_of("model.embed_tokens.weight") == d2 + "/" + s1);
    CHECK(hw.file_of("model.norm.weight") == d2 + "/" + s2);
    CHECK(hw.shape_of("model.layers.1.mlp.down_proj.weight") == mf::Shape{48, 72});
    for (const auto& [n, s] : params) {
      INFO(n);
      mf::Tensor dst = mf::host_tensor(s);
      hw.read_f32_into(n, dst);
      REQUIRE(bitwise_equal(dst, values[n]));
    }
    CHECK_THAT(error_of([&] { hw.read_f32("model.norm.weight", {47}); }),
               Contains("model.norm.weight") && Contains("[47]") && Contains("[48]") &&
                   Contains(s2));
  }
  // An index that disagrees with the shards.
  json lying = index;
  lying["weight_map"]["model.norm.weight"] = s1;
  mf::atomic_write_text(d2 + "/model.safetensors.index.json", lying.dump());
  CHECK_THAT(error_of([&] { mf::HfWeights hw(d2); }),
             Contains("model.norm.weight") && Contains(s1) && Contains(s2));
  // A shard listed in the index but absent.
  json missing = index;
  missing["weight_map"]["extra.weight"] = "model-00003-of-00002.safetensors";
  mf::atomic_write_text(d2 + "/model.safetensors.index.json", missing.dump());
  CHECK_THAT(error_of([&] { mf::hf_model_files(d2); }),
             Contains("model-00003-of-00002.safetensors") && Contains("missing"));
  // A broken index.
  write_file(d2 + "/model.safetensors.index.json", "{\"weight_map\": ");
  CHECK_THAT(error_of([&] { mf::hf_model_files(d2); }),
             Contains("model.safetensors.index.json") && Contains("invalid JSON"));
  write_file(d2 + "/model.safetensors.index.json", "{\"metadata\": {}}");
  CHECK_THAT(error_of([&] { mf::hf_model_files(d2); }), Contains("weight_map"));

  // The same tensor in two explicit files.
  CHECK_THAT(error_of([&] { mf::HfWeights hw(std::vector<std::string>{
                                d1 + "/model.safetensors", d2 + "/" + s2}); }),
             Contains("appears in both"));
}

TEST_CASE("JSON files: the strict reader names the file, the lenient one never throws", "[io][json]") {
  TempDir d("json");
  auto put = [&](const std::string& name, const std::string& text) {
    std::ofstream(d / name) << text;
    return d / name;
  };
  const std::string good = put("good.json", "{\"a\": [1, 2], \"b\": \"x\"}\n");
  const std::string bad = put("bad.json", "{\"a\": [1, 2\n");
  const std::string commented = put("commented.json", "// a note\n{\"a\": 1 /* one */}\n");
  const std::string missing = d / "missing.json";

  CHECK(mf::read_json_file(good, "state").at("a").size() == 2);
  const std::string e_bad = error_of([&] { mf::read_json_file(bad, "checkpoint state"); });
  CHECK_THAT(e_bad, Contains("invalid JSON in checkpoint state '" + bad + "'"));
  CHECK_THAT(e_bad, Contains("line 2"));                   // where the parser stopped
  CHECK_THAT(e_bad, !Contains("json.exception"));          // nlohmann's prefix is dropped
  CHECK_THAT(error_of([&] { mf::read_json_file(missing); }),
             Contains("cannot open file '" + missing + "'"));
  CHECK_THAT(error_of([&] { mf::read_json_file(d.path.string(), "index"); }),
             Contains("is a directory"));
  CHECK_THAT(error_of([&] { mf::read_json_file(commented); }), Contains("invalid JSON"));

  CHECK(mf::peek_json_file(good).at("b") == "x");
  CHECK(mf::peek_json_file(bad).is_discarded());
  CHECK(mf::peek_json_file(missing).is_discarded());
  CHECK(mf::peek_json_file(d.path.string()).is_discarded());
  CHECK(mf::peek_json_file(commented).is_discarded());
  CHECK(mf::peek_json_file(commented, /*comments=*/true).at("a") == 1);
}
