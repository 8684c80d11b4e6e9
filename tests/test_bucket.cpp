// Bucketed gradient all-reduce: the bucket planner (sizes, order, every tensor once, oversized
// tensors alone), the model's gradient arena and grad-ready hook (groups in backward order, each
// group's gradients final when its hook runs, only on the last micro-batch), and Gloo's
// asynchronous all-reduce over 3 ranks as threads (exact sums, in-order completion, blocking
// collectives after pending async ones). Training equivalence with many buckets, overlap on and
// off, is in test_train_dist.cpp.
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "config/config.h"
#include "core/error.h"
#include "core/rng.h"
#include "dist/buckets.h"
#include "dist/communicator.h"
#include "dist/store.h"
#include "model/llama.h"
#include "test_util.h"
#ifdef MF_HAS_GLOO
#include "dist/gloo_comm.h"
#endif

using namespace mf;
using Catch::Matchers::Contains;
using ms = std::chrono::milliseconds;

namespace {

using mf::test::error_of;

constexpr double kMiB = 1024.0 * 1024.0;

// Slots packed back to back with 64-float alignment, groups as given.
std::vector<GradSlot> slots_of(const std::vector<int64_t>& numels, const std::vector<int>& groups) {
  std::vector<GradSlot> out;
  int64_t at = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    out.push_back({at, numels[i], groups[i]});
    at += (numels[i] + 63) / 64 * 64;
  }
  return out;
}

void check_cover(const std::vector<GradBucket>& b, const std::vector<GradSlot>& s) {
  REQUIRE(!b.empty());
  CHECK(b.front().first == 0);
  CHECK(b.back().last == s.size());
  for (size_t k = 0; k < b.size(); ++k) {
    INFO("bucket " << k);
    REQUIRE(b[k].first < b[k].last);  // never empty
    if (k > 0) CHECK(b[k].first == b[k - 1].last);  // contiguous: every slot exactly once, in order
    const GradSlot& a = s[b[k].first];
    const GradSlot& z = s[b[k].last - 1];
    CHECK(b[k].offset == a.offset);
    CHECK(b[k].numel == z.offset + z.numel - a.offset);
    CHECK(b[k].ready_group == z.group);
  }
}

}  // namespace

TEST_CASE("bucket planner: sizes, order, every tensor once, oversized tensors alone", "[bucket]") {
  // Sizes in floats; cap = 1000 floats.
  const double cap_mb = 1000 * 4 / kMiB;
  const std::vector<int64_t> n = {300, 500, 250, 2500, 10, 990, 20, 999, 1, 1000, 64};
  const std::vector<int> g = {0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 5};
  auto s = slots_of(n, g);
  auto b = plan_grad_buckets(s, cap_mb);
  check_cover(b, s);
  // 300+500 (+250 would overflow) | 250 | 2500 alone | 10+990 (full) | 20 | 999+1 (full) |
  // 1000 (exactly full) | 64
  std::vector<std::pair<size_t, size_t>> want = {{0, 2}, {2, 3},  {3, 4},  {4, 6},
                                                 {6, 7}, {7, 9}, {9, 10}, {10, 11}};
  REQUIRE(b.size() == want.size());
  for (size_t k = 0; k < b.size(); ++k) {
    INFO("bucket " << k);
    CHECK(b[k].first == want[k].first);
    CHECK(b[k].last == want[k].second);
  }
  CHECK(b[1].ready_group == 1);
  CHECK(b[3].ready_group == 2);
  CHECK(b[5].ready_group == 3);
  // Padding between slots is inside the bucket range: 300 -> offset 320, + 500.
  CHECK(b[0].numel == 320 + 500);
  for (auto& x : b) {
    int64_t elems = 0;
    for (size_t i = x.first; i < x.last; ++i) elems += s[i].numel;
    CHECK((elems <= 1000 || x.last - x.first == 1));  // over the cap only when alone
  }

  SECTION("0 MiB: one tensor per bucket") {
    auto one = plan_grad_buckets(s, 0);
    check_cover(one, s);
    CHECK(one.size() == s.size());
  }
  SECTION("a cap larger than everything: one bucket") {
    auto all = plan_grad_buckets(s, 1.0);
    check_cover(all, s);
    CHECK(all.size() == 1);
    CHECK(all[0].ready_group == 5);
  }
  SECTION("random sizes keep the invariants") {
    Rng rng(77);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<int64_t> rn;
      std::vector<int> rg;
      int grp = 0;
      for (int i = 0, k = 1 + int(rng.below(40)); i < k; ++i) {
        rn.push_back(1 + int64_t(rng.below(3000)));
        grp += int(rng.below(2));
        rg.push_back(grp);
      }
      auto rs = slots_of(rn, rg);
      const double mb = (1 + rng.below(2000)) * 4 / kMiB;
      auto rb = plan_grad_buckets(rs, mb);
      check_cover(rb, rs);
      for (size_t k = 0; k + 1 < rb.size(); ++k) {
        int64_t elems = 0;
        for (size_t i = rb[k].first; i < rb[k].last; ++i) elems += rs[i].numel;
        // Closed early only because the next slot did not fit.
        CHECK((double(elems + rs[rb[k].last].numel) > mb * kMiB / 4 || elems >= mb * kMiB / 4));
      }
    }
  }
  SECTION("a bucket never mixes reduce-scattered (ZeRO-1) and all-reduced tensors") {
    auto z = s;
    // sharded: 300 500 | 250 2500 plain | 10 990 20 sharded | rest plain
    const std::vector<bool> sh = {true, true, false, false, true, true, true,
                                  false, false, false, false};
    for (size_t i = 0; i < z.size(); ++i) z[i].sharded = sh[i];
    auto zb = plan_grad_buckets(z, 1.0);  // no size cap: only the kind splits
    check_cover(zb, z);
    std::vector<std::pair<size_t, size_t>> want_z = {{0, 2}, {2, 4}, {4, 7}, {7, 11}};
    REQUIRE(zb.size() == want_z.size());
    for (size_t k = 0; k < zb.size(); ++k) {
      INFO("bucket " << k);
      CHECK(zb[k].first == want_z[k].first);
      CHECK(zb[k].last == want_z[k].second);
      CHECK(zb[k].sharded == sh[zb[k].first]);
      for (size_t i = zb[k].first; i < zb[k].last; ++i) CHECK(z[i].sharded == zb[k].sharded);
    }
    // With the cap as well: the same cuts as before plus the kind changes.
    auto zc = plan_grad_buckets(z, cap_mb);
    check_cover(zc, z);
    for (auto& x : zc)
      for (size_t i = x.first; i < x.last; ++i) CHECK(z[i].sharded == x.sharded);
  }
  SECTION("bad inputs name the problem") {
    CHECK_THAT(error_of([&] { plan_grad_buckets(s, -1); }), Contains("train.bucket_mb"));
    auto bad = s;
    std::swap(bad[1], bad[2]);
    CHECK_THAT(error_of([&] { plan_grad_buckets(bad, 1); }), Contains("arena order"));
    auto bad_g = s;
    bad_g[5].group = 0;
    CHECK_THAT(error_of([&] { plan_grad_buckets(bad_g, 1); }), Contains("order gradients finish"));
    CHECK(plan_grad_buckets({}, 1).empty());
  }
}

TEST_CASE("config: train.bucket_mb and train.overlap_comm", "[bucket][config]") {
  Config d = config_from_json(nlohmann::json::object(), "mem.json");
  CHECK(d.train.bucket_mb == 25.0);
  CHECK(d.train.overlap_comm == true);
  Config c = config_from_json(nlohmann::json::parse(R"({"train": {"bucket_mb": 0.5, "overlap_comm": false}})"),
                              "mem.json");
  CHECK(c.train.bucket_mb == 0.5);
  CHECK(c.train.overlap_comm == false);
  CHECK(config_to_json(c)["train"]["bucket_mb"] == 0.5);
  CHECK(config_from_json(nlohmann::json::parse(R"({"train": {"bucket_mb": 0}})"), "m.json").train.bucket_mb == 0);
  for (const char* bad : {R"({"train": {"bucket_mb": -1}})", R"({"train": {"bucket_mb": 1e9}})"}) {
    INFO(bad);
    const std::string e = error_of([&] { config_from_json(nlohmann::json::parse(bad), "mem.json"); });
    CHECK_THAT(e, Contains("train.bucket_mb"));
    CHECK_THAT(e, Contains("mem.json"));
  }
  CHECK_THAT(error_of([&] {
               config_from_json(nlohmann::json::parse(R"({"train": {"overlap_comm": 1}})"), "mem.json");
             }),
             Contains("train.overlap_comm"));
}

TEST_CASE("config: train.loss_chunk_mb reaches the backend", "[config]") {
  Config d = config_from_json(nlohmann::json::object(), "mem.json");
  CHECK(d.train.loss_chunk_mb == 1024.0);
  Config c = config_from_json(nlohmann::json::parse(R"({"train": {"loss_chunk_mb": 64}})"), "mem.json");
  CHECK(c.train.loss_chunk_mb == 64.0);
  CHECK(config_to_json(c)["train"]["loss_chunk_mb"] == 64.0);
  for (const char* bad : {R"({"train": {"loss_chunk_mb": 0}})", R"({"train": {"loss_chunk_mb": 0.5}})",
                          R"({"train": {"loss_chunk_mb": 2e6}})", R"({"train": {"loss_chunk_mb": "big"}})"}) {
    INFO(bad);
    const std::string e = error_of([&] { config_from_json(nlohmann::json::parse(bad), "mem.json"); });
    CHECK_THAT(e, Contains("train.loss_chunk_mb"));
    CHECK_THAT(e, Contains("mem.json"));
  }
  // The backend keeps the byte count the memory plan reads; a non-positive size is refused.
  CpuBackend be;
  CHECK(be.loss_chunk_bytes() == size_t(1) << 30);
  be.set_loss_chunk_mb(c.train.loss_chunk_mb);
  CHECK(be.loss_chunk_bytes() == size_t(64) << 20);
  CHECK_THAT(error_of([&] { be.set_loss_chunk_mb(0); }), Contains("train.loss_chunk_mb"));
  CHECK_THAT(error_of([&] { be.set_loss_chunk_mb(std::nan("")); }), Contains("train.loss_chunk_mb"));
}

namespace {

ModelConfig tiny_model(bool moe, bool tied) {
  ModelConfig m;
  m.vocab_size = 48;
  m.d_model = 24;
  m.n_layers = 3;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.d_ff = 40;
  m.max_seq_len = 16;
  m.init_std = 0.1;
  m.tie_embeddings = tied;
  if (moe) {
    m.moe.n_experts = 5;
    m.moe.top_k = 2;
    m.moe.n_shared = 1;
    m.moe.d_expert = 12;
    m.moe.first_dense = 1;
  }
  return m;
}

std::vector<float> host_copy(const Tensor& t) {
  return std::vector<float>(t.f32(), t.f32() + t.numel());
}

}  // namespace

TEST_CASE("model gradient arena and grad-ready hook", "[bucket][model]") {
  for (bool moe : {false, true})
    for (bool tied : {false, true}) {
      DYNAMIC_SECTION((moe ? "moe" : "dense") << (tied ? " tied" : " untied")) {
        CpuBackend be;
        const int B = 2, T = 8;
        const ModelConfig cfg = tiny_model(moe, tied);
        LlamaModel model(cfg, be, B, T);
        model.init_weights(3);
        auto groups = model.grad_groups();
        REQUIRE(groups.size() == size_t(cfg.n_layers + 2));
        // Every parameter exactly once; arena offsets increase in group order, 64-float aligned.
        const Tensor arena = model.grad_arena();
        std::set<const Param*> seen;
        int64_t prev_end = 0;
        for (auto& g : groups)
          for (Param* p : g) {
            INFO(p->name);
            CHECK(seen.insert(p).second);
            const int64_t off = p->grad.f32() - arena.f32();
            CHECK(off % 64 == 0);
            CHECK(off >= prev_end);
            prev_end = off + p->numel();
            CHECK(prev_end <= arena.numel());
            CHECK(p->grad.shape == p->shape);
          }
        CHECK(seen.size() == model.params().size());
        // Group 0: the final norm (+ untied head); then layers from the last; the embedding last.
        CHECK(groups[0][0]->name == "model.norm.weight");
        CHECK(groups[0].size() == (tied ? 1u : 2u));
        CHECK(groups.back().size() == 1u);
        CHECK(groups.back()[0]->name == "model.embed_tokens.weight");
        for (int i = 0; i < cfg.n_layers; ++i)
          for (Param* p : groups[size_t(1 + i)]) {
            INFO(p->name);
            CHECK(p->name.rfind("model.layers." + std::to_string(cfg.n_layers - 1 - i) + ".", 0) == 0);
          }

        // Two micro-batches: the hook runs only in the last, once per group in order, and each
        // group's gradients are already final when it runs.
        Rng rng(11);
        std::vector<int32_t> in(B * T), tg(B * T), in2(B * T), tg2(B * T);
        for (auto* v : {&in, &tg, &in2, &tg2})
          for (auto& x : *v) x = int32_t(rng.below(uint64_t(cfg.vocab_size)));
        std::vector<int> calls;
        std::map<const Param*, std::vector<float>> at_hook;
        model.set_grad_ready_hook([&](int g) {
          calls.push_back(g);
          for (Param* p : groups[size_t(g)]) at_hook[p] = host_copy(p->grad);
        });
        model.zero_grads();
        model.forward_backward(in.data(), tg.data(), 0.5f / (B * T), /*grads_final=*/false);
        CHECK(calls.empty());
        model.forward_backward(in2.data(), tg2.data(), 0.5f / (B * T), /*grads_final=*/true);
        REQUIRE(calls.size() == groups.size());
        for (size_t g = 0; g < calls.size(); ++g) CHECK(calls[g] == int(g));
        double nonzero = 0;
        for (Param* p : model.params()) {
          INFO(p->name);
          REQUIRE(at_hook.count(p));
          CHECK(at_hook[p] == host_copy(p->grad));  // bitwise: nothing changed after the hook
          for (float x : at_hook[p]) nonzero += x != 0;
        }
        CHECK(nonzero > 0);
        // zero_grads clears the whole arena (padding included).
        model.zero_grads();
        for (float x : host_copy(arena)) REQUIRE(x == 0.0f);
      }
    }
}

#ifdef MF_HAS_GLOO
namespace {

// Runs f(rank, comm) on n threads, each with its own store client and Gloo communicator.
std::vector<std::string> with_gloo(int n, const std::function<void(int, Communicator&)>& f,
                                   ms timeout = ms(10000)) {
  TcpStore server("127.0.0.1", 0, true, timeout);
  std::vector<std::string> err(static_cast<size_t>(n));
  std::vector<std::thread> th;
  for (int r = 0; r < n; ++r)
    th.emplace_back([&, r] {
      try {
        TcpStore store("127.0.0.1", server.port(), false, timeout);
        auto comm = make_gloo_communicator(r, n, store, "127.0.0.1", timeout);
        f(r, *comm);
        comm->barrier();
      } catch (const std::exception& e) {
        err[size_t(r)] = e.what();
      }
    });
  for (auto& t : th) t.join();
  return err;
}

std::vector<float> ints(int rank, size_t n, uint64_t salt) {  // integer-valued: exact sums
  Rng rng(4321 + salt * 7 + uint64_t(rank));
  std::vector<float> v(n);
  for (auto& x : v) x = float(int64_t(rng.below(2001)) - 1000);
  return v;
}

// What allreduce_avg gives: the exact integer sum, then times 1/size in float.
std::vector<float> want_avg(int n, size_t len, uint64_t salt) {
  std::vector<float> s(len, 0.0f);
  for (int r = 0; r < n; ++r) {
    auto x = ints(r, len, salt);
    for (size_t i = 0; i < len; ++i) s[i] += x[i];
  }
  for (auto& x : s) x *= 1.0f / float(n);
  return s;
}

}  // namespace

TEST_CASE("gloo: asynchronous all-reduce over 3 ranks", "[bucket][gloo]") {
  const int n = 3;
  // Awkward sizes, one empty, one large enough to take a while.
  const std::vector<size_t> sizes = {1037, 1, 0, 64, 200003, 5, 4099, 33};
  std::vector<std::vector<std::vector<float>>> bufs(n), sync(n);
  std::vector<std::vector<float>> after_blocking(n), ref_blocking(n);
  auto errs = with_gloo(n, [&](int r, Communicator& c) {
    auto& mine = bufs[size_t(r)];
    for (size_t k = 0; k < sizes.size(); ++k) mine.push_back(ints(r, sizes[k], k));
    std::vector<std::unique_ptr<CommWork>> works;
    for (size_t k = 0; k < sizes.size(); ++k)
      works.push_back(c.allreduce_avg_async(mine[k].data(), sizes[k]));
    // In-order completion: once the last work is done, every earlier one is too.
    works.back()->wait();
    sync[size_t(r)] = mine;  // snapshot before waiting on the others
    for (auto& w : works) w->wait();
    works.back()->wait();  // a second wait is a no-op

    // A blocking collective issued while async work is pending runs after it: sum(avg(x)).
    after_blocking[size_t(r)] = ints(r, 777, 100);
    ref_blocking[size_t(r)] = after_blocking[size_t(r)];
    auto w = c.allreduce_avg_async(after_blocking[size_t(r)].data(), 777);
    c.allreduce_sum(after_blocking[size_t(r)].data(), 777);
    w->wait();
    // A work dropped without wait() still completes before its buffer goes away.
    std::vector<float> dropped = ints(r, 5000, 200);
    c.allreduce_avg_async(dropped.data(), dropped.size()).reset();
    MF_CHECK(dropped == want_avg(n, 5000, 200), "dropped work did not complete");
  });
  for (int r = 0; r < n; ++r) {
    INFO("rank " << r << ": " << errs[size_t(r)]);
    REQUIRE(errs[size_t(r)].empty());
  }
  for (size_t k = 0; k < sizes.size(); ++k) {
    INFO("buffer " << k << " of " << sizes[k] << " floats");
    const auto want = want_avg(n, sizes[k], k);
    for (int r = 0; r < n; ++r) {
      CHECK(bufs[size_t(r)][k] == want);  // exact, and the same bits on every rank
      CHECK(sync[size_t(r)][k] == want);
    }
  }
  // sum over ranks of the (identical) averages: 3 * avg, rounded once per add.
  const auto avg = want_avg(n, 777, 100);
  for (int r = 0; r < n; ++r) {
    REQUIRE(after_blocking[size_t(r)].size() == 777u);
    for (size_t i = 0; i < 777; ++i) {
      const float w3 = (avg[i] + avg[i]) + avg[i];
      REQUIRE(after_blocking[size_t(r)][i] == w3);
    }
    CHECK(after_blocking[size_t(r)] != ref_blocking[size_t(r)]);
  }
}

TEST_CASE("gloo: a failed asynchronous all-reduce reports the rank, later ones fail fast",
          "[bucket][gloo]") {
  // Rank 1 leaves before the collective; rank 0's async all-reduce times out and says so.
  const auto timeout = ms(1500);
  TcpStore server("127.0.0.1", 0, true, ms(10000));
  std::string err0, err_later;
  double later_s = 1e9;
  std::thread t1([&] {
    TcpStore store("127.0.0.1", server.port(), false, ms(10000));
    auto comm = make_gloo_communicator(1, 2, store, "127.0.0.1", timeout);
    comm->barrier();
  });
  {
    TcpStore store("127.0.0.1", server.port(), false, ms(10000));
    auto comm = make_gloo_communicator(0, 2, store, "127.0.0.1", timeout);
    comm->barrier();
    t1.join();  // rank 1 is gone
    std::vector<float> a(100, 1.0f), b(100, 2.0f);
    auto wa = comm->allreduce_avg_async(a.data(), a.size());
    auto wb = comm->allreduce_avg_async(b.data(), b.size());
    err0 = error_of([&] { wa->wait(); });
    auto t0 = std::chrono::steady_clock::now();
    err_later = error_of([&] { wb->wait(); });
    later_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  CHECK_THAT(err0, Contains("rank 0 of 2"));
  CHECK_THAT(err_later, Contains("earlier asynchronous collective failed"));
  CHECK(later_s < 1.0);
}
#endif
