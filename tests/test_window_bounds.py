"""What one client's steps may cost a handle: its open window closes before it outgrows
ServiceConfig.max_window_bytes (or pads hints past twice their size), and its journal keeps at
most max_journal_bytes of unacknowledged windows."""

from __future__ import annotations

import numpy as np
import pytest

from moeray.actors import _ray
from moeray.actors.config import ServiceConfig
from moeray.actors.journal import ClientJournal
from moeray.actors.steps import Window
from moeray.service import ServiceHandle


def test_a_handle_sends_its_window_before_it_outgrows_its_bytes(monkeypatch):
    received = []
    monkeypatch.setattr(_ray, "ready", lambda ref: False)  # no answer comes back

    class FakeMethod:
        def remote(self, routing, steps, close_window, starts, hints, client, seq):
            received.append((routing.copy(), None if hints is None else hints.copy()))
            return object()

    coordinator = type("FakeCoordinator", (), {"add_routing": FakeMethod()})()
    config = ServiceConfig(
        num_layers=2, num_experts=8, top_k=2, window_steps=1000, max_window_bytes=4096
    )
    handle = ServiceHandle(coordinator, config, wake_after=lambda seconds, callback: None)
    rng = np.random.default_rng(1)
    submitted = 0
    for _ in range(40):
        tokens = int(rng.integers(1, 60))
        ids = rng.integers(0, 8, (2, tokens, 2)).astype(np.int32)
        width = int(rng.choice([0, 1, 8]))
        hints = None if width == 0 else np.full((2, tokens, width), -1, np.int32)
        handle.submit(ids, hints=hints)
        submitted += tokens
    handle._send_window()  # the last open window
    assert len(received) > 1
    assert sum(routing.shape[1] for routing, _ in received) == submitted
    for routing, hints in received:
        width = 0 if hints is None else hints.shape[2]
        assert routing.shape[1] * (2 * 2 + 2 * 4 * width + 1) <= config.max_window_bytes
    with pytest.raises(ValueError, match="max_window_bytes=4,096"):
        handle.submit(np.zeros((2, 300, 2), np.int32), hints=np.full((2, 300, 8), -1, np.int32))


def test_a_journal_is_full_at_its_bytes():
    journal = ClientJournal("c", max_windows=100, max_bytes=10_000)
    window = Window(np.zeros((2, 1000, 2), np.uint8), 1, None, None)  # 4,000 bytes
    journal.add(window)
    journal.add(window)
    assert not journal.full() and journal.bytes == 8000
    journal.add(window)
    assert journal.full()
    journal.confirm(2)
    assert journal.bytes == 4000 and not journal.full()
    with pytest.raises(ValueError, match="max_bytes"):
        ClientJournal("c", max_bytes=0)
