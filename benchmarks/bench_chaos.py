"""Failures at scale: a client streams routing while the service's coordinator and layer actors
are killed, one at a time, at seeded random moments; nothing may be lost or counted twice.

One service on a local, loopback-only Ray (the bundled gpt-oss-20b slice, 24 layers, top-4,
lru, ``--layers-per-actor`` layers per actor, windows of 2 steps of ``--step-tokens`` tokens,
the trace replayed round after round). Each round submits a random number of steps, then kills
either the coordinator (SIGKILL of its process, or ``ray.kill(no_restart=False)``, alternating;
Ray restarts it and it rebuilds itself from the layer actors) or a random layer actor
(``ray.kill``; the coordinator re-creates it), until ``--coordinator-kills`` and
``--layer-kills`` are reached; with ``--double-kills``, some rounds kill a random layer actor and
the coordinator in the same instant (the layer actor first, then the coordinator, back to back:
the layer actor dies while no coordinator is up to restore it; its replacement resumes the
report it saved in the GCS). After a coordinator kill the client keeps submitting until its
handle has resent its journal; the client pause is the longest submit() in that time (what an
engine's step waits). After a layer-actor kill it submits until stats() shows the actor
re-created.

At the end: routing lost and doubled, per layer, in tokens (the service's count against the
tokens accepted: goal 0 and 0), and whether every count of every layer equals the in-process
replay of the same steps with each layer actor re-created at the token where the service says
it was (``moeray.replay.inprocess.replay_steps``). Goal: client pause p99 <= 5 s on the 2-core VM.

usage: python benchmarks/bench_chaos.py [--coordinator-kills 100] [--layer-kills 100]
       [--double-kills 0] [--seed 0] [--layers-per-actor 6] [--step-tokens 64]
       [--timeout-s 1800] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import ray

from moeray import service
from moeray.actors import _ray
from moeray.replay.inprocess import replay_steps
from moeray.traces import default_trace_path, load_trace


def _percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Stream:
    """The bundled trace's steps, round after round; keeps every step submitted."""

    def __init__(self, step_tokens: int):
        trace = load_trace(default_trace_path())
        self._ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
        self._step = step_tokens
        self._at = 0
        self.submitted: list[tuple[np.ndarray, None, None]] = []

    def next(self) -> np.ndarray:
        if self._at + self._step > self._ids.shape[1]:
            self._at = 0
        ids = self._ids[:, self._at : self._at + self._step]
        self._at += self._step
        self.submitted.append((ids, None, None))
        return ids


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    config = service.ServiceConfig(
        num_layers=24,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="lru",
        layers_per_actor=args.layers_per_actor,
        window_steps=2,
        name="bench-chaos",
    )
    actors = len(config.actor_layers())
    stream = Stream(args.step_tokens)
    began = time.monotonic()
    deadline = began + args.timeout_s
    pauses, recoveries, layer_recovery = [], [], []
    double_pauses: list[bool] = []  # per pause: whether a layer actor died with the coordinator
    kills = {"coordinator": 0, "layer": 0, "double": 0}
    wanted = {
        "coordinator": args.coordinator_kills,
        "layer": args.layer_kills,
        "double": args.double_kills,
    }
    layer_kills = [0] * actors
    handle = service.start(config)
    try:
        coordinator = ray.get_actor(_ray.coordinator_name(config.name), namespace=config.namespace)

        def submit() -> float:
            start = time.perf_counter()
            handle.submit(stream.next())
            return time.perf_counter() - start

        def kill_coordinator(also_layer_actor: int | None = None) -> None:
            """Kills the coordinator (SIGKILL or ray.kill, alternating), with layer actor
            ``also_layer_actor`` in the same instant, and submits until the handle resent."""
            handles = handle.layer_actor_handles()
            pid = handle.coordinator_pid()  # also: any earlier restart is over
            seen = len(handle.recoveries_s)
            if also_layer_actor is not None:
                ray.kill(handles[also_layer_actor], no_restart=True)
            if (kills["coordinator"] + kills["double"]) % 2:
                os.kill(pid, signal.SIGKILL)
            else:
                ray.kill(coordinator, no_restart=False)
            worst = 0.0
            while len(handle.recoveries_s) == seen:  # until the handle has resent
                if time.monotonic() > deadline:
                    raise TimeoutError("the handle never saw the coordinator die")
                worst = max(worst, submit())
            worst = max(worst, submit())
            pauses.append(worst)
            double_pauses.append(also_layer_actor is not None)
            recoveries.append(handle.recoveries_s[-1])

        while any(kills[k] < n for k, n in wanted.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"--timeout-s {args.timeout_s} reached after {kills}")
            for _ in range(int(rng.integers(2, 11))):
                submit()
            left = {k: n - kills[k] for k, n in wanted.items()}
            kind = str(rng.choice(list(left), p=np.array(list(left.values())) / sum(left.values())))
            if kind == "coordinator":
                kill_coordinator()
            else:
                victim = int(rng.integers(actors))
                killed = time.monotonic()
                if kind == "double":
                    kill_coordinator(also_layer_actor=victim)
                else:
                    ray.kill(handle.layer_actor_handles()[victim], no_restart=True)
                layer_kills[victim] += 1
                first = config.actor_layers()[victim][0]
                while True:
                    submit()
                    submit()
                    if len(stream.submitted) % config.window_steps:
                        submit()  # stats() flushes: no half window (the replay's windows)
                    if handle.stats().layers[first].restarts >= layer_kills[victim]:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"layer actor {victim} never came back")
                layer_recovery.append(time.monotonic() - killed)
            kills[kind] += 1
        stats = handle.stats()
    finally:
        handle.shutdown()
    wall = time.monotonic() - began
    accepted = sum(ids.shape[1] for ids, _, _ in stream.submitted)
    lost = sum(max(0, accepted - s.tokens) for s in stats.layers)
    doubled = sum(max(0, s.tokens - accepted) for s in stats.layers)
    restart_tokens = {
        actor: list(stats.layers[layers[0]].restart_tokens)
        for actor, layers in enumerate(config.actor_layers())
    }
    expected = replay_steps(config, stream.submitted, restart_tokens)
    equal = sum(vars(got) == vars(want) for got, want in zip(stats.layers, expected.layers))
    return {
        "config": (
            f"24 layers, {actors} layer actors, lru, windows of 2 steps of {args.step_tokens} "
            f"tokens, seed {args.seed}"
        ),
        "rows": [
            ("coordinator kills (half SIGKILL, half ray.kill)", f"{kills['coordinator']}"),
            ("layer-actor kills", f"{kills['layer']}"),
            ("a layer actor and the coordinator killed at once", f"{kills['double']}"),
            ("coordinator restarts the service counted", f"{stats.coordinator_restarts}"),
            (
                "layer-actor restarts the service counted",
                f"{sum(layer_kills)} killed, "
                f"{sum(stats.layers[g[0]].restarts for g in config.actor_layers())} counted",
            ),
            ("steps submitted / tokens per layer", f"{len(stream.submitted):,} / {accepted:,}"),
            ("routing lost (layer-tokens)", f"{lost:,}"),
            ("routing doubled (layer-tokens)", f"{doubled:,}"),
            (
                "layers whose every count equals the in-process replay",
                f"{equal} of {len(stats.layers)}",
            ),
            (
                "client pause after a coordinator kill (any), p50 / p99 / max",
                f"{_percentile(pauses, 50):.2f} / {_percentile(pauses, 99):.2f} / "
                f"{max(pauses, default=float('nan')):.2f} s",
            ),
            *[
                (
                    f"... of which {what}, p50 / p99 / max",
                    f"{_percentile(part, 50):.2f} / {_percentile(part, 99):.2f} / "
                    f"{max(part, default=float('nan')):.2f} s",
                )
                for what, part in (
                    ("the coordinator alone", [p for p, d in zip(pauses, double_pauses) if not d]),
                    ("a layer actor with it", [p for p, d in zip(pauses, double_pauses) if d]),
                )
                if kills["double"]
            ],
            (
                "handle recovery (failure seen to journal resent), p50 / p99",
                f"{_percentile(recoveries, 50):.2f} / {_percentile(recoveries, 99):.2f} s",
            ),
            (
                "layer actor kill to re-created (stats), p50 / p99",
                f"{_percentile(layer_recovery, 50):.2f} / {_percentile(layer_recovery, 99):.2f} s",
            ),
            ("wall", f"{wall:.0f} s"),
        ],
        "goals met": lost == 0
        and doubled == 0
        and equal == len(stats.layers)
        and _percentile(pauses, 99) <= 5.0,
        "pauses_s": [round(p, 4) for p in pauses],
        "pause_with_a_layer_actor": double_pauses,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator-kills", type=int, default=100)
    parser.add_argument("--layer-kills", type=int, default=100)
    parser.add_argument(
        "--double-kills",
        type=int,
        default=0,
        help="rounds that kill a layer actor and the coordinator at once (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers-per-actor", type=int, default=6)
    parser.add_argument("--step-tokens", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="the whole run's bound")
    parser.add_argument("--json", help="also write the table and the pauses to this file")
    args = parser.parse_args(argv)
    with _ray.local_session(num_cpus=2):
        result = run(args)
    print(result["config"])
    print("| what | value |")
    print("|---|---|")
    for what, value in result["rows"]:
        print(f"| {what} | {value} |")
    print(
        f"goals met (0 lost, 0 doubled, every count equal, pause p99 <= 5 s): "
        f"{'yes' if result['goals met'] else 'NO'}"
    )
    if args.json:
        document = {
            "script": "benchmarks/bench_chaos.py",
            "command": "python benchmarks/bench_chaos.py " + " ".join(argv or sys.argv[1:]),
            "commit": _commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": "the project's 2-core VM (shared; VMs of different days differ in speed)",
            **{k: v for k, v in result.items() if k != "rows"},
            "rows": [{"what": w, "value": v} for w, v in result["rows"]],
            "pause_p50_s": statistics.median(result["pauses_s"]) if result["pauses_s"] else None,
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
    return 0 if result["goals met"] else 1


if __name__ == "__main__":
    sys.exit(main())
