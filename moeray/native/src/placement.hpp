// Placement kernels, one layer per call: EPLB's replication and balanced packing, moeray's
// incremental re-placement, and the dispatch of one batch onto the replicas. The binding
// (bindings.cpp) checks every argument and loops over layers with the GIL released. The twin,
// _reference/placement.py, is the specification: the same decisions bit for bit, so the float
// arithmetic keeps its types and operation order (float32 in replicate and pack, float64 in
// improve; no FMA contraction, see CMakeLists.txt).
//
// replicate (n experts, S slots): a binary heap of experts by (weight / count desc, id asc) in
//   float32; its top is numpy's argmax of weight / count, the first index on ties.
//   O(n + (S - n) log n).
// pack (n items, P packs of n / P >= 2): items in (weight desc, index asc) order, the twin's
//   stable argsort of -weight (a radix sort of the weights' bits); each goes to the pack of least
//   (float32 sum, index) among those with room, the top of a heap. With labels, the packs
//   already holding the item's label (those of the label's earlier items, labels grouped by a
//   radix sort) are popped aside while the heap holds another; when it does not, the first
//   popped (the least of all packs with room) takes the item. O(n log P + n r), r the items of
//   one label.
// improve (S slots on G GPUs, E experts, C candidates), per layer: the counts, each expert's
//   slots (a linked list, ascending), a bitset of the slots whose expert has two or more, the
//   GPUs sorted by load, and the receivers: the first C of a pool of the experts of highest
//   share (share desc, id asc, the twin's stable argsort), O(S + E + G log G) to build. A move
//   updates only what it changes: two experts' counts, shares, lists and places in the pool,
//   and the loads of their GPUs, each summed again slot by slot in slot order as the twin sums
//   it (a GPU without them keeps its sum bit for bit); the pool is refilled, O(E), once it holds
//   fewer than C. The twin's candidates are enumerated in its order (the slots of the bitset
//   ascending x receivers; then the swaps hi x lo) with its strict `>`, so a tie goes to the
//   first found; a candidate is skipped only when it cannot be chosen:
//   - a rewrite of a slot on GPU g to expert b lowers no GPU but g and b's (a GPU of the old
//     expert a gains up_a >= 0, and rounding is monotonic), so every GPU at the peak must be
//     one of them: off the top GPU only receivers on it are tried;
//   - its new max is at least the new load of g or of the top GPU without the up_a they may
//     gain, and the load of the highest GPU neither g nor holding b: a rate bounded so is not
//     above the best so far when that bound is not, and is never chosen (the same for a swap
//     and the others' max);
//   - GPU and node membership of a receiver are 64-bit masks when G <= 64.
//   A candidate left is evaluated as the twin does: its additions replayed on the GPUs of the
//   two experts' slots, in slot order, O(count a + count b). Per move: O(E/C) amortised for the
//   pool, O(C G) for the receivers' bounds, O(S / 64 + candidates tried).
//   An empty slot (-1, a shared budget's) holds nothing and is never rewritten; a swap of the
//   top GPU's expert into an empty slot of the least loaded one is a move of one copy.
// dispatch_allocation (E experts, S slots, G GPUs): per expert, its GPUs ascending and its first
//   slot on each (a CSR). Experts on one GPU put their count there; the others, by count desc
//   then id, are water-filled twice, each fill a closed form over its r GPUs, O(r log r).
//   O(S + E log E).
// dispatch (T x top_k assignments): counts, allocation, then one pass in token order. Each
//   assignment takes its expert's current replica (a cursor over the replicas in GPU order,
//   moved on when the replica's allocation is spent) and is written at its GPU's cursor into the
//   CSR, whose offsets the allocation gives beforehand. O(T top_k + S + E log E).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace moeray {

namespace placement_detail {

// Restores the heap property below h[i] in h[0:size); before(a, b): a belongs above b.
template <typename Before>
inline void sift_down(int64_t* h, int64_t size, int64_t i, const Before& before) {
  const int64_t x = h[i];
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= size) break;
    if (c + 1 < size && before(h[c + 1], h[c])) ++c;
    if (!before(h[c], x)) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = x;
}

template <typename Before>
inline void sift_up(int64_t* h, int64_t i, const Before& before) {
  const int64_t x = h[i];
  while (i > 0) {
    const int64_t parent = (i - 1) / 2;
    if (!before(x, h[parent])) break;
    h[i] = h[parent];
    i = parent;
  }
  h[i] = x;
}

template <typename Before>
inline void make_heap(int64_t* h, int64_t size, const Before& before) {
  for (int64_t i = size / 2 - 1; i >= 0; --i) sift_down(h, size, i, before);
}

// order = 0..n-1 sorted by key ascending, ties in index order: an LSD radix sort, a byte a pass
// (a pass whose byte all keys share is skipped). tmp: scratch.
inline void radix_order(const uint32_t* key, int64_t n, std::vector<int64_t>& order,
                        std::vector<int64_t>& tmp) {
  order.resize(n);
  tmp.resize(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  int64_t count[4][257] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int d = 0; d < 4; ++d) ++count[d][((key[i] >> (8 * d)) & 255) + 1];
  for (int d = 0; d < 4; ++d) {
    int64_t* c = count[d];
    if (std::any_of(c + 1, c + 257, [n](int64_t x) { return x == n; })) continue;
    for (int b = 0; b < 256; ++b) c[b + 1] += c[b];
    for (int64_t i = 0; i < n; ++i) tmp[c[(key[order[i]] >> (8 * d)) & 255]++] = order[i];
    order.swap(tmp);
  }
}

}  // namespace placement_detail

// EPLB's replication of one layer. weight: float32 [n], finite, >= 0, n >= 1; num_slots >= n.
// Writes phy, rank [num_slots] (slot i < n holds expert i) and counts [n].
class Replicator {
 public:
  void run(const float* weight, int64_t n, int64_t num_slots, int32_t* phy, int32_t* rank,
           int32_t* counts) {
    for (int64_t e = 0; e < n; ++e) {
      phy[e] = static_cast<int32_t>(e);
      rank[e] = 0;
      counts[e] = 1;
    }
    if (num_slots == n) return;
    per_copy_.assign(weight, weight + n);  // weight / 1.0f
    heap_.resize(n);
    std::iota(heap_.begin(), heap_.end(), int64_t{0});
    const float* v = per_copy_.data();
    auto before = [v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
    placement_detail::make_heap(heap_.data(), n, before);
    for (int64_t slot = n; slot < num_slots; ++slot) {
      const int64_t e = heap_[0];
      phy[slot] = static_cast<int32_t>(e);
      rank[slot] = counts[e];
      ++counts[e];
      per_copy_[e] = weight[e] / static_cast<float>(counts[e]);  // only lower: sift down
      placement_detail::sift_down(heap_.data(), n, 0, before);
    }
  }

 private:
  std::vector<float> per_copy_;
  std::vector<int64_t> heap_;
};

// EPLB's balanced packing of one layer. weight: float32 [n], finite, >= 0; labels: int32 [n] or
// nullptr; n / num_packs >= 2 items per pack (the binding answers one item per pack itself).
// Writes pack, rank [n]: each item's pack and its place there.
class Packer {
 public:
  void run(const float* weight, const int32_t* labels, int64_t n, int64_t num_packs,
           int32_t* pack, int32_t* rank) {
    const int64_t per_pack = n / num_packs;
    // (weight desc, index asc): a weight >= 0 (or -0.0, equal to 0) orders as its bits
    keys_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, weight + i, sizeof bits);
      keys_[i] = ~(bits & 0x7fffffffu);
    }
    placement_detail::radix_order(keys_.data(), n, order_, scratch_);
    if (labels != nullptr) group_labels(labels, n, num_packs);
    sums_.assign(num_packs, 0.0f);
    sizes_.assign(num_packs, 0);
    heap_.resize(num_packs);
    std::iota(heap_.begin(), heap_.end(), int64_t{0});
    const float* sums = sums_.data();
    auto before = [sums](int64_t p, int64_t q) {
      return sums[p] < sums[q] || (sums[p] == sums[q] && p < q);
    };
    int64_t* heap = heap_.data();
    int64_t size = num_packs;  // the packs with room
    for (int64_t idx = 0; idx < n; ++idx) {
      const int64_t item = order_[idx];
      int64_t group = 0;
      if (labels != nullptr) {
        group = group_of_[item];
        for (int64_t k = group_start_[group]; k < group_next_[group]; ++k)
          stamp_[group_packs_[k]] = idx;
      }
      int64_t chosen = -1;
      aside_.clear();
      if (labels == nullptr || stamp_[heap[0]] != idx) {
        chosen = heap[0];  // stays the root until its sum changes
      } else {
        while (size > 0) {
          const int64_t p = heap[0];
          heap[0] = heap[--size];
          placement_detail::sift_down(heap, size, 0, before);
          if (stamp_[p] == idx) {
            aside_.push_back(p);
            continue;
          }
          chosen = p;
          break;
        }
        if (chosen < 0) chosen = aside_[0];  // every pack with room holds the label
      }
      pack[item] = static_cast<int32_t>(chosen);
      rank[item] = static_cast<int32_t>(sizes_[chosen]);
      sums_[chosen] += weight[item];
      ++sizes_[chosen];
      const bool room = sizes_[chosen] < per_pack;
      if (aside_.empty()) {  // the root: sift down, or drop it when full
        if (!room) heap[0] = heap[--size];
        placement_detail::sift_down(heap, size, 0, before);
      } else {
        for (const int64_t p : aside_) {
          if (p == chosen && !room) continue;
          heap[size] = p;
          placement_detail::sift_up(heap, size++, before);
        }
        if (chosen != aside_[0] && room) {
          heap[size] = chosen;
          placement_detail::sift_up(heap, size++, before);
        }
      }
      if (labels != nullptr) group_packs_[group_next_[group]++] = chosen;
    }
  }

 private:
  // Items of equal label share a group; group_packs_[group_start_[g]:group_next_[g]] are the
  // packs its placed items went to.
  void group_labels(const int32_t* labels, int64_t n, int64_t num_packs) {
    keys_.resize(n);
    for (int64_t i = 0; i < n; ++i) keys_[i] = static_cast<uint32_t>(labels[i]) ^ 0x80000000u;
    placement_detail::radix_order(keys_.data(), n, by_label_, scratch_);
    group_of_.resize(n);
    group_start_.clear();
    for (int64_t k = 0; k < n; ++k) {
      const int64_t item = by_label_[k];
      if (k == 0 || labels[item] != labels[by_label_[k - 1]]) group_start_.push_back(k);
      group_of_[item] = static_cast<int64_t>(group_start_.size()) - 1;
    }
    group_next_ = group_start_;
    group_packs_.resize(n);
    stamp_.assign(num_packs, -1);
  }

  std::vector<int64_t> order_, heap_, aside_, by_label_, group_of_, group_start_, group_next_,
      group_packs_, stamp_, sizes_, scratch_;
  std::vector<uint32_t> keys_;
  std::vector<float> sums_;
};

// moeray's incremental re-placement of one layer: greedy slot rewrites and cross-GPU swaps, the
// most max-GPU-load removed per unit of cost first, while the budget lasts and the best move
// gains more than min_gain of the max load. A rewrite costs 1, or node_cost when the new expert
// has no replica on the slot's node; a swap 2, or 2 * node_cost across nodes.
class Improver {
 public:
  // num_slots >= 1, a multiple of num_gpus, itself a multiple of gpus_per_node; candidates >= 1;
  // min_gain >= 0; node_cost >= 1.
  Improver(int64_t num_slots, int64_t num_experts, int64_t num_gpus, int64_t gpus_per_node,
           int64_t budget, int64_t candidates, double min_gain, double node_cost)
      : S_(num_slots), E_(num_experts), G_(num_gpus), per_gpu_(num_slots / num_gpus),
        budget_(static_cast<double>(budget)), C_(std::min(candidates, num_experts)),
        min_gain_(min_gain), node_cost_(node_cost), gpu_of_(num_slots), node_of_(num_gpus),
        count_(num_experts), head_(num_experts), next_(num_slots), multi_((num_slots + 63) / 64),
        share_(num_experts), masks_(num_gpus <= 64), next_share_(C_), info_(C_),
        loads_(num_gpus), tmp_(num_gpus), sorted_(num_gpus), by_load_(num_gpus),
        mark_(num_gpus, 0) {
    for (int64_t s = 0; s < S_; ++s) gpu_of_[s] = s / per_gpu_;
    for (int64_t g = 0; g < G_; ++g) node_of_[g] = g / gpus_per_node;
  }

  // row: int32 [S], each in [0, E), rewritten in place; mu: float64 [E], finite, >= 0.
  // Returns the slots rewritten (1 per rewrite, 2 per swap).
  int32_t run(int32_t* row, const double* mu) {
    row_ = row;
    mu_ = mu;
    double spent = 0.0;
    int32_t moved = 0;
    if (spent + 1.0 > budget_) return 0;  // every move costs >= 1: none fits
    build();
    fill_pool();
    for (;;) {
      const double peak = sorted_[0];
      if (peak <= 0) break;
      if (static_cast<int64_t>(pool_.size()) < C_) fill_pool();
      const int64_t* receivers = pool_.data();
      peaks_.clear();
      for (int64_t i = 0; i < G_ && sorted_[i] == peak; ++i) peaks_.push_back(by_load_[i]);
      const int64_t top = *std::min_element(peaks_.begin(), peaks_.end());  // the twin's argmax
      // Per receiver b: mu / (count + 1), its share with one more replica; the two highest
      // loads of GPUs without b (a rewrite to b lowers no other); and, when b is on the top GPU,
      // the top's new load without the up_a >= 0 it may gain (adding one never lowers a sum).
      // Off the top GPU only a receiver on it can lower the peak: on_top_ lists those.
      on_top_.clear();
      for (int64_t k = 0; k < C_; ++k) {
        const int64_t b = receivers[k];
        next_share_[k] = mu_[b] / static_cast<double>(count_[b] + 1);
        Receiver& info = info_[k];
        info.gpus = info.nodes = 0;
        if (masks_) {
          for (int64_t r = head_[b]; r >= 0; r = next_[r]) {
            info.gpus |= uint64_t{1} << gpu_of_[r];
            info.nodes |= uint64_t{1} << node_of_[gpu_of_[r]];
          }
        }
        info.without_gpu = -1;
        info.without = info.without_next = -std::numeric_limits<double>::infinity();
        for (const int64_t h : by_load_) {
          if (holds(info, b, h)) continue;
          if (info.without_gpu < 0) {
            info.without_gpu = h;
            info.without = loads_[h];
          } else {
            info.without_next = loads_[h];
            break;
          }
        }
        if (!holds(info, b, top)) continue;
        const double up_b = next_share_[k] - share_[b];
        info.top_floor = loads_[top];
        for (int64_t r = head_[b]; r >= 0; r = next_[r])
          if (gpu_of_[r] == top) info.top_floor += up_b;
        on_top_.push_back(k);
      }

      double best_rate = 0.0, best_cost = 0.0;
      int64_t best_s = -1, best_b = -1, best_s2 = -1;
      const bool one_peak = peaks_.size() == 1;
      for (int64_t s = next_multi(0); s < S_; s = next_multi(s + 1)) {
        const int64_t a = row_[s], g = gpu_of_[s];
        const bool at_top = g == top;
        const int64_t len = at_top ? C_ : static_cast<int64_t>(on_top_.size());
        for (int64_t i = 0; i < len; ++i) {
          const int64_t k = at_top ? i : on_top_[i], b = receivers[k];
          if (b == a || count_[b] == 0) continue;
          // Bounds of the new max from below, so of the rate from above: the new load of g
          // without the up_a it may gain, the top's (above), a GPU neither g nor holding b.
          const Receiver& info = info_[k];
          double floor = loads_[g] + (next_share_[k] - share_[a]);
          if (!at_top) floor = std::max(floor, info.top_floor);
          floor = std::max(floor, g == info.without_gpu ? info.without_next : info.without);
          if (!(peak - floor > best_rate)) continue;  // the rate with a cost of 1, the least
          const int64_t node = node_of_[g];
          const bool near = masks_ ? (info.nodes >> node) & 1 : on_node(b, node);
          const double cost = near ? 1.0 : node_cost_;
          if (spent + cost > budget_ || !((peak - floor) / cost > best_rate)) continue;
          // one peak: it is g, or off g the top, which holds b
          if (holds(info, b, g) || !(one_peak || lowers_every_peak(b, g))) continue;
          const double rate = (peak - rewrite_max(s, a, k, g)) / cost;
          if (rate > best_rate) {
            best_rate = rate;
            best_s = s;
            best_b = b;
            best_s2 = -1;
            best_cost = cost;
          }
        }
      }
      const int64_t hi = top;
      int64_t lo = by_load_[G_ - 1];  // the twin's argmin: the first GPU of least load
      for (int64_t i = G_ - 2; i >= 0 && sorted_[i] == sorted_[G_ - 1]; --i)
        lo = std::min(lo, by_load_[i]);
      if (hi != lo) {
        double others = -std::numeric_limits<double>::infinity();
        for (const int64_t g : by_load_) {
          if (g != hi && g != lo) {
            others = loads_[g];
            break;
          }
        }
        // a swap's new max is at least the others' max: with another GPU at the peak, or no
        // more gain than the best rewrite's, none is chosen
        // a swap costs two copies; a move into an empty slot of lo (b < 0) one
        const double move_cost = node_of_[hi] == node_of_[lo] ? 1.0 : node_cost_;
        bool lo_empty = false;
        for (int64_t s2 = lo * per_gpu_; s2 < (lo + 1) * per_gpu_; ++s2) lo_empty |= row_[s2] < 0;
        const double least = lo_empty ? move_cost : 2.0 * move_cost;
        if (others < peak && !(spent + least > budget_) && (peak - others) / least > best_rate) {
          for (int64_t s1 = hi * per_gpu_; s1 < (hi + 1) * per_gpu_; ++s1) {
            for (int64_t s2 = lo * per_gpu_; s2 < (lo + 1) * per_gpu_; ++s2) {
              const int64_t a = row_[s1], b = row_[s2];
              if (a < 0) continue;  // an empty slot of hi gives nothing
              const double delta = share_[a] - (b < 0 ? 0.0 : share_[b]);
              if (a == b || delta <= 0) continue;
              const double cost = b < 0 ? move_cost : 2.0 * move_cost;
              if (spent + cost > budget_) continue;
              const double new_max =
                  std::max(others, std::max(loads_[hi] - delta, loads_[lo] + delta));
              const double rate = (peak - new_max) / cost;
              if (rate > best_rate && !on_gpu(a, lo) && (b < 0 || !on_gpu(b, hi))) {
                best_rate = rate;
                best_s = s1;
                best_b = -1;
                best_s2 = s2;
                best_cost = cost;
              }
            }
          }
        }
      }
      if (best_s < 0 || best_rate <= min_gain_ * peak) break;
      if (best_s2 < 0) {
        rewrite(best_s, best_b);
        moved += 1;
      } else {
        moved += row_[best_s2] < 0 ? 1 : 2;  // a move into an empty slot copies one expert
        swap(best_s, best_s2);
      }
      spent += best_cost;
      if (spent + 1.0 > budget_) break;
      sort_by_load();
    }
    return moved;
  }

 private:
  // The row's counts, replica lists (slots ascending), shares and loads. A GPU's load is summed
  // from 0 slot by slot in slot order: the twin's _gpu_loads.
  void build() {
    std::fill(count_.begin(), count_.end(), 0);
    std::fill(head_.begin(), head_.end(), -1);
    for (int64_t s = S_ - 1; s >= 0; --s) {
      const int64_t e = row_[s];
      if (e < 0) continue;  // empty
      ++count_[e];
      next_[s] = head_[e];
      head_[e] = s;
    }
    for (int64_t e = 0; e < E_; ++e)
      share_[e] = count_[e] > 0 ? mu_[e] / static_cast<double>(count_[e]) : 0.0;
    std::fill(multi_.begin(), multi_.end(), 0);
    for (int64_t s = 0; s < S_; ++s)
      if (row_[s] >= 0 && count_[row_[s]] >= 2) multi_[s / 64] |= uint64_t{1} << (s % 64);
    for (int64_t g = 0; g < G_; ++g) sum_load(g);
    std::copy(loads_.begin(), loads_.end(), tmp_.begin());
    std::iota(by_load_.begin(), by_load_.end(), int64_t{0});
    if (G_ <= 64) {
      sort_by_load();
      return;
    }
    const double* loads = loads_.data();
    std::sort(by_load_.begin(), by_load_.end(),
              [loads](int64_t a, int64_t b) { return loads[a] > loads[b]; });
    for (int64_t i = 0; i < G_; ++i) sorted_[i] = loads_[by_load_[i]];
  }

  void sum_load(int64_t g) {
    double load = 0.0;
    for (int64_t s = g * per_gpu_; s < (g + 1) * per_gpu_; ++s)
      if (row_[s] >= 0) load += share_[row_[s]];
    loads_[g] = load;
    tmp_[g] = load;
  }

  // Slot s goes to expert b. Only the GPUs holding its old expert or b change their sums.
  void rewrite(int64_t s, int64_t b) {
    const int64_t a = row_[s];
    unlink(a, s);
    row_[s] = static_cast<int32_t>(b);
    link(b, s);
    --count_[a];
    ++count_[b];
    share_[a] = mu_[a] / static_cast<double>(count_[a]);
    share_[b] = mu_[b] / static_cast<double>(count_[b]);
    unpool(a);
    unpool(b);
    repool(a);
    repool(b);
    for (const int64_t e : {a, b}) {
      for (int64_t r = head_[e]; r >= 0; r = next_[r]) {
        set_multi(r, count_[e] >= 2);
        if (!mark_[gpu_of_[r]]) {
          mark_[gpu_of_[r]] = 1;
          sum_load(gpu_of_[r]);
        }
      }
    }
    for (const int64_t e : {a, b})
      for (int64_t r = head_[e]; r >= 0; r = next_[r]) mark_[gpu_of_[r]] = 0;
  }

  // Slots s1 and s2 trade experts: counts and shares stay, the two GPUs' sums change.
  // s1 holds an expert; s2 may be empty (b < 0: the expert moves there, s1 is left empty).
  void swap(int64_t s1, int64_t s2) {
    const int64_t a = row_[s1], b = row_[s2];
    unlink(a, s1);
    if (b >= 0) unlink(b, s2);
    std::swap(row_[s1], row_[s2]);
    link(a, s2);
    if (b >= 0) link(b, s1);
    set_multi(s1, b >= 0 && count_[b] >= 2);
    set_multi(s2, count_[a] >= 2);
    sum_load(gpu_of_[s1]);
    sum_load(gpu_of_[s2]);
  }

  void set_multi(int64_t s, bool on) {
    const uint64_t bit = uint64_t{1} << (s % 64);
    multi_[s / 64] = on ? multi_[s / 64] | bit : multi_[s / 64] & ~bit;
  }

  void unlink(int64_t e, int64_t s) {
    if (head_[e] == s) {
      head_[e] = next_[s];
      return;
    }
    int64_t p = head_[e];
    while (next_[p] != s) p = next_[p];
    next_[p] = next_[s];
  }

  void link(int64_t e, int64_t s) {
    if (head_[e] < 0 || head_[e] > s) {
      next_[s] = head_[e];
      head_[e] = s;
      return;
    }
    int64_t p = head_[e];
    while (next_[p] >= 0 && next_[p] < s) p = next_[p];
    next_[s] = next_[p];
    next_[p] = s;
  }

  bool ranks_before(int64_t a, int64_t b) const {
    return share_[a] > share_[b] || (share_[a] == share_[b] && a < b);
  }

  // The receivers are the first C of a pool of experts in (share desc, id asc) order, the
  // twin's stable argsort of -share; every expert in the pool ranks before every other. A scan
  // fills it with the first C + 4 when it holds fewer than C.
  void fill_pool() {
    const int64_t size = std::min(E_, C_ + 4);
    pool_.resize(E_);
    std::iota(pool_.begin(), pool_.end(), int64_t{0});
    auto before = [this](int64_t a, int64_t b) { return ranks_before(a, b); };
    if (size > 64) {
      std::partial_sort(pool_.begin(), pool_.begin() + size, pool_.end(), before);
    } else {
      int64_t n = 0;
      for (int64_t e = 0; e < E_; ++e) {
        int64_t pos;
        if (n < size) {
          pos = n++;
        } else if (share_[e] > share_[pool_[size - 1]]) {  // a later id ranks after a tie
          pos = size - 1;
        } else {
          continue;
        }
        for (; pos > 0 && share_[e] > share_[pool_[pos - 1]]; --pos) pool_[pos] = pool_[pos - 1];
        pool_[pos] = e;
      }
    }
    pool_.resize(size);
    whole_pool_ = size == E_;
  }

  // After e's share changed, it leaves the pool (unpool), and returns (repool) where it still
  // ranks before every expert outside: before the last in the pool, or anywhere when the pool
  // holds them all.
  void unpool(int64_t e) {
    const auto at = std::find(pool_.begin(), pool_.end(), e);
    if (at != pool_.end()) pool_.erase(at);
  }

  void repool(int64_t e) {
    if (!whole_pool_ && (pool_.empty() || !ranks_before(e, pool_.back()))) return;
    auto pos = pool_.end();
    while (pos != pool_.begin() && ranks_before(e, *(pos - 1))) --pos;
    pool_.insert(pos, e);
  }

  // by_load_ sorted by load, descending (any order on ties), and sorted_ its loads: an
  // insertion sort, quick after a move changed a few loads.
  void sort_by_load() {
    for (int64_t i = 0; i < G_; ++i) sorted_[i] = loads_[by_load_[i]];
    for (int64_t i = 1; i < G_; ++i) {
      const int64_t x = by_load_[i];
      const double load = sorted_[i];
      int64_t j = i;
      for (; j > 0 && sorted_[j - 1] < load; --j) {
        by_load_[j] = by_load_[j - 1];
        sorted_[j] = sorted_[j - 1];
      }
      by_load_[j] = x;
      sorted_[j] = load;
    }
  }

  // The first slot >= from whose expert holds two or more slots; S when none.
  int64_t next_multi(int64_t from) const {
    if (from >= S_) return S_;
    size_t w = static_cast<size_t>(from / 64);
    uint64_t bits = multi_[w] & (~uint64_t{0} << (from % 64));
    while (bits == 0) {
      if (++w == multi_.size()) return S_;
      bits = multi_[w];
    }
    return static_cast<int64_t>(w * 64 + __builtin_ctzll(bits));
  }

  bool on_gpu(int64_t e, int64_t g) const {
    for (int64_t r = head_[e]; r >= 0; r = next_[r])
      if (gpu_of_[r] >= g) return gpu_of_[r] == g;  // slots ascending: GPUs ascending
    return false;
  }

  struct Receiver {
    uint64_t gpus, nodes;          // the GPUs and nodes holding it, when masks_
    int64_t without_gpu;           // the GPU of highest load without it
    double without, without_next;  // that load; the next such GPU's
    double top_floor;              // the top GPU's new load, without up_a, when it holds it
  };

  bool holds(const Receiver& info, int64_t b, int64_t g) const {
    return masks_ ? (info.gpus >> g) & 1 : on_gpu(b, g);
  }

  bool on_node(int64_t e, int64_t node) const {
    for (int64_t r = head_[e]; r >= 0; r = next_[r])
      if (node_of_[gpu_of_[r]] == node) return true;
    return false;
  }

  // Every GPU at the peak is g or holds b: the only GPUs a rewrite of a slot on g to b lowers.
  bool lowers_every_peak(int64_t b, int64_t g) const {
    for (const int64_t h : peaks_)
      if (h != g && !on_gpu(b, h)) return false;
    return true;
  }

  void touch(int64_t h) {
    if (!mark_[h]) {
      mark_[h] = 1;
      touched_.push_back(h);
    }
  }

  // The max GPU load after slot s (on g) goes from a to b, summed as the twin sums it: its
  // loads, then up_a or up_b slot by slot in slot order, then the slot's own change on g.
  // (share_ is mu / count, next_share_[k] mu_b / (count_b + 1): the twin's quotients.)
  double rewrite_max(int64_t s, int64_t a, int64_t k, int64_t g) {
    const int64_t b = pool_[k];
    const double up_a = mu_[a] / static_cast<double>(count_[a] - 1) - share_[a];
    const double up_b = next_share_[k] - share_[b];
    touched_.clear();
    for (int64_t i = head_[a], j = head_[b]; i >= 0 || j >= 0;) {
      if (j < 0 || (i >= 0 && i < j)) {
        if (i != s) {
          touch(gpu_of_[i]);
          tmp_[gpu_of_[i]] += up_a;
        }
        i = next_[i];
      } else {
        touch(gpu_of_[j]);
        tmp_[gpu_of_[j]] += up_b;
        j = next_[j];
      }
    }
    touch(g);
    tmp_[g] += next_share_[k] - share_[a];
    double new_max = -std::numeric_limits<double>::infinity();
    for (const int64_t h : touched_) new_max = std::max(new_max, tmp_[h]);
    for (const int64_t h : by_load_) {
      if (!mark_[h]) {
        new_max = std::max(new_max, loads_[h]);
        break;
      }
    }
    for (const int64_t h : touched_) {
      tmp_[h] = loads_[h];
      mark_[h] = 0;
    }
    return new_max;
  }

  const int64_t S_, E_, G_, per_gpu_;
  const double budget_;
  const int64_t C_;
  const double min_gain_, node_cost_;
  int32_t* row_ = nullptr;
  const double* mu_ = nullptr;
  std::vector<int64_t> gpu_of_, node_of_, count_;
  std::vector<int64_t> head_, next_;  // per expert, its slots ascending: a linked list
  std::vector<uint64_t> multi_;       // the slots whose expert holds two or more
  std::vector<double> share_;
  std::vector<int64_t> pool_;  // the receivers: its first C
  bool whole_pool_ = false;
  const bool masks_;  // GPUs and nodes fit a 64-bit mask
  std::vector<double> next_share_;  // per receiver: mu / (count + 1)
  std::vector<Receiver> info_;
  std::vector<double> loads_, tmp_, sorted_;  // tmp_ equals loads_ between evaluations
  std::vector<int64_t> by_load_, peaks_, on_top_, touched_;  // on_top_: receivers' indices
  std::vector<char> mark_;
};

// The replicas of one layer's placement and the allocation of a batch's tokens over them.
class Allocation {
 public:
  // slots: int32 [S], S a multiple of num_gpus, every expert in [0, E) in at least one slot,
  // -1 an empty slot.
  Allocation(const int32_t* slots, int64_t num_slots, int64_t num_gpus, int64_t num_experts)
      : S_(num_slots), G_(num_gpus), E_(num_experts), start_(num_experts + 1, 0),
        levels_(num_gpus) {
    const int64_t per_gpu = S_ / G_;
    std::vector<int64_t> last(E_, -1);
    for (int64_t s = 0; s < S_; ++s) {
      const int64_t e = slots[s], g = s / per_gpu;
      if (e < 0) continue;  // an empty slot serves nothing
      if (last[e] != g) {
        last[e] = g;
        ++start_[e + 1];
      }
    }
    for (int64_t e = 0; e < E_; ++e) start_[e + 1] += start_[e];
    gpu_.resize(start_[E_]);
    first_.resize(start_[E_]);
    std::vector<int64_t> next(start_.begin(), start_.end() - 1);
    std::fill(last.begin(), last.end(), -1);
    for (int64_t s = 0; s < S_; ++s) {
      const int64_t e = slots[s], g = s / per_gpu;
      if (e < 0) continue;  // an empty slot serves nothing
      if (last[e] != g) {
        last[e] = g;
        gpu_[next[e]] = g;
        first_[next[e]++] = s;
      }
    }
  }

  // counts: int64 [E] >= 0, summing to at most 2**62. Writes alloc [S], the tokens each slot
  // serves (0 for a second replica on one GPU); the twin's _dispatch_allocation.
  void run(const int64_t* counts, int64_t* alloc) {
    std::fill(levels_.begin(), levels_.end(), 0);
    std::fill(alloc, alloc + S_, 0);
    spread_.clear();
    for (int64_t e = 0; e < E_; ++e) {
      if (start_[e + 1] - start_[e] == 1) {
        levels_[gpu_[start_[e]]] += counts[e];
        alloc[first_[start_[e]]] = counts[e];
      } else if (counts[e] > 0) {
        spread_.push_back(e);
      }
    }
    std::sort(spread_.begin(), spread_.end(), [counts](int64_t a, int64_t b) {
      return counts[a] > counts[b] || (counts[a] == counts[b] && a < b);
    });
    for (int pass = 0; pass < 2; ++pass) {  // the second refills knowing where the others went
      for (const int64_t e : spread_) {
        const int64_t lo = start_[e], r = start_[e + 1] - lo;
        lv_.resize(r);
        add_.resize(r);
        for (int64_t i = 0; i < r; ++i) {
          levels_[gpu_[lo + i]] -= alloc[first_[lo + i]];
          lv_[i] = levels_[gpu_[lo + i]];
        }
        fill(r, counts[e]);
        for (int64_t i = 0; i < r; ++i) {
          levels_[gpu_[lo + i]] += add_[i];
          alloc[first_[lo + i]] = add_[i];
        }
      }
    }
  }

  // Per expert e: its GPUs ascending, gpu_[start_[e]:start_[e + 1]], and its first slot on each.
  const std::vector<int64_t>& start() const { return start_; }
  const std::vector<int64_t>& gpu() const { return gpu_; }
  const std::vector<int64_t>& first() const { return first_; }

 private:
  // The twin's _fill: n tokens one by one to the lowest of lv_[0:r] (the first on ties), in
  // closed form: the j lowest are raised to a common level, the remainder one each to the
  // raised ones in index order. lv_ >= 0, n + sum(lv_) < 2**63.
  void fill(int64_t r, int64_t n) {
    std::fill(add_.begin(), add_.end(), 0);
    if (n == 0) return;
    order_.resize(r);
    std::iota(order_.begin(), order_.end(), int64_t{0});
    const int64_t* lv = lv_.data();
    std::sort(order_.begin(), order_.end(),
              [lv](int64_t a, int64_t b) { return lv[a] < lv[b] || (lv[a] == lv[b] && a < b); });
    int64_t j = 1, prefix = lv[order_[0]];
    // j * ranked[j] - prefix <= n, without the product
    while (j < r && lv[order_[j]] <= (n + prefix) / j) prefix += lv[order_[j++]];
    const int64_t level = (n + prefix) / j;
    int64_t left = (n + prefix) % j;
    for (int64_t k = 0; k < j; ++k) add_[order_[k]] = level - lv[order_[k]];
    for (int64_t i = 0; i < r && left > 0; ++i) {
      if (lv[i] + add_[i] == level) {
        ++add_[i];
        --left;
      }
    }
  }

  const int64_t S_, G_, E_;
  std::vector<int64_t> start_, gpu_, first_, levels_, spread_, lv_, add_, order_;
};

// True when every id of ids[0:total] is in [0, num_experts) and every weight is finite.
inline bool batch_ok(const int32_t* ids, const float* weights, int64_t total, int64_t num_experts) {
  bool ok = true;
  const uint32_t n = static_cast<uint32_t>(num_experts);
  for (int64_t i = 0; i < total; ++i) {
    uint32_t bits;
    std::memcpy(&bits, weights + i, sizeof bits);
    ok &= (static_cast<uint32_t>(ids[i]) < n) & ((bits & 0x7f800000u) != 0x7f800000u);
  }
  return ok;
}

// One layer's batch onto its placement's replicas; the twin's dispatch. ids, weights: [T, top_k]
// (checked: batch_ok); slots: int32 [S] as for Allocation. Writes the per-GPU CSR: offsets
// [G + 1]; token_indices, slot_indices, out_weights [T * top_k], each GPU's in token order.
// token_nodes (nullptr, or int32 [T] in [0, num_gpus / gpus_per_node), checked): each token first
// takes a replica with room on its own node, the first in GPU order; the rest fill in token order.
inline void dispatch(const int32_t* ids, const float* weights, int64_t num_tokens, int64_t top_k,
                     const int32_t* slots, int64_t num_slots, int64_t num_gpus,
                     int64_t num_experts, int64_t* offsets, int32_t* token_indices,
                     int32_t* slot_indices, float* out_weights,
                     const int32_t* token_nodes = nullptr, int64_t gpus_per_node = 1) {
  const int64_t total = num_tokens * top_k, per_gpu = num_slots / num_gpus;
  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t i = 0; i < total; ++i) ++counts[ids[i]];
  Allocation allocation(slots, num_slots, num_gpus, num_experts);
  std::vector<int64_t> left(num_slots);  // each slot's tokens still to come
  allocation.run(counts.data(), left.data());
  offsets[0] = 0;
  for (int64_t g = 0; g < num_gpus; ++g) {
    int64_t sum = 0;
    for (int64_t s = g * per_gpu; s < (g + 1) * per_gpu; ++s) sum += left[s];
    offsets[g + 1] = offsets[g] + sum;
  }
  std::vector<int64_t> next(offsets, offsets + num_gpus);
  std::vector<int64_t> cursor(allocation.start().begin(), allocation.start().end() - 1);
  const int64_t* first = allocation.first().data();
  const int64_t* gpu = allocation.gpu().data();
  int64_t* left_of = left.data();
  int64_t* cur = cursor.data();
  int64_t* at = next.data();
  if (token_nodes == nullptr) {  // one pass: each assignment takes the next replica with room
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t i = t * top_k + j, e = ids[i];
        int64_t c = cur[e];
        while (left_of[first[c]] == 0) ++c;  // the allocations of e sum to its count
        cur[e] = c;
        const int64_t s = first[c];
        --left_of[s];
        const int64_t p = at[gpu[c]]++;
        token_indices[p] = static_cast<int32_t>(t);
        slot_indices[p] = static_cast<int32_t>(s);
        out_weights[p] = weights[i];
      }
    }
    return;
  }
  // Same-node replicas first: decide every assignment's replica, then write in token order.
  const int64_t* start = allocation.start().data();
  std::vector<int64_t> chosen(total, -1);  // the index into first / gpu of each assignment
  for (int64_t i = 0; i < total; ++i) {
    const int64_t e = ids[i], node = token_nodes[i / top_k];
    for (int64_t c = start[e]; c < start[e + 1]; ++c) {
      if (left_of[first[c]] > 0 && gpu[c] / gpus_per_node == node) {
        --left_of[first[c]];
        chosen[i] = c;
        break;
      }
    }
  }
  for (int64_t i = 0; i < total; ++i) {
    if (chosen[i] >= 0) continue;
    const int64_t e = ids[i];
    int64_t c = cur[e];
    while (left_of[first[c]] == 0) ++c;
    cur[e] = c;
    --left_of[first[c]];
    chosen[i] = c;
  }
  for (int64_t i = 0; i < total; ++i) {
    const int64_t c = chosen[i], p = at[gpu[c]]++;
    token_indices[p] = static_cast<int32_t>(i / top_k);
    slot_indices[p] = static_cast<int32_t>(first[c]);
    out_weights[p] = weights[i];
  }
}

}  // namespace moeray
