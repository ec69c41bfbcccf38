"""Twin of ``src/placement.hpp``: the placement kernels, one layer per row.

- ``_replicate``: the published EPLB replication: each extra slot goes to the expert with the
  largest load per copy (float32, first index on ties).
- ``_pack``: the published EPLB balanced packing (heaviest item first onto the least loaded pack
  with room, first pack on ties); with ``labels``, an item avoids packs that already hold its
  label while another pack has room (replicas of one expert land on different GPUs).
- ``_improve``: moeray's incremental re-placement: greedy slot rewrites and cross-GPU swaps, the
  one with the most max-GPU-load removed per slot moved first, until the budget is spent or the
  best move gains less than ``min_gain`` of the max load.
- ``_dispatch_allocation`` / ``dispatch``: one batch's tokens onto replicas, water-filled so the
  batch's max GPU load is as low as integers allow.
"""

from __future__ import annotations

import numpy as np

from moeray.native._reference._checks import as_float, check_array, check_ids, check_int

__all__ = ["_dispatch_allocation", "_improve", "_pack", "_replicate", "dispatch"]

_MAX = 2**31 - 1
_MAX_TOKENS = 2**62


def _check_matrix(value, name: str, dtype: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy {dtype} array, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array [layers, n], got {list(value.shape)}")
    value = check_array(value, name, dtype, value.shape, "")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise ValueError(f"{name}: every load must be finite (no NaN or inf)")
    if value.size and value.min() < 0:
        raise ValueError(f"{name}: every load must be >= 0, got {value.min()}")
    return value


def _replicate(weight, num_slots):
    """weight: float32 [X, n] >= 0; num_slots >= n. Returns (physical_to_logical, rank, counts):
    int32 [X, num_slots], int32 [X, num_slots], int32 [X, n]; slot i < n holds expert i."""
    weight = _check_matrix(weight, "weight", "float32")
    rows, n = weight.shape
    if rows and not n:
        raise ValueError(
            f"weight: expected at least one expert per layer, got {list(weight.shape)}"
        )
    num_slots = check_int(
        num_slots, "num_slots", max(n, 1), _MAX, f"an int in [{max(n, 1)}, 2**31)"
    )
    phy = np.zeros((rows, num_slots), dtype=np.int32)
    rank = np.zeros((rows, num_slots), dtype=np.int32)
    counts = np.ones((rows, n), dtype=np.int32)
    for x in range(rows):
        phy[x, :n] = np.arange(n)
        for slot in range(n, num_slots):
            per_copy = weight[x] / counts[x].astype(np.float32)
            e = int(np.argmax(per_copy))
            phy[x, slot] = e
            rank[x, slot] = counts[x, e]
            counts[x, e] += 1
    return phy, rank, counts


def _pack(weight, num_packs, labels=None):
    """weight: float32 [X, n] >= 0, n a multiple of num_packs; labels: int32 [X, n] or None.
    Returns (pack, rank): int32 [X, n], the pack of each item and its place in the pack; with one
    item per pack, item i is pack i."""
    weight = _check_matrix(weight, "weight", "float32")
    rows, n = weight.shape
    num_packs = check_int(num_packs, "num_packs", 1, _MAX, "an int >= 1")
    if n % num_packs:
        raise ValueError(f"num_packs: {n} items do not divide over {num_packs} packs")
    if labels is not None:
        labels = check_array(labels, "labels", "int32", (rows, n), " like weight")
    per_pack = n // num_packs
    pack = np.zeros((rows, n), dtype=np.int32)
    rank = np.zeros((rows, n), dtype=np.int32)
    if per_pack <= 1:  # one item per pack: item i is pack i, as the published method has it
        pack[:] = np.arange(n, dtype=np.int32)
        return pack, rank
    for x in range(rows):
        order = np.argsort(-weight[x], kind="stable")
        sums = np.zeros(num_packs, dtype=np.float32)
        sizes = np.zeros(num_packs, dtype=np.int64)
        held: list[set[int]] = [set() for _ in range(num_packs)]
        for item in order:
            label = None if labels is None else int(labels[x, item])
            best = -1
            for spread in (True, False):  # a pack without the label first, then any with room
                for p in range(num_packs):
                    if sizes[p] >= per_pack or (spread and label in held[p]):
                        continue
                    if best < 0 or sums[p] < sums[best]:
                        best = p
                if best >= 0 or label is None:
                    break
            pack[x, item] = best
            rank[x, item] = sizes[best]
            sums[best] += weight[x, item]
            sizes[best] += 1
            if label is not None:
                held[best].add(label)
    return pack, rank


def _gpu_loads(row, load, counts, gpu_of_slot, num_gpus):
    loads = np.zeros(num_gpus, dtype=np.float64)
    for s, e in enumerate(row):
        if e >= 0:  # an empty slot carries nothing
            loads[gpu_of_slot[s]] += load[e] / counts[e]
    return loads


def _improve(slots, load, num_gpus, gpus_per_node, budget, candidates, min_gain, node_cost):
    """slots: int32 [X, S] (rewritten in place), S a multiple of num_gpus; load: float64 [X, E].
    Returns int32 [X]: slots rewritten per row (<= budget). A move's cost is 1 per slot, or
    ``node_cost`` when the slot's new expert has no replica on the slot's node (a cross-node copy).
    A slot of -1 is empty: never rewritten, but a swap from the peak GPU into an empty slot of
    the least loaded one moves the expert there for one copy (1, or ``node_cost`` across nodes)
    and leaves its old slot empty; the number of filled slots never changes.
    """
    if not isinstance(slots, np.ndarray):
        raise TypeError(f"slots: expected a numpy int32 array, got {type(slots).__name__}")
    load = _check_matrix(load, "load", "float64")
    rows, num_experts = load.shape
    width = slots.shape[-1] if slots.ndim else 0
    slots = check_array(slots, "slots", "int32", (rows, width), " [layers, slots]")
    if not slots.flags.writeable:
        raise ValueError("slots: expected a writeable array")
    num_slots = slots.shape[1]
    num_gpus = check_int(num_gpus, "num_gpus", 1, _MAX, "an int >= 1")
    if num_slots % num_gpus:
        raise ValueError(f"num_gpus: {num_slots} slots do not divide over {num_gpus} GPUs")
    gpus_per_node = check_int(gpus_per_node, "gpus_per_node", 1, _MAX, "an int >= 1")
    if num_gpus % gpus_per_node:
        raise ValueError(f"gpus_per_node: {num_gpus} GPUs do not divide into nodes of it")
    budget = check_int(budget, "budget", 0, _MAX, "an int >= 0")
    candidates = check_int(candidates, "candidates", 1, _MAX, "an int >= 1")
    min_gain = as_float(min_gain, "min_gain")
    node_cost = as_float(node_cost, "node_cost")
    if not (min_gain >= 0 and node_cost >= 1):
        raise ValueError("min_gain must be >= 0 and node_cost >= 1")
    if slots.size and (slots.min() < -1 or slots.max() >= num_experts):
        raise ValueError(
            f"slots: every slot must hold an expert in [0, {num_experts}) or be empty (-1)"
        )
    per_gpu = num_slots // num_gpus
    gpu_of_slot = np.arange(num_slots) // per_gpu
    node_of_slot = gpu_of_slot // gpus_per_node
    moved = np.zeros(rows, dtype=np.int32)
    if num_slots == 0:  # nothing to move, and no [num_gpus] loads to allocate
        return moved
    for x in range(rows):
        row = slots[x]
        mu = load[x]
        spent = 0.0
        while True:
            counts = np.bincount(row[row >= 0], minlength=num_experts)
            loads = _gpu_loads(row, mu, counts, gpu_of_slot, num_gpus)
            peak = float(loads.max())
            if peak <= 0:
                break
            share = np.divide(mu, counts, out=np.zeros(num_experts), where=counts > 0)
            receivers = np.argsort(-share, kind="stable")[:candidates]
            best_rate, best = 0.0, None
            for s in range(num_slots):
                a = int(row[s])
                if a < 0 or counts[a] < 2:
                    continue
                g = gpu_of_slot[s]
                on_gpu = row[g * per_gpu : (g + 1) * per_gpu]
                for b in receivers:
                    b = int(b)
                    if b == a or counts[b] == 0 or (on_gpu == b).any():
                        continue
                    cost = 1.0 if (node_of_slot[row == b] == node_of_slot[s]).any() else node_cost
                    if spent + cost > budget:
                        continue
                    new = loads.copy()
                    up_a = mu[a] / (counts[a] - 1) - mu[a] / counts[a]
                    up_b = mu[b] / (counts[b] + 1) - mu[b] / counts[b]
                    for r in range(num_slots):
                        if row[r] == a and r != s:
                            new[gpu_of_slot[r]] += up_a
                        elif row[r] == b:
                            new[gpu_of_slot[r]] += up_b
                    new[g] += mu[b] / (counts[b] + 1) - mu[a] / counts[a]
                    rate = (peak - float(new.max())) / cost
                    if rate > best_rate:
                        best_rate, best = rate, (s, b, -1, cost)
            hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
            for s1 in range(hi * per_gpu, (hi + 1) * per_gpu):
                for s2 in range(lo * per_gpu, (lo + 1) * per_gpu):
                    a, b = int(row[s1]), int(row[s2])
                    if a < 0:
                        continue
                    delta = share[a] - (share[b] if b >= 0 else 0.0)
                    if a == b or delta <= 0:
                        continue
                    if (row[lo * per_gpu : (lo + 1) * per_gpu] == a).any():
                        continue
                    if b >= 0 and (row[hi * per_gpu : (hi + 1) * per_gpu] == b).any():
                        continue
                    cost = 1.0 if node_of_slot[s1] == node_of_slot[s2] else node_cost
                    if b >= 0:  # a swap copies two experts, a move into an empty slot one
                        cost *= 2.0
                    if spent + cost > budget:
                        continue
                    new = loads.copy()
                    new[hi] -= delta
                    new[lo] += delta
                    rate = (peak - float(new.max())) / cost
                    if rate > best_rate:
                        best_rate, best = rate, (s1, -1, s2, cost)
            if best is None or best_rate <= min_gain * peak:
                break
            s, b, s2, cost = best
            if s2 < 0:
                row[s] = b
                moved[x] += 1
            else:
                moved[x] += 1 if row[s2] < 0 else 2
                row[s], row[s2] = row[s2], row[s]
            spent += cost
    return moved


def _fill(levels: np.ndarray, n: int) -> np.ndarray:
    """Integer water-fill: the state after n tokens each go to the lowest level, the first GPU in
    ``levels``' order on ties. int64 [r] tokens per GPU."""
    add = np.zeros(len(levels), dtype=np.int64)
    if n == 0:
        return add
    order = np.argsort(levels, kind="stable")
    ranked = levels[order]
    # j GPUs are raised: the most for which bringing all j to the j-th lowest level fits in n.
    j, prefix = 1, int(ranked[0])
    while j < len(ranked) and j * int(ranked[j]) - prefix <= n:
        prefix += int(ranked[j])
        j += 1
    level, left = divmod(n + prefix, j)
    add[order[:j]] = level - ranked[:j]
    for i in range(len(levels)):  # the rest, one each, to the raised GPUs in their order
        if left == 0:
            break
        if levels[i] + add[i] == level:
            add[i] += 1
            left -= 1
    return add


def _replica_gpus(row, gpu_of_slot, num_experts):
    """Per expert, its GPUs in ascending order and the first slot it holds on each."""
    gpus: list[list[int]] = [[] for _ in range(num_experts)]
    first: list[list[int]] = [[] for _ in range(num_experts)]
    for s, e in enumerate(row):
        if e < 0:  # empty
            continue
        g = int(gpu_of_slot[s])
        if g not in gpus[e]:
            gpus[e].append(g)
            first[e].append(s)
    return gpus, first


def _check_slots(slots, num_gpus, num_experts):
    if not isinstance(slots, np.ndarray):
        raise TypeError(f"slots: expected a numpy int32 array, got {type(slots).__name__}")
    slots = check_array(slots, "slots", "int32", (slots.shape[0] if slots.ndim else 0,), " [slots]")
    num_gpus = check_int(num_gpus, "num_gpus", 1, _MAX, "an int >= 1")
    if slots.shape[0] == 0 or slots.shape[0] % num_gpus:
        raise ValueError(f"num_gpus: {slots.shape[0]} slots do not divide over {num_gpus} GPUs")
    if slots.min() < -1 or slots.max() >= num_experts:
        raise ValueError(
            f"slots: every slot must hold an expert in [0, {num_experts}) or be empty (-1)"
        )
    if len(np.unique(slots[slots >= 0])) != num_experts:
        raise ValueError("slots: every expert must hold at least one slot")
    return slots, num_gpus


def _dispatch_allocation(counts, slots, num_gpus):
    """counts: int64 [E] >= 0 tokens per expert in the batch, summing to at most 2**62; slots:
    int32 [S] the layer's placement. Returns int64 [S]: tokens each slot serves (0 for a second
    replica on the same GPU)."""
    if not isinstance(counts, np.ndarray):
        raise TypeError(f"counts: expected a numpy int64 array, got {type(counts).__name__}")
    counts = check_array(counts, "counts", "int64", (counts.shape[0] if counts.ndim else 0,), "")
    num_experts = len(counts)
    if num_experts and counts.min() < 0:
        raise ValueError("counts: every count must be >= 0")
    if sum(counts.tolist()) > _MAX_TOKENS:  # the levels below stay exact in int64
        raise ValueError("counts: the counts must sum to at most 2**62")
    slots, num_gpus = _check_slots(slots, num_gpus, num_experts)
    gpu_of_slot = np.arange(len(slots)) // (len(slots) // num_gpus)
    gpus, first = _replica_gpus(slots, gpu_of_slot, num_experts)
    levels = np.zeros(num_gpus, dtype=np.int64)
    alloc = np.zeros(len(slots), dtype=np.int64)
    for e in range(num_experts):
        if len(gpus[e]) == 1:
            levels[gpus[e][0]] += counts[e]
            alloc[first[e][0]] = counts[e]
    spread = [e for e in range(num_experts) if len(gpus[e]) > 1 and counts[e] > 0]
    spread.sort(key=lambda e: (-int(counts[e]), e))
    for _ in range(2):  # a second pass refills each expert knowing where the others went
        for e in spread:
            g = np.asarray(gpus[e])
            s = np.asarray(first[e])
            levels[g] -= alloc[s]
            add = _fill(levels[g], int(counts[e]))
            levels[g] += add
            alloc[s] = add
    return alloc


def dispatch(
    expert_ids,
    weights,
    slots,
    num_gpus: int,
    num_experts: int,
    token_nodes=None,
    gpus_per_node: int = 1,
):
    """One layer's batch onto the placement's replicas.

    expert_ids: int32 [T, top_k] in [0, num_experts); weights: float32 [T, top_k]; slots: int32
    [S], the expert of each slot (GPU = slot // (S // num_gpus)). Each expert's tokens, in token
    order, fill its replicas' allocations (``_dispatch_allocation``) in GPU order. With
    token_nodes (int32 [T], the node each token comes from, in [0, num_gpus / gpus_per_node)),
    a token first takes a replica on its own node that has room (the first in GPU order), and
    only the tokens none of whose expert's replicas on their node has room fill the rest, in
    token order: the same loads, fewer tokens across nodes.
    Returns the per-GPU CSR: offsets int64 [num_gpus + 1], token_indices int32 [T * top_k],
    slot_indices int32, weights float32; GPU g serves entries offsets[g]:offsets[g+1], in token
    order.
    """
    if isinstance(num_experts, bool):
        raise TypeError("num_experts: expected an int, got bool")
    num_experts = check_int(num_experts, "num_experts", 1, _MAX, "an int in [1, 2**31)")
    ids = check_ids(expert_ids, num_experts)
    weights = check_array(weights, "weights", "float32", ids.shape, " like expert_ids")
    if not np.isfinite(weights).all():
        raise ValueError("weights: every weight must be finite (no NaN or inf)")
    if ids.shape[0] > _MAX:  # token_indices are int32
        raise ValueError("expert_ids: at most 2**31 - 1 tokens per call")
    slots, num_gpus = _check_slots(slots, num_gpus, num_experts)
    gpus_per_node = check_int(gpus_per_node, "gpus_per_node", 1, _MAX, "an int >= 1")
    if num_gpus % gpus_per_node:
        raise ValueError(f"gpus_per_node: {num_gpus} GPUs do not divide into nodes of it")
    if token_nodes is not None:
        token_nodes = check_array(token_nodes, "token_nodes", "int32", ids.shape[:1], " [T]")
        num_nodes = num_gpus // gpus_per_node
        if token_nodes.size and (token_nodes.min() < 0 or token_nodes.max() >= num_nodes):
            raise ValueError(f"token_nodes: every node must be in [0, {num_nodes})")
    flat = ids.ravel()
    counts = np.bincount(flat, minlength=num_experts).astype(np.int64)
    alloc = _dispatch_allocation(counts, slots, num_gpus)
    gpu_of_slot = np.arange(len(slots)) // (len(slots) // num_gpus)
    _, first = _replica_gpus(slots, gpu_of_slot, num_experts)
    left = alloc.copy()
    slot_of = np.full(len(flat), -1, dtype=np.int32)
    top_k = ids.shape[1]
    if token_nodes is not None:  # same-node replicas first
        for i, e in enumerate(flat.tolist()):
            node = token_nodes[i // top_k]
            for owner in first[e]:
                if left[owner] > 0 and gpu_of_slot[owner] // gpus_per_node == node:
                    slot_of[i] = owner
                    left[owner] -= 1
                    break
    cursor = [0] * num_experts
    for i, e in enumerate(flat.tolist()):
        if slot_of[i] >= 0:
            continue
        owners = first[e]
        while left[owners[cursor[e]]] == 0:
            cursor[e] += 1
        slot_of[i] = owners[cursor[e]]
        left[owners[cursor[e]]] -= 1
    gpu_of = gpu_of_slot[slot_of]
    order = np.argsort(gpu_of, kind="stable")
    offsets = np.zeros(num_gpus + 1, dtype=np.int64)
    np.cumsum(np.bincount(gpu_of, minlength=num_gpus), out=offsets[1:])
    token_indices = (order // max(top_k, 1)).astype(np.int32)
    return offsets, token_indices, slot_of[order], weights.ravel()[order].astype(np.float32)
