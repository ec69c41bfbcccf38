"""Chaos on a real local Ray, bounded for CI (about a minute here): one client streams routing
while its layer actors and its coordinator are killed at seeded random moments, and a second
client mixes in bad and hostile steps, through a handle and as raw actor calls.

What must hold at the end: every hostile step was refused, to its caller alone; every count of
every layer equals the in-process replay of the accepted steps with each layer actor re-created
at the token where the service says it was (``replay_steps``; a coordinator's death changes no
decision); and the service still serves both clients.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from moeray import service
from moeray.actors import _ray
from moeray.replay.inprocess import replay_steps
from moeray.traces import default_trace_path, load_trace

SEED = 20261207
NAME = "svc-chaos"
STEP_TOKENS = 16


def chaos_config() -> service.ServiceConfig:
    # moeray with no warm-up: a re-created actor starts from empty tables, at a token the
    # service reports, so the in-process replay can restart it at the same token
    return service.ServiceConfig(
        num_layers=8,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="moeray",
        warmup_tokens=0,
        layers_per_actor=2,
        window_steps=2,
        name=NAME,
    )


def stream_steps(rng):
    """128 steps of the bundled slice's first 8 layers: ids, sequence starts, and engine hints
    (2 wide) on a third of the steps."""
    trace = load_trace(default_trace_path()).head(2048)
    ids = np.ascontiguousarray(trace.expert_ids[:, :8].transpose(1, 0, 2), dtype=np.int32)
    starts = np.zeros(2048, dtype=bool)
    starts[trace.seq_offsets[:-1]] = True
    steps = []
    for lo in range(0, 2048, STEP_TOKENS):
        hi = lo + STEP_TOKENS
        hints = None
        if rng.random() < 1 / 3:
            hints = np.where(rng.random((8, STEP_TOKENS, 2)) < 0.7, ids[:, lo:hi, :2], -1)
        steps.append((ids[:, lo:hi], starts[lo:hi], hints))
    return steps


def hostile_actions(other, coordinator, good):
    """Each refused in its caller alone: (what, call, errors it may raise). Raw actor calls may
    also meet a coordinator that is restarting (RayActorError): refused all the same."""
    ids, starts, _ = good
    raw = (_ray.RayTaskError, _ray.RayActorError)

    def raw_call(method, *args):
        return lambda: _ray.get(getattr(coordinator, method).remote(*args), timeout_s=60)

    out_of_range = np.where(ids == ids[0, 0, 0], 32, ids)
    return [
        ("wrong layers", lambda: other.submit(ids[:5]), ValueError),
        ("wrong top_k", lambda: other.submit(ids[:, :, :3]), ValueError),
        ("id out of range", lambda: other.submit(out_of_range), ValueError),
        ("negative id", lambda: other.submit(ids - 1), ValueError),
        ("float ids", lambda: other.submit(ids.astype(np.float32)), TypeError),
        (
            "huge hint width",
            lambda: other.submit(ids, hints=np.full((8, STEP_TOKENS, 4096), -1, np.int32)),
            ValueError,
        ),
        ("hint out of range", lambda: other.submit(ids, hints=ids[:, :, :1] + 99), ValueError),
        (
            "NaN weights",
            lambda: other.submit(ids, np.full(ids.shape, np.nan, np.float32)),
            ValueError,
        ),
        ("bad seq_starts", lambda: other.submit(ids, seq_starts=starts[:3]), ValueError),
        ("garbage msgpack", lambda: other.submit_msgpack(b"\xc1 not a step"), ValueError),
        ("raw: id out of range", raw_call("add_routing", out_of_range, 1, True), raw),
        ("raw: list ids", raw_call("add_routing", ids.tolist(), 1, True), raw),
        ("raw: a billion steps", raw_call("add_routing", ids, 10**9, True), raw),
        (
            "raw: huge hint width",
            raw_call("add_routing", ids, 1, True, None, np.full((8, 16, 4096), -1, np.int32)),
            raw,
        ),
        (
            "raw: forged window ahead",
            raw_call("add_routing", ids, 1, True, None, None, "x", 9),
            raw,
        ),
        ("raw: bad client id", raw_call("add_routing", ids, 1, True, None, None, "", 1), raw),
        ("raw: garbage msgpack", raw_call("submit_msgpack", b"\x93\x01\x02"), raw),
        ("raw: hostile submit", raw_call("submit", ids[:, :, :2]), raw),
    ]


def wait_until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def test_chaos_kills_and_hostile_steps_lose_and_double_nothing(ray_local):
    rng = np.random.default_rng(SEED)
    config = chaos_config()
    steps = stream_steps(rng)
    actors = len(config.actor_layers())
    # 3 coordinator kills and 3 layer-actor kills at random steps, at least 8 steps apart (a
    # layer actor's recovery is checked 4 steps after its kill: one failure at a time)
    slots = np.sort(rng.choice(np.arange(4, len(steps) - 8, 8), size=6, replace=False))
    kinds = rng.permutation(["coordinator"] * 3 + ["layer"] * 3)
    events = {int(step) + int(rng.integers(0, 4)): kind for step, kind in zip(slots, kinds)}
    hostile_at = set(rng.choice(len(steps), size=24, replace=False).tolist())
    began = time.monotonic()
    handle = service.start(config)
    try:
        other = service.connect(NAME)
        coordinator = ray_local.get_actor(_ray.coordinator_name(NAME), namespace=config.namespace)
        check_recovery_at, killed, refused = None, [], []
        for i, (ids, starts, hints) in enumerate(steps):
            handle.submit(ids, seq_starts=starts, hints=hints)
            kind = events.get(i)
            if kind == "coordinator":
                if len(killed) % 2:
                    os.kill(handle.coordinator_pid(), signal.SIGKILL)
                else:
                    handle.coordinator_pid()  # any earlier restart is over
                    ray_local.kill(coordinator, no_restart=False)
                killed.append(("coordinator", i))
            elif kind == "layer":
                victim = int(rng.integers(actors))
                ray_local.kill(handle.layer_actor_handles()[victim], no_restart=True)
                killed.append((f"layer actor {victim}", i))
                # 4 or 5 steps on, where a window ends: stats() sends no half window early
                check_recovery_at = (i + 4 + (i + 5) % 2, victim)
            if check_recovery_at and check_recovery_at[0] == i:
                _, victim = check_recovery_at
                first = config.actor_layers()[victim][0]
                want = sum(1 for what, _ in killed if what == f"layer actor {victim}")
                wait_until(
                    lambda first=first, want=want: handle.stats().layers[first].restarts >= want,
                    60,
                    f"layer actor {victim} re-created",
                )
                check_recovery_at = None
            if i in hostile_at:
                actions = hostile_actions(other, coordinator, steps[i])
                what, action, errors = actions[int(rng.integers(len(actions)))]
                with pytest.raises(errors):
                    action()
                refused.append(what)
        stats = handle.stats()
        by_actor = {
            actor: list(stats.layers[layers[0]].restart_tokens)
            for actor, layers in enumerate(config.actor_layers())
        }
        expected = replay_steps(config, steps, by_actor)
        for got, want in zip(stats.layers, expected.layers):
            assert vars(got) == vars(want), f"layer {got.layer} after {killed}"
        assert stats.submits == expected.submits == len(steps)
        assert stats.coordinator_restarts == 3
        assert sum(s.restarts for s in stats.layers) == 3 * 2  # 3 actors of 2 layers each
        assert len(refused) == len(hostile_at)
        # still serving, both clients and a new one
        handle.submit(*steps[0][:1])
        other.submit(*steps[1][:1])
        handle.flush()
        other.flush()
        assert service.connect(NAME).stats().layers[0].tokens == 2048 + 2 * STEP_TOKENS
    finally:
        handle.shutdown()
    assert time.monotonic() - began < 90
