"""Prometheus metrics of a moeray service, through ``ray.util.metrics``.

Exported on each Ray node's metrics endpoint (``http://<node>:<metrics_export_port>/metrics``)
with Ray's prefix: a Counter ``moeray_cache_hits`` appears as ``ray_moeray_cache_hits_total``.
Tags: ``service`` and ``layer``.

- ``moeray_cache_hits``, ``moeray_cache_misses``, ``moeray_cache_evictions``: per applied window;
- ``moeray_prefetches``, ``moeray_prefetch_hits``: experts prefetched by affinity, and later hits
  on them;
- ``moeray_transfers``: experts moved into the fast tier (misses plus prefetches);
- ``moeray_submit_latency_ms``: Histogram of ``ServiceHandle.submit`` in the submitting process.
"""

from __future__ import annotations

from ray.util import metrics

from moeray.actors.layer import LayerAck

__all__ = ["ServiceMetrics", "SubmitLatency"]

_LATENCY_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000]


class ServiceMetrics:
    """Counters fed by the coordinator as layer actors acknowledge windows."""

    def __init__(self, service: str):
        tags = ("service", "layer")

        def counter(name: str, description: str):
            c = metrics.Counter(name, description=description, tag_keys=tags)
            c.set_default_tags({"service": service})
            return c

        self._hits = counter("moeray_cache_hits", "accesses that found their expert hot")
        self._misses = counter("moeray_cache_misses", "accesses whose expert was not hot")
        self._evictions = counter("moeray_cache_evictions", "experts evicted from a hot set")
        self._prefetches = counter("moeray_prefetches", "experts prefetched by affinity")
        self._prefetch_hits = counter("moeray_prefetch_hits", "hits on prefetched experts")
        self._transfers = counter("moeray_transfers", "experts moved into the fast tier")

    def record_ack(self, ack: LayerAck) -> None:
        tags = {"layer": str(ack.layer)}
        for counter, value in (
            (self._hits, ack.hits),
            (self._misses, ack.misses),
            (self._evictions, ack.evictions),
            (self._prefetches, ack.prefetches),
            (self._prefetch_hits, ack.prefetch_hits),
            (self._transfers, ack.misses + ack.prefetches),
        ):
            if value:
                counter.inc(value, tags=tags)


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
