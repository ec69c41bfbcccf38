"""Every Ray call of moeray lives here, behind domain verbs: starting a local session, creating,
calling, polling and killing actors, and the Prometheus metrics.

The actor bodies (``LayerCaches``, ``Coordinator``) are plain classes; this module wraps them
with ``ray.remote`` and gives the coordinator a ``LayerTransport`` over real actor handles.

Metrics are exported on each Ray node's metrics endpoint with Ray's prefix (a Counter
``moeray_cache_hits`` appears as ``ray_moeray_cache_hits_total``), tags ``service`` and
``layer``: ``moeray_cache_hits``, ``moeray_cache_stalls``, ``moeray_cache_evictions``,
``moeray_prefetches``, ``moeray_prefetch_hits``, ``moeray_transfers`` (stalls plus
prefetches), ``moeray_wasted_prefetches``; per predictor (tag ``predictor``)
``moeray_predictor_hits``, ``_guesses``, ``_uses`` (precision hits / guesses, recall
hits / uses); and the Histogram ``moeray_submit_latency_ms`` in the submitting process.
With ``expert_placement``, tagged ``service`` (and ``layer`` where per layer): the Gauges
``moeray_placement_forecast_balancedness`` and ``moeray_placement_realised_balancedness`` (per
layer, after each load window), ``moeray_placement_version`` and ``moeray_placement_age_s``
(set on every stats call, so a stalled balancer shows); the Counters
``moeray_placement_slots_moved``, ``moeray_placement_bytes_moved`` (per layer),
``moeray_placement_rebalances``, ``moeray_placement_rebalances_skipped`` and
``moeray_placement_errors``. In an engine's process, per service its session is attached to
(``moeray.engine.ServiceLink``): the Gauge ``moeray_engine_service_connected`` (0 while the
session decides on its own) and the Counters ``moeray_engine_reported_tokens``,
``moeray_engine_dropped_tokens`` and ``moeray_engine_link_failures``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
import time
from dataclasses import replace

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    AuthenticationError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)
from ray.experimental import internal_kv
from ray.util import metrics
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moeray.actors.address import resolve_address
from moeray.actors.channel import ChannelClient, RouteMessage
from moeray.actors.config import ServiceConfig
from moeray.actors.coordinator import Coordinator
from moeray.actors.layer import LayerCaches
from moeray.actors.messages import (
    LayerAck,
    LayerState,
    LayerWindow,
    PlacementStats,
    Warmup,
    WindowGapError,
)
from moeray.actors.prefetch_node import PrefetchNode, StreamStats
from moeray.actors.steps import check_window
from moeray.placement.balancer import Rebalance
from moeray.placement.placement import Placement
from moeray.policy.predict import PREDICTOR_NAMES
from moeray.traces.wire import decode_step, encode_batches

__all__ = [
    "GcsStateStore",
    "RayLayerTransport",
    "CoordinatorHost",
    "coordinator_exists",
    "coordinator_name",
    "layer_actor_name",
    "create_coordinator",
    "get_coordinator",
    "call",
    "init",
    "call_async",
    "call_within",
    "get",
    "kill",
    "ready",
    "remove_service",
    "ActorDiedError",
    "ActorUnavailableError",
    "GetTimeoutError",
    "RayActorError",
    "RayTaskError",
    "PrefetchNodeHandle",
    "ServiceMetrics",
    "SubmitLatency",
    "local_session",
    "wait_all",
]

# Ray stores one task event per actor call in the GCS (22-98 MiB/min under a steady service):
# off for both actors, whose submit / apply calls run at step rate. MOERAY_TASK_EVENTS=1 in the
# environment of the process that creates an actor turns them on (debugging, bench_soak).
_OPTIONS = {
    "num_cpus": 0,
    "max_restarts": 0,
    "lifetime": "detached",
    "enable_task_events": os.environ.get("MOERAY_TASK_EVENTS") == "1",
}
# The coordinator comes back under the same actor id and name when its process dies, so every
# client's handle, in any process, follows it; its calls are not retried (a client resends its
# windows from its journal, in order, and the coordinator drops what it already has).
_COORDINATOR_RESTARTS = {"max_restarts": -1, "max_task_retries": 0}


def coordinator_name(config_name: str) -> str:
    return f"{config_name}.coordinator"


def layer_actor_name(config_name: str, actor: int) -> str:
    return f"{config_name}.layers-{actor}"


class GcsStateStore:
    """A layer actor's saved report (``LayerCaches(state_store=)``): one key of Ray's GCS
    key-value store, overwritten on every save, so it outlives the actor and the coordinator
    (and lives as long as the cluster's GCS). Picklable: created by the coordinator, used in
    the layer actor's process. Its size: the actor's layers x (16 x num_experts bytes of
    affinity + ~1 KB of statistics) + ~50 bytes per client id."""

    def __init__(self, config: ServiceConfig, actor: int):
        self.namespace = f"moeray:{config.namespace}"
        self.key = f"{layer_actor_name(config.name, actor)}.state"

    def save(self, states: list[LayerState]) -> None:
        data = pickle.dumps(states, protocol=pickle.HIGHEST_PROTOCOL)
        internal_kv._internal_kv_put(self.key, data, overwrite=True, namespace=self.namespace)

    def load(self) -> list[LayerState] | None:
        data = internal_kv._internal_kv_get(self.key, namespace=self.namespace)
        return None if data is None else pickle.loads(data)

    def delete(self) -> None:
        internal_kv._internal_kv_del(self.key, namespace=self.namespace)


def _placement_options(resource: str | None) -> dict:
    # A tiny amount of a node's custom resource pins the actor to that node without using it up.
    return {"resources": {resource: 0.001}} if resource else {}


class _LayerActor(LayerCaches):
    """LayerCaches as a Ray actor, which can also say which node it runs on."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _resource_available(resource: str) -> bool:
    return ray.cluster_resources().get(resource, 0) > 0


class RayLayerTransport:
    """The coordinator's view of its layer actors; every call returns at once.

    adopt: the coordinator was restarted: its layer actors are found by name (a missing one is
    re-created empty and reported lost by ``adopt()``); otherwise any actor left under their
    names (a service that died without a shutdown) is killed and new ones are created."""

    def __init__(self, config: ServiceConfig, adopt: bool = False):
        self._config = config
        self._groups = config.actor_layers()
        self._handles: list = [None] * len(self._groups)
        self._generation = [0] * len(self._groups)
        self._inflight: list[tuple[int, int, ray.ObjectRef]] = []
        self._lost: set[int] = set()
        self.blocked_cpu_s = 0.0  # this thread's CPU while blocked waiting for a layer actor
        # the node resource each actor is pinned to; changes when its node is lost
        self._resource = list(config.placement) if config.placement else [None] * len(self._groups)
        for actor in range(len(self._groups)):
            name = layer_actor_name(config.name, actor)
            if adopt:
                try:
                    self._handles[actor] = ray.get_actor(name, namespace=config.namespace)
                    continue
                except ValueError:  # it died too: its state is lost
                    self._lost.add(actor)
            else:  # a new service: nothing of an earlier one of that name is resumed
                _free_name(name, config.namespace, time.monotonic() + _FREE_NAME_S)
                GcsStateStore(config, actor).delete()
            self._handles[actor] = self._create(actor, replacement=adopt)

    def adopt(self) -> tuple[list[LayerState], list[int]]:
        states = []
        for actor, ref in enumerate([handle.adopt.remote() for handle in self._handles]):
            try:
                states.extend(ray.get(ref))
            except RayActorError:  # died since: re-created empty
                self.recreate(actor)
                self._lost.add(actor)
                states.extend(ray.get(self._handles[actor].adopt.remote()))
        lost, self._lost = sorted(self._lost), set()
        return states, lost

    def _replace_if_lost(self, actor: int) -> None:
        """Moves an actor whose node resource is gone to the placement resource, still offered,
        that hosts the fewest actors (the spread across shard-holding nodes stays even)."""
        resource = self._resource[actor]
        if resource is None or _resource_available(resource):
            return
        alive = [r for r in dict.fromkeys(self._config.placement) if r and _resource_available(r)]
        if alive:
            self._resource[actor] = min(
                alive, key=lambda r: (self._resource.count(r), alive.index(r))
            )

    def _create(self, actor: int, replacement: bool = False):
        config = self._config
        self._replace_if_lost(actor)
        resource = self._resource[actor]
        layers = self._groups[actor]
        return (
            ray.remote(_LayerActor)
            .options(
                name=layer_actor_name(config.name, actor),
                namespace=config.namespace,
                **_OPTIONS,
                **_placement_options(resource),
            )
            .remote(
                layers,
                config.num_experts,
                {layer: config.capacity[layer] for layer in layers},
                config.policy,
                config.affinity_config(),
                config.settings(),
                config.shards,
                replacement=replacement,
                state_store=GcsStateStore(config, actor),
            )
        )

    def send(self, actor: int, windows: list[LayerWindow]) -> None:
        ref = self._handles[actor].apply.remote(windows)
        self._inflight.append((actor, self._generation[actor], ref))

    def restore(self, actor: int, states: list[LayerState], warmup: Warmup | None = None) -> None:
        ref = self._handles[actor].restore.remote(states, warmup)
        self._inflight.append((actor, self._generation[actor], ref))

    def recreate(self, actor: int) -> None:
        try:
            ray.kill(self._handles[actor], no_restart=True)
        except Exception:  # already gone
            pass
        self._generation[actor] += 1
        self._handles[actor] = self._create(actor, replacement=True)

    def generation(self, actor: int) -> int:
        return self._generation[actor]

    def outstanding(self) -> int:
        return len(self._inflight)

    def poll(self, wait: bool) -> list[tuple[int, int, object]]:
        """Finished calls in send order per actor; with ``wait``, every outstanding one (the
        coordinator waits only to sync: one wake-up, not one per call, when actors lag)."""
        if not self._inflight:
            return []
        refs = [ref for _, _, ref in self._inflight]
        if wait:
            start = time.thread_time()
            ray.wait(refs, num_returns=len(refs), timeout=None)
            self.blocked_cpu_s += time.thread_time() - start
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        done, keep, blocked = [], [], set()
        for actor, generation, ref in self._inflight:
            if actor in blocked or ref not in ready:
                blocked.add(actor)  # later calls of this actor wait for this one
                keep.append((actor, generation, ref))
                continue
            try:
                done.append((actor, generation, ray.get(ref)))
            except RayActorError as exc:  # the actor died
                done.append((actor, generation, exc))
            except RayTaskError as exc:  # a restarted actor that lost its place
                if not isinstance(exc.cause, WindowGapError):
                    raise
                done.append((actor, generation, exc))
        self._inflight = keep
        return done

    def settle_shards(self) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for ref in [handle.settle_shards.remote() for handle in self._handles]:
            try:
                out.update(ray.get(ref))
            except RayActorError:  # dead: the next window's failure re-creates it
                pass
        return out

    def handles(self) -> list:
        return list(self._handles)

    def layer_actor_resources(self) -> list[str | None]:
        return list(self._resource)

    def kill_all(self) -> None:
        for handle in self._handles:
            kill(handle)
        self._inflight = []


class CoordinatorHost:
    """The coordinator actor's body: a ``Coordinator`` over real layer actors. Restarted by Ray
    when its process dies (``_COORDINATOR_RESTARTS``), it adopts the layer actors it had and
    rebuilds itself from them (``Coordinator(adopt=True)``)."""

    def __init__(self, config: ServiceConfig):
        adopt = ray.get_runtime_context().was_current_actor_reconstructed
        self._transport = RayLayerTransport(config, adopt=adopt)
        self._metrics = ServiceMetrics(config.name, config.expert_placement is not None)
        self._coordinator = Coordinator(
            config,
            self._transport,
            on_ack=self._metrics.record_ack,
            on_rebalance=self._metrics.record_rebalance,
            adopt=adopt,
        )
        self._method_cpu_s = 0.0  # this thread's CPU inside the methods below

    def _timed(self, method, *args):
        # thread time: the coordinator's own work, not Ray's background threads (which burn
        # CPU in this process even while idle)
        start = time.thread_time()
        try:
            return method(*args)
        finally:
            self._method_cpu_s += time.thread_time() - start

    def config(self) -> ServiceConfig:
        return self._coordinator.config

    def submit(
        self, expert_ids, weights=None, schedule_batches: bool = True, seq_starts=None, hints=None
    ):
        return self._timed(
            self._coordinator.submit, expert_ids, weights, schedule_batches, seq_starts, hints
        )

    def submit_msgpack(self, payload: bytes) -> bytes:
        step = decode_step(payload)
        batches = self._timed(
            self._coordinator.submit,
            step.expert_ids,
            step.weights,
            True,
            step.seq_starts,
            step.hints,
        )
        return encode_batches(batches or [])

    def add_routing(
        self,
        ids,
        steps: int = 1,
        close_window: bool = False,
        seq_starts=None,
        hints=None,
        client: str | None = None,
        seq: int | None = None,
    ) -> tuple[int, int] | None:
        """A client's window (``Coordinator.add_routing``), checked again here: any Ray client
        can call this, and a bad window must fail its caller alone."""
        ids, seq_starts, hints = check_window(
            self._coordinator.config, ids, steps, seq_starts, hints
        )
        return self._timed(
            self._coordinator.add_routing,
            ids,
            steps,
            bool(close_window),
            seq_starts,
            hints,
            client,
            seq,
        )

    def client_marks(self, client: str, sync: bool = False) -> tuple[int, int]:
        """``Coordinator.client_marks``: (confirmed, low) of ``client``'s windows."""
        return self._timed(self._coordinator.client_marks, client, bool(sync))

    def pid(self) -> int:
        """This process's id (tests kill it)."""
        return os.getpid()

    def flush(self) -> None:
        self._timed(self._coordinator.flush)

    def stats(self, sync: bool = True):
        stats = self._timed(self._coordinator.stats, sync)
        if stats.expert_placement is not None:
            self._metrics.record_placement_age(stats.expert_placement)
        # a blocked ray.wait costs CPU in proportion to how long layer actors take, not to
        # the work steps cause: left out
        return replace(
            stats,
            coordinator_cpu_s=time.process_time(),
            coordinator_method_cpu_s=self._method_cpu_s - self._transport.blocked_cpu_s,
        )

    def layer_actor_handles(self) -> list:
        return self._transport.handles()

    def layer_actor_resources(self) -> list[str | None]:
        """The node resource each layer actor is pinned to now (None: anywhere)."""
        return self._transport.layer_actor_resources()

    def expert_placement(self, after_version: int = 0) -> Placement | None:
        """The latest expert placement when newer than ``after_version`` (else None)."""
        return self._timed(self._coordinator.expert_placement, after_version)

    def engine_update(self, after_version: int = 0):
        """The engine sessions' update when newer than ``after_version`` (else None)."""
        return self._timed(self._coordinator.engine_update, after_version)

    def layer_actor_nodes(self) -> list[str]:
        """The Ray node id each layer actor runs on."""
        return ray.get([handle.node_id.remote() for handle in self._transport.handles()])

    def ready(self) -> bool:
        """Waits until every layer actor answers (process started, caches built)."""
        wait_all([handle.ping.remote() for handle in self._transport.handles()])
        return True

    def core(self) -> tuple[str, bool]:
        """Where this process imported moeray from, and whether its core is the native one."""
        import moeray
        from moeray.native import IS_NATIVE

        return moeray.__file__, IS_NATIVE

    def shutdown(self) -> None:
        self._coordinator.close()
        self._transport.kill_all()


def create_coordinator(config: ServiceConfig):
    """Creates the named, detached coordinator actor (which creates its layer actors)."""
    return (
        ray.remote(CoordinatorHost)
        .options(
            name=coordinator_name(config.name),
            namespace=config.namespace,
            **{**_OPTIONS, **_COORDINATOR_RESTARTS},
            **_placement_options(config.coordinator_placement),
        )
        .remote(config)
    )


class PrefetchNodeHandle:
    """A prefetch actor (``PrefetchNode(*args, **kwargs)``) on this process's node, owned by
    this process. ``on_route`` writes to the actor's stream socket (``moeray.actors.channel``:
    one way, in order, tens of microseconds); the other calls go through Ray, after the actor
    read everything sent (``timeout_s`` bounds that wait and each call)."""

    def __init__(self, *args, timeout_s: float = 60.0, **kwargs):
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        options = dict(num_cpus=0, max_restarts=0, scheduling_strategy=here)
        options["enable_task_events"] = _OPTIONS["enable_task_events"]
        self._timeout_s = timeout_s
        self._actor = ray.remote(PrefetchNode).options(**options).remote(*args, **kwargs)
        try:  # the actor's errors (a bad checkpoint) raise here
            self._channel = ChannelClient(ray.get(self._actor.listen.remote(), timeout=timeout_s))
        except BaseException:
            kill(self._actor)
            raise

    def on_route(self, message: RouteMessage) -> None:
        self._channel.send(message)

    def _call(self, method):
        deadline = time.monotonic() + self._timeout_s
        while ray.get(self._actor.received.remote(), timeout=self._timeout_s) < self._channel.sent:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the prefetch actor has not read the stream in {self._timeout_s} s"
                )
            time.sleep(0.001)
        return ray.get(method.remote(), timeout=self._timeout_s)

    def flush(self) -> None:
        self._call(self._actor.flush)

    def settle(self) -> None:
        self._call(self._actor.settle)

    def stats(self) -> StreamStats:
        return self._call(self._actor.stats)

    def reset_stats(self) -> None:
        self._call(self._actor.reset_stats)

    def close(self) -> None:
        """Unmaps the checkpoint in the actor (its pages can then leave the page cache at
        once, not when Ray has reaped the process), then kills it."""
        self._channel.close()
        try:
            ray.get(self._actor.close.remote(), timeout=self._timeout_s)
        except Exception:  # dead or stuck: the kill below ends it either way
            pass
        kill(self._actor)


def coordinator_exists(name: str, namespace: str) -> bool:
    """Whether service ``name`` has a coordinator (alive or restarting)."""
    try:
        ray.get_actor(coordinator_name(name), namespace=namespace)
    except ValueError:
        return False
    return True


def get_coordinator(name: str, namespace: str):
    """The running coordinator of service ``name``; ValueError when there is none."""
    try:
        return ray.get_actor(coordinator_name(name), namespace=namespace)
    except ValueError:
        raise ValueError(f"name: no moeray service {name!r} in namespace {namespace!r}") from None


def init(**kwargs):
    """``ray.init(**kwargs)`` from an empty working directory. Ray puts the driver's working
    directory first on every worker's sys.path: a driver run inside a moeray checkout would make
    the workers import the checkout's unbuilt source tree (and its pure-Python core) instead of
    the installed package."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="moeray-driver-") as empty:
        os.chdir(empty)
        try:
            return ray.init(**kwargs)
        finally:
            os.chdir(cwd)


def call(method, *args, **kwargs):
    """Calls an actor method and waits for its result."""
    return ray.get(method.remote(*args, **kwargs))


def call_async(method, *args, **kwargs):
    """Calls an actor method; returns its ObjectRef without waiting."""
    return method.remote(*args, **kwargs)


def call_within(timeout_s: float, method, *args, **kwargs):
    """Calls an actor method and waits at most ``timeout_s`` seconds (GetTimeoutError)."""
    return ray.get(method.remote(*args, **kwargs), timeout=timeout_s)


def ready(ref) -> bool:
    """Whether the call behind ``ref`` has finished (answered or failed); never waits."""
    return bool(ray.wait([ref], timeout=0)[0])


def get(ref, timeout_s: float | None = None):
    """The result of a call (its error raised), waiting at most ``timeout_s`` seconds."""
    return ray.get(ref, timeout=timeout_s)


_FREE_NAME_S = 30.0


def _free_name(name: str, namespace: str, deadline: float) -> bool:
    """Kills the actor named ``name`` (no restart) and waits until the name is free; returns
    whether there was one. TimeoutError at ``deadline`` (time.monotonic)."""
    found = False
    while True:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            return found
        found = True
        kill(handle)
        if time.monotonic() > deadline:
            raise TimeoutError(f"actor {namespace}/{name} still holds its name after a kill")
        time.sleep(0.01)  # the GCS frees the name once the process is gone


def remove_service(config: ServiceConfig, timeout_s: float = _FREE_NAME_S) -> None:
    """Kills the coordinator of service ``config.name`` (no restart) and then every layer actor,
    by name, whether or not they answer, deletes their saved reports (``GcsStateStore``), and
    returns once every name is free (a new service of that name can start). TimeoutError after
    ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    names = [coordinator_name(config.name)] + [
        layer_actor_name(config.name, actor) for actor in range(len(config.actor_layers()))
    ]
    # the coordinator first (a restarting one re-creates layer actors); then until one pass
    # finds none, in case one was being created as the coordinator died
    while any([_free_name(name, config.namespace, deadline) for name in names]):
        pass
    for actor in range(len(config.actor_layers())):  # the layer actors' saved reports
        GcsStateStore(config, actor).delete()


def wait_all(refs) -> None:
    if refs:
        ray.get(list(refs))


def kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone
        pass


@contextlib.contextmanager
def _stderr_aside():
    """Sends this process's file descriptor 2 (Ray's C++ logs write there) to a temporary file
    while the block runs; yields a function that returns what was written so far."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as aside:
        os.dup2(aside.fileno(), 2)
        try:
            yield lambda: (aside.seek(0), aside.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _use_token_if_available() -> None:
    """What Ray's own CLI does for a cluster started with token auth: a client that has the
    token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and no RAY_AUTH_MODE turns
    token auth on, Ray's cached config included (so setting the variable alone, after
    ``import ray``, would not do)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth: nothing to find
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def local_session(address: str | None = None, job: bool = False, say=None, **options):
    """Joins ``address`` (with ``job``, also RAY_ADDRESS, as a Ray job's driver does), or starts
    a quiet, loopback-only local Ray (``options`` go to ``ray.init``); shuts down what it began.
    Yields ``ray.init``'s context (None inside an already initialised Ray, where it does
    nothing). The one way the CLI, tests and benchmarks start Ray.

    Token auth stays on: a local Ray uses Ray's default (a token, generated once); joining a
    cluster uses its token when one is at hand (``_use_token_if_available``). An address
    is checked first (``address.resolve_address``, seconds, one line). say(text): progress
    lines (e.g. to stderr), or None. Errors a user can act on (nothing listens there, Ray refused
    the token) are ValueErrors of one line."""
    if address is None and job:
        address = os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield None
        return
    say = say or (lambda text: None)
    quiet = dict(log_to_driver=False, logging_level="ERROR")
    start = time.monotonic()
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # for Ray's processes
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # ...and for this one, which read the variable when ray was imported: the node's address
        # (so every listener of the GCS, raylet and workers) is 127.0.0.1, not the host's IP
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        system = {"worker_maximum_startup_concurrency": 32, **options.pop("_system_config", {})}
        settings = {
            "include_dashboard": False,
            "object_store_memory": 200 * 2**20,
            **quiet,
            **options,  # the caller's settings win
            "_system_config": system,
        }
        say("starting a local Ray (loopback only) ...")
        # address="local": always a new Ray of its own, never one a stale
        # /tmp/ray/ray_current_cluster or RAY_ADDRESS points at
        try:
            context = init(address="local", **settings)
        except Exception as exc:  # Ray raises a bare Exception on startup timeouts
            # A loaded 2-core VM can miss Ray's fixed 30 s raylet registration wait: once more.
            ray.shutdown()
            if "timed out during startup" not in str(exc):
                raise
            context = init(address="local", **settings)
        except BaseException:  # Ctrl-C while Ray starts: stop what it began
            ray.shutdown()
            raise
        say(f"local Ray up in {time.monotonic() - start:.1f} s")
    else:
        resolved = resolve_address(address)
        say(f"joining the Ray cluster at {resolved} ...")
        # Ray prefers RAY_ADDRESS to its argument: make them agree (a shell may hold the job
        # server's http:// address there)
        previous = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = resolved
        # Ray's C++ client writes every retry of a refused connection to stderr: kept aside,
        # and only its cause reported
        with _stderr_aside() as aside:
            try:
                _use_token_if_available()
                context = init(address=resolved, **quiet, **options)
            except (AuthenticationError, ConnectionError) as exc:
                # the address answered (resolve_address): a refusal here is the cluster's
                ray.shutdown()
                refused = "token" if "InvalidAuthToken" in aside() else "client"
                raise ValueError(
                    f"address {resolved}: a Ray cluster answers there but refused this {refused} "
                    f"({str(exc).splitlines()[0]}); a cluster with token auth needs its token: "
                    "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray "
                    "get-auth-token` on its head prints it)"
                ) from None
            finally:
                if previous is None:
                    os.environ.pop("RAY_ADDRESS", None)
                else:
                    os.environ["RAY_ADDRESS"] = previous
        say(f"joined in {time.monotonic() - start:.1f} s")
    try:
        yield context
    finally:
        ray.shutdown()


_LATENCY_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000]


class ServiceMetrics:
    """Counters fed by the coordinator as layer actors acknowledge windows and, with
    ``placement``, as load windows are re-placed (module doc)."""

    def __init__(self, service: str, placement: bool = False):
        def counter(name: str, description: str, tags=("service", "layer")):
            c = metrics.Counter(name, description=description, tag_keys=tags)
            c.set_default_tags({"service": service})
            return c

        def gauge(name: str, description: str, tags=("service", "layer")):
            g = metrics.Gauge(name, description=description, tag_keys=tags)
            g.set_default_tags({"service": service})
            return g

        self._counters = {
            key: counter(name, description)
            for key, name, description in (
                ("hits", "moeray_cache_hits", "uses that found their expert hot"),
                (
                    "stalls",
                    "moeray_cache_stalls",
                    "uses whose expert was neither hot nor prefetched",
                ),
                ("evictions", "moeray_cache_evictions", "experts evicted from a hot set"),
                ("prefetches", "moeray_prefetches", "experts prefetched"),
                ("prefetch_hits", "moeray_prefetch_hits", "hits on prefetched experts"),
                ("transfers", "moeray_transfers", "experts moved into the fast tier"),
                ("wasted_prefetches", "moeray_wasted_prefetches", "prefetches evicted unused"),
            )
        }
        predictor_tags = ("service", "layer", "predictor")
        self._predictor = {
            field: counter(f"moeray_predictor_{field}", description, predictor_tags)
            for field, description in (
                ("hits", "experts of a predictor's top-k guesses that were used"),
                ("guesses", "experts a predictor guessed"),
                ("uses", "expert uses a predictor had a guess for"),
            )
        }
        self._placement = None
        if placement:
            self._placement = {
                "forecast": gauge(
                    "moeray_placement_forecast_balancedness",
                    "mean / max GPU load of the forecast on the placement in force",
                ),
                "realised": gauge(
                    "moeray_placement_realised_balancedness",
                    "mean / max GPU load of the last load window on the placement that served "
                    "it (even split over replicas)",
                ),
                "slots": counter("moeray_placement_slots_moved", "expert slots rewritten"),
                "bytes": counter("moeray_placement_bytes_moved", "expert bytes to copy"),
                "rebalances": counter(
                    "moeray_placement_rebalances", "placements published", ("service",)
                ),
                "skipped": counter(
                    "moeray_placement_rebalances_skipped",
                    "re-placements whose moves were all zero (the gate)",
                    ("service",),
                ),
                "errors": counter(
                    "moeray_placement_errors", "load windows whose planning failed", ("service",)
                ),
                "version": gauge(
                    "moeray_placement_version", "the latest placement's version", ("service",)
                ),
                "age": gauge(
                    "moeray_placement_age_s",
                    "seconds since the latest placement was published",
                    ("service",),
                ),
            }

    def record_rebalance(self, result: Rebalance) -> None:
        placement = self._placement
        if placement is None:
            return
        if result.error is not None:
            placement["errors"].inc(1)
        elif result.skipped:
            placement["skipped"].inc(1)
        else:
            placement["rebalances"].inc(1)
            placement["version"].set(result.version)
            expert_bytes = result.placement.topology.expert_bytes
            for layer, moved in enumerate(result.moved_slots.tolist()):
                if moved:
                    placement["slots"].inc(moved, tags={"layer": str(layer)})
                    if expert_bytes:
                        placement["bytes"].inc(moved * expert_bytes, tags={"layer": str(layer)})
        for key, values in (
            ("forecast", result.forecast_balancedness),
            ("realised", result.realised_balancedness),
        ):
            if values is not None:
                for layer, value in enumerate(values.tolist()):
                    placement[key].set(value, tags={"layer": str(layer)})

    def record_placement_age(self, stats: PlacementStats) -> None:
        if self._placement is not None and stats.age_s is not None:
            self._placement["age"].set(stats.age_s)

    def record_ack(self, ack: LayerAck) -> None:
        tags = {"layer": str(ack.layer)}
        counts = ack.counters
        for key, counter in self._counters.items():
            value = getattr(counts, key)
            if value:
                counter.inc(value, tags=tags)
        for field, counter in self._predictor.items():
            for name, value in zip(PREDICTOR_NAMES, getattr(counts, f"predictor_{field}")):
                if value:
                    counter.inc(value, tags={**tags, "predictor": name})


class LinkMetrics:
    """An engine session's link to the service (``moeray.engine.ServiceLink``), exported from the
    engine's process: whether the service answers, and what the link reported, dropped and
    failed. ``observe`` takes the link's cumulative ``LinkStats`` and adds what is new."""

    def __init__(self, service: str):
        def counter(name: str, description: str):
            c = metrics.Counter(name, description=description, tag_keys=("service",))
            c.set_default_tags({"service": service})
            return c

        self._connected = metrics.Gauge(
            "moeray_engine_service_connected",
            description="1 while the engine's last call to the service worked; 0 while the "
            "engine-side session decides on its own",
            tag_keys=("service",),
        )
        self._connected.set_default_tags({"service": service})
        self._counters = {
            "reported_tokens": counter(
                "moeray_engine_reported_tokens", "routed tokens the service took"
            ),
            "dropped_tokens": counter(
                "moeray_engine_dropped_tokens",
                "routed tokens not reported (the link's queue full, or the service failed)",
            ),
            "failures": counter("moeray_engine_link_failures", "failed calls to the service"),
        }
        self._seen = dict.fromkeys(self._counters, 0)

    def observe(self, stats) -> None:
        self._connected.set(1.0 if stats.connected else 0.0)
        for key, counter in self._counters.items():
            value = getattr(stats, key)
            if value > self._seen[key]:
                counter.inc(value - self._seen[key])
                self._seen[key] = value


class SubmitLatency:
    """Histogram of submit latency, recorded in the process that submits."""

    def __init__(self, service: str):
        self._histogram = metrics.Histogram(
            "moeray_submit_latency_ms",
            description="ServiceHandle.submit latency",
            boundaries=_LATENCY_BOUNDARIES_MS,
            tag_keys=("service",),
        )
        self._histogram.set_default_tags({"service": service})

    def observe(self, seconds: float) -> None:
        self._histogram.observe(seconds * 1e3)
