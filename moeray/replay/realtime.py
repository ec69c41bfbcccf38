"""A paced replay (``moeray replay --realtime MS``): routing streamed layer by layer to a node's
prefetcher while an engine's compute is simulated, experts read from a mapped checkpoint.

Per token and layer: route (``StreamingSession.route``: the engine-side session's plan, streamed
one way to the prefetch node) -> sleep ``compute_ms`` (the layer's compute before its experts
run) -> the layer's experts' residency checked, then their bytes read from the engine's mapping
(``StreamingSession.use``; a cold page costs its fault). The report holds, beside the session's
own accounting (the stalls and prefetch hits of the same replay in-process, where every prefetch
is in time), what was observed: prefetched experts not resident at use (late prefetches) and the
route-to-prefetch-start latency the prefetch node measured. Without a checkpoint, a small one of
the trace's shape is synthesised (``synthetic_checkpoint``) and its page cache dropped first.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

from moeray._progress import Progress
from moeray.actors.config import ServiceConfig
from moeray.actors.prefetch_node import RouteMessage, StreamStats
from moeray.engine.session import EngineSession
from moeray.engine.stream import CheckpointReader, StreamingSession, UseStats
from moeray.policy.windows import COUNTER_KEYS
from moeray.replay.inprocess import trace_seq_starts
from moeray.shards.synth import ModelShape, SynthConfig, write_checkpoint
from moeray.traces.trace import Trace

__all__ = [
    "PrefetchTarget",
    "RealtimeReport",
    "check_compute_ms",
    "format_report",
    "replay_realtime",
    "synthetic_checkpoint",
]

# The synthesised checkpoint's expert: BF16 gate, up, down of 128 x 128 (96 KiB), so a trace of
# gpt-oss-20b's shape (24 layers, 32 experts) writes 72 MiB.
_SYNTH_HIDDEN = 128
_MAX_COMPUTE_MS = 10_000.0


class PrefetchTarget(Protocol):
    """Where a replay streams: a ``PrefetchNode`` in this process, or a handle to one."""

    def on_route(self, message: RouteMessage) -> object: ...
    def flush(self) -> object: ...
    def stats(self) -> StreamStats: ...


@dataclass(frozen=True)
class RealtimeReport:
    """One paced replay. counters: the session's accounting summed over layers
    (``COUNTER_KEYS``); uses: what the engine observed; stream: the prefetch node's counts and
    latencies; resident_before_bytes: the checkpoint's resident bytes after the drop (mincore)."""

    policy: str
    tokens: int
    num_layers: int
    compute_ms: float
    shards: str
    checkpoint_bytes: int
    synthesised: bool
    resident_before_bytes: int
    counters: dict
    uses: UseStats
    stream: StreamStats
    wall_s: float

    def to_json(self) -> dict:
        document = asdict(self)
        document["uses"]["late_prefetches"] = self.uses.late_prefetches
        document["uses"]["prefetched_in_time"] = self.uses.prefetched_in_time
        return document


def check_compute_ms(compute_ms) -> float:
    """ms of compute per layer, in [0, 10000]; ValueError naming --realtime otherwise."""
    if isinstance(compute_ms, bool) or not isinstance(compute_ms, (int, float)):
        raise ValueError(f"--realtime: expected milliseconds per layer, got {compute_ms!r}")
    if not 0 <= compute_ms <= _MAX_COMPUTE_MS:  # NaN fails too
        raise ValueError(
            f"--realtime: expected milliseconds per layer in [0, {_MAX_COMPUTE_MS:g}], "
            f"got {compute_ms}"
        )
    return float(compute_ms)


@contextlib.contextmanager
def synthetic_checkpoint(
    trace: Trace, say: Callable[[str], None] = lambda text: None, size: int = _SYNTH_HIDDEN
) -> Iterator:
    """A BF16 checkpoint of ``trace``'s layers and experts (gate, up, down of ``size`` x
    ``size``: 96 KiB per expert by default) in a temporary directory, removed on exit; yields
    its ``SynthCheckpoint``."""
    shape = ModelShape("synthetic", "mlp", trace.num_layers, trace.num_experts, size, size)
    with tempfile.TemporaryDirectory(prefix="moeray-realtime-") as out:
        checkpoint = write_checkpoint(
            SynthConfig(shape, trace.num_layers, layers_per_file=trace.num_layers), out
        )
        say(
            f"synthesised a checkpoint of {checkpoint.total_bytes / 2**20:.1f} MiB "
            f"({trace.num_layers} layers x {trace.num_experts} experts of "
            f"{3 * size * size * 2 // 1024} KiB) in {out}"
        )
        yield checkpoint


def replay_realtime(
    trace: Trace,
    config: ServiceConfig,
    reader: CheckpointReader,
    target: PrefetchTarget,
    compute_ms: float,
    synthesised: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    progress: Progress | None = None,
) -> RealtimeReport:
    """Paces ``trace`` (one token per batch) through an ``EngineSession`` of ``config``, its plans
    streamed to ``target`` and its experts read through ``reader`` (module doc). ``target``'s
    prefetch node must be new (its page-cache drop made the checkpoint cold)."""
    compute_ms = check_compute_ms(compute_ms)
    if (config.num_layers, config.num_experts) != (trace.num_layers, trace.num_experts):
        raise ValueError("config: its layers and experts must be the trace's")
    reader.drop_page_cache()
    resident_before = reader.resident_total()
    streaming = StreamingSession(EngineSession(config, max_batch_tokens=1), target.on_route, reader)
    starts = trace_seq_starts(trace)
    ids = trace.expert_ids
    start = time.monotonic()
    for t in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            used = ids[t, layer]
            streaming.route(layer, used[None], new_sequence=bool(starts[t]) if layer == 0 else None)
            if compute_ms:
                sleep(compute_ms / 1e3)
            streaming.use(layer, used)
        if progress is not None:
            progress.advance(1, note=f"token {t + 1}")
    wall_s = time.monotonic() - start
    target.flush()
    stats = streaming.session.stats()
    counters = {key: sum(layer[key] for layer in stats) for key in COUNTER_KEYS}
    return RealtimeReport(
        config.policy,
        trace.num_tokens,
        trace.num_layers,
        compute_ms,
        reader.path,
        reader.total_bytes,
        synthesised,
        resident_before,
        counters,
        streaming.uses,
        target.stats(),
        wall_s,
    )


def format_report(report: RealtimeReport) -> list[str]:
    """The printed table: observed timeliness beside the in-process accounting."""
    u, s, c = report.uses, report.stream, report.counters
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    where = "synthesised, " if report.synthesised else ""
    in_time = "-" if u.prefetched_in_time is None else f"{100 * u.prefetched_in_time:.1f} %"
    lines = [
        f"realtime replay: policy {report.policy}, {report.tokens} tokens x {report.num_layers} "
        f"layers at {report.compute_ms:g} ms of compute per layer, {report.wall_s:.2f} s",
        f"checkpoint {report.shards} ({where}{mib(report.checkpoint_bytes)}, "
        f"{mib(report.resident_before_bytes)} resident at the start)",
        "",
        f"{'':<34}{'in-process':>12}{'observed':>12}",
        f"{'expert uses':<34}{c['hits'] + c['stalls']:>12,}{u.prefetched + u.loaded + u.other:>12,}",
        f"{'stalls (not hot at use)':<34}{c['stalls']:>12,}{'':>12}",
        f"{'  loaded at route, resident at use':<34}{'':>12}{u.loaded_resident:>12,}",
        f"{'prefetches issued':<34}{c['prefetches']:>12,}{'':>12}",
        f"{'prefetched experts used':<34}{c['prefetch_hits']:>12,}{u.prefetched:>12,}",
        f"{'late prefetches (not resident)':<34}{0:>12,}{u.late_prefetches:>12,}",
        f"{'prefetched resident before use':<34}{'':>12}{in_time:>12}",
        f"{'other uses (kept), resident':<34}{'':>12}{f'{u.other_resident}/{u.other}':>12}",
        "",
    ]
    if s.samples:
        lines.append(
            f"route-to-prefetch-start over {s.samples:,} messages: p50 {s.latency_p50_us:,.0f} us, "
            f"p99 {s.latency_p99_us:,.0f} us, max {s.latency_max_us:,.0f} us"
        )
    lines.append(
        f"prefetch node: {s.experts_told:,} experts paged in, {s.experts_released:,} freed, "
        f"{mib(s.bytes_populated)} populated; engine read {mib(u.bytes_read)}"
        + (f"; {s.rejected} messages rejected ({s.last_error})" if s.rejected else "")
    )
    return lines
