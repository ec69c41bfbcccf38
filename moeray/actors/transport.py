"""``InProcessTransport``: the coordinator's layer actors as plain objects in this process.

Every call runs at once, in order; ``poll`` hands back what finished. The in-process replays
(``moeray.replay``) run the same ``Coordinator`` over it as the service runs over Ray, so "the
service decides as in-process" holds by construction; tests use it to kill and restart actors,
and to kill the coordinator (``lose_queued``, then a new transport over the same ``actors`` for a
``Coordinator(..., adopt=True)``).
It also measures each actor's time in ``apply`` (``seconds``, per layer: an actor's time split
evenly over its layers) with an injected timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from moeray.actors.config import ServiceConfig
from moeray.actors.layer import LayerCaches
from moeray.actors.messages import Counters, LayerState, LayerWindow, Warmup, WindowGapError
from moeray.policy.registry import POLICIES, PolicyEntry

__all__ = ["ActorLost", "InProcessTransport"]


class ActorLost(RuntimeError):
    """A call to an actor that was killed (``InProcessTransport.kill``): Ray's RayActorError."""


class InProcessTransport:
    """Layer actors (``LayerCaches``) of ``config`` in this process; calls run in send order
    when the coordinator polls. settle: the replay's consumer (see ``LayerCaches``). policies:
    the registry the actors build from (a benchmark adds variants). timer: seconds, for
    ``seconds``."""

    def __init__(
        self,
        config: ServiceConfig,
        settle: bool = False,
        policies: dict[str, PolicyEntry] = POLICIES,
        timer: Callable[[], float] = time.perf_counter,
        actors: list[LayerCaches | None] | None = None,
    ):
        """actors: layer actor bodies that outlived a coordinator (``survivors()``), for its
        successor to adopt, None for one that is dead (None: new ones)."""
        self._config = config
        self._settle = settle
        self._policies = policies
        self._timer = timer
        self._groups = config.actor_layers()
        self._generation = [0] * len(self._groups)
        if actors is None:
            actors = [self._create(actor) for actor in range(len(self._groups))]
        self.actors = list(actors)
        self._queued: list[tuple[int, int, str, tuple]] = []  # (actor, generation, verb, args)
        self._dead: set[int] = {actor for actor, body in enumerate(self.actors) if body is None}
        self.sends: list[tuple[int, list[LayerWindow]]] = []  # every send, for inspection
        self.seconds = [0.0] * config.num_layers  # time in apply, per layer

    def _create(self, actor: int, replacement: bool = False) -> LayerCaches:
        config, layers = self._config, self._groups[actor]
        return LayerCaches(
            layers,
            config.num_experts,
            {layer: config.capacity[layer] for layer in layers},
            config.policy,
            config.affinity_config(),
            config.settings(),
            config.shards,
            self._settle,
            self._policies,
            replacement,
        )

    def send(self, actor: int, windows: list[LayerWindow]) -> None:
        self.sends.append((actor, list(windows)))
        self._queued.append((actor, self._generation[actor], "apply", (windows,)))

    def restore(self, actor: int, states: list[LayerState], warmup: Warmup | None = None) -> None:
        self._queued.append((actor, self._generation[actor], "restore", (states, warmup)))

    def recreate(self, actor: int) -> None:
        self._generation[actor] += 1
        self._dead.discard(actor)
        self.actors[actor] = self._create(actor, replacement=True)

    def kill(self, actor: int) -> None:
        """The actor's process dies: its state is lost, and its calls fail until re-created."""
        self._dead.add(actor)

    def survivors(self) -> list[LayerCaches | None]:
        """The actors' bodies, None for a dead one (a successor transport's ``actors``)."""
        return [None if actor in self._dead else body for actor, body in enumerate(self.actors)]

    def lose_queued(self, delivered: dict[int, int]) -> None:
        """The coordinator's process dies: of each live actor's queued calls, the first
        ``delivered[actor]`` (default all) still reach it, as calls already on the wire do;
        the others are lost. Their results go nowhere."""
        queued, self._queued = self._queued, []
        seen: dict[int, int] = {}
        for actor, generation, verb, args in queued:
            seen[actor] = seen.get(actor, 0) + 1
            live = actor not in self._dead and generation == self._generation[actor]
            if live and seen[actor] <= delivered.get(actor, len(queued)):
                try:
                    getattr(self.actors[actor], verb)(*args)
                except WindowGapError:
                    pass

    def adopt(self) -> tuple[list[LayerState], list[int]]:
        """Every actor's report to a restarted coordinator (``LayerCaches.adopt``); a dead one
        is re-created empty first (and listed)."""
        lost = sorted(self._dead)
        for actor in lost:
            self.recreate(actor)
        return [state for body in self.actors for state in body.adopt()], lost

    def poll(self, wait: bool) -> list[tuple[int, int, object]]:
        done = []
        queued, self._queued = self._queued, []
        for actor, generation, verb, args in queued:
            if actor in self._dead or generation != self._generation[actor]:
                done.append((actor, generation, ActorLost(f"layer actor {actor} is gone")))
                continue
            start = self._timer()
            try:
                result = getattr(self.actors[actor], verb)(*args)
            except WindowGapError as exc:  # a restarted actor that lost its place
                result = exc
            if verb == "apply":
                share = (self._timer() - start) / len(self._groups[actor])
                for layer in self._groups[actor]:
                    self.seconds[layer] += share
            done.append((actor, generation, result))
        return done

    def generation(self, actor: int) -> int:
        return self._generation[actor]

    def outstanding(self) -> int:
        return len(self._queued)

    def settle_shards(self) -> dict[int, Counters]:
        out: dict[int, Counters] = {}
        for i, actor in enumerate(self.actors):
            if i not in self._dead:
                out.update(actor.settle_shards())
        return out
