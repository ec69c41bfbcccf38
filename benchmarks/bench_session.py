"""The engine-side session's plan per layer call, side by side in one run: the native core alone,
the Python ``EngineSession.route`` on it, and the Python path before the native cores.

Rows, per policy (lru: a demand policy; moeray: the predictive one):
- decode at 256 experts, top-8, 64 hot per layer, 24 layers (a skewed synthetic stream, one
  token per batch): nanoseconds per layer call.
- a decode step of gpt-oss-20b's shape (the bundled trace: 24 layers, 32 experts, top-4, 8 hot):
  microseconds per 24-layer step (24 route calls, one token).
- a decode step of DeepSeek-V2-Lite's shape (26 layers, 64 experts, top-6, 16 hot; a skewed
  synthetic stream), microseconds per 26-layer step: no goal; the middle size, where a layer's
  tables (1.1 MB) just pass a core's L2.
Columns:
- core (C++): the plan core of ``EngineSession.route`` timed in C++ without Python per call:
  ``session_harness.cpp``, built here with the system compiler against the headers (lru:
  session.hpp's DemandSession over the seed ExpertCache and Affinity; moeray: predict.hpp's
  open_batch / serve_layer / close_batch with session.hpp's HotPlan around each serve_layer and
  the session's affinity update at the batch's close). Its plans' totals are checked equal to
  the Python session's on the same tokens.
- of it: the plan (moeray): HotPlan's share of a core call, by clock reads around its calls in
  one more, instrumented run per repeat (the core column's runs have no such reads); median.
- core at REV (with ``--core-baseline REV``): the same harness built against the native headers
  of git revision REV, run alternately with this tree's in the same run, on the same tokens: a
  change to the native core beside the code before it.
- route (Python): ``EngineSession.route`` of this tree, LayerPlan and all.
- route at REV (with ``--route-baseline REV``): ``EngineSession.route`` as of git revision REV
  (its session module read from git, on this tree's cores), timed alternately with this tree's
  on the same tokens; its decisions are checked equal (every counter of every layer).
- before (Python): ``EngineSession.route`` as it was before the native cores (the session module
  at ``BASELINE_REV``, read from git): the baseline. Its decisions are checked equal to this
  tree's (every counter of every layer).
Each repeat starts fresh sessions, warms them on the first tokens (hot sets full, tables
learned) and times the rest; the implementations alternate within a repeat; medians are shown.
Times are the timing thread's CPU time (CLOCK_THREAD_CPUTIME_ID, Python's thread_time): on a
shared machine the wall clock also counts the time other processes held the CPU.

Goals (issue 18): <= 1 us per layer call at decode for the predictive policy, <= 100 ns for lru;
a 24-layer decode step of gpt-oss-20b's shape planned in <= 25 us.

usage: python benchmarks/bench_session.py [--quick] [--tokens N] [--repeats R] [--json PATH]
                                         [--core-baseline REV] [--route-baseline REV]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from moeray.actors.config import ServiceConfig
from moeray.engine import EngineSession
from moeray.native import IS_NATIVE
from moeray.policy.predict import _KERNEL_WEIGHTS, PREDICTOR_NAMES, PredictiveCaches
from moeray.traces import default_trace_path, load_trace

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "2323305"  # the last commit whose EngineSession planned in numpy
POLICIES = ("lru", "moeray")
GOALS = {  # (shape, policy) -> (goal, unit of the row)
    ("decode", "lru"): 100.0,
    ("decode", "moeray"): 1000.0,
    ("gpt-oss-20b", "lru"): 25.0,
    ("gpt-oss-20b", "moeray"): 25.0,
}  # rows without one (DeepSeek-V2-Lite's shape) show "-"


def skewed_stream(tokens: int, layers: int, experts: int, top_k: int, seed: int = 0):
    """int64 [tokens, layers, top_k]: per layer a Zipf-like popularity over its own
    permutation of the experts, top_k distinct experts per token."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** 0.8
    out = np.empty((tokens, layers, top_k), np.int64)
    for layer in range(layers):
        p = popularity[np.argsort(rng.permutation(experts))]
        p /= p.sum()
        for t in range(tokens):
            out[t, layer] = rng.choice(experts, size=top_k, replace=False, p=p)
    return out


def session_module_at(rev: str):
    """moeray/engine/session.py as of git revision ``rev`` (read from git, run on this tree's
    other modules), or None without git or that file there."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:moeray/engine/session.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="bench_session_")) / f"session_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"moeray_session_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def baseline_session_class():
    """EngineSession as of BASELINE_REV, or None without git."""
    module = session_module_at(BASELINE_REV)
    if module is None:
        return None

    class Before(module.EngineSession):
        # DemandCaches.hot_mask, which that module reads, became hot_experts at 5d17055: the
        # same hot set, read as ids (a sort of at most capacity ids more per read)
        def _hot_mask(self, layer: int) -> np.ndarray:
            if self._predictive:
                return super()._hot_mask(layer)
            mask = np.zeros(self.config.num_experts, dtype=bool)
            mask[self._demand.hot_experts(layer)] = True
            return mask

    return Before


def build_harness(
    workdir: Path,
    headers: Path = ROOT / "moeray/native/src",
    name: str = "session_harness",
    defines: tuple[str, ...] = (),
) -> Path | None:
    """Compiles session_harness.cpp against ``headers`` as the extension is compiled (-O3, no
    FMA contraction), with ``defines`` (NAME=VALUE) as -D options."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return None
    out = workdir / name
    cmd = [
        compiler,
        "-std=c++17",
        "-O3",
        "-ffp-contract=off",
        *(f"-D{define}" for define in defines),
        "-I",
        str(headers),
        str(ROOT / "benchmarks/session_harness.cpp"),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    return out


def baseline_headers(rev: str, workdir: Path) -> Path:
    """The native headers of git revision ``rev``, extracted under ``workdir``."""
    out = workdir / f"headers-{rev}"
    out.mkdir()
    try:
        archive = subprocess.run(
            ["git", "archive", rev, "moeray/native/src"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (
            exc.stderr.decode().strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        )
        raise SystemExit(f"--core-baseline {rev}: cannot read it from git ({detail})") from None
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "moeray/native/src"


def harness_args(config: ServiceConfig) -> list[str]:
    """The harness's policy arguments for ``config`` (see session_harness.cpp)."""
    a = config.affinity_config()
    out = [repr(float(a.decay)), repr(float(a.activation_boost)), repr(float(a.max_score))]
    if config.policy == "lru":
        return out
    caches = PredictiveCaches(
        config.num_layers,
        config.num_experts,
        config.top_k,
        config.capacity,
        replace(config.predict, split=None),
    )
    kw = caches._kernel_arguments()
    cfg = caches.config
    return out + [
        str(caches._pair_buckets),
        str(len(PREDICTOR_NAMES)),
        str(kw["prefetch_budget"]),
        repr(cfg.transition_decay),
        repr(cfg.previous_decay),
        *(repr(kw[name]) for name in _KERNEL_WEIGHTS),
    ]


def run_harness(
    harness: Path,
    config,
    ids: np.ndarray,
    warm: int,
    repeats: int,
    workdir: Path,
    mode: str | None = None,
):
    """The harness's JSON for ``config`` on ids [T, L, k]; mode: its POLICY argument (default
    config.policy; "window" times moeray's window step, see session_harness.cpp)."""
    path = workdir / f"ids-{config.num_experts}.bin"
    np.ascontiguousarray(ids, dtype=np.int64).tofile(path)
    T, L, k = ids.shape
    cmd = [str(harness), mode or config.policy, str(path), str(T), str(L), str(config.num_experts)]
    cmd += [str(k), str(config.capacity[0]), str(warm), str(repeats), *harness_args(config)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def time_route(session, ids: np.ndarray, warm: int) -> float:
    """Routes ids [T, L, k] one token per batch; returns this thread's CPU ns per route call
    after ``warm`` tokens."""
    rows = [[ids[t, layer][None] for layer in range(ids.shape[1])] for t in range(len(ids))]
    layers = range(ids.shape[1])
    route = session.route
    for t in range(warm):
        for layer in layers:
            route(layer, rows[t][layer])
    gc.disable()
    try:
        start = time.thread_time_ns()
        for t in range(warm, len(ids)):
            row = rows[t]
            for layer in layers:
                route(layer, row[layer])
        elapsed = time.thread_time_ns() - start
    finally:
        gc.enable()
    return elapsed / ((len(ids) - warm) * ids.shape[1])


def plan_totals(config, ids: np.ndarray, warm: int) -> dict[str, int]:
    """The plans' totals of this tree's session on tokens warm.. (the harness's check)."""
    session = EngineSession(config)
    out = dict.fromkeys(("loads", "evictions", "prefetches"), 0)
    for t in range(len(ids)):
        for layer in range(ids.shape[1]):
            plan = session.route(layer, ids[t, layer][None])
            if t >= warm:
                out["loads"] += plan.load.size
                out["evictions"] += plan.evict.size
                out["prefetches"] += plan.prefetch.size
    return out


def measure(
    shape, config, ids, warm, repeats, harness, base_harness, before_cls, workdir, route_cls=None
) -> dict:
    """One row: the columns' ns per layer call (medians), and the checks. route_cls: the
    session class of ``--route-baseline`` (timed alternately with this tree's)."""
    core = plan_ns = None
    core_repeats, base_repeats, plan_repeats = [], [], []
    if harness is not None:
        # one repeat a process, this tree's and the baseline's alternating
        for _ in range(repeats):
            result = run_harness(harness, config, ids, warm, 1, workdir)
            core_repeats += result["ns_per_call"]
            plan_repeats.append(result["plan_ns_per_call"])
            if base_harness is not None:
                base = run_harness(base_harness, config, ids, warm, 1, workdir)
                base_repeats += base["ns_per_call"]
                if any(base[key] != result[key] for key in ("loads", "evictions", "prefetches")):
                    raise SystemExit(
                        f"{shape} {config.policy}: the baseline core planned {base}, this one {result}"
                    )
        totals = plan_totals(config, ids, warm)
        if any(result[key] != totals[key] for key in totals):
            raise SystemExit(
                f"{shape} {config.policy}: the harness planned {result}, the session {totals}"
            )
        core = statistics.median(core_repeats)
        plan_ns = statistics.median(plan_repeats) if config.policy != "lru" else None
    route, before, route_base, same = [], [], [], None
    for _ in range(repeats):
        session = EngineSession(config)
        route.append(time_route(session, ids, warm))
        if route_cls is not None:
            try:
                other = route_cls(config)
                route_base.append(time_route(other, ids, warm))
            except Exception as exc:  # written against modules this tree no longer has
                raise SystemExit(
                    f"--route-baseline: its EngineSession does not run on this tree "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            if session.stats() != other.stats():
                raise SystemExit(f"{shape} {config.policy}: decisions differ at the route baseline")
        if before_cls is not None:
            old = before_cls(config)
            before.append(time_route(old, ids, warm))
            same = session.stats() == old.stats()
            if not same:
                raise SystemExit(f"{shape} {config.policy}: decisions differ from the baseline's")
    return {
        "shape": shape,
        "policy": config.policy,
        "core_ns": core,
        "core_ns_repeats": core_repeats,
        "core_baseline_ns": statistics.median(base_repeats) if base_repeats else None,
        "core_baseline_ns_repeats": base_repeats,
        "plan_helper_ns": plan_ns,
        "route_ns": statistics.median(route),
        "route_baseline_ns": statistics.median(route_base) if route_base else None,
        "route_baseline_ns_repeats": route_base,
        "before_ns": statistics.median(before) if before else None,
        "route_ns_repeats": route,
        "before_ns_repeats": before,
        "same_decisions_as_before": same,
        "harness_plans_checked": core is not None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--tokens", type=int, help="timed tokens per row (default 300; quick 60)")
    parser.add_argument("--repeats", type=int, help="repeats per row (default 3; quick 2)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--core-baseline",
        metavar="REV",
        help="also time the core built against the native headers of git revision REV",
    )
    parser.add_argument(
        "--route-baseline",
        metavar="REV",
        help="also time EngineSession.route of git revision REV (its session module on this "
        "tree's cores, so REV must be recent enough to run on them), alternately with this tree's",
    )
    args = parser.parse_args(argv)
    tokens = args.tokens or (60 if args.quick else 300)
    repeats = args.repeats or (2 if args.quick else 3)
    if tokens < 1 or repeats < 1:
        parser.error("--tokens and --repeats: expected ints >= 1")
    if not IS_NATIVE:
        parser.error("the native core is not in use (MOERAY_PURE_PYTHON or an unbuilt tree)")
    warm = 100 if not args.quick else 40
    workdir = Path(tempfile.mkdtemp(prefix="bench_session_"))
    harness = build_harness(workdir)
    base_harness = None
    if args.core_baseline and harness is not None:
        headers = baseline_headers(args.core_baseline, workdir)
        try:
            base_harness = build_harness(workdir, headers, "session_harness_baseline")
        except subprocess.CalledProcessError:
            parser.error(f"--core-baseline {args.core_baseline}: the harness does not build there")
    before_cls = baseline_session_class()
    route_cls = None
    if args.route_baseline:
        try:
            module = session_module_at(args.route_baseline)
        except Exception as exc:  # written against modules this tree no longer has
            parser.error(
                f"--route-baseline {args.route_baseline}: its session module does not load on "
                f"this tree ({type(exc).__name__}: {exc})"
            )
        if module is None:
            parser.error(f"--route-baseline {args.route_baseline}: no session module there")
        route_cls = module.EngineSession
    trace = load_trace(default_trace_path())
    gpt = trace.expert_ids[: warm + tokens].astype(np.int64)
    shapes = [
        ("decode", 24, 256, 8, 64, skewed_stream(warm + tokens, 24, 256, 8)),
        ("gpt-oss-20b", trace.num_layers, trace.num_experts, trace.top_k, 8, gpt),
        ("deepseek-v2-lite", 26, 64, 6, 16, skewed_stream(warm + tokens, 26, 64, 6)),
    ]
    rows = []
    for shape, L, E, k, capacity, ids in shapes:
        for policy in POLICIES:
            config = ServiceConfig(
                num_layers=L, num_experts=E, top_k=k, capacity=capacity, policy=policy
            )
            rows.append(
                measure(
                    shape,
                    config,
                    ids,
                    warm,
                    repeats,
                    harness,
                    base_harness,
                    before_cls,
                    workdir,
                    route_cls,
                )
            )
    lines = table(
        rows, shapes, args.core_baseline if base_harness is not None else None, args.route_baseline
    )
    for line in lines:
        print(line)
    if args.json:
        result = {
            "command": " ".join(["python", "benchmarks/bench_session.py", *(argv or sys.argv[1:])]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "revision": _revision(),
            "baseline_revision": BASELINE_REV,
            "core_baseline_revision": args.core_baseline,
            "route_baseline_revision": args.route_baseline,
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
            "tokens": tokens,
            "warm": warm,
            "repeats": repeats,
            "rows": rows,
            "lines": lines,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def table(
    rows: list[dict], shapes, core_baseline: str | None = None, route_baseline: str | None = None
) -> list[str]:
    """The printed table: decode rows in ns per layer call, the decode steps in us per step;
    with core_baseline, the core at that revision beside this tree's (and their ratio); with
    route_baseline, the same for the Python route."""
    dims = {shape: f"{L} x {E}, top-{k}, {c} hot" for shape, L, E, k, c, _ in shapes}
    layers = {shape: L for shape, L, *_ in shapes}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    base_head = f" core at {core_baseline} | core x faster |" if core_baseline else ""
    route_head = f" route at {route_baseline} | route x faster |" if route_baseline else ""
    out = [
        f"load average {load} on {os.cpu_count()} CPUs; thread CPU time, medians of the repeats",
        "",
        f"| row | policy | core (C++) |{base_head} of it: the plan | route (Python) |"
        f"{route_head} before (Python) | x faster | goal | met by |",
        "|---|---|---|"
        + ("---|---|" if core_baseline else "")
        + "---|---|"
        + ("---|---|" if route_baseline else "")
        + "---|---|---|---|",
    ]
    for row in rows:
        per_step = row["shape"] != "decode"
        scale, unit = (layers[row["shape"]] / 1000, "us/step") if per_step else (1.0, "ns/call")
        cells = [row["core_ns"], row["plan_helper_ns"], row["route_ns"], row["before_ns"]]
        text = [
            "-" if v is None else f"{v * scale:,.1f}" if per_step else f"{v:,.0f}" for v in cells
        ]
        speedup = (
            f"{row['before_ns'] / row['route_ns']:.1f}" if row["before_ns"] is not None else "-"
        )
        base_cells = ""
        if core_baseline:
            base = row["core_baseline_ns"]
            if base is None or row["core_ns"] is None:
                base_cells = " - | - |"
            else:
                shown = f"{base * scale:,.1f}" if per_step else f"{base:,.0f}"
                base_cells = f" {shown} | {base / row['core_ns']:.2f} |"
        route_cells = ""
        if route_baseline:
            base = row["route_baseline_ns"]
            shown = f"{base * scale:,.1f}" if per_step else f"{base:,.0f}"
            route_cells = f" {shown} | {base / row['route_ns']:.2f} |"
        goal = GOALS.get((row["shape"], row["policy"]))
        met = [
            name
            for name, v in zip(("core", "route"), cells[::2])
            if v is not None and goal is not None and v * scale <= goal
        ]
        goal_text = "-" if goal is None else f"<= {goal:g} {unit}"
        label = f"{'decode step' if per_step else 'decode'}, {dims[row['shape']]} ({unit})"
        out.append(
            f"| {label} | {row['policy']} | {text[0]} |{base_cells} "
            f"{'in core' if row['policy'] == 'lru' else text[1]} | {text[2]} |{route_cells} "
            f"{text[3]} | "
            f"{speedup} | {goal_text} | {', '.join(met) or ('not met' if goal else '-')} |"
        )
    return out


def _revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
