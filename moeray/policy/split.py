"""One total capacity, split across layers by marginal benefit and re-split as routing drifts.

Each layer's LRU miss-ratio curve is measured online from stack distances (decayed per token);
every ``every_tokens`` tokens the split that maximises all layers' hits on those curves (an exact
dynamic program) becomes the target, and at most ``max_move`` experts of capacity move towards
it when it beats the current split by ``min_gain``. The split from token t on is a pure function
of every layer's routing before t, so a coordinator computes the same capacities as a replay::

    split = CapacitySplit.for_model(num_layers, num_experts, top_k, capacity, SplitConfig())
    for window in routing:                     # int [T, num_layers, top_k], tokens in order
        for plan in split.observe(window):     # SplitPlan(token, capacity, moved)
            ...  # layer l holds plan.capacity[l] experts from token plan.token on

Stack distances run in the core (``_stack_histogram``). How the defaults were chosen, and why
re-split is off by default: docs/design.md, "The capacity re-split".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.native import IS_NATIVE, backend, reference
from moeray.policy._validate import check_float, check_int

# Tokens per histogram update (bounds the copy of a chunk of routing each update makes).
_CHUNK_TOKENS = 256

__all__ = [
    "CapacitySplit",
    "SplitConfig",
    "SplitPlan",
    "SplitSchedule",
    "best_split",
    "lru_hit_curves",
    "per_layer_capacity",
]


def per_layer_capacity(capacity, num_layers: int, num_experts: int) -> np.ndarray:
    """capacity: an int (every layer) or one int per layer, each in [1, num_experts]; returns
    int64 [num_layers], or ValueError naming ``capacity``."""
    caps = np.asarray(capacity)
    if (
        caps.ndim > 1
        or (caps.ndim == 1 and caps.shape[0] != num_layers)
        or caps.dtype.kind not in "iu"
        or caps.min() < 1
        or caps.max() > num_experts
    ):
        raise ValueError(
            f"capacity: expected an int or {num_layers} ints, each in "
            f"[1, {num_experts}], got {capacity!r}"
        )
    return np.broadcast_to(caps, (num_layers,)).astype(np.int64)


@dataclass(frozen=True)
class SplitConfig:
    """every_tokens: tokens between re-splits, >= 1. decay: per-token decay in (0, 1) of the
    stack-distance histograms. max_move: experts of capacity moved per re-split, >= 1.
    min_gain: in [0, 1], the least predicted gain (hits over decayed accesses, summed over
    layers) worth a re-split."""

    every_tokens: int = 256
    decay: float = 0.999
    max_move: int = 4
    min_gain: float = 0.002

    def __post_init__(self):
        check_int(self.every_tokens, "every_tokens", 1)
        check_int(self.max_move, "max_move", 1)
        value = check_float(self.decay, "decay")
        if not 0.0 < value < 1.0:
            raise ValueError(f"decay: expected a float in (0, 1), got {value}")
        value = check_float(self.min_gain, "min_gain")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"min_gain: expected a float in [0, 1], got {value}")


@dataclass(frozen=True)
class SplitPlan:
    """token: the first token (counted from the first token observed, from 0) that runs with
    ``capacity``: int per layer, each in [1, num_experts], summing to the total. moved:
    experts of capacity moved by this re-split (half the sum of the absolute changes)."""

    token: int
    capacity: tuple[int, ...]
    moved: int


def lru_hit_curves(histogram: np.ndarray) -> np.ndarray:
    """histogram: float [L, E], histogram[l, d] = (decayed) accesses at stack distance d.
    Returns float [L, E + 1]: hits of an LRU hot set of c experts, c = 0..E."""
    histogram = np.asarray(histogram, dtype=np.float64)
    out = np.zeros((histogram.shape[0], histogram.shape[1] + 1))
    np.cumsum(histogram, axis=1, out=out[:, 1:])
    return out


def best_split(curves: np.ndarray, total: int, prefer=None, min_capacity: int = 1) -> np.ndarray:
    """The capacities c_l in [min_capacity, E], summing to ``total`` in [L * min_capacity,
    L * E], that maximise sum_l curves[l, c_l]; curves: float [L, E + 1] (curves[l, c]: hits
    at capacity c).
    prefer: int [L] or None; among equal totals the split nearest to it wins (so flat curves
    keep capacity where it is). Returns int64 [L]."""
    curves = np.asarray(curves, dtype=np.float64)
    L, E = curves.shape[0], curves.shape[1] - 1
    min_capacity = check_int(min_capacity, "min_capacity", 1, E)
    total = check_int(total, "total", L * min_capacity, L * E)
    sizes = np.arange(1, E + 1)
    # A tie-break far below one access: each expert away from ``prefer`` costs 1e-9 of the scale.
    tie = 1e-9 * max(float(np.abs(curves).max()), 1.0)
    gain = curves[:, 1:].copy()
    if prefer is not None:
        gain -= tie * np.abs(sizes[None, :] - np.asarray(prefer)[:, None])
    gain[:, : min_capacity - 1] = -np.inf
    # best[c]: the most hits of the layers so far with c experts in all; choice[l, c]: layer
    # l's capacity in that optimum.
    first = min(E, total)
    best = np.full(total + 1, -np.inf)
    best[1 : first + 1] = gain[0, :first]
    choice = np.zeros((L, total + 1), dtype=np.int64)
    choice[0, 1 : first + 1] = sizes[:first]
    # cand[s - 1, c]: layer given s experts of c in all (-inf where c < s)
    start = np.arange(total + 1)[None, :] - sizes[:first, None]
    reachable = start >= 0
    start = np.maximum(start, 0)
    for layer in range(1, L):
        cand = np.where(reachable, best[start] + gain[layer, :first, None], -np.inf)
        pick = cand.argmax(axis=0)  # the smallest size among equals
        best = cand[pick, np.arange(total + 1)]
        choice[layer] = np.where(best > -np.inf, pick + 1, 0)
    out = np.zeros(L, dtype=np.int64)
    left = total
    for layer in range(L - 1, -1, -1):
        out[layer] = choice[layer, left]
        left -= out[layer]
    assert left == 0 and out.min() >= min_capacity, (out, total)
    return out


class CapacitySplit:
    """Online split of one total capacity across ``num_layers`` layers (see the module
    docstring). capacity: the starting split, int in [1, num_experts] (every layer) or one per
    layer; its sum is the total, kept by every re-split. min_capacity: in [1, min(capacity)],
    the least any layer gets (top_k is natural: one token's experts of a layer fit at once)."""

    # Stack distances in the native core when it is in use, else in its twin; a test sets this
    # False to compare the two.
    _native = IS_NATIVE

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        capacity,
        config: SplitConfig = SplitConfig(),
        min_capacity: int = 1,
    ):
        if not isinstance(config, SplitConfig):
            raise TypeError(f"config: expected a SplitConfig, got {type(config).__name__}")
        self.num_layers = check_int(num_layers, "num_layers", 1)
        self.num_experts = check_int(num_experts, "num_experts", 1)
        self.config = config
        self._capacity = per_layer_capacity(capacity, num_layers, num_experts)
        self.total_capacity = int(self._capacity.sum())
        self.min_capacity = check_int(min_capacity, "min_capacity", 1, int(self._capacity.min()))
        L, E = num_layers, num_experts
        self._rows = np.arange(L)
        self._last = np.full((L, E), -1, dtype=np.int64)  # access counter of each last use
        self._counter = 0
        # Decayed histogram, scaled by _scale so that decay is lazy (as in predict.py).
        self._histogram = np.zeros((L, E))
        self._accesses = 0.0
        self._scale = 1.0
        self._tokens = 0
        self.moved = 0  # experts of capacity moved by every re-split so far

    @classmethod
    def for_model(
        cls,
        num_layers: int,
        num_experts: int,
        top_k: int,
        capacity,
        config: SplitConfig = SplitConfig(),
    ) -> CapacitySplit:
        """The split ``PredictiveCaches`` runs (and a coordinator must run to match it): no layer
        below top_k (one token's experts of a layer fit at once), or below the smallest
        starting capacity if that is less."""
        caps = per_layer_capacity(capacity, num_layers, num_experts)
        top_k = check_int(top_k, "top_k", 1, num_experts)
        return cls(num_layers, num_experts, caps, config, min_capacity=min(top_k, int(caps.min())))

    @property
    def capacity(self) -> np.ndarray:
        """The current split: int64 [num_layers] (a copy)."""
        return self._capacity.copy()

    @property
    def tokens(self) -> int:
        """Tokens observed so far."""
        return self._tokens

    def curves(self) -> np.ndarray:
        """Each layer's LRU hits at every capacity over the decayed histogram: float
        [num_layers, num_experts + 1] (see ``lru_hit_curves``)."""
        return lru_hit_curves(self._histogram / self._scale)

    def observe(self, ids) -> list[SplitPlan]:
        """Feeds tokens: ids integer [T, num_layers, top_k] (or [num_layers, top_k], one token),
        each in [0, num_experts), in token order. Returns the re-splits due in these tokens,
        each applying from its ``token`` on (after the token that completed its window)."""
        ids = np.asarray(ids)
        if ids.ndim == 2:
            ids = ids[None]
        if ids.ndim != 3 or ids.shape[1] != self.num_layers or ids.dtype.kind not in "iu":
            raise ValueError(
                f"ids: expected integers of shape [T, {self.num_layers}, top_k], "
                f"got {ids.dtype} {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"ids: expected ids in [0, {self.num_experts})")
        plans = []
        ids = ids.astype(np.int64)
        every, first = self.config.every_tokens, 0
        while first < len(ids):
            # one chunk: up to the next re-split, at most _CHUNK_TOKENS tokens
            last = min(len(ids), first + every - self._tokens % every, first + _CHUNK_TOKENS)
            first += self._observe_chunk(ids[first:last])
            if self._tokens % every == 0:
                plan = self._resplit()
                if plan is not None:
                    plans.append(plan)
        return plans

    def _observe_chunk(self, ids: np.ndarray) -> int:
        """Adds the stack distances of the accesses of ``ids`` int64 [T, L, k] to the histogram,
        each weighted by its token's scale, in the order of a token-by-token loop (so the sums
        do not depend on how tokens are chunked); returns how many tokens it took (it stops after
        a token whose scale needs a rescale)."""
        scales = []
        scale = self._scale
        for _ in range(len(ids)):
            scale /= self.config.decay  # lazy decay: each token's accesses weigh 1/decay more
            scales.append(scale)
            if scale > 1e200:
                break
        T, (_, L, k) = len(scales), ids.shape
        chunk = np.ascontiguousarray(ids[:T])
        core = backend if self._native else reference
        core._stack_histogram(self._last, self._histogram, chunk, self._counter, np.asarray(scales))
        self._counter += T * k
        for value in scales:
            self._accesses += value * (L * k)
        self._scale = scales[-1]
        self._tokens += T
        if self._scale > 1e200:
            self._histogram /= self._scale
            self._accesses /= self._scale
            self._scale = 1.0
        return T

    def _resplit(self) -> SplitPlan | None:
        curves = self.curves()
        current = self._capacity
        target = best_split(
            curves, self.total_capacity, prefer=current, min_capacity=self.min_capacity
        )
        rows = self._rows
        accesses = self._accesses / self._scale
        gain = curves[rows, target].sum() - curves[rows, current].sum()
        if accesses <= 0 or gain < self.config.min_gain * accesses or (target == current).all():
            return None
        caps = current.copy()
        for _ in range(self.config.max_move):
            up, down = caps < target, caps > target
            if not up.any():
                break
            # The receiver gains most from one more expert; the donor loses least by one fewer.
            receiver = int(
                np.where(
                    up,
                    curves[rows, np.minimum(caps + 1, self.num_experts)] - curves[rows, caps],
                    -np.inf,
                ).argmax()
            )
            donor = int(
                np.where(down, curves[rows, caps] - curves[rows, caps - 1], np.inf).argmin()
            )
            caps[receiver] += 1
            caps[donor] -= 1
        moved = int(np.abs(caps - current).sum()) // 2
        self._capacity = caps
        self.moved += moved
        return SplitPlan(self._tokens, tuple(int(c) for c in caps), moved)


class SplitSchedule:
    """A ``CapacitySplit`` fed routing as it arrives and read window by window, as a coordinator
    sends it: ``observe(ids)`` takes tokens in order; ``window(tokens)`` returns the re-splits of
    the next window of ``tokens`` tokens (the tokens observed come first) as (token offset in the
    window, every layer's capacity from that token on) pairs, the first at offset 0: the split in
    force when the window begins (``LayerWindow.resplits``). ``capacity``: the split in force
    after the windows taken; ``capacity_max``: each layer's largest so far; ``moved``: experts
    of capacity the taken re-splits moved."""

    def __init__(self, split: CapacitySplit):
        self._split = split
        self._plans: list[SplitPlan] = []  # due in tokens not yet taken
        self.capacity = tuple(int(c) for c in split.capacity)
        self.capacity_max = self.capacity
        self.moved = 0
        self._taken = 0  # tokens of the windows taken

    def observe(self, ids) -> None:
        """ids: integer [T, num_layers, top_k], the next tokens (``CapacitySplit.observe``)."""
        self._plans += self._split.observe(ids)

    def window(self, tokens: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        first, end = self._taken, self._taken + check_int(tokens, "tokens", 0)
        if end > self._split.tokens:
            raise ValueError(f"tokens: {end} taken, only {self._split.tokens} observed")
        out = [(0, self.capacity)]
        while self._plans and self._plans[0].token < end:
            plan = self._plans.pop(0)
            out.append((plan.token - first, plan.capacity))
            self.capacity = plan.capacity
            self.capacity_max = tuple(max(a, b) for a, b in zip(self.capacity_max, plan.capacity))
            self.moved += plan.moved
        self._taken = end
        return tuple(out)
