"""A service under steady load and faults for minutes: does any process grow, is any token lost?

Submits the bundled gpt-oss-20b slice (looped) to a service on a local Ray started as moeray's
CLI starts one (token auth on), ``--steps-per-s`` steps of ``--step-tokens`` tokens a second, for
``--minutes``.
Every ``--kill-every`` seconds a layer actor (round robin, from the handle's
``layer_actor_handles``) is killed with Ray's kill; the coordinator re-creates and restores it.
With ``--kill-coordinator``, the coordinator is killed as well, half a period after each layer
actor (one failure at a time; ``bench_chaos.py --double-kills`` kills both at once), where the
installed code can recover it (its actor may be restarted: ``max_restarts`` != 0 in the GCS);
otherwise a note says it was skipped.

Every ``--sample-s`` seconds the resident set (VmRSS, /proc) of each process is read: the
coordinator and each layer actor (the pid their own process reports, through the ``__ray_call__``
method every Ray actor has), the GCS server and the raylet (this session's, found in /proc by its
session directory), and this client. A row is printed every minute. At the end, per process, the
growth in MiB/min after warm-up: the slope of a least-squares line through the samples of the
last half of the run (a layer actor's samples since its latest restart only), and tokens lost:
tokens submitted against the tokens every layer's statistics count as routed (must be 0 at
every layer; more would be a window applied twice).

``--task-events on`` lets both actors record Ray task events (one per actor call, stored in the
GCS), as moeray did before, for the comparison. Goal: a 30-minute soak with flat memory (no
process growing once warm) and 0 tokens lost.

usage: python benchmarks/bench_soak.py [--minutes 10] [--kill-every 60] [--kill-coordinator]
       [--task-events off|on] [--steps-per-s 200] [--step-tokens 256] [--window-steps 4]
       [--sample-s 10] [--json PATH]
       python benchmarks/bench_soak.py --summary-of PATH  (a saved run's growth table again)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray

from moeray import service
from moeray.actors import _ray
from moeray.traces import default_trace_path, load_trace

_MIB = 2**20


def _own_pid(_actor) -> int:
    """Runs inside an actor (``__ray_call__`` passes the actor's instance)."""
    return os.getpid()


def rss_bytes(pid: int | None) -> int | None:
    """VmRSS of ``pid`` from /proc; None when there is no such process."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def session_pids(session_dir: str) -> dict[str, int]:
    """{"gcs": pid, "raylet": pid} of the Ray session at ``session_dir`` (read from /proc: the
    processes whose command line names the session)."""
    marker = os.path.basename(session_dir).encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if not any(marker in arg for arg in argv):
            continue
        program = os.path.basename(argv[0].decode(errors="replace"))
        if program in ("gcs_server", "raylet"):
            found["gcs" if program == "gcs_server" else "raylet"] = int(entry)
    return found


def actor_pids(coordinator, layer_handles: list) -> dict[str, int | None]:
    """{"coordinator": pid, "layers-i": pid}; None for an actor that is dead (killed and not
    yet re-created) or does not answer within 10 s."""
    names = ["coordinator"] + [f"layers-{i}" for i in range(len(layer_handles))]
    refs = [h.__ray_call__.remote(_own_pid) for h in [coordinator, *layer_handles]]
    out: dict[str, int | None] = {}
    for name, ref in zip(names, refs):
        try:
            out[name] = ray.get(ref, timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            out[name] = None
    return out


def coordinator_may_restart(coordinator) -> bool:
    """Whether Ray may restart the coordinator's actor (its max_restarts in the GCS)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    info = state._connect_and_get_accessor().get_actor_info(coordinator._ray_actor_id)
    return info is not None and gcs_pb2.ActorTableData.FromString(info).max_restarts != 0


def slope_mib_per_min(times_s: list[float], values: list[int | None]) -> float | None:
    """Least-squares slope of values (bytes) over times (s), in MiB per minute; None with
    fewer than 3 points."""
    points = [(t, v) for t, v in zip(times_s, values) if v is not None]
    if len(points) < 3:
        return None
    t, v = np.array(points, dtype=float).T
    return float(np.polyfit(t / 60.0, v / _MIB, 1)[0])


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / _MIB:,.0f}"


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def soak(args, ids, weights, session_dir: str, say) -> dict:
    """Runs the soak on an initialised Ray; returns the samples and the summary."""
    config = service.ServiceConfig(
        num_layers=ids.shape[0],
        num_experts=32,
        top_k=ids.shape[2],
        capacity=8,
        policy="lru",
        window_steps=args.window_steps,
        layers_per_actor=args.layers_per_actor,
        name=f"soak-{os.getpid()}",
    )
    handle = service.start(config)
    notes = []
    try:
        coordinator = _ray.get_coordinator(config.name, config.namespace)
        path, native = _ray.call(coordinator.core)
        say(f"the service's actors run moeray from {path} ({'native' if native else 'pure'} core)")
        kill_coordinator = args.kill_coordinator and coordinator_may_restart(coordinator)
        if args.kill_coordinator and not kill_coordinator:
            notes.append(
                "--kill-coordinator skipped: the installed code cannot recover a coordinator "
                "(its actor has max_restarts=0)"
            )
            say(notes[-1])
        system = session_pids(session_dir)
        names = ["coordinator"] + [f"layers-{i}" for i in range(len(config.actor_layers()))]
        names += ["gcs", "raylet", "client"]
        samples: list[dict] = []
        kills = {"layer": 0, "coordinator": 0}
        step_tokens, total = args.step_tokens, ids.shape[1]
        submitted = steps = 0
        start = time.monotonic()
        end = start + args.minutes * 60
        next_sample = start
        next_row = start + 60
        next_kill = start + args.kill_every if args.kill_every > 0 else float("inf")
        # the coordinator dies half a period after a layer actor: single failures, staggered
        next_coordinator_kill = next_kill + args.kill_every / 2
        victim = 0
        print(
            "| minute | steps/s | tokens submitted | layer kills | "
            + " | ".join(f"{name} RSS (MiB)" for name in names)
            + " |"
        )
        print("|---|---|---|---|" + "---|" * len(names), flush=True)
        while True:
            now = time.monotonic()
            if now >= next_sample:
                pids = actor_pids(coordinator, handle.layer_actor_handles())
                pids.update(system, client=os.getpid())
                samples.append(
                    dict(
                        t_s=now - start,
                        submitted=submitted,
                        pids=pids,
                        rss={name: rss_bytes(pids.get(name)) for name in names},
                    )
                )
                next_sample += args.sample_s
                if now >= next_row or now >= end:
                    last = samples[-1]
                    print(
                        f"| {last['t_s'] / 60:.1f} | {steps / max(now - start, 1e-9):.0f} | "
                        f"{submitted:,} | {kills['layer']} | "
                        + " | ".join(_mib(last["rss"][name]) for name in names)
                        + " |",
                        flush=True,
                    )
                    next_row += 60
            if now >= end:
                break
            if now >= next_kill:
                layer_handles = handle.layer_actor_handles()
                _ray.kill(layer_handles[victim % len(layer_handles)])
                victim += 1
                kills["layer"] += 1
                next_kill += args.kill_every
            if kill_coordinator and now >= next_coordinator_kill:
                ray.kill(coordinator, no_restart=False)
                kills["coordinator"] += 1
                next_coordinator_kill += args.kill_every
            first = (steps * step_tokens) % (total - step_tokens + 1)
            part = slice(first, first + step_tokens)
            handle.submit(ids[:, part], weights[:, part])
            submitted += step_tokens
            steps += 1
            # a steady rate: the next step at its own time, whatever this one cost
            delay = start + steps / args.steps_per_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        stats = handle.stats()
    finally:
        handle.shutdown()
    routed = [layer.tokens for layer in stats.layers]
    return dict(
        names=names,
        samples=samples,
        submitted=submitted,
        steps=steps,
        seconds=samples[-1]["t_s"],
        routed_min=min(routed),
        routed_max=max(routed),
        # LayerStats.restarts counts its actor's restarts at each of the actor's layers
        restarts=sum(stats.layers[group[0]].restarts for group in config.actor_layers()),
        kills=kills,
        notes=notes,
    )


def summary_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(process, RSS at half-time, RSS at the end, growth MiB/min over the last half, note)."""
    samples = result["samples"]
    half = samples[-1]["t_s"] / 2
    tail = [s for s in samples if s["t_s"] >= half]
    rows = []
    for name in result["names"]:
        kept = tail
        note = ""
        if name.startswith("layers-"):
            # a killed actor starts afresh: its samples since its latest restart
            last_pid = tail[-1]["pids"].get(name)
            kept = [s for s in tail if s["pids"].get(name) == last_pid]
            if len(kept) < len(tail):
                # ... and, since its latest process is young, the line through every process of
                # that actor over the last half: does the actor grow from restart to restart?
                across = slope_mib_per_min([s["t_s"] for s in tail], [s["rss"][name] for s in tail])
                note = f"since its restart at {kept[0]['t_s'] / 60:.1f} min"
                if across is not None:
                    note += f"; {across:+.2f} MiB/min through all its processes"
        slope = slope_mib_per_min([s["t_s"] for s in kept], [s["rss"][name] for s in kept])
        rows.append(
            (
                name,
                _mib(kept[0]["rss"][name]),
                _mib(kept[-1]["rss"][name]),
                "-" if slope is None else f"{slope:+.2f}",
                note,
            )
        )
    return rows


def print_summary(rows: list[tuple[str, str, str, str, str]]) -> None:
    print("| process | RSS at half-time (MiB) | RSS at the end (MiB) | growth (MiB/min) | note |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length (default 10)")
    parser.add_argument(
        "--kill-every",
        type=float,
        default=60.0,
        help="seconds between layer actor kills (default 60; 0: none)",
    )
    parser.add_argument(
        "--kill-coordinator",
        action="store_true",
        help="kill the coordinator too, where the installed code can recover it",
    )
    parser.add_argument(
        "--task-events",
        choices=("off", "on"),
        default="off",
        help="Ray task events of the service's actors (default off, as moeray runs)",
    )
    parser.add_argument("--steps-per-s", type=float, default=200.0, help="default 200")
    parser.add_argument("--step-tokens", type=int, default=256, help="default 256")
    parser.add_argument("--window-steps", type=int, default=4, help="default 4")
    parser.add_argument(
        "--layers-per-actor", type=int, default=None, help="default: one actor per CPU"
    )
    parser.add_argument("--sample-s", type=float, default=10.0, help="default 10")
    parser.add_argument("--json", type=Path, default=None, help="write samples and summary")
    parser.add_argument(
        "--summary-of",
        type=Path,
        default=None,
        help="print the growth table of a run saved with --json, and run nothing",
    )
    args = parser.parse_args(argv)
    if args.summary_of is not None:
        saved = json.loads(args.summary_of.read_text())
        print(f"{args.summary_of.name} (moeray at {saved['commit']}, {saved['date']}):")
        print_summary(summary_rows(saved))
        return 0
    if args.minutes <= 0 or args.steps_per_s <= 0 or args.sample_s <= 0:
        parser.error("--minutes, --steps-per-s and --sample-s must be > 0")

    trace = load_trace(default_trace_path())
    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    weights = np.ascontiguousarray(trace.weights.transpose(1, 0, 2))
    if args.layers_per_actor is None:
        args.layers_per_actor = max(1, -(-trace.num_layers // (os.cpu_count() or 1)))

    options = dict(object_store_memory=300 * 2**20)
    if args.task_events == "on":
        # this process read MOERAY_TASK_EVENTS when it imported moeray (the coordinator it
        # creates); the actors' processes read it from the job's environment
        _ray._OPTIONS["enable_task_events"] = True
        options["runtime_env"] = {"env_vars": {"MOERAY_TASK_EVENTS": "1"}}

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with _ray.local_session(say=say, **options) as context:
        say(
            f"soak: {args.minutes:g} min, {args.steps_per_s:g} steps/s of {args.step_tokens} "
            f"tokens, window {args.window_steps} steps, a layer actor killed every "
            f"{args.kill_every:g} s, task events {args.task_events}; {os.cpu_count()} CPUs"
        )
        result = soak(args, ids, weights, context.address_info["session_dir"], say)

    lost = result["submitted"] - result["routed_min"]
    twice = result["routed_max"] - result["submitted"]
    rows = summary_rows(result)
    print()
    print(
        f"after {result['seconds'] / 60:.1f} min (task events {args.task_events}): growth over "
        "the last half, least-squares line through the samples"
    )
    print()
    print_summary(rows)
    print()
    print(
        "| steps | tokens submitted | tokens routed (every layer) | tokens lost | applied twice "
        "| layer actor kills | layer actor restarts | coordinator kills |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['steps']:,} | {result['submitted']:,} | {result['routed_min']:,} | "
        f"{lost:,} | {max(twice, 0):,} | {result['kills']['layer']} | {result['restarts']} | "
        f"{result['kills']['coordinator']} |"
    )
    for note in result["notes"]:
        print(f"\nnote: {note}")
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(
                    script="benchmarks/bench_soak.py",
                    command="python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]),
                    commit=_git_commit(),
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    summary=[
                        dict(zip(("process", "half", "end", "growth", "note"), r)) for r in rows
                    ],
                    tokens_lost=lost,
                    **result,
                ),
                indent=1,
            )
        )
    return 0 if lost == 0 and twice <= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
