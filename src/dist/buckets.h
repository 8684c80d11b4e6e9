// Gradient buckets for data-parallel training: the gradients, in the order backward finishes
// them, packed into contiguous ranges of one flat gradient arena, each all-reduced as one
// collective (as soon as its last tensor is final when communication overlaps backward).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mf {

// One gradient tensor in the arena, listed in the order its gradient becomes final.
struct GradSlot {
  int64_t offset = 0;  // first float in the arena
  int64_t numel = 0;
  int group = 0;       // index of the backward stage that finishes it (non-decreasing)
  bool sharded = false;  // ZeRO-1: reduce-scattered (its optimizer update is split over ranks)
};

struct GradBucket {
  size_t first = 0, last = 0;  // slots [first, last)
  int64_t offset = 0;          // arena range [offset, offset + numel): the slots and the padding
  int64_t numel = 0;           // between them
  int ready_group = 0;         // the bucket may start once this group is final
  bool sharded = false;        // its slots' `sharded` (a bucket never mixes the two kinds)
};

// Packs the slots, in order, into buckets of at most `bucket_mb` MiB of f32 (counting the slots'
// elements): a bucket closes before a slot that would overflow it, so a slot larger than the cap
// gets a bucket of its own, and a bucket also closes where `sharded` changes. bucket_mb = 0: one slot per bucket. Every slot lands in exactly one
// bucket. Slots must be listed in increasing, non-overlapping offsets and non-decreasing groups;
// otherwise an mf::Error names the slot (`what` labels the source in messages).
std::vector<GradBucket> plan_grad_buckets(const std::vector<GradSlot>& slots, double bucket_mb,
                                          const std::string& what = "gradient");

// The distributed matrix optimizer's ownership: the items (sizes, listed in arena order) split
// into `world` contiguous runs of balanced total size. Returns each item's rank, non-decreasing
// from 0; rank r's run ends at the item boundary nearest to (r + 1) / world of the total, so every
// rank's load is within one item of total / world (runs may be empty when items are few or large).
// Contiguous runs let each rank's updated matrices travel as one range (allgather_ranges).
std::vector<int> partition_contiguous(const std::vector<int64_t>& sizes, int world);

}  // namespace mf
