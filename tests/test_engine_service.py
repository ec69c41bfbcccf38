"""An engine session attached to a running service on a real local Ray: it starts from the
tables the layer actors learned, its routing reaches the service, and the service's update
reaches it."""

from __future__ import annotations

import numpy as np
from service_helpers import config

from moeray import service
from moeray.actors._ray import LinkMetrics
from moeray.engine import EngineSession
from moeray.traces import default_trace_path, load_trace


def test_a_session_joins_warm_reports_and_takes_updates(ray_local):
    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids[:600].transpose(1, 0, 2), dtype=np.int32)
    handle = service.start(config("svc-engine", policy="moeray"))
    session = None
    try:
        handle.submit(ids[:, :512])
        handle.flush()
        assert len(list(handle.predictor_tables())) == 2  # one per layer actor
        session = EngineSession.attach(handle, poll_s=0.05)
        assert [first for _, first in session.loaded_tables] == [0, 12]
        for t in range(512, 600):
            for layer in range(24):
                session.route(layer, ids[layer, t : t + 1])
        assert session.link.flush()
        handle.flush()
        stats = handle.stats()
        assert all(layer.tokens == 600 for layer in stats.layers)
        assert session.link.stats().reported_tokens == 88
        assert session.version >= 1 and session.config.capacity == (8,) * 24
        # the link's Ray metrics took every export (a failing one would have been dropped)
        assert isinstance(session.link.metrics, LinkMetrics)
    finally:
        if session is not None:
            session.close()
        handle.shutdown()
