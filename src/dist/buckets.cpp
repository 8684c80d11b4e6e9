#include "dist/buckets.h"

#include <cmath>

#include "core/error.h"

namespace mf {

std::vector<GradBucket> plan_grad_buckets(const std::vector<GradSlot>& slots, double bucket_mb,
                                          const std::string& what) {
  MF_CHECK(std::isfinite(bucket_mb) && bucket_mb >= 0, "gradient bucket size must be >= 0 MiB, got ",
           bucket_mb, " (train.bucket_mb)");
  const double cap = bucket_mb * 1024.0 * 1024.0 / sizeof(float);  // elements; 0 = no packing
  std::vector<GradBucket> out;
  GradBucket cur;
  int64_t filled = 0;  // elements of the slots in `cur`
  auto close = [&](size_t end) {
    if (end == cur.first) return;
    const GradSlot& a = slots[cur.first];
    const GradSlot& b = slots[end - 1];
    cur.last = end;
    cur.offset = a.offset;
    cur.numel = b.offset + b.numel - a.offset;
    cur.ready_group = b.group;
    cur.sharded = b.sharded;
    out.push_back(cur);
    cur = GradBucket();
    cur.first = end;
    filled = 0;
  };
  for (size_t i = 0; i < slots.size(); ++i) {
    const GradSlot& s = slots[i];
    MF_CHECK(s.numel >= 0 && s.offset >= 0, what, " slot ", i, ": negative offset ", s.offset,
             " or size ", s.numel);
    if (i > 0) {
      const GradSlot& p = slots[i - 1];
      MF_CHECK(s.offset >= p.offset + p.numel, what, " slot ", i, " (offset ", s.offset,
               ") overlaps or precedes slot ", i - 1, " (offset ", p.offset, ", ", p.numel,
               " floats): slots must be in arena order");
      MF_CHECK(s.group >= p.group, what, " slot ", i, " is in group ", s.group,
               " after a slot of group ", p.group, ": slots must be in the order gradients finish");
    }
    if (i > cur.first && slots[i - 1].sharded != s.sharded) close(i);
    if (filled > 0 && (cap == 0 || double(filled + s.numel) > cap)) close(i);
    filled += s.numel;
    if (cap == 0 || double(filled) >= cap) close(i + 1);
  }
  close(slots.size());
  return out;
}

std::vector<int> partition_contiguous(const std::vector<int64_t>& sizes, int world) {
  MF_CHECK(world >= 1, "partition over ", world, " ranks: need at least 1");
  std::vector<double> prefix(sizes.size() + 1, 0.0);  // prefix[k]: total of items [0, k)
  for (size_t i = 0; i < sizes.size(); ++i) {
    MF_CHECK(sizes[i] >= 0, "partition: item ", i, " has negative size ", sizes[i]);
    prefix[i + 1] = prefix[i] + double(sizes[i]);
  }
  const double total = prefix.back();
  std::vector<int> rank(sizes.size(), world - 1);
  size_t begin = 0;  // first item of rank r
  for (int r = 0; r + 1 < world; ++r) {
    const double target = total * double(r + 1) / double(world);
    size_t end = begin;  // the boundary in [begin, n] nearest to target (the last on a tie)
    while (end < sizes.size() && std::abs(prefix[end + 1] - target) <= std::abs(prefix[end] - target))
      ++end;
    for (size_t i = begin; i < end; ++i) rank[i] = r;
    begin = end;
  }
  return rank;
}

}  // namespace mf
