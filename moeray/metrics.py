"""Prometheus metrics of a moeray service, through ``ray.util.metrics``.

Exported on each Ray node's metrics endpoint (``http://<node>:<metrics_export_port>/metrics``)
with Ray's prefix: a Counter ``moeray_cache_hits`` appears as ``ray_moeray_cache_hits_total``.
Tags: ``service`` and ``layer``.

- ``moeray_cache_hits``, ``moeray_cache_misses``, ``moeray_cache_evictions``: per applied window;
- ``moeray_prefetches``, ``moeray_prefetch_hits``: experts prefetched by affinity, and later hits
  on them;
- ``moeray_transfers``: experts moved into the fast tier (misses plus prefetches);
- ``moeray_wasted_prefetches``: under the ``moeray`` policy, prefetched experts evicted before
  any use;
- ``moeray_predictor_hits``, ``moeray_predictor_guesses``, ``moeray_predictor_uses``: under
  ``moeray``, per predictor (tag ``predictor``, ``moeray.policy.predict.PREDICTOR_NAMES``) the
  experts of its top-k guesses the tokens used, its guessed experts, and the uses it had a
  guess for: precision is hits / guesses, recall hits / uses;
- ``moeray_submit_latency_ms``: Histogram of ``ServiceHandle.submit`` in the submitting process.
"""

from __future__ import annotations

from ray.util import metrics

from moeray.actors.layer import LayerAck
from moeray.policy.predict import PREDICTOR_NAMES

__all__ = ["ServiceMetrics", "SubmitLatency"]

_LATENCY_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000]


class ServiceMetrics:
    """Counters fed by the coordinator as layer actors acknowledge windows."""

    def __init__(self, service: str):
        def counter(name: str, description: str, tags=("service", "layer")):
            c = metrics.Counter(name, description=description, tag_keys=tags)
            c.set_default_tags({"service": service})
            return c

        self._hits = counter("moeray_cache_hits", "accesses that found their expert hot")
        self._misses = counter("moeray_cache_misses", "accesses whose expert was not hot")
        self._evictions = counter("moeray_cache_evictions", "experts evicted from a hot set")
        self._prefetches = counter("moeray_prefetches", "experts prefetched by affinity")
        self._prefetch_hits = counter("moeray_prefetch_hits", "hits on prefetched experts")
        self._transfers = counter("moeray_transfers", "experts moved into the fast tier")
        self._wasted = counter(
            "moeray_wasted_prefetches", "prefetched experts evicted before any use (moeray policy)"
        )
        predictor_tags = ("service", "layer", "predictor")
        self._predictor = {
            field: counter(f"moeray_predictor_{field}", description, predictor_tags)
            for field, description in (
                ("hits", "experts of a predictor's top-k guesses that were used"),
                ("guesses", "experts a predictor guessed"),
                ("uses", "expert uses a predictor had a guess for"),
            )
        }

    def record_ack(self, ack: LayerAck) -> None:
        tags = {"layer": str(ack.layer)}
        for counter, value in (
            (self._hits, ack.hits),
            (self._misses, ack.misses),
            (self._evictions, ack.evictions),
            (self._prefetches, ack.prefetches),
            (self._prefetch_hits, ack.prefetch_hits),
            (self._transfers, ack.misses + ack.prefetches),
            (self._wasted, ack.wasted_prefetches),
        ):
            if value:
                counter.inc(value, tags=tags)
        for field, counter in self._predictor.items():
            for name, value in zip(PREDICTOR_NAMES, getattr(ack, f"predictor_{field}")):
                if value:
                    counter.inc(value, tags={**tags, "predictor": name})


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
