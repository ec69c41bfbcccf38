"""Start, find and stop a moeray service on a Ray cluster; submit routing to it.

A service is a named, detached coordinator actor plus its layer actors, in a Ray namespace.
``start`` creates one, ``connect`` finds a running one from any driver or job,
``ServiceHandle.shutdown`` removes every actor it created; Ray must be initialised by the caller.
``ServiceHandle.submit`` checks a step and groups it by expert in the caller's process, and
coalesces ``window_steps`` submits (or ``window_ms``) into one window before handing it to the
coordinator without waiting, so the coordinator sees one call per client window; at most
``max_in_flight`` windows are outstanding. Steps may carry sequence starts and engine hints
(predictive policies read them); ``submit_msgpack`` takes the wire form (``moeray.traces.wire``).
With ``ServiceConfig.expert_placement``, ``placement`` / ``wait_placement`` /
``placement_msgpack`` read the coordinator's latest versioned expert placement.

Failures: each handle numbers its windows and keeps them in a journal (``ClientJournal``, at most
``max_journal_windows``) until every layer actor has acknowledged them. When the coordinator's
process dies, Ray restarts it, it rebuilds itself from the layer actors, and the handle resends
what was not acknowledged everywhere; the coordinator drops what a layer actor already has. So
no window is lost or counted twice; a submit waits while the coordinator is down (seconds), and
raises a RuntimeError that says why when it does not come back within ``recovery_timeout_s``.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator

from moeray.actors import _ray
from moeray.actors.config import ServiceConfig
from moeray.actors.journal import ClientJournal, JournalGapError
from moeray.actors.messages import ClientGapError, EngineUpdate, ServiceStats
from moeray.actors.rebalancer import wait_for_placement
from moeray.actors.steps import WindowBuffer, check_step, schedule_step
from moeray.placement.balancer import encode_placement
from moeray.placement.placement import Placement
from moeray.policy.scheduler import ExpertBatches
from moeray.traces.wire import decode_step, encode_batches

__all__ = ["ServiceConfig", "ServiceHandle", "connect", "session", "start"]


def _daemon_timer(seconds: float, callback: Callable[[], None]) -> None:
    """Calls ``callback`` in ``seconds`` on a daemon thread."""
    timer = threading.Timer(seconds, callback)
    timer.daemon = True
    timer.start()


class ServiceHandle:
    """A driver's handle on a running service."""

    def __init__(
        self,
        coordinator,
        config: ServiceConfig,
        max_in_flight: int = 64,
        timer: Callable[[], float] = time.perf_counter,
        wake_after: Callable[[float, Callable[[], None]], None] = _daemon_timer,
        max_journal_windows: int = 256,
        max_journal_bytes: int = 256 * 2**20,
        recovery_timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """timer: seconds, monotonic (submit latency, window age, recovery deadlines).
        wake_after(seconds, callback): calls callback later from another thread (closes a
        window_ms-old window when no submit comes to do it; a test passes its own).
        max_journal_windows, max_journal_bytes: windows, and their bytes, this handle keeps
        until every layer actor acknowledged them (each window at most
        ``ServiceConfig.max_window_bytes``); at either bound a submit waits for the
        acknowledgements. recovery_timeout_s: how long a submit waits for a coordinator
        that died to come back before it raises; sleep(seconds): waits between its polls of a
        restarting coordinator (a test passes its own)."""
        self._coordinator = coordinator
        self.config = config
        self._in_flight: deque = deque()  # add_routing calls not yet answered, in send order
        self._orphans: deque = deque(maxlen=4 * max_in_flight)  # calls a recovery gave up on
        self._max_in_flight = max_in_flight
        self._timer = timer
        self._wake_after = wake_after
        # the latest submits' latencies, for p50 / p99; bounded so a long-lived engine's
        # handle does not grow without end (the Prometheus histogram keeps the full record)
        self.submit_latency_s: deque[float] = deque(maxlen=100_000)
        self._latency_metric = _ray.SubmitLatency(config.name)
        self._window = WindowBuffer(config, timer)  # this client's routing not yet sent
        self._window_number = 0  # which window a window_ms wake-up was armed for
        # submit and the window_ms wake-up both send windows; a recovery inside a send calls
        # the coordinator again
        self._lock = threading.RLock()
        self._closed = False  # after shutdown: no more steps
        self._broken: str | None = None  # why this handle can take no more steps
        self._journal = ClientJournal(uuid.uuid4().hex, max_journal_windows, max_journal_bytes)
        self._recovery_timeout_s = recovery_timeout_s
        self._sleep = sleep
        self._failing_since: float | None = None  # when the coordinator was first seen failing
        # seconds each recovery took, from the failure seen to the journal resent
        self.recoveries_s: deque[float] = deque(maxlen=10_000)

    def submit(
        self, expert_ids, weights=None, seq_starts=None, hints=None
    ) -> list[ExpertBatches] | None:
        """One forward pass: expert_ids int [num_layers, T, top_k], weights float, same shape
        (or None: no schedule is returned), seq_starts bool [T]: True where a token begins a
        sequence (or None: the step continues the stream; only predictive policies read it),
        hints int [num_layers, T, h]: an engine's predicted experts of each token at each
        layer, -1 for none (or None; only predictive policies take them:
        ``moeray.policy.predict``, "Engine hints"). Returns each layer's ``ExpertBatches``.

        Bad input raises TypeError / ValueError here and reaches no actor; RuntimeError after
        ``shutdown``, or when the coordinator is gone (module doc, "Failures")."""
        self._check_open()
        start = self._timer()
        step = check_step(self.config, expert_ids, weights, seq_starts, hints)
        batches = None
        if step.weights is not None:
            batches = schedule_step(step.expert_ids, step.weights, self.config.num_experts)
        ms = self.config.window_ms
        with self._lock:
            if not self._window.fits(step.expert_ids, step.hints):
                self._send_window()  # max_window_bytes, and hints padded at most 2x
            if not self._window:
                self._window_number += 1
                if ms is not None and self.config.window_steps > 1:
                    # an engine that pauses must not leave its routing unsent: close the
                    # window when it is ms old even if no submit comes to do it
                    number = self._window_number
                    self._wake_after(ms / 1e3, lambda: self._close_window(number))
            self._window.add(step.expert_ids, 1, step.seq_starts, step.hints)
            if self._window.due():
                self._send_window()
        elapsed = self._timer() - start
        self.submit_latency_s.append(elapsed)
        self._latency_metric.observe(elapsed)
        return batches

    def _close_window(self, number: int) -> None:
        """The window_ms wake-up: sends window ``number`` if it is still open."""
        with self._lock:
            if self._window and self._window_number == number and self._broken is None:
                try:
                    self._send_window()
                except RuntimeError:  # recorded (_break): the next submit raises it
                    pass

    def _send_window(self) -> None:
        """Sends the open window (the caller holds the lock), journaled."""
        window = self._window.take()
        if window is None:
            return
        self._reap()
        if len(self._in_flight) >= self._max_in_flight:
            self._reap(keep=self._max_in_flight - 1)
        if self._journal.full():
            self._make_room()
        self._post(self._journal.add(window), window)

    def _post(self, seq: int, window) -> None:
        self._in_flight.append(
            _ray.call_async(
                self._coordinator.add_routing,
                window.expert_ids,
                window.steps,
                True,
                window.seq_starts,
                window.hints,
                self._journal.client,
                seq,
            )
        )

    def _reap(self, keep: int | None = None) -> None:
        """Takes the coordinator's answers in send order: each finished one, and while more
        than ``keep`` are outstanding, waits for the oldest. An answer confirms journaled
        windows; a failure (the coordinator died, or it lost a window before this one) starts a
        recovery."""
        self._take_orphans()
        while self._in_flight:
            ref = self._in_flight[0]
            if (keep is None or len(self._in_flight) <= keep) and not _ray.ready(ref):
                return
            try:
                confirmed, _ = _ray.get(ref, timeout_s=self._recovery_timeout_s)
            except _ray.RayActorError as exc:
                self._recover(exc)
                continue
            except _ray.RayTaskError as exc:
                if isinstance(exc.cause, ClientGapError):
                    self._recover(exc)
                    continue
                self._break(f"the coordinator refused a window of this client: {exc.cause!r}")
            except _ray.GetTimeoutError:
                self._break(f"the coordinator did not answer within {self._recovery_timeout_s:g} s")
            self._in_flight.popleft()
            self._journal.confirm(confirmed)
            self._failing_since = None

    def _take_orphans(self) -> None:
        """Takes, and ignores, the answers to calls made before a recovery that have come."""
        while self._orphans and _ray.ready(self._orphans[0]):
            ref = self._orphans.popleft()
            try:
                _ray.get(ref, timeout_s=0)
            except Exception:  # any answer, error or not, is moot now
                pass

    def _make_room(self) -> None:
        """The journal is at its bound: waits until the coordinator has every window sent and
        every layer actor has acknowledged them."""
        self._reap(keep=0)
        if self._journal.full():
            confirmed, _ = self._call("client_marks", self._journal.client, True)
            self._journal.confirm(confirmed)
        if self._journal.full():
            self._break(
                f"{len(self._journal)} windows ({self._journal.bytes:,} bytes) of this client "
                "are not acknowledged by every layer actor (max_journal_windows="
                f"{self._journal.max_windows}, max_journal_bytes={self._journal.max_bytes:,})"
            )

    def _recover(self, failure: Exception) -> None:
        """The coordinator failed a call: waits until it answers again (restarted by Ray and
        rebuilt from the layer actors), then resends every journaled window it does not have.
        RuntimeError when it is gone for good or not back within recovery_timeout_s."""
        began = self._timer()
        if self._failing_since is None:
            self._failing_since = began
        deadline = self._failing_since + self._recovery_timeout_s
        # their answers no longer matter (the resend decides), but each is taken when it comes,
        # so that Ray does not log the gap errors a restarted coordinator answers them with
        self._orphans.extend(self._in_flight)
        self._in_flight.clear()
        pause = 0.01
        while True:
            if isinstance(failure, _ray.ActorDiedError) and not _ray.coordinator_exists(
                self.config.name, self.config.namespace
            ):
                self._break("its coordinator is gone (shut down, or its restarts ran out)")
            left = deadline - self._timer()
            if left <= 0:
                self._break(
                    f"its coordinator did not come back within {self._recovery_timeout_s:g} s "
                    f"(last error: {type(failure).__name__})"
                )
            try:
                confirmed, low = _ray.call_within(
                    left, self._coordinator.client_marks, self._journal.client
                )
                break
            except (_ray.RayActorError, _ray.GetTimeoutError) as exc:
                failure = exc
            self._sleep(min(pause, max(left, 0)))  # Ray refuses calls while it restarts it
            pause = min(pause * 2, 0.2)
        self._journal.confirm(confirmed)
        try:
            again = self._journal.after(low)
        except JournalGapError as exc:
            self._break(str(exc))
        for seq, window in again:
            self._post(seq, window)
        self.recoveries_s.append(self._timer() - began)

    def _break(self, why: str) -> None:
        """This handle cannot go on: it refuses every later step, saying why."""
        self._broken = why
        self._in_flight.clear()
        raise RuntimeError(f"service {self.config.name!r}: {why}")

    def _call(self, method: str, *args):
        """Calls a coordinator method and waits; a coordinator that died is waited for (and
        this handle's windows resent) and the call made again."""
        while True:
            try:
                result = _ray.call(getattr(self._coordinator, method), *args)
            except _ray.RayActorError as exc:
                with self._lock:
                    self._recover(exc)
                continue
            self._failing_since = None
            return result

    def submit_msgpack(self, payload: bytes) -> bytes:
        """A step in the msgpack form of ``moeray.traces.wire``; returns the schedules in that form.
        This is the path of non-Python clients. The step is checked here (one-line ValueError /
        TypeError, as ``submit``) and joins this handle's windows, so steps mixed with
        ``submit`` keep their order and are journaled alike."""
        self._check_open()
        step = decode_step(payload)
        batches = self.submit(step.expert_ids, step.weights, step.seq_starts, step.hints)
        return encode_batches(batches or [])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"service {self.config.name!r}: this handle was shut down")
        if self._broken is not None:
            raise RuntimeError(f"service {self.config.name!r}: {self._broken}")

    @property
    def unconfirmed_windows(self) -> int:
        """Windows this handle sent that not every layer actor has acknowledged yet (its
        journal; at most ``max_journal_windows``)."""
        return len(self._journal)

    def flush(self) -> None:
        """Sends this client's open window and waits until everything submitted so far has
        reached the coordinator; then closes the coordinator's open window."""
        self._check_open()
        with self._lock:
            self._send_window()
            self._reap(keep=0)
        self._call("flush")

    def stats(self) -> ServiceStats:
        """Per-layer statistics once everything submitted so far has been applied."""
        self.flush()
        return self._call("stats")

    def layer_actor_handles(self) -> list:
        return self._call("layer_actor_handles")

    def predictor_tables(self) -> Iterator[tuple[int, dict]]:
        """Every layer actor's learned tables of the predictive policy (``LayerCaches.tables``:
        (first layer, tables)), learned from every client's routing: what
        ``EngineSession.attach(handle, warm=True)`` starts from. Nothing for a demand policy.
        One actor's at a time (each fetched when the one before was taken), so a caller holds
        one actor's tables, not the service's (hundreds of MiB at DeepSeek-V3's shape)."""
        for actor in self.layer_actor_handles():
            tables = _ray.get(_ray.call_async(actor.tables))
            if tables is not None:
                yield tables

    def layer_actor_resources(self) -> list[str | None]:
        """The node resource each layer actor is pinned to now (after any re-placement)."""
        return self._call("layer_actor_resources")

    def coordinator_pid(self) -> int:
        """The process id of the coordinator (on its node), for tests that kill it."""
        return self._call("pid")

    def placement(self) -> tuple[Placement | None, int]:
        """The latest expert placement the coordinator published and its version: (None, 0)
        before the first, or when ``expert_placement`` is off. Versions only rise, across
        coordinator restarts too (restarts << 32 plus the placements published since the last
        restart, from 1); a restarted coordinator has none until its first load window. Does
        not wait for this handle's routing to be planned (``wait_placement`` does)."""
        placement = self._call("expert_placement", 0)
        return (placement, placement.version) if placement is not None else (None, 0)

    def wait_placement(
        self, after_version: int = 0, timeout_s: float = 10.0
    ) -> tuple[Placement, int] | None:
        """Waits until a placement newer than ``after_version`` is published; returns it and
        its version, or None after ``timeout_s`` seconds (polls the coordinator every 10 ms)."""
        placement = wait_for_placement(
            lambda after: self._call("expert_placement", after),
            after_version,
            timeout_s,
            timer=self._timer,
        )
        return (placement, placement.version) if placement is not None else None

    def link_metrics(self):
        """The Ray metrics of an engine session's link to this service, in this process
        (``EngineSession.attach`` takes them)."""
        return _ray.LinkMetrics(self.config.name)

    def engine_update(self, after_version: int = 0) -> EngineUpdate | None:
        """What an engine session takes from the service (capacities, prefetch budget, the
        placement's version: ``EngineUpdate``) when newer than ``after_version``, else None.
        Does not wait. ``moeray.engine.EngineSession.attach(handle)`` polls it."""
        return self._call("engine_update", after_version)

    def placement_msgpack(self, after_version: int = 0) -> bytes:
        """The latest expert placement as msgpack (``moeray.placement.balancer.encode_placement``,
        docs/user-guide.md): a map {"version", "physical_to_logical", "num_experts",
        "topology"}, or nil when none is newer than ``after_version``. Does not wait."""
        return encode_placement(self._call("expert_placement", after_version))

    def layer_actor_nodes(self) -> list[str]:
        """The Ray node id each layer actor runs on."""
        return self._call("layer_actor_nodes")

    def shutdown(self) -> None:
        """Removes the coordinator and every layer actor of this service, by name, even when the
        coordinator is dead or restarting, and returns once their names are free (a new
        ``start`` works); the handle takes no more steps (RuntimeError)."""
        self._closed = True
        with self._lock:
            self._window.take()  # dropped: the service goes
            self._in_flight.clear()
        try:
            _ray.call_within(10.0, self._coordinator.shutdown)  # stops its placement worker
        except (_ray.RayActorError, _ray.RayTaskError, _ray.GetTimeoutError):
            pass  # dead or restarting: its actors go by name below
        _ray.remove_service(self.config)


def start_prefetch_node(shards: str, num_layers: int, num_experts: int, **options):
    """A prefetch actor on this process's node over the checkpoint at ``shards``
    (``moeray.actors.prefetch_node.PrefetchNode``): give its ``on_route`` to a
    ``moeray.engine.StreamingSession``, which streams each layer's plan to it over a local
    socket as the router runs (docs/user-guide.md, "Streaming"). Needs a Ray session;
    ``close()`` removes it."""
    return _ray.PrefetchNodeHandle(shards, num_layers, num_experts, **options)


def start(config: ServiceConfig, **options) -> ServiceHandle:
    """Creates the service's actors and returns once the coordinator answers. options: the
    handle's (``ServiceHandle``: max_in_flight, max_journal_windows, max_journal_bytes,
    recovery_timeout_s).

    ValueError when a service of that name already runs in the namespace (use ``connect``)."""
    if not isinstance(config, ServiceConfig):
        raise TypeError(f"config: expected a ServiceConfig, got {type(config).__name__}")
    try:
        _ray.get_coordinator(config.name, config.namespace)
    except ValueError:
        pass
    else:
        raise ValueError(f"name: service {config.name!r} already runs; connect() to it")
    coordinator = _ray.create_coordinator(config)
    _ray.call(coordinator.ready)  # every actor is up, or its creation error surfaces here
    _warn_if_core_differs(*_ray.call(coordinator.core))
    return ServiceHandle(coordinator, config, **options)


def _warn_if_core_differs(path: str, native: bool) -> None:
    """A service whose actors fell back to the pure-Python core, beside a native driver, runs
    tens of times slower: say so, and name the usual cause."""
    import moeray
    from moeray.native import IS_NATIVE

    if IS_NATIVE and not native:
        warnings.warn(
            f"the service's actors run moeray's pure-Python core, imported from {path} (this "
            f"process: native, from {moeray.__file__}). Ray puts the driver's working directory "
            "first on workers' sys.path: a driver started in a moeray checkout makes them import "
            "its unbuilt source tree. Start the driver in another directory (moeray's own commands do).",
            RuntimeWarning,
            stacklevel=3,
        )


def connect(
    name: str = "moeray", namespace: str = "moeray", timeout_s: float = 30.0, **options
) -> ServiceHandle:
    """A handle on the running service ``name``; ValueError when there is none. A coordinator
    that is restarting is waited for up to ``timeout_s`` seconds, then TimeoutError. options:
    the handle's (as ``start``)."""
    coordinator = _ray.get_coordinator(name, namespace)
    deadline = time.monotonic() + timeout_s
    pause = 0.01
    while True:
        left = deadline - time.monotonic()
        try:
            config = _ray.call_within(max(left, 0.001), coordinator.config)
            return ServiceHandle(coordinator, config, **options)
        except _ray.ActorDiedError:
            raise ValueError(
                f"name: moeray service {name!r} in namespace {namespace!r} is gone (its "
                "coordinator was shut down)"
            ) from None
        except (_ray.RayActorError, _ray.GetTimeoutError):
            if time.monotonic() + pause > deadline:
                raise TimeoutError(
                    f"service {name!r}: its coordinator is restarting and did not answer within "
                    f"{timeout_s:g} s"
                ) from None
        time.sleep(pause)  # Ray refuses calls while it restarts the coordinator
        pause = min(pause * 2, 0.2)


def session(address: str | None = None, **options):
    """A context manager around Ray for a process that is not already a Ray driver: joins the
    cluster at ``address`` (HOST:PORT or auto; checked first, its token used when one is at
    hand) or starts a quiet, loopback-only local Ray, and shuts down what it began::

        with service.session("127.0.0.1:6379"):
            handle = service.connect("gpt-oss")

    ValueError of one line when nothing answers at the address or Ray refuses the token."""
    return _ray.local_session(address, **options)
