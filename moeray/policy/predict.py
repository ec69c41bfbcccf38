"""The ``moeray`` policy: per-layer hot sets driven by online predictions of the next routing.

Three predictors, learned online from the routing so far: cross-layer (pair tables P(e' at l |
a pair at l-1), backed off to single-expert tables), previous-token (P(e' at t | e at t-1) per
layer, within a sequence) and affinity (an EMA of use), blended into one estimate ``p[l, e]``.
Before token t reaches layer l, up to ``prefetch_budget`` cold experts with the highest ``p``
are prefetched, each evicting the hot expert of lowest value if it is worth ``prefetch_margin``
less; a stall loads on demand and evicts the hot expert least likely to be used by the next
token. Optional engine hints (``step(ids, hints=...)``) are weighted by their learned precision
and recall; an optional capacity re-split (``PredictConfig.split``) moves capacity across layers.

Timing: the prefetch for layer l >= 1 of token t uses layer l-1's routing of token t and older
routing only, so ``step`` handles one token's layers together and makes exactly the decisions
of a token-major loop over layers. One token runs in a kernel object built once over this
class's state arrays (``backend._PredictKernel``): native for tokens without hints, the twin's
phases (``moeray.native._reference.predict``) otherwise, bit for bit alike. ``run_window``
serves a window of tokens in one kernel call; ``open_batch`` / ``serve_layer`` /
``close_batch`` serve a batch of tokens layer by layer, as an engine's routers run, with the
decisions of ``step``. How the defaults were chosen, and the model in full: docs/design.md,
"The predictive policy".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeray.native import IS_NATIVE, backend
from moeray.native._reference import predict as twin
from moeray.policy._validate import check_float, check_int
from moeray.policy.split import CapacitySplit, SplitConfig, per_layer_capacity

__all__ = [
    "PLAN_EVENT_KINDS",
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
# The config fields a kernel reads, besides prefetch_budget.
_KERNEL_WEIGHTS = (
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
# The kinds of a plan event (``PredictiveCaches.take_events``), in the order of their codes.
PLAN_EVENT_KINDS = twin.EVENT_KINDS
_EVICTION = PLAN_EVENT_KINDS.index("eviction")
_INT64 = np.dtype(np.int64)
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

    # Tokens without hints run on the native kernel when it is in use, the others on the twin's
    # phases (``_step_numpy``); both work on the same state, so they interleave. A test sets this
    # False to compare the two.
    _native = IS_NATIVE

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
        self._native_kernel = self._twin_kernel = None  # built from the arrays below when used
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
        # The open batch (open_batch): its kernel, each layer's ids as served, and the events of
        # its re-split evictions (None: no batch open, or events not recorded)
        self._batch_kernel = None
        self._batch_layers: list[np.ndarray] = []
        self._batch_events: np.ndarray | None = None

    @property
    def config(self) -> PredictConfig:
        return self._config

    @config.setter
    def config(self, config: PredictConfig) -> None:
        """A new config applies from the next token on (the layer actors change the budget)."""
        if not isinstance(config, PredictConfig):
            raise TypeError(f"config: expected a PredictConfig, got {type(config).__name__}")
        if getattr(self, "_batch_kernel", None) is not None:
            raise ValueError("config: a batch is open (close_batch first)")
        self._drop_kernels()
        self._config = config

    # ------------------------------------------------------------------ kernels

    def _kernel_arguments(self) -> dict:
        """The arguments of a ``_PredictKernel`` over this object's state: every array is
        updated in place, here too, so a kernel stays valid until ``set_capacity`` replaces
        ``capacity`` (or creates ``_resplit_out``) or the config changes. Neither kernel
        caches the state, so the twin's steps and a merge of tables may write it between
        calls."""
        st, cfg = self._stats, self.config
        return dict(
            hot=self._hot,
            hot_count=self._hot_count,
            pending=self._pending,
            touch=self._touch,
            capacity=self.capacity,
            resplit_out=self._resplit_out,
            cross=self._cross,
            cross_n=self._cross_n,
            pair=self._pair,
            pair_n=self._pair_n,
            prev=self._prev,
            prev_n=self._prev_n,
            affinity=self._affinity,
            hits=st.hits,
            stalls=st.stalls,
            prefetches=st.prefetches,
            prefetch_hits=st.prefetch_hits,
            wasted_prefetches=st.wasted_prefetches,
            evictions=st.evictions,
            resplit_transfers=st.resplit_transfers,
            predictor_hits=st.predictor_hits,
            predictor_guesses=st.predictor_guesses,
            predictor_uses=st.predictor_uses,
            top_k=self.top_k,
            prefetch_budget=self.top_k if cfg.prefetch_budget is None else cfg.prefetch_budget,
            **{name: float(getattr(cfg, name)) for name in _KERNEL_WEIGHTS},
        )

    def _kernel(self):
        """The native kernel (tokens without hints), built once."""
        if self._native_kernel is None:
            self._native_kernel = backend._PredictKernel(**self._kernel_arguments())
        return self._native_kernel

    def _twin(self):
        """The twin's kernel (tokens with hints, or every token off the native path), built
        once."""
        if self._twin_kernel is None:
            self._twin_kernel = twin._PredictKernel(**self._kernel_arguments())
        return self._twin_kernel

    def _drop_kernels(self) -> None:
        """Forgets both kernels (rebuilt when next used), the twin's queued guesses counted."""
        if self._twin_kernel is not None:
            self._twin_kernel.flush()
        self._native_kernel = self._twin_kernel = None

    # ------------------------------------------------------------------ valuations

    def _keep_scores(self, ids: np.ndarray) -> np.ndarray:
        """How much each expert is worth keeping for the token after one routed ``ids``
        [L, top_k]: the demand-eviction score, float [L, E] (``twin.keep_scores``; a hook of
        the numpy step)."""
        return twin.keep_scores(self._twin(), ids, self._clock)

    def _hot_value(self, p: np.ndarray) -> np.ndarray:
        """What keeping each expert is worth when a prefetch looks for a victim: float [L, E]
        from this token's estimates ``p`` (``twin.hot_value``; a hook of the numpy step)."""
        return twin.hot_value(self._twin(), p)

    def set_capacity(self, capacity) -> None:
        """Sets each layer's capacity from the next token on: int in [1, num_experts] or one per
        layer (a re-split: see ``moeray.policy.split``). A layer over its new capacity evicts the
        hot experts least likely to be used by the next token, counted in resplit_evictions;
        a layer that grows fills the room by later prefetches and loads."""
        self._refuse_in_batch("set_capacity")
        self.capacity = per_layer_capacity(capacity, self.num_layers, self.num_experts)
        self._drop_kernels()  # they hold the old capacity (and maybe no _resplit_out)
        over = self._hot_count > self.capacity
        if not over.any():
            return
        if self._resplit_out is None:
            self._resplit_out = np.zeros_like(self._hot)
        keep = self._keep_scores(self._last_ids) if self._last_ids is not None else -self._touch
        while over.any():
            victim = np.where(self._hot, keep, np.inf).argmin(axis=1)
            twin.evict(self._twin(), over, victim)
            self._stats.resplit_evictions += over
            self._resplit_out[self._rows[over], victim[over]] = True
            over = self._hot_count > self.capacity

    @property
    def stats(self) -> PredictStats:
        """Counters so far (see PredictStats)."""
        if self._twin_kernel is not None:
            self._twin_kernel.flush()
        return self._stats

    # ------------------------------------------------------------------ learned tables

    def tables(self, layers: slice = slice(None)) -> dict[str, np.ndarray]:
        """What the predictors learned, for rows ``layers`` (default all): the cross-layer,
        pair and previous-token tables and counts as decayed counts (the lazy scale divided
        out) and the affinity rows; copies. A session that loads them (``load_tables``)
        predicts from the first token as this one does now."""
        self._refuse_in_batch("tables")
        return {
            "cross": self._cross[layers] / self._scale,
            "cross_n": self._cross_n[layers] / self._scale,
            "pair": self._pair[layers] / self._scale,
            "pair_n": self._pair_n[layers] / self._scale,
            "prev": self._prev[layers] / self._prev_scale,
            "prev_n": self._prev_n[layers] / self._prev_scale,
            "affinity": self._affinity[layers].copy(),
        }

    def load_tables(self, tables: dict[str, np.ndarray], first_layer: int = 0) -> None:
        """Replaces the learned tables of rows first_layer .. first_layer + n - 1 by ``tables``
        (``tables()``'s form, n rows each); hot sets and counters stay. ValueError naming the
        table when a shape or value is wrong (nothing changes then)."""
        self._refuse_in_batch("load_tables")
        targets = {
            "cross": (self._cross, self._scale),
            "cross_n": (self._cross_n, self._scale),
            "pair": (self._pair, self._scale),
            "pair_n": (self._pair_n, self._scale),
            "prev": (self._prev, self._prev_scale),
            "prev_n": (self._prev_n, self._prev_scale),
            "affinity": (self._affinity, 1.0),
        }
        if not isinstance(tables, dict) or set(tables) != set(targets):
            raise ValueError(f"tables: expected the keys {sorted(targets)}")
        check_int(first_layer, "first_layer", 0, self.num_layers - 1)
        checked = {}
        for name, (target, _) in targets.items():
            value = np.asarray(tables[name], dtype=np.float64)
            rows = len(value) if value.ndim else 0
            if value.shape[1:] != target.shape[1:] or not 1 <= rows <= len(target) - first_layer:
                raise ValueError(
                    f"tables: {name}: expected [rows, {', '.join(map(str, target.shape[1:]))}] "
                    f"from layer {first_layer}, got {value.shape}"
                )
            if not np.isfinite(value).all() or (value < 0).any():
                raise ValueError(f"tables: {name}: expected finite counts >= 0")
            checked[name] = value
        if len({len(v) for v in checked.values()}) != 1:
            raise ValueError("tables: expected the same number of layers in every table")
        for name, (target, scale) in targets.items():
            value = checked[name]
            target[first_layer : first_layer + len(value)] = value * scale

    def plan_core(self):
        """The native helper that makes an engine session's plans from the hot rows before and
        after each ``serve_layer`` (``native/src/session.hpp``): it reads the rows the kernel
        writes in place."""
        return backend._HotPlan(self._hot)

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
        self._refuse_in_batch("step")
        hinted = self._check_hints(hints) if hints is not None else None
        ids = np.asarray(ids)
        if ids.shape != (self.num_layers, self.top_k) or ids.dtype.kind not in "iu":
            raise ValueError(
                f"ids: expected integers of shape {(self.num_layers, self.top_k)}, "
                f"got {ids.dtype} {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"ids: expected ids in [0, {self.num_experts})")
        ids = ids.astype(np.int64)
        st = self._stats
        for plan in self._due:  # a re-split is part of this token, not of the one before
            self.set_capacity(plan.capacity)
            st.resplit_moved += plan.moved
        self._due = []
        last_ids = self._last_ids if self._last_ids is not None and not new_sequence else None
        self._clock += 1
        scale = self._scale  # the tables' scale before this token
        self._scale /= self.config.transition_decay  # lazy decay: this token's events weigh more
        self._prev_scale /= self.config.previous_decay
        if hinted is None and self._native:
            self._kernel().step(ids, last_ids, self._clock, scale, self._scale, self._prev_scale)
        else:
            self._step_numpy(ids, last_ids, scale, hinted)
        if self._scale > 1e200:  # the kernel divided the tables by it
            self._scale = 1.0
        if self._prev_scale > 1e200:
            self._prev_scale = 1.0
        self._last_ids = ids
        if self._split is not None:
            self._due = self._split.observe(ids[None])  # from the next token on

    def _step_numpy(self, ids, last_ids, scale: float, hinted: np.ndarray | None) -> None:
        """One token on the twin's phases (the reference of the native ``step``, and the path
        of tokens with hints): ids int64 [L, top_k]; last_ids the previous token's or None;
        scale the tables' scale before this token (the clock and scales already advanced);
        hinted: None or bool [L, E] (``_check_hints``). Victims are valued by ``_hot_value``
        and ``_keep_scores``, so a subclass can replace them."""
        kernel = self._twin()
        p = twin.predict(kernel, ids, last_ids, scale)
        if hinted is not None:
            p = self._apply_hints(p, hinted)
        used = twin.serve(
            kernel,
            p,
            ids,
            last_ids,
            self._clock,
            self._scale,
            self._prev_scale,
            value=self._hot_value,
            keep=self._keep_scores,
        )
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
        if hints is None and self._windowed():
            new_sequence = np.zeros(expert_ids.shape[0], dtype=bool)
            new_sequence[[t for t in starts if 0 <= t < len(new_sequence)]] = True
            for first in range(0, expert_ids.shape[0], 1024):
                chunk = expert_ids[first : first + 1024]
                self.run_window(chunk, new_sequence[first : first + 1024])
                if progress is not None:
                    progress(len(chunk))
            return self.stats
        for t in range(expert_ids.shape[0]):
            self.step(
                expert_ids[t], new_sequence=t in starts, hints=None if hints is None else hints[t]
            )
            if progress is not None and (t + 1) % 1024 == 0:
                progress(1024)
        if progress is not None and expert_ids.shape[0] % 1024:
            progress(expert_ids.shape[0] % 1024)
        return self.stats

    # ------------------------------------------------------------------ a window of tokens

    def _windowed(self) -> bool:
        """Whether a window of tokens without hints may run in one kernel call: no re-split
        can fall inside it, and (off the native path) the victim valuations are this class's
        own (a subclass's hooks run only in ``_step_numpy``)."""
        return self._split is None and not self._due and self._kernel_decides()

    def _kernel_decides(self) -> bool:
        """Whether a kernel makes this object's decisions without its hooks: on the native
        path, or with this class's own victim valuations (a subclass's ``_hot_value`` and
        ``_keep_scores`` run only in ``_step_numpy``)."""
        cls = type(self)
        own = cls._hot_value is PredictiveCaches._hot_value
        return self._native or (own and cls._keep_scores is PredictiveCaches._keep_scores)

    def run_window(self, expert_ids, new_sequence=None, first_layer: int = 0) -> None:
        """Serves T tokens without hints exactly as T ``step`` calls: expert_ids integer [T,
        num_layers, top_k], each in [0, num_experts); new_sequence None (the stream continues)
        or bool [T], True where a token starts a sequence. One kernel call (the native one
        without the GIL) advances the clock and the tables' scales itself; with
        ``config.split`` set (a re-split may fall inside the window) the tokens go through
        ``step`` one by one. first_layer in [0, num_layers): the layers below it are routing
        context only (a layer actor's shadow layer): their ids feed first_layer's cross-layer
        predictor, and what happens to their own state and counters is left open (the window
        step leaves them as they were, ``step`` serves them); the other layers' decisions are
        the same either way."""
        self._refuse_in_batch("run_window")
        check_int(first_layer, "first_layer", 0, self.num_layers - 1)
        ids = np.asarray(expert_ids)
        shape = (self.num_layers, self.top_k)
        if ids.ndim != 3 or ids.shape[1:] != shape or ids.dtype.kind not in "iu":
            raise ValueError(
                f"expert_ids: expected integers of shape [tokens, {shape[0]}, {shape[1]}], "
                f"got {ids.dtype} {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"expert_ids: expected ids in [0, {self.num_experts})")
        starts = None
        if new_sequence is not None:
            starts = np.asarray(new_sequence)
            if starts.shape != (len(ids),) or starts.dtype != bool:
                raise ValueError(
                    f"new_sequence: expected bool [{len(ids)}], got {starts.dtype} {starts.shape}"
                )
            starts = np.ascontiguousarray(starts)
        if not self._windowed():
            for t in range(len(ids)):
                self.step(ids[t], new_sequence=starts is not None and bool(starts[t]))
            return
        if not len(ids):
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        kernel = self._kernel() if self._native else self._twin()
        cfg = self.config
        self._clock, self._scale, self._prev_scale = kernel.run_window(
            ids,
            starts,
            self._last_ids,
            self._clock,
            self._scale,
            self._prev_scale,
            cfg.transition_decay,
            cfg.previous_decay,
            first_layer,
        )
        self._last_ids = ids[-1].copy()

    # ------------------------------------------------------------------ a batch, layer by layer

    def open_batch(self, new_sequence, record: bool = False) -> None:
        """Opens a batch of B tokens that an engine serves layer by layer: ``serve_layer(l,
        ids)`` for l = 0 .. num_layers - 1 in order, then ``close_batch()``. new_sequence:
        bool [B], True where a token starts a sequence; record: keep the plan events
        (``take_events``).

        Each token gets the clock and table scales that B consecutive ``step`` calls would
        give it, and the re-splits due apply now, so after ``close_batch`` the state, counters
        and hot sets are exactly those of B ``step`` calls (tests/test_predict_layers.py):
        layer l's work touches only layer l's rows of the state and reads the routing of the
        layer before (this token, served earlier in the batch) and of the token before (this
        layer, served earlier in the same call). One exception: with ``config.split`` set, a
        re-split that the batch's routing calls for applies from the next batch (``step``
        applies it from the next token), so batches of one token are exact there. No hints on
        this path (``step`` takes them)."""
        self._refuse_in_batch("open_batch")
        starts = np.asarray(new_sequence)
        if starts.ndim != 1 or starts.dtype != bool or len(starts) < 1:
            raise ValueError(
                f"new_sequence: expected bool [tokens], tokens >= 1, got {starts.dtype} "
                f"{starts.shape}"
            )
        if not isinstance(record, bool):
            raise ValueError(f"record: expected a bool, got {record!r}")
        if not self._kernel_decides():
            raise ValueError("open_batch: this class values victims its own way (step only)")
        st = self._stats
        hot = self._hot.copy() if record and self._due else None
        for plan in self._due:  # a re-split is part of the batch's first token
            self.set_capacity(plan.capacity)
            st.resplit_moved += plan.moved
        self._due = []
        self._batch_events = None
        if hot is not None:
            layer, expert = np.nonzero(hot & ~self._hot)  # evicted by the re-split
            self._batch_events = np.stack(
                [np.zeros_like(layer), layer, expert, np.full_like(layer, _EVICTION)], axis=1
            ).astype(np.int64)
        kernel = self._kernel() if self._native else self._twin()
        cfg = self.config
        self._clock, self._scale, self._prev_scale = kernel.open_batch(
            self._last_ids,
            starts if starts.flags.c_contiguous else starts.copy(),
            self._clock,
            self._scale,
            self._prev_scale,
            cfg.transition_decay,
            cfg.previous_decay,
            record,
        )
        self._batch_kernel = kernel
        self._batch_layers = []

    def serve_layer(self, layer: int, ids) -> None:
        """Serves layer ``layer`` (the next in order) of every token of the open batch: ids
        integer [B, top_k], each in [0, num_experts). Each token's predictions and prefetches
        for the layer (unless done), then its accesses and learning; then the next layer's
        predictions and prefetches for the batch's first token, which need only this layer's
        routing: the prefetch an engine can start now (``hot_set(layer + 1)``, or the events
        of ``take_events``). A layer out of order is a ValueError; nothing changes then."""
        kernel = self._batch_kernel
        if kernel is None:
            raise ValueError("layer: no batch is open (open_batch first)")
        if not (type(ids) is np.ndarray and ids.dtype == _INT64 and ids.flags.c_contiguous):
            ids = np.asarray(ids)
            if ids.dtype.kind not in "iu":
                raise ValueError(f"ids: expected integers [tokens, {self.top_k}], got {ids.dtype}")
            ids = np.ascontiguousarray(ids, dtype=np.int64)
        kernel.serve_layer(layer, ids)
        if self._split is not None:  # observed at close_batch; the caller may reuse its buffer
            self._batch_layers.append(ids.copy())

    def take_events(self) -> np.ndarray:
        """The plan events of the open batch (recorded: ``open_batch(record=True)``) since the
        last call: int64 [n, 4] rows (token in the batch, layer, expert, kind), kind an index
        into PLAN_EVENT_KINDS (stall load, prefetch load, eviction), in the order they
        happened; an open batch's re-split evictions come first, as token 0's. O(events)."""
        if self._batch_kernel is None:
            raise ValueError("take_events: no batch is open")
        events = self._batch_kernel.take_events()
        if self._batch_events is not None and len(self._batch_events):
            events = np.concatenate([self._batch_events, events])
        self._batch_events = None
        return events

    def close_batch(self) -> None:
        """Closes the open batch once every layer is served: its last token becomes the
        previous token of the next; with ``config.split``, the split observes its routing."""
        if self._batch_kernel is None:
            raise ValueError("close_batch: no batch is open")
        self._last_ids = self._batch_kernel.close_batch()
        self._batch_kernel = None
        self._batch_events = None
        layers, self._batch_layers = self._batch_layers, []
        if self._split is not None:
            self._due += self._split.observe(np.stack(layers, axis=1))

    def abort_batch(self) -> None:
        """Ends the open batch early (an engine whose forward failed after some layers): the
        layers served keep what they did, the others never see the batch's tokens, and the next
        token starts afresh at the previous-token predictor (as a new sequence does); the
        re-split does not observe the batch."""
        if self._batch_kernel is None:
            raise ValueError("abort_batch: no batch is open")
        self._batch_kernel.abort_batch()
        self._batch_kernel = None
        self._batch_events = None
        self._batch_layers = []
        self._last_ids = None

    def _refuse_in_batch(self, what: str) -> None:
        if self._batch_kernel is not None:
            raise ValueError(f"{what}: a batch is open (close_batch first)")
