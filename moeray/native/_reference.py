"""Pure-Python twin of ``moeray.native._core``: same classes, same functions, same decisions.

Selected by ``MOERAY_PURE_PYTHON=1``; the test suite runs against both and compares them on
the same inputs. Written to be obviously correct rather than fast: the hot set is an ordered
dict in recency order (oldest first), and every victim choice is a scan over it.

Tie rules (shared with the native core, documented in ``moeray.policy.cache``):
- LRU evicts the least recently *touched* hot expert (a hit or an admission is a touch).
- LFU evicts the hot expert with the lowest access count, the least recently touched first.
- Affinity blends scan the hot set oldest first and keep the first highest score.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import operator
import os
from collections import OrderedDict

import numpy as np

__all__ = [
    "LRU",
    "LFU",
    "ADAPTIVE",
    "AffinityCore",
    "ExpertCacheCore",
    "schedule",
    "belady_hits",
    "PrefetcherCore",
    "expert_matvec",
]

LRU, LFU, ADAPTIVE = 0, 1, 2
_NEG_INF = -math.inf


def _index(value, name: str) -> int:
    """An int argument as the native binding takes it: ints and numpy ints, never floats."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None


def _as_float(value, name: str) -> float:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


def _check_num_experts(num_experts: int) -> int:
    if isinstance(num_experts, bool):  # a count: True is a mistake, as in the native binding
        raise TypeError("num_experts: expected an int, got bool")
    num_experts = _index(num_experts, "num_experts")
    if not 1 <= num_experts <= 2**31 - 1:
        raise ValueError(f"num_experts: expected an int in [1, 2**31), got {num_experts}")
    return int(num_experts)


def _check_ids(expert_ids, num_experts: int, name: str = "expert_ids") -> np.ndarray:
    """int32 [T, top_k], C-contiguous, every id in [0, num_experts): the batch contract."""
    if not isinstance(expert_ids, np.ndarray):
        raise TypeError(f"{name}: expected a numpy int32 array, got {type(expert_ids).__name__}")
    if expert_ids.dtype != np.int32:
        raise TypeError(f"{name}: expected dtype int32, got {expert_ids.dtype}")
    if expert_ids.ndim != 2:
        raise ValueError(f"{name}: expected shape [T, top_k], got {expert_ids.shape}")
    if not expert_ids.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= num_experts):
        bad = expert_ids[(expert_ids < 0) | (expert_ids >= num_experts)].flat[0]
        raise ValueError(f"{name}: every id must be in [0, {num_experts}), got {bad}")
    return expert_ids


def _affinity_key(score: float) -> float:
    # The seed ranks non-finite scores below every finite one.
    return score if math.isfinite(score) else _NEG_INF


class AffinityCore:
    """EMA affinity per expert: ``update`` decays every score, then boosts the activated ones."""

    def __init__(self, num_experts: int, decay: float, activation_boost: float, max_score: float):
        self._n = _check_num_experts(num_experts)
        self._decay = _as_float(decay, "decay")
        self._boost = _as_float(activation_boost, "activation_boost")
        self._max = _as_float(max_score, "max_score")
        self._scores = [0.0] * self._n
        self._counts = [0] * self._n

    def num_experts(self) -> int:
        return self._n

    def update(self, activated) -> None:
        ids = [_index(e, "activated") for e in activated]
        if any(e < 0 for e in ids):
            raise ValueError(f"activated: expert ids must be >= 0, got {min(ids)}")
        self._update_row(ids)

    def _update_row(self, ids) -> None:
        decay, scores = self._decay, self._scores
        for e in range(self._n):
            scores[e] = scores[e] * decay
        for e in ids:
            if e < self._n:  # the seed ignores ids it does not track
                scores[e] = min(scores[e] + self._boost, self._max)
                self._counts[e] += 1

    def update_batch(self, expert_ids) -> None:
        ids = _check_ids(expert_ids, self._n)
        for row in ids.tolist():
            self._update_row(row)

    def score(self, expert_id: int) -> float:
        e = _index(expert_id, "expert_id")
        return self._scores[e] if 0 <= e < self._n else 0.0

    def scores(self) -> np.ndarray:
        return np.array(self._scores, dtype=np.float64)

    def activation_count(self, expert_id: int) -> int:
        e = _index(expert_id, "expert_id")
        return self._counts[e] if 0 <= e < self._n else 0

    def activation_counts(self) -> np.ndarray:
        return np.array(self._counts, dtype=np.int64)

    def top_k_by_affinity(self, k: int) -> list[int]:
        k = _index(k, "k")
        if k < 0:
            raise ValueError(f"k: expected k >= 0, got {k}")
        order = sorted(range(self._n), key=lambda e: (-_affinity_key(self._scores[e]), e))
        return order[:k]

    def top_k_by_frequency(self, k: int) -> list[int]:
        k = _index(k, "k")
        if k < 0:
            raise ValueError(f"k: expected k >= 0, got {k}")
        return sorted(range(self._n), key=lambda e: (-self._counts[e], e))[:k]

    def least_affinity(self, candidates) -> int | None:
        ids = [_index(e, "candidates") for e in candidates]
        if not ids:
            return None
        return min(ids, key=lambda e: (_affinity_key(self.score(e)), e))

    def frequency_percentile(self, expert_id: int) -> float:
        count = self.activation_count(expert_id)
        lower = sum(1 for c in self._counts if c < count)
        equal = sum(1 for c in self._counts if c == count)
        return (lower + 0.5 * equal) / self._n

    def load_state(self, scores, activation_counts) -> None:
        """Restores scores (float64 [n]) and activation counts (int64 [n], >= 0)."""
        for name, value, dtype in (
            ("scores", scores, np.float64),
            ("activation_counts", activation_counts, np.int64),
        ):
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{name}: expected a numpy array")
            if value.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {value.dtype}")
            if value.shape != (self._n,) or not value.flags.c_contiguous:
                raise ValueError(f"{name}: expected a C-contiguous array of {self._n} values")
        if (activation_counts < 0).any():
            raise ValueError("activation_counts: counts must be >= 0")
        self._scores = scores.tolist()
        self._counts = activation_counts.tolist()

    def reset(self) -> None:
        self._scores = [0.0] * self._n
        self._counts = [0] * self._n


# --- eviction policies: each chooses a victim and scores the hot set for affinity blends ---


class _Lru:
    @staticmethod
    def victim(cache: ExpertCacheCore) -> int:
        return next(iter(cache._hot))

    @staticmethod
    def base_scores(cache: ExpertCacheCore) -> dict[int, float]:
        return _normalised(cache, cache._timestamp)


class _Lfu:
    @staticmethod
    def victim(cache: ExpertCacheCore) -> int:
        return min(cache._hot, key=lambda e: cache._freq[e])  # first minimum = oldest touch

    @staticmethod
    def base_scores(cache: ExpertCacheCore) -> dict[int, float]:
        return _normalised(cache, cache._freq)


class _Adaptive:
    @staticmethod
    def _skewed(cache: ExpertCacheCore) -> bool:
        freqs = [cache._freq[e] for e in cache._hot]
        return min(freqs) > 0 and max(freqs) >= 3 * min(freqs)

    @classmethod
    def victim(cls, cache: ExpertCacheCore) -> int:
        return (_Lfu if cls._skewed(cache) else _Lru).victim(cache)

    @classmethod
    def base_scores(cls, cache: ExpertCacheCore) -> dict[int, float]:
        return (_Lfu if cls._skewed(cache) else _Lru).base_scores(cache)


def _normalised(cache: ExpertCacheCore, value: list[int]) -> dict[int, float]:
    """Eviction score in [0, 1] per hot expert: 1 for the smallest value, 0.5 when all equal."""
    lo = min(value[e] for e in cache._hot)
    span = max(value[e] for e in cache._hot) - lo
    return {e: (1.0 - (value[e] - lo) / span) if span > 0 else 0.5 for e in cache._hot}


_POLICIES = {LRU: _Lru, LFU: _Lfu, ADAPTIVE: _Adaptive}


class ExpertCacheCore:
    """Hot set of at most ``max_hot`` experts of one layer, with the seed's accounting."""

    def __init__(self, num_experts: int, max_hot: int, prefetch_threshold: float, policy: int):
        self._n = _check_num_experts(num_experts)
        max_hot = _index(max_hot, "max_hot")
        prefetch_threshold = _as_float(prefetch_threshold, "prefetch_threshold")
        policy = _index(policy, "policy")
        if not 1 <= max_hot <= self._n:
            raise ValueError(f"max_hot_experts: expected an int in [1, {self._n}], got {max_hot}")
        if not math.isfinite(prefetch_threshold):
            raise ValueError(
                f"prefetch_threshold: expected a finite float, got {prefetch_threshold}"
            )
        if policy not in _POLICIES:
            raise ValueError(
                f"eviction_policy: expected 0 (LRU), 1 (LFU) or 2 (ADAPTIVE), got {policy}"
            )
        self._cap = int(max_hot)
        self._threshold = float(prefetch_threshold)
        self._policy = _POLICIES[policy]
        self._freq = [0] * self._n
        self._timestamp = [0] * self._n  # the seed's logical time of the last touch
        self._prefetched = [False] * self._n
        self._hot: OrderedDict[int, None] = OrderedDict()  # recency order, oldest first
        self._counter = 0
        self._hits = self._misses = self._evictions = self._prefetch_hits = 0

    def _check_id(self, expert_id) -> int:
        e = _index(expert_id, "expert_id")
        if not 0 <= e < self._n:
            raise ValueError(f"expert_id: expected an id in [0, {self._n}), got {e}")
        return e

    def _check_affinity(self, affinity: AffinityCore) -> AffinityCore:
        if not isinstance(affinity, AffinityCore):
            raise TypeError(f"affinity: expected an ExpertAffinity, got {type(affinity).__name__}")
        if affinity.num_experts() != self._n:
            raise ValueError(
                f"affinity: tracks {affinity.num_experts()} experts, the cache {self._n}"
            )
        return affinity

    # --- the seed's API ---

    def num_experts(self) -> int:
        return self._n

    def access(self, expert_id: int) -> bool:
        e = self._check_id(expert_id)
        self._counter += 1
        self._freq[e] += 1
        if e in self._hot:
            self._timestamp[e] = self._counter
            self._hot.move_to_end(e)
            self._hits += 1
            if self._prefetched[e]:
                self._prefetch_hits += 1
                self._prefetched[e] = False
            return True
        self._misses += 1
        self.admit(e)
        return False

    def should_prefetch(self, expert_id: int, router_weight: float) -> bool:
        e = self._check_id(expert_id)
        router_weight = _as_float(router_weight, "router_weight")
        if not math.isfinite(router_weight):
            raise ValueError(f"router_weight: expected a finite float, got {router_weight}")
        return router_weight > self._threshold and e not in self._hot

    def suggest_eviction(self) -> int | None:
        if len(self._hot) < self._cap:
            return None
        return self._policy.victim(self)

    def evict(self, expert_id: int) -> None:
        e = self._check_id(expert_id)
        if e in self._hot:
            del self._hot[e]
            self._evictions += 1
            self._prefetched[e] = False  # an unused prefetch is gone with its expert

    def admit(self, expert_id: int) -> None:
        e = self._check_id(expert_id)
        if e in self._hot:
            return
        if len(self._hot) >= self._cap:
            self.evict(self.suggest_eviction())
        self._timestamp[e] = self._counter
        self._hot[e] = None

    def prefetch_admit(self, expert_id: int) -> None:
        e = self._check_id(expert_id)
        if e in self._hot:
            return  # nothing was fetched, so a later hit is not a prefetch hit
        self._prefetched[e] = True
        self.admit(e)

    def is_hot(self, expert_id: int) -> bool:
        return self._check_id(expert_id) in self._hot

    def stats(self) -> tuple[int, int, int, int]:
        return (self._hits, self._misses, self._evictions, self._prefetch_hits)

    def reset_stats(self) -> None:
        self._hits = self._misses = self._evictions = self._prefetch_hits = 0

    def hot_count(self) -> int:
        return len(self._hot)

    def max_hot(self) -> int:
        return self._cap

    def hot_experts(self) -> list[int]:
        return list(self._hot)

    def suggest_eviction_with_affinity(self, affinity: AffinityCore, affinity_weight: float):
        self._check_affinity(affinity)
        affinity_weight = _as_float(affinity_weight, "affinity_weight")
        if not math.isfinite(affinity_weight):
            raise ValueError(f"affinity_weight: expected a finite float, got {affinity_weight}")
        if len(self._hot) < self._cap:
            return None
        weight = min(max(float(affinity_weight), 0.0), 1.0)
        if weight < 1e-6:
            return self.suggest_eviction()
        base = self._policy.base_scores(self)
        best, best_score = None, _NEG_INF
        for e in self._hot:
            combined = (1.0 - weight) * base[e] + weight * (1.0 - affinity.score(e))
            if combined > best_score:
                best, best_score = e, combined
        # Non-finite affinities make every blend NaN: fall back to the base policy.
        return best if best is not None else self.suggest_eviction()

    def prefetch_by_affinity(self, affinity: AffinityCore, budget: int) -> list[int]:
        self._check_affinity(affinity)
        budget = _index(budget, "budget")
        if budget < 0:
            raise ValueError(f"budget: expected budget >= 0, got {budget}")
        prefetched: list[int] = []
        if budget == 0:
            return prefetched
        for e in affinity.top_k_by_affinity(self._n):
            if len(prefetched) >= budget:
                break
            if e in self._hot:
                continue
            if len(self._hot) >= self._cap:
                self.evict(self.suggest_eviction_with_affinity(affinity, 0.5))
            self.prefetch_admit(e)
            prefetched.append(e)
        return prefetched

    # --- moeray's batch path ---

    def access_batch(self, expert_ids, affinity=None, affinity_weight: float = 0.0) -> np.ndarray:
        ids = _check_ids(expert_ids, self._n)
        if affinity is not None:
            self._check_affinity(affinity)
            affinity_weight = _as_float(affinity_weight, "affinity_weight")
            if not math.isfinite(affinity_weight):
                raise ValueError(f"affinity_weight: expected a finite float, got {affinity_weight}")
        hits = np.zeros(ids.shape, dtype=bool)
        for t, row in enumerate(ids.tolist()):
            for j, e in enumerate(row):
                if affinity is not None and e not in self._hot and len(self._hot) >= self._cap:
                    self.evict(self.suggest_eviction_with_affinity(affinity, affinity_weight))
                hits[t, j] = self.access(e)
            if affinity is not None:
                affinity._update_row(row)
        return hits


def schedule(expert_ids, weights, num_experts: int):
    """Stable grouping by expert: (offsets int64 [E+1], token_indices int32, weights float32)."""
    num_experts = _check_num_experts(num_experts)
    ids = _check_ids(expert_ids, num_experts)
    if not isinstance(weights, np.ndarray):
        raise TypeError(f"weights: expected a numpy float32 array, got {type(weights).__name__}")
    if weights.dtype != np.float32:
        raise TypeError(f"weights: expected dtype float32, got {weights.dtype}")
    if weights.shape != ids.shape:
        raise ValueError(
            f"weights: expected shape {ids.shape} like expert_ids, got {weights.shape}"
        )
    if not weights.flags.c_contiguous:
        raise ValueError("weights: expected a C-contiguous array")
    if not np.isfinite(weights).all():
        raise ValueError("weights: every weight must be finite (no NaN or inf)")
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    offsets = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=num_experts), out=offsets[1:])
    top_k = ids.shape[1]
    token_indices = (order // max(top_k, 1)).astype(np.int32)
    return offsets, token_indices, weights.ravel()[order].astype(np.float32)


def belady_hits(expert_ids, num_experts: int, capacity: int) -> int:
    """Hits of Belady's MIN over one layer's [T, top_k] accesses (see moeray.policy.belady)."""
    num_experts = _check_num_experts(num_experts)
    capacity = _index(capacity, "capacity")
    if not 1 <= capacity <= num_experts:
        raise ValueError(f"capacity: expected an int in [1, {num_experts}], got {capacity}")
    accesses = _check_ids(expert_ids, num_experts).ravel().tolist()
    never = len(accesses)  # "no next access" sorts after every real position
    next_use = [never] * len(accesses)
    last_seen = [never] * num_experts
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = last_seen[accesses[i]]
        last_seen[accesses[i]] = i
    hot: dict[int, int] = {}  # expert -> position of its next access
    hits = 0
    for i, e in enumerate(accesses):
        if e in hot:
            hits += 1
        elif len(hot) >= capacity:
            del hot[max(hot, key=lambda h: (hot[h], -h))]
        hot[e] = next_use[i]
    return hits


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


class PrefetcherCore:
    """The native prefetcher's twin, synchronous: ``prefetch`` populates at once (a read of
    one byte per page after MADV_WILLNEED), so every later ``wait`` finds the expert ready.
    ``release`` drops the pages wholly inside the expert's ranges (MADV_DONTNEED, then
    POSIX_FADV_DONTNEED) and ``resident_bytes`` asks mincore, as the native one does."""

    def __init__(self, paths: list[str], num_experts: int):
        n = _check_num_experts(num_experts)
        if isinstance(paths, (str, bytes)):
            raise TypeError("paths: expected a list of paths, got str")
        self._files = []
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise ValueError(f"paths: {path}: {exc.strerror}") from None
            size = os.fstat(fd).st_size
            view = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
            if view is not None:
                view.madvise(mmap.MADV_RANDOM)  # no fault readahead into neighbouring experts
            self._files.append((fd, view, size))
        self._ranges: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
        self._ready = [False] * n
        self._stats = dict(
            bytes_populated=0,
            bytes_released=0,
            prefetches_completed=0,
            in_time=0,
            late=0,
            queue_wait_s=0.0,
        )

    def __del__(self):
        for fd, view, _ in getattr(self, "_files", ()):
            if view is not None:
                try:
                    view.close()
                except BufferError:  # a file_array still reads it: it unmaps with that array
                    pass
            os.close(fd)

    def num_experts(self) -> int:
        return len(self._ready)

    def _expert(self, e) -> int:
        e = _index(e, "expert_id")
        if not 0 <= e < len(self._ready):
            raise ValueError(f"expert_id: expected an id in [0, {len(self._ready)}), got {e}")
        return e

    def set_ranges(self, expert_id: int, ranges) -> None:
        e = self._expert(expert_id)
        checked = []
        for file, offset, length in ranges:
            file, offset, length = (_index(v, "ranges") for v in (file, offset, length))
            if not 0 <= file < len(self._files):
                raise ValueError(f"ranges: file index {file} not in [0, {len(self._files)})")
            size = self._files[file][2]
            if offset < 0 or length < 0 or offset > size or length > size - offset:
                raise ValueError(
                    f"ranges: bytes [{offset}, +{length}) run past file {file} of {size} bytes"
                )
            checked.append((file, offset, length))
        self._ranges[e] = checked

    def expert_bytes(self, expert_id: int) -> int:
        return sum(length for _, _, length in self._ranges[self._expert(expert_id)])

    def _populate(self, e: int) -> None:
        for file, offset, length in self._ranges[e]:
            _, view, size = self._files[file]
            if length == 0:
                continue
            start, end = _outer_pages(offset, length, size)
            view.madvise(mmap.MADV_WILLNEED, start, end - start)
            for page in range(start, end, _PAGE):
                view[page]
            self._stats["bytes_populated"] += length

    def prefetch(self, expert_id: int) -> None:
        e = self._expert(expert_id)
        if not self._ready[e]:
            self._populate(e)
            self._ready[e] = True
            self._stats["prefetches_completed"] += 1

    def ready(self, expert_id: int) -> bool:
        return self._ready[self._expert(expert_id)]

    def wait(self, expert_id: int) -> bool:
        e = self._expert(expert_id)
        if self._ready[e]:
            self._stats["in_time"] += 1
            return True
        self._stats["late"] += 1
        self._populate(e)
        self._ready[e] = True
        return False

    def release(self, expert_id: int) -> None:
        e = self._expert(expert_id)
        self._ready[e] = False
        for file, offset, length in self._ranges[e]:
            fd, view, size = self._files[file]
            start = -(-offset // _PAGE) * _PAGE
            end = offset + length if offset + length >= size else (offset + length) // _PAGE * _PAGE
            if end <= start:
                continue
            view.madvise(mmap.MADV_DONTNEED, start, end - start)
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            self._stats["bytes_released"] += end - start

    def resident_bytes(self, expert_id: int) -> int:
        e = self._expert(expert_id)
        total = 0
        for file, offset, length in self._ranges[e]:
            _, view, size = self._files[file]
            if length == 0:
                continue
            start, end = _outer_pages(offset, length, size)
            pages = -(-(end - start) // _PAGE)
            vec = (ctypes.c_ubyte * pages)()
            base = _mapping_address(view) + start
            if _libc.mincore(ctypes.c_void_p(base), end - start, vec) != 0:
                continue
            total += sum(min(_PAGE, end - (start + i * _PAGE)) for i in range(pages) if vec[i] & 1)
        return total

    def read_ahead(self, expert_id: int, bytes: int) -> None:
        self._expert(expert_id)
        if _index(bytes, "bytes") < 0:
            raise ValueError(f"bytes: expected an int >= 0, got {bytes}")

    def file_array(self, file: int) -> np.ndarray:
        """uint8 [file size], a read-only view of this prefetcher's mapping of file ``file``."""
        file = _index(file, "file")
        if not 0 <= file < len(self._files):
            raise ValueError(f"file: expected an index in [0, {len(self._files)}), got {file}")
        _, view, _ = self._files[file]
        return np.frombuffer(view, dtype=np.uint8) if view is not None else np.zeros(0, np.uint8)

    def stats(self) -> dict:
        return dict(self._stats)


def _outer_pages(offset: int, length: int, size: int) -> tuple[int, int]:
    """[start, end) of the pages a byte range touches, within a file of ``size`` bytes."""
    return offset // _PAGE * _PAGE, min(size, -(-(offset + length) // _PAGE) * _PAGE)


def _mapping_address(view: mmap.mmap) -> int:
    """The address of a read-only mmap's first byte (for mincore), without copying it."""
    array = np.frombuffer(view, dtype=np.uint8, count=1)
    address = array.ctypes.data
    del array  # an exported buffer would keep the mmap from closing
    return address


# --- the consumer kernel: one expert's FFN, validated as the native binding validates ---

_SIZE_RANGE = "an int in [1, 2**31)"
_MAX_SIZE = 2**31 - 1
_FORMAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16", "TERNARY": "uint8"}


def _check_int(value, name: str, lo: int, hi: int, expected: str) -> int:
    """An int in [lo, hi] (never a bool), ``expected`` saying so in words."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = operator.index(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return value


def _check_array(
    value, label: str, dtype: str, shape: tuple[int, ...], note: str, shape_note: str = ""
) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{label}: expected a numpy {dtype} array, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
        raise TypeError(f"{label}: expected dtype {dtype}{note}, got {value.dtype}")
    if value.shape != shape:
        raise ValueError(
            f"{label}: expected shape {list(shape)}{note}{shape_note}, got {list(value.shape)}"
        )
    if not value.flags.c_contiguous:
        raise ValueError(f"{label}: expected a C-contiguous array")
    return value


def _layout_roles(layout: str, hidden: int, inter: int) -> list[tuple[str, bool, bool, int, int]]:
    """(role, required, is_bias, rows, cols) of each tensor of ``layout``, in checking order."""
    if layout == "swiglu":
        return [
            ("gate", True, False, inter, hidden),
            ("up", True, False, inter, hidden),
            ("down", True, False, hidden, inter),
        ]
    return [
        ("gate_up", True, False, hidden, 2 * inter),
        ("down", True, False, inter, hidden),
        ("gate_up_bias", False, True, 1, 2 * inter),
        ("down_bias", False, True, 1, hidden),
    ]


def _check_weight(value, role: str, is_bias: bool, rows: int, cols: int):
    """(format, data, scales, block_size) of one role, checked; returns it with a logical shape."""
    where = f"tensors[{role!r}]"
    if not isinstance(value, tuple):
        raise TypeError(
            f"{where}: expected a tuple (format, data, scales, block_size), "
            f"got {type(value).__name__}"
        )
    if len(value) != 4:
        raise ValueError(
            f"{where}: expected 4 items (format, data, scales, block_size), got {len(value)}"
        )
    fmt, data, scales, block_size = value
    if not isinstance(fmt, str):
        raise TypeError(f"{where}: format: expected a str, got {type(fmt).__name__}")
    allowed = ("F32", "F16", "BF16") if is_bias else ("F32", "F16", "BF16", "TERNARY")
    if fmt not in allowed:
        raise ValueError(f"{where}: format: expected one of {', '.join(allowed)}, got {fmt!r}")
    ternary = fmt == "TERNARY"
    if ternary:
        block_size = _check_int(
            block_size, f"{where}: block_size", 1, _MAX_SIZE, "an int in [1, 2**31) for TERNARY"
        )
    else:
        block_size = _check_int(
            block_size, f"{where}: block_size", 0, 0, f"0 for {fmt} (only TERNARY has blocks)"
        )
    shape = (cols,) if is_bias else (rows, cols)
    if ternary:
        if cols % 4:
            raise ValueError(
                f"{where}: TERNARY packs 4 weights a byte along each row: cols must "
                f"be a multiple of 4, got {cols}"
            )
        shape = (rows, cols // 4)
    data = _check_array(data, f"{where}: data", _FORMAT_DTYPES[fmt], shape, f" for {fmt}")
    if not ternary:
        if scales is not None:
            raise ValueError(
                f"{where}: scales: expected None for {fmt} (only TERNARY has "
                f"scales), got {type(scales).__name__}"
            )
        return fmt, data, None, block_size, shape
    blocks = -(-(rows * cols) // block_size)
    scales = _check_array(
        scales,
        f"{where}: scales",
        "float32",
        (blocks,),
        "",
        f" (ceil({rows} * {cols} / {block_size}))",
    )
    # one block >= the whole matrix: the same weights, and the reference's np.repeat stays small
    return fmt, data, scales, min(block_size, rows * cols), (rows, cols)


def expert_matvec(layout, hidden_size, intermediate_size, tensors, x) -> np.ndarray:
    """One expert's FFN over T tokens: x float32 [T, hidden], C-contiguous -> float32 [T, hidden].

    ``layout`` 'swiglu' (roles gate, up [intermediate, hidden], down [hidden, intermediate]) or
    'gpt-oss' (gate_up [hidden, 2 * intermediate], down [intermediate, hidden], optional
    gate_up_bias [2 * intermediate] and down_bias [hidden]); ``tensors`` maps each role to
    (format, data, scales, block_size) as a ``moeray.shards.WeightView`` holds them: F32 / F16 /
    BF16 data float32 / float16 / uint16 [rows, cols] with scales None and block_size 0; TERNARY
    data uint8 [rows, cols / 4], scales float32 [ceil(rows * cols / block_size)], block_size >= 1.
    Computes with ``moeray.shards.kernels.expert_matvec``, the numpy reference.
    """
    if not isinstance(layout, str):
        raise TypeError(f"layout: expected 'swiglu' or 'gpt-oss', got {type(layout).__name__}")
    if layout not in ("swiglu", "gpt-oss"):
        raise ValueError(f"layout: expected 'swiglu' or 'gpt-oss', got {layout!r}")
    hidden = _check_int(hidden_size, "hidden_size", 1, _MAX_SIZE, _SIZE_RANGE)
    inter = _check_int(intermediate_size, "intermediate_size", 1, _MAX_SIZE, _SIZE_RANGE)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy float32 array [T, hidden], got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"x: expected dtype float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"x: expected shape [T, {hidden}], got {list(x.shape)}")
    if not x.flags.c_contiguous:
        raise ValueError("x: expected a C-contiguous array")
    if not isinstance(tensors, dict):
        raise TypeError(
            "tensors: expected a dict of role -> (format, data, scales, block_size), "
            f"got {type(tensors).__name__}"
        )
    roles = _layout_roles(layout, hidden, inter)
    names = ", ".join(r[0] for r in roles)
    for key in tensors:
        if key not in [r[0] for r in roles] or not isinstance(key, str):
            raise ValueError(
                f"tensors: unexpected role {key!r} for layout {layout!r} (expected {names})"
            )
    required = ", ".join(r[0] for r in roles if r[1])
    checked = {}
    for role, is_required, is_bias, rows, cols in roles:
        if role not in tensors:
            if is_required:
                raise ValueError(
                    f"tensors: no {role!r} for layout {layout!r} (it needs {required})"
                )
            continue
        checked[role] = _check_weight(tensors[role], role, is_bias, rows, cols)
    # moeray.shards imports moeray.native: importing it back at module level would be circular
    from moeray.shards.kernels import expert_matvec as numpy_expert_matvec
    from moeray.shards.store import ExpertWeights, WeightView

    views = {
        role: WeightView(role, fmt, shape, data, scales, block_size)
        for role, (fmt, data, scales, block_size, shape) in checked.items()
    }
    weights = ExpertWeights(-1, -1, layout, hidden, inter, views)  # not from a store
    return numpy_expert_matvec(weights, x)
