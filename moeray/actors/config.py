"""``ServiceConfig``: the validated shape, policy and coalescing of one moeray service.

A frozen value with no I/O: ``from_byte_budget`` and ``from_dict`` (a JSON config) are the
named constructors that read a checkpoint to turn one byte budget into experts per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from moeray.placement.balancer import PlacementConfig
from moeray.policy._validate import check_int
from moeray.policy.affinity import AffinityConfig
from moeray.policy.predict import PredictConfig
from moeray.policy.registry import PolicyEntry, PolicySettings, online_policy_names, policy_entry
from moeray.policy.split import SplitConfig
from moeray.shards.capacity import capacity_from_bytes, shard_expert_bytes

__all__ = ["ServiceConfig"]

_MAX_LAYERS = 4096  # per-layer state is allocated for every layer: bounded before it is
_MAX_EXPERTS = 2**20  # per-expert state likewise (the largest routed MoE today has 512)
_MAX_TABLE_BYTES = 8 * 2**30


@dataclass(frozen=True)
class ServiceConfig:
    """Model shape, cache policy and coalescing of one moeray service.

    capacity: hot experts per layer, one int for every layer or a tuple of num_layers ints.
    window_steps: submits per window; window_ms: also close a window this old (None: never;
    a ServiceHandle closes its own window by a timer, the coordinator at the next submit).
    layers_per_actor: consecutive layers hosted by one actor process (1: one actor per layer).
    placement: per layer actor, the Ray custom resource that pins it to a node (None: anywhere).
    shards: a checkpoint directory, at this path on every node, whose expert bytes the layer
    actors keep resident for their hot sets (None: decisions only, no bytes move).
    coordinator_placement: the resource that pins the coordinator, e.g. one only the head node
    offers (None: anywhere). Ray restarts a coordinator whose process dies, where that resource
    is offered; pinned to a node that is lost, it comes back only when the resource does.
    policy: an online policy of ``moeray.policy.registry``: moeray (the default, predictive;
    its parameters are ``predict``, a PredictConfig or a dict of its fields, and its budget,
    experts per layer per token, is ``predict.prefetch_budget``, None for top_k;
    ``prefetch_budget`` must stay 0; engine hints come with a step, ``submit(..., hints=...)``;
    with ``predict.split`` the coordinator re-splits the sum of ``capacity`` across layers) or a
    demand policy, lru | lfu | adaptive | affinity-lru (cheaper per token; ``prefetch_budget``
    experts are prefetched by affinity after each window). warmup_tokens: for a predictive
    policy, the routing the coordinator keeps (this many last tokens, every layer) for a
    restarted layer actor to relearn from (0: it restarts with empty tables).
    max_step_tokens: the most tokens one step may carry (a larger one is refused, naming this
    limit). max_window_bytes: the most bytes one window's routing and hints may take, as
    buffered (ids at ``ids_dtype``, hints int32 padded to the window's widest step, one byte per
    token for sequence starts): a step larger than this is refused, naming it, and a window
    closes early rather than grow past it or pad its hints to more than twice their own bytes.
    So a handle holds at most 2 x max_window_bytes of routing not yet sent (its open window and
    one being sent) plus its journal (``max_journal_windows`` windows, at most
    ``max_journal_bytes``), and the coordinator one open window, whatever its clients send.
    expert_placement: which GPU slots hold each expert of each layer, re-planned by the
    coordinator from every client's routing every ``every_tokens`` tokens and published in
    versions (``ServiceHandle.placement``): a ``PlacementConfig`` or a dict of its fields (None,
    the default: off). Not to be confused with ``placement``, the nodes of the layer actors.
    """

    num_layers: int
    num_experts: int
    top_k: int
    capacity: int | tuple[int, ...] = 8
    policy: str = "moeray"
    prefetch_budget: int = 0
    window_steps: int = 1
    window_ms: float | None = None
    layers_per_actor: int = 1
    name: str = "moeray"
    namespace: str = "moeray"
    placement: tuple[str | None, ...] | None = None
    coordinator_placement: str | None = None
    shards: str | None = None
    affinity_decay: float = 0.95
    affinity_boost: float = 0.05
    affinity_weight: float = 0.8
    predict: PredictConfig = PredictConfig()
    warmup_tokens: int = 4096
    max_step_tokens: int = 65_536
    max_window_bytes: int = 64 * 2**20
    expert_placement: PlacementConfig | None = None

    def __post_init__(self):
        check_int(self.num_layers, "num_layers", 1, _MAX_LAYERS)
        check_int(self.num_experts, "num_experts", 1, _MAX_EXPERTS)
        check_int(self.top_k, "top_k", 1, self.num_experts)
        capacity = self.capacity
        if isinstance(capacity, (list, tuple)):
            if len(capacity) != self.num_layers:
                raise ValueError(
                    f"capacity: expected one int or {self.num_layers} ints, got {len(capacity)}"
                )
            capacity = tuple(check_int(c, "capacity", 1, self.num_experts) for c in capacity)
        else:
            capacity = (check_int(capacity, "capacity", 1, self.num_experts),) * self.num_layers
        object.__setattr__(self, "capacity", capacity)
        if self.policy not in online_policy_names():
            raise ValueError(
                f"policy: expected one of {list(online_policy_names())}, got {self.policy!r}"
            )
        check_int(self.prefetch_budget, "prefetch_budget", 0, self.num_experts)
        if isinstance(self.predict, dict):  # from a JSON config (moeray serve --config)
            fields = dict(self.predict)
            if isinstance(fields.get("split"), dict):
                try:
                    fields["split"] = SplitConfig(**fields["split"])
                except TypeError as exc:
                    raise ValueError(f"predict.split: {exc}") from None
            try:
                object.__setattr__(self, "predict", PredictConfig(**fields))
            except TypeError as exc:
                raise ValueError(f"predict: {exc}") from None
        if not isinstance(self.predict, PredictConfig):
            raise TypeError(f"predict: expected a PredictConfig or a dict, got {self.predict!r}")
        if self.entry.predictive:
            if self.prefetch_budget:
                raise ValueError(
                    "prefetch_budget: expected 0 with policy 'moeray' (the default), "
                    "whose budget is predict.prefetch_budget (experts per layer per "
                    "token); the affinity prefetch budget is the demand policies'"
                )
        check_int(self.warmup_tokens, "warmup_tokens", 0)
        check_int(self.window_steps, "window_steps", 1)
        check_int(self.max_step_tokens, "max_step_tokens", 1)
        check_int(self.max_window_bytes, "max_window_bytes", 4096)
        if self.entry.predictive:  # [layers, E, E] tables: refused before any is allocated
            table_bytes = self.num_layers * self.num_experts**2 * 4
            if table_bytes > _MAX_TABLE_BYTES:
                raise ValueError(
                    f"num_experts: the moeray policy's transition tables for {self.num_experts:,} "
                    f"experts x {self.num_layers} layers would take {table_bytes / 2**30:,.1f} "
                    f"GiB (more than {_MAX_TABLE_BYTES // 2**30} GiB); use a demand policy "
                    "(--policy lru) for this many experts"
                )
        if self.window_ms is not None and not self.window_ms > 0:
            raise ValueError(f"window_ms: expected None or a positive number, got {self.window_ms}")
        check_int(self.layers_per_actor, "layers_per_actor", 1, self.num_layers)
        if not self.name or not self.namespace:
            raise ValueError("name, namespace: expected non-empty strings")
        if self.placement is not None and len(self.placement) != len(self.actor_layers()):
            raise ValueError(
                f"placement: expected one resource (or None) per layer actor "
                f"({len(self.actor_layers())}), got {len(self.placement)}"
            )
        if not 0.0 <= self.affinity_weight <= 1.0:
            raise ValueError(
                f"affinity_weight: expected a float in [0, 1], got {self.affinity_weight}"
            )
        if self.shards is not None and not isinstance(self.shards, str):
            raise TypeError(
                f"shards: expected a checkpoint path (str) or None, got {self.shards!r}"
            )
        if self.expert_placement is not None:
            object.__setattr__(self, "expert_placement", self._check_expert_placement())

    def _check_expert_placement(self) -> PlacementConfig:
        """``expert_placement`` as a PlacementConfig whose slots fit this model; errors name the
        field as ``expert_placement.<field>``."""
        value = self.expert_placement
        if isinstance(value, dict):  # from a JSON config (moeray serve --config)
            known = [f.name for f in fields(PlacementConfig)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(
                    f"expert_placement: unknown field {', '.join(map(str, unknown))} "
                    f"(expected some of {', '.join(known)})"
                )
            if "gpus" not in value:
                raise ValueError("expert_placement.gpus: required (the GPUs serving the model)")
            try:
                value = PlacementConfig(**value)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"expert_placement.{exc}") from None
        if not isinstance(value, PlacementConfig):
            raise TypeError(
                f"expert_placement: expected a PlacementConfig, a dict or None, got {value!r}"
            )
        try:
            topology = value.topology(self.num_experts)
        except ValueError as exc:
            raise ValueError(f"expert_placement.{exc}") from None
        if value.migration_budget is not None and value.migration_budget > topology.num_slots:
            raise ValueError(
                f"expert_placement.migration_budget: expected at most the {topology.num_slots} "
                f"slots of a layer, got {value.migration_budget}"
            )
        return value

    def actor_layers(self) -> list[list[int]]:
        """Layers of each layer actor, in actor order."""
        n = self.layers_per_actor
        return [list(range(i, min(i + n, self.num_layers))) for i in range(0, self.num_layers, n)]

    def ids_dtype(self) -> np.dtype:
        """The smallest integer type that holds every expert id: routing travels in it."""
        for dtype in (np.uint8, np.uint16):
            if self.num_experts <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        return np.dtype(np.int32)

    def affinity_config(self) -> AffinityConfig:
        return (
            AffinityConfig.with_num_experts(self.num_experts)
            .with_decay(self.affinity_decay)
            .with_activation_boost(self.affinity_boost)
        )

    @property
    def entry(self) -> PolicyEntry:
        """The policy's registry entry."""
        return policy_entry(self.policy)

    def settings(self) -> PolicySettings:
        return PolicySettings(self.affinity_weight, self.predict)

    def prefetch_budgets(self) -> tuple[int, ...]:
        """Each layer's prefetch budget for its windows: for a predictive policy
        ``predict.prefetch_budget`` experts per token (None: top_k), else ``prefetch_budget``
        experts by affinity per window. A function of the configuration alone: decisions never
        depend on when acknowledgements arrive."""
        if self.entry.predictive:
            budget = self.predict.prefetch_budget
            return (self.top_k if budget is None else budget,) * self.num_layers
        return (self.prefetch_budget,) * self.num_layers

    @classmethod
    def from_byte_budget(cls, capacity_bytes: int, shards: str, **fields) -> ServiceConfig:
        """A config whose ``capacity`` is as many experts per layer as ``capacity_bytes`` holds
        for the checkpoint at ``shards`` (read here, where the config is made): one byte budget
        for every layer's hot set. ValueError when it cannot hold one expert per layer."""
        if shards is None:
            raise ValueError(
                "capacity_bytes: needs shards (an expert's bytes come from the checkpoint)"
            )
        if "capacity" in fields:
            raise ValueError("capacity_bytes: give capacity or capacity_bytes, not both")
        num_layers = check_int(fields.get("num_layers"), "num_layers", 1)
        num_experts = check_int(fields.get("num_experts"), "num_experts", 1, 2**31 - 1)
        expert_bytes = shard_expert_bytes(shards, num_layers)
        capacity = capacity_from_bytes(capacity_bytes, expert_bytes, num_experts)
        return cls(capacity=capacity, shards=shards, **fields)

    @classmethod
    def from_dict(cls, fields: dict) -> ServiceConfig:
        """A config from JSON-like fields (``moeray serve --config``): lists become tuples,
        ``predict`` (and its ``split``) and ``expert_placement`` dicts of fields,
        ``capacity_bytes`` a byte budget (see ``from_byte_budget``). ValueError naming what is
        wrong."""
        fields = dict(fields)
        for key in ("capacity", "placement"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        try:
            if "capacity_bytes" in fields:
                budget = fields.pop("capacity_bytes")
                return cls.from_byte_budget(budget, fields.pop("shards", None), **fields)
            return cls(**fields)
        except TypeError as exc:  # unknown or missing fields
            raise ValueError(str(exc)) from None
