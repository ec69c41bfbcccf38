"""The ``moeray`` policy: per-layer hot sets driven by online predictions of the next routing.

Three predictors, each learned online from the routing seen so far (nothing else):
- cross-layer: transition tables P(e' at l | a pair of experts at l-1), each pair backed off
  to the single-expert tables P(e' at l | e at l-1) while it is rarely seen, with exponential
  decay per token; once layer l-1's routing of token t is known they predict token t's
  experts at layer l (the mean over the pairs of that routing). A pair says more than its two
  experts alone: top-k precision +7 points on both real traces (BENCHMARKS.md);
- previous-token: a table P(e' at token t | e at token t-1) per layer (within one sequence),
  with decay; it predicts token t's experts at layer l from token t-1's;
- affinity: per layer and expert, an EMA of "used by this token" (an estimate of how often
  the expert is used).
Their scores are blended with fixed weights into one estimate ``p[l, e]`` that token t uses
expert e at layer l. Before token t reaches layer l, up to ``prefetch_budget`` cold experts
with the highest ``p`` are prefetched into layer l's hot set, each evicting the hot expert of
lowest value (least recently touched among equals) if it is worth at least
``prefetch_margin`` less. A hot expert's value is ``p`` plus what the next token is expected
to want of it (``victim_next_weight``): without that term prefetches evict experts the
following tokens need again, and transfers grow (BENCHMARKS.md, "Policy quality"). A miss
(a stall) loads on demand and evicts, among the hot experts this token has not used at this
layer, the one least likely to be used by the next token (previous-token table from this
token's routing; least recently touched among equals).

Engine hints (optional, ``step(ids, hints=...)``): expert ids an engine computed for a layer (for
example the next layer's gate applied to the current hidden state), available with the previous
layer's routing, so in time for that layer of the same token. Each layer keeps counts, decayed per
token that hints it, of how its hints fared: precision q (hinted experts used / hinted) and recall
r (uses that were hinted / uses), both with a prior of ``hint_prior`` misses, so hints start with
no weight and earn it. At a layer with hints, a hinted expert's estimate becomes q + (1 - q) p (the
hint is right, or the blend is) and every other expert's (1 - r) p (what the hints miss); the
prefetch loop and its victims then use these estimates within the same budget. Truthful hints drive
q and r to 1: the hinted experts are prefetched first and nothing else is; pure noise keeps q and r
near top_k / num_experts and changes little.

One capacity, re-split (optional, ``PredictConfig.split``): the sum of the starting capacities
is split across layers by ``moeray.policy.split.CapacitySplit`` from every layer's routing of
earlier tokens, re-split every ``split.every_tokens`` tokens. A shrinking layer evicts its hot
experts least likely to be used by the next token (the demand-eviction score); those evictions
and the later loads of the experts they pushed out (``resplit_transfers``, a proxy for the
transfers re-splitting causes) are counted apart. ``set_capacity`` applies a split computed
elsewhere (a coordinator running the same ``CapacitySplit``).

Timing (the accounting rules of ``moeray replay``): the prefetch for layer l >= 1 of token t
uses layer l-1's routing of token t and older routing only (and token t's hints for layer l),
so it is issued in time for layer l of token t; the prefetch for layer 0 uses routing of
earlier tokens only. Without re-split, hot sets of different layers never interact (one
capacity per layer): a layer's decisions depend only on its own state, its previous layer's
routing and its own routing and hints. With re-split, capacities change only between tokens,
from all layers' routing of earlier tokens. So ``step`` handles the layers of one token
together in numpy arrays and makes exactly the decisions a token-major loop over layers
0..L-1 would make. Prefetches complete before the use they were issued in time for: an expert
used while hot is a hit, otherwise a stall.

Parameters are chosen once for every trace (``PredictConfig`` defaults): prefetch budget
top_k experts per layer per token, cross-layer decay 0.999, previous-token decay 0.99, pair
prior 1, affinity decay 0.9, blend 0.7 cross-layer + 0.2 previous-token + 0.1 affinity,
prefetch margin 0.05, prefetch threshold 0.2, victim value p + 0.7 next-token estimate,
eviction score the previous-token estimate alone. They were picked by hand on the first 3,000
tokens of the gpt-oss-20b and DeepSeek-V2-Lite developer traces, as the fewest transfers whose
stall rate stays below Belady's miss rate on both, and the last candidates were compared on
the whole traces (bench_quality's 20,000 tokens; so those are not held out). A lower next-token
weight, more budget and a lower margin cut stalls and add transfers; ``prefetch_threshold`` and
``victim_affinity_weight`` turn the trade further towards fewer transfers. Previous-token
relations are local to a sequence, so their tables forget faster than the cross-layer ones,
which follow the model's structure (0.99 against 0.999: fewer stalls and transfers on
gpt-oss-20b, the same on DeepSeek-V2-Lite). Affinity in the eviction score, a longer-horizon
frequency, or a previous-token estimate run two or more tokens ahead all made demand
evictions worse. Hint prior 16 misses (hints: see above). Re-split: off by default
(``split=None``); ``SplitConfig()`` defaults when on (see ``moeray.policy.split``).

Native step: a token without hints runs in one call of the native core
(``moeray.native._core._predict_step``) when it is in use, over the same state arrays and with
the same decisions as the numpy code (``_step_numpy``), which serves tokens with hints and
``MOERAY_PURE_PYTHON=1``; re-splits (``set_capacity``) and hint learning stay in numpy. Predictor
counts take each predictor's k highest float32 scores, ties to the lower expert id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.native import IS_NATIVE, backend
from moeray.policy._validate import check_float, check_int
from moeray.policy.split import CapacitySplit, SplitConfig, per_layer_capacity

__all__ = [
    "PAIR_TABLE_ENTRIES",
    "PREDICTOR_NAMES",
    "PredictConfig",
    "PredictStats",
    "PredictiveCaches",
    "predictor_rates",
    "predictor_report",
]

# Names of the predictors whose recall and precision the report shows ("combined" is the blend
# that drives prefetches; "hints" are the engine's, counted only where a layer had any).
PREDICTOR_NAMES = ("cross-layer", "previous-token", "affinity", "combined", "hints")
_HINTS = PREDICTOR_NAMES.index("hints")
# The config fields the native step reads, besides prefetch_budget.
_NATIVE_WEIGHTS = (
    "cross_weight",
    "previous_weight",
    "affinity_weight",
    "prefetch_margin",
    "prefetch_threshold",
    "keep_previous_weight",
    "keep_affinity_weight",
    "victim_next_weight",
    "victim_affinity_weight",
    "pair_prior",
    "affinity_decay",
)
# Most entries of one pair table (float64; 64 MiB): beyond it pairs share hashed buckets.
PAIR_TABLE_ENTRIES = 2**23


@dataclass(frozen=True)
class PredictConfig:
    """prefetch_budget: prefetches per layer per token step, >= 0 (0: a demand cache that
    evicts by prediction; None: top_k, as many as a token uses). transition_decay,
    previous_decay, affinity_decay: per-token decay in (0, 1) of the cross-layer tables, the
    previous-token tables and the affinity EMA.
    cross_weight, previous_weight, affinity_weight: >= 0, blend of the three predictors
    (normalised over those available: layer 0 and the first token of a sequence have fewer).
    prefetch_margin: in [0, 1], how much more likely a prefetched expert must be than the one
    it evicts. keep_previous_weight, keep_affinity_weight: >= 0, the score by which a demand load chooses its victim.
    prefetch_threshold: in [0, 1], the least blended probability worth a prefetch.
    victim_next_weight, victim_affinity_weight: >= 0, added to the value of a hot expert a
    prefetch would evict: its estimated use by the next token (the previous-token table
    applied to this token's estimates) and its affinity, times these weights, so an expert
    the next tokens want is not evicted for one this token may want. prefetch_threshold and
    the two victim weights trade stalls for transfers (0: stalls first). hint_prior: >= 0,
    misses assumed before a layer's first hint, so hints earn their weight. cross_pairs: the
    cross-layer predictor conditions on each pair of the previous layer's experts (True) or
    on each expert alone (False). pair_prior: >= 0, pseudo-count of the single-expert
    estimate in each pair's estimate (a pair seen rarely leans on its two experts' own
    tables). split: None (each layer keeps its capacity) or a SplitConfig: one total
    capacity re-split across layers."""

    prefetch_budget: int | None = None
    transition_decay: float = 0.999
    previous_decay: float = 0.99
    affinity_decay: float = 0.9
    cross_weight: float = 0.7
    previous_weight: float = 0.2
    affinity_weight: float = 0.1
    prefetch_margin: float = 0.05
    keep_previous_weight: float = 0.5
    keep_affinity_weight: float = 0.0
    prefetch_threshold: float = 0.2
    victim_next_weight: float = 0.7
    victim_affinity_weight: float = 0.0
    hint_prior: float = 16.0
    cross_pairs: bool = True
    pair_prior: float = 1.0
    split: SplitConfig | None = None

    def __post_init__(self):
        if self.split is not None and not isinstance(self.split, SplitConfig):
            raise ValueError(
                f"split: expected None or a SplitConfig, got {type(self.split).__name__}"
            )
        if self.prefetch_budget is not None:
            check_int(self.prefetch_budget, "prefetch_budget", 0)
        for name in ("transition_decay", "previous_decay", "affinity_decay"):
            value = check_float(getattr(self, name), name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}: expected a float in (0, 1), got {value}")
        if not isinstance(self.cross_pairs, bool):
            raise ValueError(f"cross_pairs: expected a bool, got {self.cross_pairs!r}")
        for name in (
            "cross_weight",
            "previous_weight",
            "affinity_weight",
            "keep_previous_weight",
            "keep_affinity_weight",
            "victim_next_weight",
            "victim_affinity_weight",
            "hint_prior",
            "pair_prior",
        ):
            if check_float(getattr(self, name), name) < 0.0:
                raise ValueError(f"{name}: expected a float >= 0, got {getattr(self, name)}")
        if self.cross_weight + self.previous_weight + self.affinity_weight <= 0.0:
            raise ValueError(
                "cross_weight, previous_weight, affinity_weight: expected a positive sum"
            )
        for name in ("prefetch_margin", "prefetch_threshold"):
            value = check_float(getattr(self, name), name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a float in [0, 1], got {value}")


@dataclass
class PredictStats:
    """Counters per layer (int64 [num_layers]) since creation.

    hits: uses of a hot expert. stalls: uses of an expert that was not hot. prefetches:
    experts brought in by prefetch. prefetch_hits: first uses of a prefetched expert.
    wasted_prefetches: prefetched experts evicted before any use. transfers = stalls +
    prefetches. predictor_hits / predictor_guesses [predictors, num_layers]: experts of each
    predictor's top-k guess that the token used / guessed, summed over tokens, and
    predictor_uses [predictors, num_layers]: uses where that predictor had a guess (its
    recall's denominator). resplit_evictions: hot experts evicted because a re-split shrank
    the layer; resplit_transfers: later loads (stall or prefetch) of experts a re-split
    evicted, the first after each such eviction (part of transfers, counted apart);
    resplit_moved: experts of capacity moved between layers (int, all layers). evictions: every hot expert evicted (by a
    prefetch, a demand load or a re-split)."""

    hits: np.ndarray
    stalls: np.ndarray
    prefetches: np.ndarray
    prefetch_hits: np.ndarray
    wasted_prefetches: np.ndarray
    predictor_hits: np.ndarray | None = None
    predictor_guesses: np.ndarray | None = None
    predictor_uses: np.ndarray | None = None
    resplit_evictions: np.ndarray | None = None
    resplit_transfers: np.ndarray | None = None
    resplit_moved: int = 0
    evictions: np.ndarray | None = None

    def __post_init__(self):
        for name in ("resplit_evictions", "resplit_transfers", "evictions"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros_like(self.hits))
        for name in ("predictor_hits", "predictor_guesses", "predictor_uses"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros((len(PREDICTOR_NAMES), len(self.hits)), np.int64))

    @property
    def transfers(self) -> np.ndarray:
        return self.stalls + self.prefetches

    def recall(self) -> dict[str, float]:
        """Per predictor, all layers: fraction of used experts that its top-k guess named."""
        return predictor_rates(self.predictor_hits, self.predictor_uses)

    def precision(self) -> dict[str, float]:
        """Per predictor, all layers: fraction of its guessed experts that the token used."""
        return predictor_rates(self.predictor_hits, self.predictor_guesses)

    def report(self) -> dict[str, dict[str, float]]:
        """Predictor name -> {recall, precision}, all layers (hints only where some were
        given): what ``moeray replay`` reports, in-process and through the service."""
        return predictor_report(self.predictor_hits, self.predictor_guesses, self.predictor_uses)


def predictor_rates(hits, totals) -> dict[str, float]:
    """Predictor name -> hits / totals summed over layers (0.0 without any): recall with
    uses, precision with guesses; arrays [predictors, layers] or [predictors]."""
    hits = np.asarray(hits).reshape(len(PREDICTOR_NAMES), -1).sum(axis=1)
    totals = np.asarray(totals).reshape(len(PREDICTOR_NAMES), -1).sum(axis=1)
    return {n: float(h / t) if t else 0.0 for n, h, t in zip(PREDICTOR_NAMES, hits, totals)}


def predictor_report(hits, guesses, uses) -> dict[str, dict[str, float]]:
    """Predictor name -> {recall, precision} from counts [predictors, layers] or [predictors];
    "hints" only where some hint was counted."""
    recall, precision = predictor_rates(hits, uses), predictor_rates(hits, guesses)
    hinted = np.asarray(uses).reshape(len(PREDICTOR_NAMES), -1)[_HINTS].sum() > 0
    return {
        n: {"recall": recall[n], "precision": precision[n]}
        for n in PREDICTOR_NAMES
        if n != "hints" or hinted
    }


class PredictiveCaches:
    """The hot sets of ``num_layers`` layers under the ``moeray`` policy.

    capacity: int in [1, num_experts] (every layer) or a sequence of one per layer (with
    ``config.split``, the starting split of their sum). ``step(ids, new_sequence, hints)``
    feeds one token: ids integer [num_layers, top_k], each in [0, num_experts). Decisions depend
    only on the routing (and hints) fed so far.
    """

    # Tokens without hints run in the native core when it is in use (``_step_native``), the
    # others in numpy (``_step_numpy``, the reference); both keep the same state, so they
    # interleave. A test sets this False to compare the two.
    _native = IS_NATIVE and hasattr(backend, "_predict_step")

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        capacity,
        config: PredictConfig = PredictConfig(),
    ):
        self.num_layers = check_int(num_layers, "num_layers", 1)
        self.num_experts = check_int(num_experts, "num_experts", 1)
        self.top_k = check_int(top_k, "top_k", 1, num_experts)
        self.capacity = per_layer_capacity(capacity, num_layers, num_experts)
        self.config = config
        L, E = num_layers, num_experts
        self._rows = np.arange(L)
        self._hot = np.zeros((L, E), dtype=bool)
        self._hot_count = np.zeros(L, dtype=np.int64)
        self._pending = np.zeros((L, E), dtype=bool)  # prefetched, not yet used
        self._touch = np.zeros((L, E), dtype=np.float64)  # last touch, for ties
        self._clock = 0
        # Transition tables hold decayed counts, scaled so that decay is lazy: an event adds
        # the scale, and the scale grows by 1/decay per token (_scale for the cross-layer
        # tables, _prev_scale for the previous-token ones).
        self._cross = np.zeros((L, E, E))  # [l, e at l-1, e' at l]; row 0 unused
        self._cross_n = np.zeros((L, E))
        self._prev = np.zeros((L, E, E))  # [l, e at t-1, e' at t]
        # Pair table [l, pair at l-1, e' at l]: a pair (a <= b) of the previous layer's experts
        # tells more than each alone. Too many pairs for PAIR_TABLE_ENTRIES share hashed buckets.
        self._pair_a, self._pair_b = np.triu_indices(top_k, 1)
        pairs = E * (E + 1) // 2
        use_pairs = config.cross_pairs and top_k > 1 and L > 1
        self._pair_buckets = min(pairs, max(1, PAIR_TABLE_ENTRIES // (L * E))) if use_pairs else 0
        self._pair = np.zeros((L, self._pair_buckets, E))
        self._pair_n = np.zeros((L, self._pair_buckets))
        self._prev_n = np.zeros((L, E))
        self._scale = 1.0
        self._prev_scale = 1.0
        self._affinity = np.zeros((L, E))
        self._last_ids: np.ndarray | None = None
        z = lambda: np.zeros(L, dtype=np.int64)  # noqa: E731
        self._stats = PredictStats(z(), z(), z(), z(), z())
        self._guesses: list = []
        # Hints: decayed per-layer counts of hinted experts used, hinted, and uses at layers
        # with hints (precision and recall estimates).
        self._hint_hits = np.zeros(L)
        self._hint_guesses = np.zeros(L)
        self._hint_uses = np.zeros(L)
        self._split = (
            CapacitySplit.for_model(L, E, top_k, self.capacity, config.split)
            if config.split is not None
            else None
        )
        self._resplit_out: np.ndarray | None = None  # [l, e]: evicted by a re-split, not reloaded
        self._due: list = []  # re-split plans for the next token
        self._native_arrays: dict | None = None  # _native_state(), cached

    @property
    def config(self) -> PredictConfig:
        return self._config

    @config.setter
    def config(self, config: PredictConfig) -> None:
        """A new config applies from the next token on (the layer actors change the budget)."""
        if not isinstance(config, PredictConfig):
            raise TypeError(f"config: expected a PredictConfig, got {type(config).__name__}")
        self._config = config
        budget = config.prefetch_budget
        self._native_config = {
            "prefetch_budget": self.top_k if budget is None else budget,
            **{name: float(getattr(config, name)) for name in _NATIVE_WEIGHTS},
        }

    # ------------------------------------------------------------------ predictions

    def _table_scores(self, table, counts, ids) -> np.ndarray:
        """Mean over the k source experts of P(e' | source): float [L, E] (0 with no data)."""
        rows = np.arange(len(ids))[:, None]
        num = table[rows, ids]  # [L, k, E]
        den = counts[rows, ids][..., None]
        return (num / np.maximum(den, 1e-300)).sum(axis=1) * (1.0 / ids.shape[1])

    def _pair_index(self, src: np.ndarray) -> np.ndarray:
        """Bucket of every pair of each row's experts: src int [n, k] -> int [n, k(k-1)/2]."""
        a, b = src[:, self._pair_a], src[:, self._pair_b]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        index = lo * self.num_experts - lo * (lo - 1) // 2 + (hi - lo)  # triangular, a <= b
        if self._pair_buckets < self.num_experts * (self.num_experts + 1) // 2:
            index = index.astype(np.int64) * 2654435761 % self._pair_buckets  # hashed, spread
        return index

    def _cross_scores(self, src: np.ndarray) -> np.ndarray:
        """P(e' at l | routing at l - 1) for l >= 1 from src = ids[:-1]: float [L - 1, E], the
        mean over the source experts (or over their pairs, each backed off to its two
        experts' tables by pair_prior) of the decayed transition frequencies."""
        rows = self._rows[:-1, None]
        den = np.maximum(self._cross_n[1:][rows, src], 1e-300)[..., None]
        cond = self._cross[1:][rows, src] / den
        if not self._pair_buckets:
            return cond.mean(axis=1)
        back = 0.5 * (cond[:, self._pair_a] + cond[:, self._pair_b])  # [L - 1, pairs, E]
        index = self._pair_index(src)
        prior = self.config.pair_prior * self._scale
        num = self._pair[1:][rows, index] + prior * back
        den = self._pair_n[1:][rows, index][..., None] + prior
        return (num / np.maximum(den, 1e-300)).mean(axis=1)

    def _learn_cross(self, ids: np.ndarray, inc: float) -> None:
        # A router's k experts are distinct, so the index triples are too (plain += is exact;
        # a repeated id within one token's routing counts once, as do hashed pairs colliding).
        rows = self._rows[1:, None]
        self._cross[rows[..., None], ids[:-1, :, None], ids[1:, None, :]] += inc
        self._cross_n[rows, ids[:-1]] += inc
        if self._pair_buckets:
            index = self._pair_index(ids[:-1])
            self._pair[rows[..., None], index[:, :, None], ids[1:, None, :]] += inc
            self._pair_n[rows, index] += inc

    def _guess_stats(self, index: int, scores: np.ndarray, ids: np.ndarray) -> None:
        """Queues the top-k guess of ``scores`` [n, E] against ``ids`` [n, k] for predictor
        ``index``, rows for the last n layers; counted in batches (one numpy pass per 256
        tokens)."""
        self._guesses.append((index, scores.astype(np.float32), ids))
        if len(self._guesses) >= 1024:
            self._flush_guesses()

    def _flush_guesses(self) -> None:
        k, st = self.top_k, self._stats
        for index in range(len(PREDICTOR_NAMES)):
            batch = [(s, i) for j, s, i in self._guesses if j == index]
            if not batch:
                continue
            scores = np.concatenate([s for s, _ in batch])
            ids = np.concatenate([i for _, i in batch])
            layers = np.concatenate([self._rows[self.num_layers - len(i) :] for _, i in batch])
            # The k highest float32 scores, ties to the lower expert id (argpartition leaves
            # the choice among ties open; the native step counts by the same rule).
            guess = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            valid = np.take_along_axis(scores, guess, axis=1) > 0.0
            used = np.zeros(scores.shape, dtype=bool)
            np.put_along_axis(used, ids, True, axis=1)
            hit = np.take_along_axis(used, guess, axis=1) & valid
            L = self.num_layers
            st.predictor_hits[index] += np.bincount(layers, hit.sum(axis=1), L).astype(np.int64)
            st.predictor_guesses[index] += np.bincount(layers, valid.sum(axis=1), L).astype(
                np.int64
            )
            st.predictor_uses[index] += np.bincount(layers, minlength=L) * k
        self._guesses.clear()

    def _evict(self, hot: np.ndarray, layers: np.ndarray, victim: np.ndarray) -> None:
        """Evicts expert victim[l] of every layer l where ``layers`` (bool [L]) is set; a
        prefetched expert leaving unused counts as a wasted prefetch."""
        if not layers.any():
            return
        er, ev = self._rows[layers], victim[layers]
        self._stats.wasted_prefetches += np.bincount(
            er[self._pending[er, ev]], minlength=self.num_layers
        )
        hot[er, ev] = False
        self._pending[er, ev] = False
        self._hot_count -= layers
        self._stats.evictions += layers

    def _keep_scores(self, ids: np.ndarray) -> np.ndarray:
        """How much each expert is worth keeping for the token after one routed ``ids``
        [L, top_k]: the demand-eviction score, float [L, E] (least recently touched lowest
        among equals)."""
        cfg = self.config
        nxt = self._table_scores(self._prev, self._prev_n, ids)
        keep = cfg.keep_previous_weight * nxt + cfg.keep_affinity_weight * self._affinity
        return keep - 1e-9 * (1.0 - self._touch / max(self._clock, 1))

    def _hot_value(self, p: np.ndarray) -> np.ndarray:
        """What keeping each expert is worth when a prefetch looks for a victim: float [L, E]
        from this token's estimates ``p``."""
        cfg, value = self.config, p
        if cfg.victim_next_weight:
            cond = (
                self._prev / np.maximum(self._prev_n, 1e-300)[..., None]
            )  # [l, e at t, e' at t+1]
            value = value + cfg.victim_next_weight / self.top_k * np.einsum("le,lef->lf", p, cond)
        if cfg.victim_affinity_weight:
            value = value + cfg.victim_affinity_weight * self._affinity
        return value

    def set_capacity(self, capacity) -> None:
        """Sets each layer's capacity from the next token on: int in [1, num_experts] or one per
        layer (a re-split: see ``moeray.policy.split``). A layer over its new capacity evicts the
        hot experts least likely to be used by the next token, counted in resplit_evictions;
        a layer that grows fills the room by later prefetches and loads."""
        self.capacity = per_layer_capacity(capacity, self.num_layers, self.num_experts)
        self._native_arrays = None  # holds the old capacity (and maybe no _resplit_out)
        over = self._hot_count > self.capacity
        if not over.any():
            return
        if self._resplit_out is None:
            self._resplit_out = np.zeros_like(self._hot)
        keep = self._keep_scores(self._last_ids) if self._last_ids is not None else -self._touch
        while over.any():
            victim = np.where(self._hot, keep, np.inf).argmin(axis=1)
            self._evict(self._hot, over, victim)
            self._stats.resplit_evictions += over
            self._resplit_out[self._rows[over], victim[over]] = True
            over = self._hot_count > self.capacity

    def _count_reloads(self, layers: np.ndarray, experts: np.ndarray) -> None:
        """Loads of ``experts`` at ``layers`` (int arrays): those a re-split evicted count as
        re-split transfers, once."""
        if self._resplit_out is None or not len(layers):
            return
        back = self._resplit_out[layers, experts]
        if back.any():
            self._stats.resplit_transfers += np.bincount(layers[back], minlength=self.num_layers)
            self._resplit_out[layers[back], experts[back]] = False

    @property
    def stats(self) -> PredictStats:
        """Counters so far (see PredictStats)."""
        self._flush_guesses()
        return self._stats

    def hot_set(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s hot experts now and, of those, the ones prefetched and not used
        yet (int64 ids, ascending): what shard residency follows."""
        layer = check_int(layer, "layer", 0, self.num_layers - 1)
        hot = np.flatnonzero(self._hot[layer])
        return hot, np.flatnonzero(self._pending[layer])

    # ------------------------------------------------------------------ one token

    def step(self, ids, new_sequence: bool = False, hints=None) -> None:
        """Serves one token: ids integer [num_layers, top_k]; new_sequence: the token starts a
        sequence (the previous-token predictor has nothing to go on); hints: None or integer
        [num_layers, h], h >= 1, each in [-1, num_experts) (-1: no hint), an engine's
        predicted experts of this token at each layer (see the module docstring)."""
        hinted = self._check_hints(hints) if hints is not None else None
        ids = np.asarray(ids)
        if ids.shape != (self.num_layers, self.top_k) or ids.dtype.kind not in "iu":
            raise ValueError(
                f"ids: expected integers of shape {(self.num_layers, self.top_k)}, "
                f"got {ids.dtype} {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"ids: expected ids in [0, {self.num_experts})")
        ids = ids.astype(np.intp)
        st = self._stats
        for plan in self._due:  # a re-split is part of this token, not of the one before
            self.set_capacity(plan.capacity)
            st.resplit_moved += plan.moved
        self._due = []
        have_prev = self._last_ids is not None and not new_sequence
        self._clock += 1
        if hinted is None and self._native:
            self._step_native(ids, have_prev)
        else:
            self._step_numpy(ids, have_prev, hinted)
        self._last_ids = ids
        if self._split is not None:
            self._due = self._split.observe(ids[None])  # from the next token on

    def _step_native(self, ids: np.ndarray, have_prev: bool) -> None:
        """``_step_numpy`` without hints, in one call of the native core (the same decisions
        and state; see ``moeray.native._core._predict_step``)."""
        cfg = self.config
        scale = self._scale
        self._scale /= cfg.transition_decay  # lazy decay of the tables, as in _step_numpy
        self._prev_scale /= cfg.previous_decay
        if self._native_arrays is None:  # built once; set_capacity drops it
            self._native_arrays = self._native_state()
        backend._predict_step(
            self._native_arrays,
            ids,
            self._last_ids if have_prev else None,
            self._clock,
            scale,
            self._scale,
            self._prev_scale,
            self._native_config,
        )
        if self._scale > 1e200:  # the kernel divided the tables by it
            self._scale = 1.0
        if self._prev_scale > 1e200:
            self._prev_scale = 1.0

    def _native_state(self) -> dict:
        """The arrays ``_predict_step`` reads and updates in place (by the names it expects);
        every one is updated in place elsewhere too, so the dict stays valid until
        ``set_capacity`` replaces ``capacity`` or creates ``_resplit_out``."""
        st = self._stats
        return {
            "hot": self._hot,
            "hot_count": self._hot_count,
            "pending": self._pending,
            "touch": self._touch,
            "capacity": self.capacity,
            "resplit_out": self._resplit_out,
            "cross": self._cross,
            "cross_n": self._cross_n,
            "pair": self._pair,
            "pair_n": self._pair_n,
            "prev": self._prev,
            "prev_n": self._prev_n,
            "affinity": self._affinity,
            "hits": st.hits,
            "stalls": st.stalls,
            "prefetches": st.prefetches,
            "prefetch_hits": st.prefetch_hits,
            "wasted_prefetches": st.wasted_prefetches,
            "evictions": st.evictions,
            "resplit_transfers": st.resplit_transfers,
            "predictor_hits": st.predictor_hits,
            "predictor_guesses": st.predictor_guesses,
            "predictor_uses": st.predictor_uses,
        }

    def _step_numpy(self, ids: np.ndarray, have_prev: bool, hinted: np.ndarray | None) -> None:
        """One token's predictions, prefetches, accesses and learning (the clock already
        advanced): ids intp [L, top_k]; hinted: None or bool [L, E] (``_check_hints``). The
        reference of ``_step_native``, and the path of tokens with hints."""
        cfg, st, rows, L = self.config, self._stats, self._rows, self.num_layers

        # Predictions for this token, from routing already seen (see the module docstring).
        weight = np.zeros((L, 1))
        p = np.zeros((L, self.num_experts))
        if cfg.affinity_weight > 0:
            p += cfg.affinity_weight * self._affinity
            weight += cfg.affinity_weight
        self._guess_stats(2, self._affinity, ids)
        if have_prev:
            prev = self._table_scores(self._prev, self._prev_n, self._last_ids)
            self._guess_stats(1, prev, ids)
            if cfg.previous_weight > 0:
                p += cfg.previous_weight * prev
                weight += cfg.previous_weight
        if L > 1:
            cross = np.zeros_like(p)
            cross[1:] = self._cross_scores(ids[:-1])
            self._guess_stats(0, cross[1:], ids[1:])
            if cfg.cross_weight > 0:
                p[1:] += cfg.cross_weight * cross[1:]
                weight[1:] += cfg.cross_weight
        p /= np.maximum(weight, 1e-300)
        if hinted is not None:
            p = self._apply_hints(p, hinted)
        self._guess_stats(3, p, ids)

        # Prefetch: the most likely cold experts, each against the least likely hot one.
        hot = self._hot
        value = self._hot_value(p)
        budget = self.top_k if cfg.prefetch_budget is None else cfg.prefetch_budget
        for _ in range(budget):
            cand_scores = np.where(hot, -np.inf, p)
            cand = cand_scores.argmax(axis=1)
            cand_p = cand_scores[rows, cand]
            full = self._hot_count >= self.capacity
            victim_scores = np.where(hot, value + 1e-9 * self._touch / self._clock, np.inf)
            victim = victim_scores.argmin(axis=1)
            bar = np.where(
                full, victim_scores[rows, victim] + cfg.prefetch_margin, cfg.prefetch_margin
            )
            go = (cand_p > bar) & (cand_p > cfg.prefetch_threshold)
            if not go.any():
                break
            self._evict(hot, go & full, victim)
            gr, gc = rows[go], cand[go]
            self._count_reloads(gr, gc)
            hot[gr, gc] = True
            self._pending[gr, gc] = True
            self._touch[gr, gc] = self._clock
            self._hot_count += go
            st.prefetches += go

        # Accesses: the token's experts in routing order; a miss evicts the hot expert, not used
        # by this token here, least likely to be used by the next token.
        keep = self._keep_scores(ids)
        used = np.zeros_like(hot)
        for j in range(self.top_k):
            e = ids[:, j]
            hit = hot[rows, e]
            st.hits += hit
            first = self._pending[rows, e]
            st.prefetch_hits += first
            self._pending[rows, e] = False
            miss = ~hit
            if miss.any():
                st.stalls += miss
                evict = miss & (self._hot_count >= self.capacity)
                if evict.any():
                    victim = np.where(hot & ~used, keep, np.inf).argmin(axis=1)
                    # capacity below top_k: every hot expert served this token already, and
                    # the one it used first leaves
                    for l in np.flatnonzero(evict & ~(hot & ~used).any(axis=1)):
                        victim[l] = next(x for x in ids[l, :j] if hot[l, x])
                    self._evict(hot, evict, victim)
                mr, me = rows[miss], e[miss]
                self._count_reloads(mr, me)
                hot[mr, me] = True
                self._hot_count += miss
            used[rows, e] = True
            self._touch[rows, e] = self._clock

        # Learn from this token's routing.
        self._scale /= cfg.transition_decay  # lazy decay of the tables
        self._prev_scale /= cfg.previous_decay
        if L > 1:
            self._learn_cross(ids, self._scale)
        if have_prev:
            inc = self._prev_scale
            self._prev[rows[:, None, None], self._last_ids[:, :, None], ids[:, None, :]] += inc
            self._prev_n[rows[:, None], self._last_ids] += inc
        if self._scale > 1e200:
            for a in (self._cross, self._cross_n, self._pair, self._pair_n):
                a /= self._scale
            self._scale = 1.0
        if self._prev_scale > 1e200:
            self._prev /= self._prev_scale
            self._prev_n /= self._prev_scale
            self._prev_scale = 1.0
        self._affinity *= cfg.affinity_decay
        self._affinity[rows[:, None], ids] += 1.0 - cfg.affinity_decay
        if hinted is not None:
            self._learn_hints(hinted, used)

    # ------------------------------------------------------------------ hints

    def _check_hints(self, hints) -> np.ndarray:
        """hints as bool [L, E]: hinted[l, e] when some hint for layer l names e."""
        hints = np.asarray(hints)
        if (
            hints.ndim != 2
            or hints.shape[0] != self.num_layers
            or hints.shape[1] < 1
            or hints.dtype.kind not in "iu"
        ):
            raise ValueError(
                f"hints: expected integers of shape [{self.num_layers}, h], h >= 1, "
                f"got {hints.dtype} {hints.shape}"
            )
        if hints.min() < -1 or hints.max() >= self.num_experts:
            raise ValueError(f"hints: expected ids in [0, {self.num_experts}) or -1 (no hint)")
        hints = hints.astype(np.intp)
        hinted = np.zeros((self.num_layers, self.num_experts + 1), dtype=bool)
        hinted[self._rows[:, None], hints] = True  # -1 lands in the spare last column
        return hinted[:, :-1]

    def _apply_hints(self, p: np.ndarray, hinted: np.ndarray) -> np.ndarray:
        """The blend ``p`` [L, E] updated by this token's hints (see the module docstring)."""
        prior = self.config.hint_prior
        q = (self._hint_hits / np.maximum(self._hint_guesses + prior, 1e-300))[:, None]
        r = (self._hint_hits / np.maximum(self._hint_uses + prior, 1e-300))[:, None]
        some = hinted.any(axis=1, keepdims=True)
        return np.where(hinted, q + (1.0 - q) * p, np.where(some, (1.0 - r) * p, p))

    def _learn_hints(self, hinted: np.ndarray, used: np.ndarray) -> None:
        some = hinted.any(axis=1)
        right = (hinted & used).sum(axis=1)
        guesses = hinted.sum(axis=1)
        uses = np.where(some, used.sum(axis=1), 0)
        # decay per hinted token of each layer: a token without hints (None, or -1 for every
        # slot of a layer) leaves the layer's hint record as it was
        for counts in (self._hint_hits, self._hint_guesses, self._hint_uses):
            counts[some] *= self.config.transition_decay
        self._hint_hits += right
        self._hint_guesses += guesses
        self._hint_uses += uses
        st = self._stats
        st.predictor_hits[_HINTS] += right
        st.predictor_guesses[_HINTS] += guesses
        st.predictor_uses[_HINTS] += uses

    def run(self, expert_ids, seq_offsets=None, progress=None, hints=None) -> PredictStats:
        """Feeds every token of expert_ids: integer [tokens, num_layers, top_k]; seq_offsets:
        int [sequences + 1] (default one sequence); hints: None or integer [tokens, num_layers,
        h] (see ``step``). Returns ``stats``."""
        expert_ids = np.asarray(expert_ids)
        if hints is not None and np.shape(hints)[:1] != expert_ids.shape[:1]:
            raise ValueError(
                f"hints: expected {expert_ids.shape[0]} tokens, got shape {np.shape(hints)}"
            )
        starts = set(np.asarray(seq_offsets if seq_offsets is not None else [0]).tolist())
        for t in range(expert_ids.shape[0]):
            self.step(
                expert_ids[t], new_sequence=t in starts, hints=None if hints is None else hints[t]
            )
            if progress is not None and (t + 1) % 1024 == 0:
                progress(1024)
        if progress is not None and expert_ids.shape[0] % 1024:
            progress(expert_ids.shape[0] % 1024)
        return self.stats
