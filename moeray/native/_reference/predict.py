"""Twin of ``src/predict.hpp``: one token of the ``moeray`` policy over its numpy state arrays.

``_PredictKernel`` holds the state of ``moeray.policy.predict.PredictiveCaches`` (L layers, E
experts, k = top_k), checked once when built, and ``step`` serves one token in four phases,
each a function here over all layers at once: ``predict`` (the blend of the three predictors),
``prefetch``, ``access`` and ``learn`` (``serve`` runs the last three). The native kernel runs
the layers one after the other and reaches the same state bit for bit. The policy's numpy path
(tokens with engine hints) calls ``predict`` and ``serve`` itself, with the hints between.

A batch of tokens may also be served layer by layer (``open_batch``, ``serve_layer``,
``close_batch``: the engine's order, a layer as its router runs): per layer and token,
``ahead_layer`` (predictions and prefetches, decidable once the layer before is routed) and
``serve_layer`` (the guesses counted, accesses, learning), each the all-layer phases above run
on a one-layer view of the state (``_LayerView``). ``run_window`` serves a whole window of
tokens as consecutive steps, advancing the clock and the lazy-decay scales itself.

Predictor guesses are queued and counted 1024 at a time (one numpy pass each); ``flush``
counts the rest: the predictor counters are complete after it.
"""

from __future__ import annotations

import numpy as np

from moeray.native._reference._checks import as_float, check_array, check_int, check_writeable

__all__ = [
    "EVENT_KINDS",
    "_PredictKernel",
    "access",
    "ahead_layer",
    "count_guess",
    "cross_scores",
    "evict",
    "hot_value",
    "keep_scores",
    "learn",
    "pair_index",
    "predict",
    "prefetch",
    "serve",
    "serve_layer",
    "table_scores",
]

# The kinds of a plan event (token, layer, expert, kind), in the order of their codes.
EVENT_KINDS = ("stall load", "prefetch load", "eviction")
_STALL_LOAD, _PREFETCH_LOAD, _EVICTION = range(3)

_INT64_MAX = 2**63 - 1
_HASH = 2654435761
_TINY = 1e-300  # no division by a zero count
# name, dtype and shape ("L", "E", "B", "P": layers, experts, pair buckets, predictors), in
# the order of the constructor's parameters and its checks
_ARRAYS = (
    ("hot", "bool", "LE"),
    ("hot_count", "int64", "L"),
    ("pending", "bool", "LE"),
    ("touch", "float64", "LE"),
    ("capacity", "int64", "L"),
    ("resplit_out", "bool", "LE"),
    ("cross", "float64", "LEE"),
    ("cross_n", "float64", "LE"),
    ("pair", "float64", "LBE"),
    ("pair_n", "float64", "LB"),
    ("prev", "float64", "LEE"),
    ("prev_n", "float64", "LE"),
    ("affinity", "float64", "LE"),
    ("hits", "int64", "L"),
    ("stalls", "int64", "L"),
    ("prefetches", "int64", "L"),
    ("prefetch_hits", "int64", "L"),
    ("wasted_prefetches", "int64", "L"),
    ("evictions", "int64", "L"),
    ("resplit_transfers", "int64", "L"),
    ("predictor_hits", "int64", "PL"),
    ("predictor_guesses", "int64", "PL"),
    ("predictor_uses", "int64", "PL"),
)
# the float parameters and their ranges: (lo, hi, open interval, in words)
_ANY = (0.0, float("inf"), False, "a float >= 0")
_UNIT = (0.0, 1.0, False, "a float in [0, 1]")
_FLOATS = {
    "cross_weight": _ANY,
    "previous_weight": _ANY,
    "affinity_weight": _ANY,
    "prefetch_margin": _UNIT,
    "prefetch_threshold": _UNIT,
    "keep_previous_weight": _ANY,
    "keep_affinity_weight": _ANY,
    "victim_next_weight": _ANY,
    "victim_affinity_weight": _ANY,
    "pair_prior": _ANY,
    "affinity_decay": (0.0, 1.0, True, "a float in (0, 1)"),
}


def _shape_2d(value, label: str, dtype: str, expected: str) -> tuple[int, int]:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{label}: expected a numpy {dtype} array, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{label}: expected shape {expected}, got {list(value.shape)}")
    return value.shape


def _config_float(value, name: str) -> float:
    lo, hi, open_, expected = _FLOATS[name]
    if isinstance(value, bool) or not isinstance(value, (float, int)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    x = float(value)
    inside = lo < x < hi if open_ else lo <= x <= hi
    if not np.isfinite(x) or not inside:
        raise ValueError(f"{name}: expected {expected}, got {x}")
    return x


def _check_scale(value, name: str) -> float:
    x = as_float(value, name)
    if not np.isfinite(x) or not x > 0.0:
        raise ValueError(f"{name}: expected a finite float > 0, got {x}")
    return x


class _PredictKernel:
    """The state of ``PredictiveCaches``, checked once: C-contiguous numpy arrays, written in
    place by ``step`` (all writeable but ``capacity``). bool [L, E]: hot, pending, resplit_out
    (None: no re-split yet); int64 [L]: hot_count, capacity and the counters hits .. resplit_
    transfers; float64: touch [L, E], cross [L, E, E], cross_n [L, E], pair [L, B, E], pair_n
    [L, B] (B = 0: no pair tables; else top_k >= 2), prev [L, E, E], prev_n [L, E], affinity
    [L, E]; predictor_hits, predictor_guesses, predictor_uses int64 [P, L], P >= 4 (rows 0..3:
    cross-layer, previous-token, affinity, combined). top_k in [1, E]; prefetch_budget >= 0
    (None already resolved); the weights >= 0, prefetch_margin and prefetch_threshold in
    [0, 1], affinity_decay in (0, 1): ``PredictConfig``'s fields."""

    def __init__(
        self,
        hot,
        hot_count,
        pending,
        touch,
        capacity,
        resplit_out,
        cross,
        cross_n,
        pair,
        pair_n,
        prev,
        prev_n,
        affinity,
        hits,
        stalls,
        prefetches,
        prefetch_hits,
        wasted_prefetches,
        evictions,
        resplit_transfers,
        predictor_hits,
        predictor_guesses,
        predictor_uses,
        top_k,
        prefetch_budget,
        cross_weight,
        previous_weight,
        affinity_weight,
        prefetch_margin,
        prefetch_threshold,
        keep_previous_weight,
        keep_affinity_weight,
        victim_next_weight,
        victim_affinity_weight,
        pair_prior,
        affinity_decay,
    ):
        arrays = dict(locals())
        L, E = _shape_2d(hot, "hot", "bool", "[num_layers, num_experts]")
        if L < 1 or E < 1 or E > 2**31 - 1:
            raise ValueError(
                f"hot: expected shape [num_layers, num_experts], each >= 1, got {list(hot.shape)}"
            )
        if E * (E + 1) // 2 > _INT64_MAX // _HASH:  # the hashed pair index stays in int64
            raise ValueError(f"hot: at most 83,000 experts, got {E}")
        k = check_int(top_k, "top_k", 1, E, f"an int in [1, {E}]")
        if not isinstance(pair, np.ndarray):
            raise TypeError(f"pair: expected a numpy float64 array, got {type(pair).__name__}")
        if pair.ndim != 3:
            raise ValueError(f"pair: expected shape [{L}, buckets, {E}], got {list(pair.shape)}")
        B = pair.shape[1]
        if B > E * (E + 1) // 2 or (B > 0 and k < 2):
            raise ValueError(
                f"pair: expected 0 buckets with top_k 1, else at most {E * (E + 1) // 2}, got {B}"
            )
        P = _shape_2d(predictor_hits, "predictor_hits", "int64", "[predictors, num_layers]")[0]
        if P < 4:
            raise ValueError(f"predictor_hits: expected at least 4 predictors, got {P}")
        sizes = {"L": L, "E": E, "B": B, "P": P}
        for name, dtype, dims in _ARRAYS:
            value = arrays[name]
            if name == "resplit_out" and value is None:
                continue
            shape = tuple(sizes[d] for d in dims)
            if name == "capacity":  # read only
                check_array(value, name, dtype, shape, "")
            else:
                check_writeable(value, name, dtype, shape)
            setattr(self, name, value)
        if resplit_out is None:
            self.resplit_out = None
        self.layers, self.experts, self.top_k, self.buckets = L, E, k, B
        self.prefetch_budget = check_int(
            prefetch_budget, "prefetch_budget", 0, _INT64_MAX, "an int >= 0"
        )
        for name in _FLOATS:
            setattr(self, name, _config_float(arrays[name], name))
        self.rows = np.arange(L)
        self.pair_a, self.pair_b = np.triu_indices(k, 1)
        # (predictor, float32 scores [n, E], ids [n, k], layers [n]), not counted yet
        self._guesses: list = []
        self._events: list | None = None  # plan events of the open batch, when recorded
        self._event_token = self._layer = 0  # where this kernel's events happen (a view: its own)
        self._views: dict[int, _LayerView] = {}
        self._batch: _Batch | None = None

    def _token(self, ids, name: str) -> np.ndarray:
        """ids int64 [L, top_k], C-contiguous, each in [0, E)."""
        check_array(ids, name, "int64", (self.layers, self.top_k), "")
        if ids.min() < 0 or ids.max() >= self.experts:
            bad = ids[(ids < 0) | (ids >= self.experts)].flat[0]
            raise ValueError(f"{name}: every id must be in [0, {self.experts}), got {bad}")
        return ids

    def step(self, ids, last_ids, clock, scale, next_scale, next_prev_scale) -> None:
        """One token without hints: ids int64 [L, top_k], each in [0, E); last_ids the previous
        token's (None: none in this sequence); clock the token's clock (already advanced), >= 1;
        scale the cross-layer tables' scale before this token, next_scale and next_prev_scale
        the scales its events add (> 1e200: the tables are divided by them after), each finite
        and > 0."""
        ids = self._token(ids, "ids")
        if last_ids is not None:
            last_ids = self._token(last_ids, "last_ids")
        clock = check_int(clock, "clock", 1, _INT64_MAX, "an int >= 1")
        scale = _check_scale(scale, "scale")
        next_scale = _check_scale(next_scale, "next_scale")
        next_prev_scale = _check_scale(next_prev_scale, "next_prev_scale")
        p = predict(self, ids, last_ids, scale)
        serve(self, p, ids, last_ids, clock, next_scale, next_prev_scale)

    def run_window(
        self,
        ids,
        new_sequence,
        last_ids,
        clock,
        scale,
        prev_scale,
        transition_decay,
        previous_decay,
        first_layer,
    ) -> tuple[int, float, float]:
        """Tokens ids int64 [T, L, top_k] without hints, as T steps: new_sequence bool [T] or
        None (no token starts a sequence); last_ids the token's before the window (None:
        none); clock, scale, prev_scale the policy's before the window, each advanced per
        token as ``PredictiveCaches.step`` advances them (the tables divided by a scale past
        1e200, which restarts at 1). Layers below first_layer (in [0, L)) are routing only:
        they feed first_layer's cross-layer predictor, nothing of theirs runs or changes.
        Returns (clock, scale, prev_scale) after the window."""
        if not isinstance(ids, np.ndarray) or ids.ndim != 3:
            raise ValueError(f"ids: expected shape [tokens, {self.layers}, {self.top_k}]")
        T = ids.shape[0]
        check_array(ids, "ids", "int64", (T, self.layers, self.top_k), "")
        if ids.size and (ids.min() < 0 or ids.max() >= self.experts):
            bad = ids[(ids < 0) | (ids >= self.experts)].flat[0]
            raise ValueError(f"ids: every id must be in [0, {self.experts}), got {bad}")
        if new_sequence is not None:
            check_array(new_sequence, "new_sequence", "bool", (T,), "")
        if last_ids is not None:
            last_ids = self._token(last_ids, "last_ids")
        clock = _Clock(clock, T, scale, prev_scale, transition_decay, previous_decay)
        first = check_int(
            first_layer, "first_layer", 0, self.layers - 1, f"an int in [0, {self.layers - 1}]"
        )
        if self._batch is not None:
            raise ValueError("run_window: a batch is open (close_batch first)")
        for t in range(T):
            before = ids[t - 1] if t else last_ids
            last = None if new_sequence is not None and new_sequence[t] else before
            token_clock, scale, next_scale, next_prev_scale = clock.advance()
            if not first:  # every layer at once
                p = predict(self, ids[t], last, scale)
                serve(self, p, ids[t], last, token_clock, next_scale, next_prev_scale)
                continue
            for layer in range(first, self.layers):  # one layer at a time, as a batch's
                view = self._view(layer, 0)
                prev = None if last is None else last[layer]
                guesses = ahead_layer(view, ids[t, layer - 1], prev, scale, token_clock)
                serve_layer(
                    view,
                    guesses,
                    ids[t, layer],
                    ids[t, layer - 1],
                    prev,
                    token_clock,
                    next_scale,
                    next_prev_scale,
                )
        return clock.state()

    # -------------------------------------------------------------- a batch, layer by layer

    def open_batch(
        self,
        last_ids,
        new_sequence,
        clock,
        scale,
        prev_scale,
        transition_decay,
        previous_decay,
        record,
    ) -> tuple[int, float, float]:
        """Opens a batch of B tokens served layer by layer: last_ids int64 [L, top_k] the
        token's before the batch (None: none); new_sequence bool [B]; clock, scale,
        prev_scale, transition_decay, previous_decay as ``run_window`` takes them, each
        token's clock and scales advanced as steps advance them; record: keep the plan events
        for ``take_events``. Returns (clock, scale, prev_scale) after the batch's tokens."""
        if not isinstance(new_sequence, np.ndarray) or new_sequence.ndim != 1:
            raise ValueError("new_sequence: expected a numpy bool array [tokens]")
        B = len(new_sequence)
        check_array(new_sequence, "new_sequence", "bool", (B,), "")
        if B < 1:
            raise ValueError("new_sequence: expected at least one token, got 0")
        if last_ids is not None:
            last_ids = self._token(last_ids, "last_ids").copy()
        clock = _Clock(clock, B, scale, prev_scale, transition_decay, previous_decay)
        if self._batch is not None:
            raise ValueError("open_batch: a batch is open (close_batch first)")
        tokens = [clock.advance() for _ in range(B)]
        self._batch = _Batch(
            np.zeros((B, self.layers, self.top_k), dtype=np.int64),
            last_ids,
            new_sequence.copy(),
            *(list(column) for column in zip(*tokens)),
        )
        self._events = [] if record else None
        return clock.state()

    def serve_layer(self, layer, ids) -> None:
        """Layer ``layer`` (the next in order, from 0) of every token of the open batch: ids
        int64 [B, top_k], each in [0, E); each token's predictions and prefetches for the
        layer unless done, then its accesses and learning; then the next layer's predictions
        and prefetches for the first token (the prefetch an engine can start now)."""
        batch = self._batch
        error = _layer_error(batch, layer, self.layers)
        if error:
            raise ValueError(error)
        B, k = len(batch.new_sequence), self.top_k
        check_array(ids, "ids", "int64", (B, k), "")
        if ids.min() < 0 or ids.max() >= self.experts:
            bad = ids[(ids < 0) | (ids >= self.experts)].flat[0]
            raise ValueError(f"ids: every id must be in [0, {self.experts}), got {bad}")
        batch.ids[:, layer] = ids
        for b in range(B):
            guesses = batch.ahead if b == 0 and batch.ahead is not None else None
            if guesses is None:
                guesses = self._ahead(layer, b)
            src, last = self._context(layer, b)
            view = self._view(layer, b)
            serve_layer(
                view,
                guesses,
                batch.ids[b, layer],
                src,
                last,
                batch.clock[b],
                batch.next_scale[b],
                batch.next_prev_scale[b],
            )
        batch.ahead = None
        batch.next_layer = layer + 1
        if layer + 1 < self.layers:
            batch.ahead = self._ahead(layer + 1, 0)

    def take_events(self) -> np.ndarray:
        """The plan events recorded since the last call: int64 [n, 4] rows (token, layer,
        expert, kind), kind an index into EVENT_KINDS, in the order they happened."""
        events = self._events or []
        out = np.array(events, dtype=np.int64).reshape(len(events), 4)
        if self._events is not None:
            self._events = []
        return out

    def close_batch(self) -> np.ndarray:
        """Closes the open batch (every layer served); returns its last token's ids int64 [L,
        top_k]."""
        if self._batch is None:
            raise ValueError("close_batch: no batch is open")
        if self._batch.next_layer < self.layers:
            raise ValueError(
                f"close_batch: layers {self._batch.next_layer}..{self.layers - 1} of the batch "
                "not served"
            )
        last, self._batch, self._events = self._batch.ids[-1].copy(), None, None
        return last

    def abort_batch(self) -> None:
        """Ends the open batch without its layers not served yet (they never see its
        tokens); the layers served keep what they did."""
        if self._batch is None:
            raise ValueError("abort_batch: no batch is open")
        self._batch, self._events = None, None

    def _context(self, layer: int, b: int):
        """(src, last) of token b at ``layer``: its ids at layer - 1 (None at 0) and the token
        before's at ``layer`` (None where b starts a sequence or nothing came before)."""
        batch = self._batch
        src = batch.ids[b, layer - 1] if layer else None
        last = None
        if not batch.new_sequence[b]:
            before = batch.ids[b - 1] if b else batch.last_ids
            last = None if before is None else before[layer]
        return src, last

    def _view(self, layer: int, b: int) -> _LayerView:
        view = self._views.get(layer)
        if view is None:
            view = self._views[layer] = _LayerView(self, layer)
        view._events, view._event_token = self._events, b
        return view

    def _ahead(self, layer: int, b: int) -> list:
        src, last = self._context(layer, b)
        batch = self._batch
        return ahead_layer(self._view(layer, b), src, last, batch.scale[b], batch.clock[b])

    def flush(self) -> None:
        """Counts the queued predictor guesses: per predictor, the k highest float32 scores
        (ties to the lower expert id), those > 0 guessed, those the token used hit."""
        k, L = self.top_k, self.layers
        for index in range(self.predictor_hits.shape[0]):
            batch = [(s, i, rows) for j, s, i, rows in self._guesses if j == index]
            if not batch:
                continue
            scores = np.concatenate([s for s, _, _ in batch])
            ids = np.concatenate([i for _, i, _ in batch])
            layers = np.concatenate([rows for _, _, rows in batch])
            # argpartition would leave the choice among ties open
            guess = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            valid = np.take_along_axis(scores, guess, axis=1) > 0.0
            used = np.zeros(scores.shape, dtype=bool)
            np.put_along_axis(used, ids, True, axis=1)
            hit = np.take_along_axis(used, guess, axis=1) & valid
            self.predictor_hits[index] += np.bincount(layers, hit.sum(axis=1), L).astype(np.int64)
            self.predictor_guesses[index] += np.bincount(layers, valid.sum(axis=1), L).astype(
                np.int64
            )
            self.predictor_uses[index] += np.bincount(layers, minlength=L) * k
        self._guesses.clear()


# ---------------------------------------------------------------------- predictions


def count_guess(
    kernel: _PredictKernel, index: int, scores: np.ndarray, ids: np.ndarray, layers=None
) -> None:
    """Queues predictor ``index``'s guess ``scores`` [n, E] against ``ids`` [n, k], rows for
    ``layers`` (int [n]; default the last n layers; ``_PredictKernel.flush`` counts them)."""
    if layers is None:
        layers = kernel.rows[kernel.layers - len(ids) :]
    kernel._guesses.append((index, scores.astype(np.float32), ids, layers))
    if len(kernel._guesses) >= 1024:
        kernel.flush()


def reciprocal(counts: np.ndarray) -> np.ndarray:
    """1 / counts, a zero count read as 1e-300 (its table row is zero too): a table's
    quotients are its rows times these, multiplied rather than divided because a division
    costs several multiplications and a prediction reads some 10^4 quotients at 256 experts."""
    return 1.0 / np.maximum(counts, _TINY)


def table_scores(table: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean over the k source experts ids [L, k] of P(e' | source) = table[l, source, e'] *
    reciprocal(counts[l, source]): float [L, E] (0 with no data)."""
    rows = np.arange(len(ids))[:, None]
    num = table[rows, ids]  # [L, k, E]
    return (num * reciprocal(counts[rows, ids])[..., None]).sum(axis=1) * (1.0 / ids.shape[1])


def pair_index(kernel: _PredictKernel, src: np.ndarray) -> np.ndarray:
    """Bucket of every pair of each row's experts: src int [n, k] -> int [n, k(k-1)/2], the
    triangular index (a <= b), hashed when the tables hold fewer buckets than pairs."""
    E = kernel.experts
    a, b = src[:, kernel.pair_a], src[:, kernel.pair_b]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    index = lo * E - lo * (lo - 1) // 2 + (hi - lo)
    if kernel.buckets < E * (E + 1) // 2:
        index = index.astype(np.int64) * _HASH % kernel.buckets  # hashed, spread
    return index


def cross_scores(
    kernel: _PredictKernel, src: np.ndarray, scale: float, layers: slice = slice(1, None)
) -> np.ndarray:
    """P(e' at l | routing at l - 1) for the n layers l of ``layers`` (default every l >= 1)
    from src = their previous layers' ids [n, k]: float [n, E], the mean over the source
    experts (or over their pairs, each backed off to its two experts' tables by pair_prior,
    in units of ``scale``) of the decayed transition frequencies."""
    k = kernel
    rows = np.arange(len(src))[:, None]
    cond = k.cross[layers][rows, src] * reciprocal(k.cross_n[layers][rows, src])[..., None]
    if not k.buckets:
        return cond.sum(axis=1) * (1.0 / src.shape[1])
    back = 0.5 * (cond[:, k.pair_a] + cond[:, k.pair_b])  # [n, pairs, E]
    index = pair_index(k, src)
    prior = k.pair_prior * scale
    num = k.pair[layers][rows, index] + prior * back
    den = k.pair_n[layers][rows, index] + prior
    return (num * reciprocal(den)[..., None]).sum(axis=1) * (1.0 / index.shape[1])


def predict(kernel: _PredictKernel, ids, last_ids, scale: float) -> np.ndarray:
    """The blend p [L, E] of the predictors available for this token (affinity; previous-token
    from last_ids unless None; cross-layer from the layer before, l >= 1), each predictor's
    guess counted; ``scale``: the cross-layer tables' scale before this token."""
    k, L = kernel, kernel.layers
    weight = np.zeros((L, 1))
    p = np.zeros((L, k.experts))
    if k.affinity_weight > 0:
        p += k.affinity_weight * k.affinity
        weight += k.affinity_weight
    count_guess(k, 2, k.affinity, ids)
    if last_ids is not None:
        prev = table_scores(k.prev, k.prev_n, last_ids)
        count_guess(k, 1, prev, ids)
        if k.previous_weight > 0:
            p += k.previous_weight * prev
            weight += k.previous_weight
    if L > 1:
        cross = np.zeros_like(p)
        cross[1:] = cross_scores(k, ids[:-1], scale)
        count_guess(k, 0, cross[1:], ids[1:])
        if k.cross_weight > 0:
            p[1:] += k.cross_weight * cross[1:]
            weight[1:] += k.cross_weight
    p *= reciprocal(weight)
    return p


# ---------------------------------------------------------------------- prefetches and accesses


def hot_value(kernel: _PredictKernel, p: np.ndarray) -> np.ndarray:
    """What keeping each expert is worth when a prefetch looks for a victim: float [L, E], p
    plus the next token's estimated use of it (the previous-token table applied to p) and its
    affinity, times their weights."""
    k, value = kernel, p
    if k.victim_next_weight:
        cond = k.prev * reciprocal(k.prev_n)[..., None]  # [l, e at t, e' at t+1]
        value = value + k.victim_next_weight / k.top_k * np.einsum("le,lef->lf", p, cond)
    if k.victim_affinity_weight:
        value = value + k.victim_affinity_weight * k.affinity
    return value


def keep_scores(kernel: _PredictKernel, ids: np.ndarray, clock: int) -> np.ndarray:
    """How much each expert is worth keeping for the token after one routed ``ids`` [L, k]: the
    demand-eviction score, float [L, E] (least recently touched lowest among equals)."""
    k = kernel
    nxt = table_scores(k.prev, k.prev_n, ids)
    keep = k.keep_previous_weight * nxt + k.keep_affinity_weight * k.affinity
    return keep - 1e-9 * (1.0 - k.touch / max(clock, 1))


def evict(kernel: _PredictKernel, layers: np.ndarray, victim: np.ndarray) -> None:
    """Evicts expert victim[l] of every layer l where ``layers`` (bool [L]) is set; a
    prefetched expert leaving unused counts as a wasted prefetch."""
    if not layers.any():
        return
    k = kernel
    er, ev = k.rows[layers], victim[layers]
    _note(k, _EVICTION, er, ev)
    k.wasted_prefetches += np.bincount(er[k.pending[er, ev]], minlength=k.layers)
    k.hot[er, ev] = False
    k.pending[er, ev] = False
    k.hot_count -= layers
    k.evictions += layers


def _note(kernel, kind: int, rows: np.ndarray, experts: np.ndarray) -> None:
    """Records plan events of ``kind`` at rows x experts when the kernel records them."""
    if kernel._events is not None:
        for r, e in zip(rows.tolist(), experts.tolist()):
            kernel._events.append((kernel._event_token, kernel._layer + r, e, kind))


def _count_reloads(kernel: _PredictKernel, layers: np.ndarray, experts: np.ndarray) -> None:
    """Loads of ``experts`` at ``layers`` (int arrays): those a re-split evicted count as
    re-split transfers, once."""
    k = kernel
    if k.resplit_out is None or not len(layers):
        return
    back = k.resplit_out[layers, experts]
    if back.any():
        k.resplit_transfers += np.bincount(layers[back], minlength=k.layers)
        k.resplit_out[layers[back], experts[back]] = False


def prefetch(kernel: _PredictKernel, p: np.ndarray, value: np.ndarray, clock: int) -> None:
    """Up to prefetch_budget rounds: in each layer the likeliest cold expert comes in if its p
    passes prefetch_threshold and, in a full layer, the least valuable hot expert's ``value``
    (ties to the least recently touched) plus prefetch_margin; that expert leaves."""
    k, rows, hot = kernel, kernel.rows, kernel.hot
    for _ in range(k.prefetch_budget):
        cand_scores = np.where(hot, -np.inf, p)
        cand = cand_scores.argmax(axis=1)
        cand_p = cand_scores[rows, cand]
        full = k.hot_count >= k.capacity
        victim_scores = np.where(hot, value + 1e-9 * k.touch / clock, np.inf)
        victim = victim_scores.argmin(axis=1)
        bar = np.where(full, victim_scores[rows, victim] + k.prefetch_margin, k.prefetch_margin)
        go = (cand_p > bar) & (cand_p > k.prefetch_threshold)
        if not go.any():
            break
        evict(k, go & full, victim)
        gr, gc = rows[go], cand[go]
        _count_reloads(k, gr, gc)
        _note(k, _PREFETCH_LOAD, gr, gc)
        hot[gr, gc] = True
        k.pending[gr, gc] = True
        k.touch[gr, gc] = clock
        k.hot_count += go
        k.prefetches += go


def access(kernel: _PredictKernel, ids: np.ndarray, keep: np.ndarray, clock: int) -> np.ndarray:
    """The token's experts in routing order: a hit, or a stall that loads the expert and, in a
    full layer, evicts the hot expert not used by this token of lowest ``keep`` (capacity below
    top_k: the one it used first). Returns used, bool [L, E]."""
    k, rows, hot = kernel, kernel.rows, kernel.hot
    used = np.zeros_like(hot)
    for j in range(k.top_k):
        e = ids[:, j]
        hit = hot[rows, e]
        k.hits += hit
        k.prefetch_hits += k.pending[rows, e]
        k.pending[rows, e] = False
        miss = ~hit
        if miss.any():
            k.stalls += miss
            full = miss & (k.hot_count >= k.capacity)
            if full.any():
                victim = np.where(hot & ~used, keep, np.inf).argmin(axis=1)
                # capacity below top_k: every hot expert served this token already
                for l in np.flatnonzero(full & ~(hot & ~used).any(axis=1)):
                    victim[l] = next(x for x in ids[l, :j] if hot[l, x])
                evict(k, full, victim)
            mr, me = rows[miss], e[miss]
            _count_reloads(k, mr, me)
            _note(k, _STALL_LOAD, mr, me)
            hot[mr, me] = True
            k.hot_count += miss
        used[rows, e] = True
        k.touch[rows, e] = clock
    return used


# ---------------------------------------------------------------------- learning


def learn(kernel: _PredictKernel, ids, last_ids, next_scale: float, next_prev_scale: float) -> None:
    """Adds this token's routing to the tables (the cross-layer and pair tables next_scale per
    event, the previous-token ones next_prev_scale; a repeated index adds once), divides them
    by a scale past 1e200, and moves the affinity towards this token's experts."""
    k, rows = kernel, kernel.rows
    if k.layers > 1:
        below = rows[1:, None]
        k.cross[below[..., None], ids[:-1, :, None], ids[1:, None, :]] += next_scale
        k.cross_n[below, ids[:-1]] += next_scale
        if k.buckets:
            index = pair_index(k, ids[:-1])
            k.pair[below[..., None], index[:, :, None], ids[1:, None, :]] += next_scale
            k.pair_n[below, index] += next_scale
    if last_ids is not None:
        k.prev[rows[:, None, None], last_ids[:, :, None], ids[:, None, :]] += next_prev_scale
        k.prev_n[rows[:, None], last_ids] += next_prev_scale
    if next_scale > 1e200:
        for a in (k.cross, k.cross_n, k.pair, k.pair_n):
            a /= next_scale
    if next_prev_scale > 1e200:
        k.prev /= next_prev_scale
        k.prev_n /= next_prev_scale
    k.affinity *= k.affinity_decay
    k.affinity[rows[:, None], ids] += 1.0 - k.affinity_decay


def serve(
    kernel: _PredictKernel,
    p: np.ndarray,
    ids,
    last_ids,
    clock: int,
    next_scale: float,
    next_prev_scale: float,
    value=None,
    keep=None,
) -> np.ndarray:
    """The token after its predictions ``p`` [L, E]: the combined guess counted, prefetches,
    accesses and learning. value(p) and keep(ids): the valuations of prefetch and demand
    victims (default ``hot_value`` and ``keep_scores``; a caller may pass its own). Returns
    used, bool [L, E]."""
    k = kernel
    count_guess(k, 3, p, ids)
    prefetch(k, p, hot_value(k, p) if value is None else value(p), clock)
    used = access(k, ids, keep_scores(k, ids, clock) if keep is None else keep(ids), clock)
    learn(k, ids, last_ids, next_scale, next_prev_scale)
    return used


# ---------------------------------------------------------------------- one layer of one token


class _Clock:
    """The lazy-decay state of ``PredictiveCaches`` (clock, scale, prev_scale) and its decays,
    checked for ``tokens`` tokens; ``advance`` moves it one token as ``step`` does."""

    def __init__(self, clock, tokens, scale, prev_scale, transition_decay, previous_decay):
        self.clock = check_int(clock, "clock", 0, _INT64_MAX - tokens, "an int >= 0")
        self.scale = _check_scale(scale, "scale")
        self.prev_scale = _check_scale(prev_scale, "prev_scale")
        for name, decay in (
            ("transition_decay", transition_decay),
            ("previous_decay", previous_decay),
        ):
            if not 0.0 < decay < 1.0:
                raise ValueError(f"{name}: expected a float in (0, 1)")
        self.transition_decay, self.previous_decay = transition_decay, previous_decay

    def advance(self) -> tuple[int, float, float, float]:
        """One token: its clock, the tables' scale before it, and the scales its events add
        (a scale past 1e200 restarts at 1 after the token: its learning divides by it)."""
        self.clock += 1
        scale = self.scale
        self.scale /= self.transition_decay
        self.prev_scale /= self.previous_decay
        out = self.clock, scale, self.scale, self.prev_scale
        if self.scale > 1e200:
            self.scale = 1.0
        if self.prev_scale > 1e200:
            self.prev_scale = 1.0
        return out

    def state(self) -> tuple[int, float, float]:
        return self.clock, self.scale, self.prev_scale


class _Batch:
    """The open batch of a kernel: ids int64 [B, L, k] (filled a layer at a time), last_ids
    the token's before it or None, new_sequence bool [B], and per token its clock and scales;
    next_layer the layer to serve next; ahead the guesses of the next layer's first token,
    whose predictions and prefetches already ran (None: not yet)."""

    def __init__(self, ids, last_ids, new_sequence, clock, scale, next_scale, next_prev_scale):
        self.ids, self.last_ids, self.new_sequence = ids, last_ids, new_sequence
        self.clock, self.scale = clock, scale
        self.next_scale, self.next_prev_scale = next_scale, next_prev_scale
        self.next_layer = 0
        self.ahead: list | None = None


def _layer_error(batch: _Batch | None, layer, layers: int) -> str:
    """Why ``layer`` cannot be served now ("" when it can)."""
    if batch is None:
        return "layer: no batch is open (open_batch first)"
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        return f"layer: expected an int, got {type(layer).__name__}"
    if layer == batch.next_layer:
        return ""
    if batch.next_layer >= layers:
        return f"layer: every layer of the batch is served, got {layer} (close_batch next)"
    return (
        f"layer: expected {batch.next_layer} (layers in order 0..{layers - 1} per batch), "
        f"got {layer}"
    )


class _LayerView:
    """Layer ``layer`` of a kernel as a one-layer kernel: its arrays are views of the layer's
    rows (written through), its parameters the kernel's; so the all-layer phases above serve
    one layer with the same arithmetic."""

    def __init__(self, kernel: _PredictKernel, layer: int):
        self._kernel, self._layer_index = kernel, layer
        for name, _, _ in _ARRAYS:
            if name.startswith("predictor_"):
                continue
            value = getattr(kernel, name)
            setattr(self, name, None if value is None else value[layer : layer + 1])
        self.layers, self.rows = 1, np.arange(1)
        self._layer, self._event_token, self._events = layer, 0, None

    def __getattr__(self, name):  # the parameters: top_k, weights, pair_a, ...
        return getattr(self._kernel, name)


def ahead_layer(view: _LayerView, src, last, scale: float, clock: int) -> list:
    """Layer l's predictions and prefetches for one token (l = the view's layer): src the
    token's ids [k] at layer l - 1 (None at l = 0), last the previous token's ids [k] at layer
    l (None: none in this sequence), scale the cross-layer tables' scale before the token.
    Reads no routing of layer l. Returns the predictors' guesses [(predictor, float32 scores
    [1, E])], counted by ``serve_layer`` against the routing."""
    k, layer = view, view._layer
    weight = np.zeros((1, 1))
    p = np.zeros((1, k.experts))
    guesses = []
    if k.affinity_weight > 0:
        p += k.affinity_weight * k.affinity
        weight += k.affinity_weight
    guesses.append((2, k.affinity.astype(np.float32)))
    if last is not None:
        prev = table_scores(k.prev, k.prev_n, last[None])
        guesses.append((1, prev.astype(np.float32)))
        if k.previous_weight > 0:
            p += k.previous_weight * prev
            weight += k.previous_weight
    if layer > 0:
        cross = cross_scores(view._kernel, src[None], scale, slice(layer, layer + 1))
        guesses.append((0, cross.astype(np.float32)))
        if k.cross_weight > 0:
            p += k.cross_weight * cross
            weight += k.cross_weight
    p *= reciprocal(weight)
    guesses.append((3, p.astype(np.float32)))
    prefetch(k, p, hot_value(k, p), clock)
    return guesses


def serve_layer(
    view: _LayerView,
    guesses: list,
    ids,
    src,
    last,
    clock: int,
    next_scale: float,
    next_prev_scale: float,
) -> None:
    """Layer l of one token after ``ahead_layer``: its guesses counted against ids [k] (the
    token's routing at l), the accesses, and the learning (src and last as in
    ``ahead_layer``; next_scale and next_prev_scale the scales the token's events add)."""
    k, layer = view._kernel, view._layer
    rows = k.rows[layer : layer + 1]
    for index, scores in guesses:
        count_guess(k, index, scores, ids[None], rows)
    access(view, ids[None], keep_scores(view, ids[None], clock), clock)
    if layer > 0:
        k.cross[layer][src[:, None], ids[None, :]] += next_scale
        k.cross_n[layer][src] += next_scale
        if k.buckets:
            index = pair_index(k, src[None])[0]
            k.pair[layer][index[:, None], ids[None, :]] += next_scale
            k.pair_n[layer][index] += next_scale
    if last is not None:
        k.prev[layer][last[:, None], ids[None, :]] += next_prev_scale
        k.prev_n[layer][last] += next_prev_scale
    if next_scale > 1e200:
        for a in (k.cross, k.cross_n, k.pair, k.pair_n):
            a[layer] /= next_scale
    if next_prev_scale > 1e200:
        k.prev[layer] /= next_prev_scale
        k.prev_n[layer] /= next_prev_scale
    k.affinity[layer] *= k.affinity_decay
    k.affinity[layer][ids] += 1.0 - k.affinity_decay
