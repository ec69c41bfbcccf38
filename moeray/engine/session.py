"""The engine-side data plane: a session in the engine's own process that plans each layer's
fast tier as the layer's router runs.

An engine calls ``route(layer, ids)`` for layers 0, 1, ..., L-1 of each batch, in order, as each
router runs; the answer is that layer's ``LayerPlan``: the experts of this layer to load before
its experts run (what the batch uses and is not hot), the experts of this layer to free once it
ran, and, for a predictive policy, the experts of the next layer to start loading now (and the
ones of the next layer to free to make room). ``hot(layer)`` is the layer's hot set, the plan's
target. The session runs the service's own policies (``moeray.policy.registry``) on the
service's configuration (``ServiceConfig``), so its decisions are those of ``moeray replay
--backend local`` on the same stream: layer l's decisions read only layer l's state, layer l-1's
routing of the same tokens and older routing, so serving the layers of a batch one after the
other makes the decisions of serving its tokens one after the other (tests/test_engine_session.py
checks every policy against the replay).

A capacity re-split (``predict.split``) couples every layer at every token: a session takes it
from a service's updates (``apply_update``), between batches, never on its own.

A route call's work is native (``moeray.native``'s session cores, src/session.hpp): a demand
policy's layer is served and planned in one call (``_DemandSession``, over the DemandCaches'
own caches and this session's affinities); a predictive one's plan is read from the hot rows
before and after ``PredictiveCaches.serve_layer`` (``_HotPlan``). Python checks the call's shape
and order; the ids' range is checked natively before anything changes.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from moeray.actors.config import ServiceConfig
from moeray.actors.messages import PROTOCOL_VERSION, EngineUpdate
from moeray.engine.link import ServiceLink
from moeray.native import backend
from moeray.policy.affinity import ExpertAffinity
from moeray.policy.predict import PredictiveCaches
from moeray.policy.windows import COUNTER_KEYS

__all__ = ["EngineSession", "EngineUpdate", "LayerPlan", "PROTOCOL_VERSION"]

log = logging.getLogger(__name__)

_EMPTY = np.zeros(0, np.int64)
_EMPTY.flags.writeable = False
_INT32, _INT64 = np.dtype(np.int32), np.dtype(np.int64)  # the cores read these in place
_new_plan = tuple.__new__  # LayerPlan(...) without NamedTuple's keyword handling


class LayerPlan(NamedTuple):
    """What the engine does for ``layer`` of the current batch (expert ids, int64, ascending).

    load: experts of ``layer`` to load before its experts run (the batch uses them and they are
    not hot: stalls), and, for a batch of several tokens, the experts the policy brought in for
    its later tokens. evict: experts of ``layer`` to free once the layer ran. prefetch: experts
    of layer + 1 to start loading now, in time for its router (predictive policies; empty for
    demand ones and at the last layer). prefetch_evict: experts of layer + 1 to free to make
    room for them. version: the update (``EngineUpdate.version``) the plan was made under.
    """

    layer: int
    load: np.ndarray = _EMPTY
    evict: np.ndarray = _EMPTY
    prefetch: np.ndarray = _EMPTY
    prefetch_evict: np.ndarray = _EMPTY
    version: int = 0

    # a plan equals itself only (its arrays would compare element by element)
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__


@dataclass
class _Batch:
    """The batch being routed: its size, sequence starts, ids' shape and each layer's routing
    so far."""

    tokens: int
    starts: np.ndarray
    shape: tuple[int, int]
    ids: list[np.ndarray] = field(default_factory=list)


class EngineSession:
    """One engine's plans, layer by layer, under ``config``'s policy and capacities.

    max_batch_tokens: the most tokens one route call may carry (a larger batch is refused before
    anything changes; default ``config.max_step_tokens``). link: None (the session decides
    alone) or a ``moeray.engine.link.ServiceLink``: each routed batch is reported to the
    service through it, and the service's updates are applied at the start of the next batch
    (``attach`` builds one from a service's handle).
    """

    def __init__(self, config: ServiceConfig, max_batch_tokens: int | None = None, link=None):
        if not isinstance(config, ServiceConfig):
            raise TypeError(f"config: expected a ServiceConfig, got {type(config).__name__}")
        self.config = config
        self._max_tokens = config.max_step_tokens if max_batch_tokens is None else max_batch_tokens
        if isinstance(self._max_tokens, bool) or not isinstance(self._max_tokens, int):
            raise TypeError(f"max_batch_tokens: expected an int, got {self._max_tokens!r}")
        if self._max_tokens < 1:
            raise ValueError(f"max_batch_tokens: expected an int >= 1, got {self._max_tokens}")
        self._check_capacity(config)
        L, E = config.num_layers, config.num_experts
        self._last_layer = L - 1
        self._affinity = [ExpertAffinity(config.affinity_config()) for _ in range(L)]
        self._predictive = config.entry.predictive
        if self._predictive:
            # the service's predictive windows run PredictiveCaches without their own split
            self._caches = PredictiveCaches(
                L, E, config.top_k, config.capacity, replace(config.predict, split=None)
            )
            self._layer_affinities = backend._LayerAffinities(self._affinity)
        else:  # every layer in one DemandCaches, as a replay's one actor hosts them
            self._demand = config.entry.build(
                list(range(L)),
                E,
                dict(enumerate(config.capacity)),
                dict(enumerate(self._affinity)),
                config.settings(),
            )
            self._budget = config.prefetch_budgets()
            self._prefetches = [0] * L
        # the native core of the plans: the demand caches are served by it alone from now on
        self._core = (self._caches if self._predictive else self._demand).plan_core()
        self._batch: _Batch | None = None
        self._version = 0
        self._link = link
        self.batches = 0  # batches routed to their last layer
        # (batch number it applied before, update), the latest 10,000: with the routing, what
        # makes the decisions reproducible
        self.applied_updates: deque[tuple[int, EngineUpdate]] = deque(maxlen=10_000)
        self.refused_updates = 0
        self.aborted_batches = 0
        self.loaded_tables: list[tuple[int, int]] = []  # (batch number, first layer) of loads

    @classmethod
    def attach(cls, handle, warm: bool = True, **link_options) -> EngineSession:
        """A session on a running service's configuration (``handle.config``) that reports its
        routing to it and takes its updates (``ServiceLink``'s options). warm: a predictive
        policy starts from the tables the service's layer actors learned from every engine
        (``handle.predictor_tables()``) instead of empty ones. The link exports its state as
        Ray metrics (``handle.link_metrics()``) unless ``metrics`` is given."""
        session = cls(handle.config)
        if warm and session._predictive:
            for first_layer, tables in handle.predictor_tables():
                session.load_tables(tables, first_layer)
        if "metrics" not in link_options and hasattr(handle, "link_metrics"):
            link_options["metrics"] = handle.link_metrics()
        session._link = ServiceLink(handle, **link_options)
        return session

    def load_tables(self, tables: dict, first_layer: int = 0) -> None:
        """Starts the predictive policy's predictors of layers first_layer.. from ``tables``
        (``PredictiveCaches.tables``' form: a service's, or another session's ``tables()``),
        between batches. ValueError for a demand policy, in a batch, or for bad tables."""
        if not self._predictive:
            raise ValueError(f"tables: the {self.config.policy!r} policy learns no tables")
        if self._batch is not None:
            raise ValueError("tables: a batch is being routed; load tables between batches")
        self._caches.load_tables(tables, first_layer)
        self.loaded_tables.append((self.batches, first_layer))

    def tables(self) -> dict:
        """The predictive policy's learned tables, every layer (``load_tables``' form)."""
        if not self._predictive:
            raise ValueError(f"tables: the {self.config.policy!r} policy learns no tables")
        return self._caches.tables()

    @property
    def link(self):
        """The ``ServiceLink`` to a service, or None."""
        return self._link

    def close(self) -> None:
        """Stops the link to the service, if any (the session itself holds no thread)."""
        if self._link is not None:
            self._link.close()

    # ------------------------------------------------------------------ the engine's calls

    def route(self, layer: int, ids, weights=None, new_sequence=None) -> LayerPlan:
        """Layer ``layer``'s routing of the current batch: ids int [B, top_k] in [0,
        num_experts); weights: the router's weights, float [B, top_k] (checked; the policies
        decide by ids alone); new_sequence: with layer 0 only, bool [B] (True where a token
        starts a sequence) or one bool for all, default False. Layers come 0..L-1 for each batch;
        anything else, and bad input, raises a one-line ValueError / TypeError and changes
        nothing. Returns the layer's plan."""
        batch = self._batch
        if not (  # the common call (a batch's next layer, its ids as the cores read them)
            batch is not None
            and type(layer) is int
            and layer == len(batch.ids)
            and type(ids) is np.ndarray
            and ids.shape == batch.shape
            and (ids.dtype is _INT64 or (ids.dtype is _INT32 and not self._predictive))
            and weights is None
            and new_sequence is None
        ):
            layer, ids = self._check_route(layer, ids, weights, new_sequence)
        core = self._core
        if layer == 0:
            core.check(ids)  # the range, before the batch opens
            self._open(ids.shape, new_sequence)
            batch = self._batch
        if self._predictive:
            if layer == 0:
                core.before(0)  # later layers' rows were kept by the plan of the layer before
            self._caches.serve_layer(layer, ids)
            load, evict, fetch, drop = core.plan(layer, ids)
        else:
            load, evict, prefetched = core.route(layer, ids, self._budget[layer])
            if prefetched:
                self._prefetches[layer] += prefetched
            fetch = drop = _EMPTY
        batch.ids.append(ids)
        plan = _new_plan(LayerPlan, (layer, load, evict, fetch, drop, self._version))
        if layer == self._last_layer:
            self._close()
        return plan

    def abort_batch(self) -> None:
        """Ends the batch being routed before its last layer (the engine's forward failed):
        the layers routed keep their decisions, the others never see the batch, the next batch
        starts at layer 0 and afresh at the previous-token predictor, and the service is not told
        of the batch. Nothing to do between batches."""
        if self._batch is None:
            return
        if self._predictive:
            self._caches.abort_batch()
        self.aborted_batches += 1
        self._batch = None

    def hot(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s hot experts now (int64, ascending): what the plans keep resident."""
        layer = self._check_layer(layer)
        if self._predictive:
            return self._caches.hot_set(layer)[0]
        return self._demand.hot_experts(layer)

    @property
    def version(self) -> int:
        """The version of the last update applied (0: none)."""
        return self._version

    def stats(self) -> list[dict]:
        """Per layer, the counters so far (``moeray.policy.windows.COUNTER_KEYS``), as a replay
        of the same stream counts them."""
        if self._predictive:
            st = self._caches.stats
            return [
                {key: int(getattr(st, key)[layer]) for key in COUNTER_KEYS}
                for layer in range(self.config.num_layers)
            ]
        return [
            self._demand.counters(layer) | {"prefetches": self._prefetches[layer]}
            for layer in range(self.config.num_layers)
        ]

    def apply_update(self, update: EngineUpdate) -> None:
        """Takes a service's update between batches: its capacities and prefetch budget apply
        from the next batch on. An update no newer than the last one applied is ignored; one
        from a newer protocol, one in the middle of a batch, or one with bad fields raises a
        one-line ValueError and changes nothing."""
        if not isinstance(update, EngineUpdate):
            raise TypeError(f"update: expected an EngineUpdate, got {type(update).__name__}")
        if update.protocol > PROTOCOL_VERSION:
            raise ValueError(
                f"update: protocol {update.protocol} is newer than this session's "
                f"{PROTOCOL_VERSION}; upgrade moeray on the engine"
            )
        if self._batch is not None:
            raise ValueError(
                f"update: a batch is being routed (layer {len(self._batch.ids)} is next); "
                "apply updates between batches"
            )
        if update.version <= self._version:
            return
        config = self.config
        if update.capacity is not None:
            config = replace(config, capacity=tuple(update.capacity))  # checks the values
        if update.prefetch_budget is not None:
            if not self._predictive:
                config = replace(config, prefetch_budget=update.prefetch_budget)
            else:
                config = replace(
                    config, predict=replace(config.predict, prefetch_budget=update.prefetch_budget)
                )
        self._check_capacity(config)
        if config.capacity != self.config.capacity:
            if not self._predictive:  # as in the service: only a predictive policy re-splits
                raise ValueError(
                    f"update: capacity: the {config.policy!r} policy's capacity is fixed"
                )
            self._caches.set_capacity(np.asarray(config.capacity, dtype=np.int64))
        if self._predictive:
            self._caches.config = replace(config.predict, split=None)
        else:
            self._budget = config.prefetch_budgets()
        self.config = config
        self._version = update.version
        self.applied_updates.append((self.batches, update))

    # ------------------------------------------------------------------ internals

    def _open(self, shape: tuple[int, int], new_sequence) -> None:
        if self._link is not None:
            update = self._link.take_update()
            if update is not None:
                try:
                    self.apply_update(update)
                except ValueError as exc:  # the engine keeps serving with what it has
                    self.refused_updates += 1
                    log.warning("moeray: update %d refused: %s", update.version, exc)
        starts = np.zeros(shape[0], dtype=bool)
        if new_sequence is not None:
            starts[:] = new_sequence
        self._batch = _Batch(shape[0], starts, shape)
        if self._predictive:
            self._caches.open_batch(starts)

    def _close(self) -> None:
        if self._predictive:
            self._caches.close_batch()
            # the service's affinity EMA of each layer (the predictive windows feed it too), in
            # one native call over the layers' arrays as routed
            self._layer_affinities.update(self._batch.ids)
        if self._link is not None:
            ids = np.stack(self._batch.ids)
            self._link.report(ids.astype(self.config.ids_dtype()), self._batch.starts)
        self.batches += 1
        self._batch = None

    @staticmethod
    def _check_capacity(config: ServiceConfig) -> None:
        """The engine's tier holds at least one token's experts of a layer while it runs."""
        if min(config.capacity) < config.top_k:
            raise ValueError(
                f"capacity: the tier must hold one token's {config.top_k} experts of a layer, "
                f"got {min(config.capacity)}"
            )

    def _check_layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(
                f"layer: expected an int in [0, {self.config.num_layers}), got {layer}"
            )
        return int(layer)

    def _check_route(self, layer, ids, weights, new_sequence) -> tuple[int, np.ndarray]:
        """The call's layer and its ids as the cores read them (int32 or int64 [tokens,
        top_k]); the ids' range is the cores' to check."""
        expected = 0 if self._batch is None else len(self._batch.ids)
        if type(layer) is not int or layer != expected:
            layer = self._check_layer(layer)
            if layer != expected:
                raise ValueError(
                    f"layer: expected layer {expected} next (layers come "
                    f"0..{self.config.num_layers - 1} for each batch), got {layer}"
                )
        if type(ids) is not np.ndarray:
            ids = np.asarray(ids)
        top_k = self.config.top_k
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] != top_k or ids.dtype.kind not in "iu":
            raise ValueError(
                f"ids: expected integers of shape [tokens, {top_k}], got {ids.dtype} {ids.shape}"
            )
        tokens = ids.shape[0]
        if not 1 <= tokens <= self._max_tokens:
            raise ValueError(f"ids: expected 1 to {self._max_tokens} tokens, got {tokens}")
        if self._batch is not None and tokens != self._batch.tokens:
            raise ValueError(
                f"ids: layer {layer} of this batch needs its {self._batch.tokens} tokens, "
                f"got {tokens}"
            )
        if weights is not None:
            weights = np.asarray(weights)
            if weights.shape != ids.shape or weights.dtype.kind != "f":
                raise ValueError(
                    f"weights: expected floats of shape {ids.shape}, got {weights.dtype} "
                    f"{weights.shape}"
                )
        if new_sequence is not None:
            if layer != 0:
                raise ValueError("new_sequence: give it with layer 0 (it marks the batch's tokens)")
            starts = np.asarray(new_sequence)
            if starts.dtype != bool or starts.shape not in ((), (tokens,)):
                raise ValueError(
                    f"new_sequence: expected a bool or bool [{tokens}], got {starts.dtype} "
                    f"{starts.shape}"
                )
        dtype = ids.dtype
        if dtype != _INT64 and (dtype != _INT32 or self._predictive):
            ids = ids.astype(np.int64)  # uint64 ids past 2**63 turn negative: out of range
        return layer, ids  # the cores read a strided array through a copy
