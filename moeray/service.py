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
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Callable

from moeray.actors import _ray
from moeray.actors.config import ServiceConfig
from moeray.actors.messages import ServiceStats
from moeray.actors.rebalancer import wait_for_placement
from moeray.actors.steps import WindowBuffer, check_step, schedule_step
from moeray.placement.balancer import encode_placement
from moeray.placement.placement import Placement
from moeray.policy.scheduler import ExpertBatches
from moeray.traces.wire import decode_step

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
    ):
        """timer: seconds, monotonic (submit latency, window age). wake_after(seconds,
        callback): calls callback later from another thread (closes a window_ms-old window
        when no submit comes to do it; a test passes its own)."""
        self._coordinator = coordinator
        self.config = config
        self._in_flight: deque = deque()
        self._max_in_flight = max_in_flight
        self._timer = timer
        self._wake_after = wake_after
        # the latest submits' latencies, for p50 / p99; bounded so a long-lived engine's
        # handle does not grow without end (the Prometheus histogram keeps the full record)
        self.submit_latency_s: deque[float] = deque(maxlen=100_000)
        self._latency_metric = _ray.SubmitLatency(config.name)
        self._window = WindowBuffer(config, timer)  # this client's routing not yet sent
        self._window_number = 0  # which window a window_ms wake-up was armed for
        self._lock = threading.Lock()  # submit and the window_ms wake-up both send windows
        self._closed = False  # after shutdown: no more steps

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
        ``shutdown``."""
        self._check_open()
        start = self._timer()
        step = check_step(self.config, expert_ids, weights, seq_starts, hints)
        batches = None
        if step.weights is not None:
            batches = schedule_step(step.expert_ids, step.weights, self.config.num_experts)
        ms = self.config.window_ms
        with self._lock:
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
            if self._window and self._window_number == number:
                self._send_window()

    def _send_window(self) -> None:
        """Sends the open window (the caller holds the lock)."""
        window = self._window.take()
        if window is None:
            return
        if len(self._in_flight) >= self._max_in_flight:
            _ray.wait_all([self._in_flight.popleft()])
        self._in_flight.append(
            _ray.call_async(
                self._coordinator.add_routing,
                window.expert_ids,
                window.steps,
                True,
                window.seq_starts,
                window.hints,
            )
        )

    def submit_msgpack(self, payload: bytes) -> bytes:
        """A step in the msgpack form of ``moeray.traces.wire``; returns the schedules in that form.
        This is the path of non-Python clients: it waits for the coordinator. The step is
        checked here first (one-line ValueError / TypeError, as ``submit``); this handle's open
        window goes first, so steps mixed with ``submit`` keep their order."""
        self._check_open()
        step = decode_step(payload)
        check_step(self.config, step.expert_ids, step.weights, step.seq_starts, step.hints)
        with self._lock:
            self._send_window()
        return _ray.call(self._coordinator.submit_msgpack, payload)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"service {self.config.name!r}: this handle was shut down")

    def flush(self) -> None:
        """Sends this client's open window and waits until everything submitted so far has
        reached the coordinator; then closes the coordinator's open window."""
        self._check_open()
        with self._lock:
            self._send_window()
            in_flight = list(self._in_flight)
            self._in_flight.clear()
        _ray.wait_all(in_flight)
        _ray.call(self._coordinator.flush)

    def stats(self) -> ServiceStats:
        """Per-layer statistics once everything submitted so far has been applied."""
        self.flush()
        return _ray.call(self._coordinator.stats)

    def layer_actor_handles(self) -> list:
        return _ray.call(self._coordinator.layer_actor_handles)

    def layer_actor_resources(self) -> list[str | None]:
        """The node resource each layer actor is pinned to now (after any re-placement)."""
        return _ray.call(self._coordinator.layer_actor_resources)

    def placement(self) -> tuple[Placement | None, int]:
        """The latest expert placement the coordinator published and its version (from 1):
        (None, 0) before the first, or when ``expert_placement`` is off. Does not wait for this
        handle's routing to be planned (``wait_placement`` does)."""
        placement = _ray.call(self._coordinator.expert_placement, 0)
        return (placement, placement.version) if placement is not None else (None, 0)

    def wait_placement(
        self, after_version: int = 0, timeout_s: float = 10.0
    ) -> tuple[Placement, int] | None:
        """Waits until a placement newer than ``after_version`` is published; returns it and
        its version, or None after ``timeout_s`` seconds (polls the coordinator every 10 ms)."""
        placement = wait_for_placement(
            lambda after: _ray.call(self._coordinator.expert_placement, after),
            after_version,
            timeout_s,
            timer=self._timer,
        )
        return (placement, placement.version) if placement is not None else None

    def placement_msgpack(self, after_version: int = 0) -> bytes:
        """The latest expert placement as msgpack (``moeray.placement.balancer.encode_placement``,
        docs/user-guide.md): a map {"version", "physical_to_logical", "num_experts",
        "topology"}, or nil when none is newer than ``after_version``. Does not wait."""
        return encode_placement(_ray.call(self._coordinator.expert_placement, after_version))

    def layer_actor_nodes(self) -> list[str]:
        """The Ray node id each layer actor runs on."""
        return _ray.call(self._coordinator.layer_actor_nodes)

    def shutdown(self) -> None:
        """Removes the coordinator and every layer actor of this service; the handle takes no
        more steps (RuntimeError)."""
        self._closed = True
        try:
            with self._lock:
                self._window.take()  # dropped: the service goes
            _ray.wait_all(self._in_flight)
            _ray.call(self._coordinator.shutdown)
        except _ray.RayActorError:
            pass
        finally:
            self._in_flight.clear()
            _ray.kill(self._coordinator)


def start(config: ServiceConfig) -> ServiceHandle:
    """Creates the service's actors and returns once the coordinator answers.

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
    return ServiceHandle(coordinator, config)


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


def connect(name: str = "moeray", namespace: str = "moeray") -> ServiceHandle:
    """A handle on the running service ``name``; ValueError when there is none."""
    coordinator = _ray.get_coordinator(name, namespace)
    return ServiceHandle(coordinator, _ray.call(coordinator.config))


def session(address: str | None = None, **options):
    """A context manager around Ray for a process that is not already a Ray driver: joins the
    cluster at ``address`` (HOST:PORT or auto; checked first, its token used when one is at
    hand) or starts a quiet, loopback-only local Ray, and shuts down what it began::

        with service.session("127.0.0.1:6379"):
            handle = service.connect("gpt-oss")

    ValueError of one line when nothing answers at the address or Ray refuses the token."""
    return _ray.local_session(address, **options)
