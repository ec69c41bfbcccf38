"""A transformers MoE model whose experts do not fit: moeray's offload against accelerate's, and
against the physical bound, side by side in one run.

The model is a random-weight gpt-oss (transformers' ``GptOssForCausalLM``) at gpt-oss-20b's
expert shape (openai/gpt-oss-20b config.json: hidden 2880, intermediate 2880, 32 experts, top-4,
bf16; 49.8 MB per expert), its first ``--layers`` layers, a 2048-token vocabulary. Every router
is forced to the real gpt-oss-20b decode trace (``../shared/traces``, else the bundled slice;
``moeray.integrations.transformers.force_routing``), so the experts are used as the real model
used them. Each setting runs in its own process (peak RSS is its own): a 4-token prompt, then
``--tokens`` greedy decode steps, timed.

Settings, at each budget (a fraction of the experts' bytes; the dense weights are extra):
  resident        every expert in memory: the compute time
  accelerate      accelerate's dispatch_model: the experts modules of as many layers as the
                  budget holds in memory, the others offloaded (CPU: to disk, read at each
                  forward; the offload folder's pages are dropped before each token, so the slow
                  tier is the disk, as for moeray; CUDA: to CPU memory)
  lru             moeray offload, demand policy lru: misses load when the layer needs them
  moeray          moeray offload, the predictive policy: the next layer's predicted experts load
                  on a background thread while this layer computes
  moeray-demand   moeray offload, the predictive policy with prefetch=False: its eviction (keep
                  the experts the next tokens are likeliest to use) on demand loads, no prefetch:
                  where a read overlapped with compute costs more than the stall it saves
The slow tier: CPU, the checkpoint on disk (every read cold: moeray drops the pages it read);
CUDA, pinned host memory. Its bandwidth is measured in the same run (CPU: a cold read of the
checkpoint after dropping its page cache; CUDA: pinned host to device copies).
Reported per setting: tokens/s, bytes moved per token (moeray: counted; accelerate: the
offloaded experts' bytes, every forward), disk bytes read per token (/proc/self/io), RSS+: the
decode steps' peak RSS over the process's RSS before the model was built (the libraries, warm; the
prompt's peak, when up to 4 x top_k experts of a layer run at once, is in the JSON; CUDA: peak
GPU memory), against the goal budget + dense weights + two experts, stalls per token, and the
ratio of time per token to the physical bound max(compute, bytes moved / bandwidth). Time per
token is the median decode step (the machine is shared), of each setting's fastest of
``--rounds`` runs (accelerate: one run); compute is the fastest resident run (one per round and
one last). Every setting must produce the same token ids (exactness). Below the table, per
budget: the fastest step moeray's counts allow, the stalls 1.3x lru would need, and Belady's
optimum on the same tokens; on CPU, what a cold read costs the compute beside it (the reading
thread's CPU share, and a resident run's step beside a thread that reads the checkpoint cold).
A line on stderr after each setting's run says how far the benchmark is (a full run takes about
15 minutes on a 2-core CPU host).

usage: python benchmarks/bench_offload.py [--quick] [--layers N] [--tokens N] [--json PATH]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from shared_traces import GPT_OSS_20B_TRACE

GPT_OSS_20B = dict(hidden=2880, intermediate=2880, experts=32, top_k=4, heads=64, kv_heads=8)
PROMPT_TOKENS = 4
TRACE_START = 1000  # decode steps into the trace: past the first sequence's start
SETTINGS = ("accelerate", "lru", "moeray", "moeray-demand")  # each budget's, accelerate first


# ---------------------------------------------------------------------------- the child


def build_model(args):
    """The random gpt-oss model, the same weights in every process (seeded, in order)."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    scale = args.scale
    config = transformers.GptOssConfig(
        vocab_size=2048,
        hidden_size=GPT_OSS_20B["hidden"] // scale,
        intermediate_size=GPT_OSS_20B["intermediate"] // scale,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, GPT_OSS_20B["heads"] // scale),
        num_key_value_heads=max(1, GPT_OSS_20B["kv_heads"] // scale),
        head_dim=64,
        num_local_experts=GPT_OSS_20B["experts"],
        num_experts_per_tok=GPT_OSS_20B["top_k"],
        sliding_window=128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("sinks"):
                p.fill_(1.0 if "norm" in name else 0.0)
            elif name.endswith("bias"):
                p.uniform_(-0.01, 0.01, generator=gen)
            else:
                fan_in = (
                    p.shape[-2] if name.endswith(("gate_up_proj", "down_proj")) else p.shape[-1]
                )
                bound = (3.0 / fan_in) ** 0.5
                p.uniform_(-bound, bound, generator=gen)
    return model.eval()


def experts_bytes(model) -> tuple[int, int, int]:
    """(every expert's bytes, one expert's, the dense weights')."""
    total = dense = 0
    one = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if ".experts." in name:
            total += size
            one += size // p.shape[0] if "layers.0." in name else 0
        else:
            dense += size
    return total, one, dense


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak (VmHWM) to the current RSS
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def library_rss() -> int:
    """RSS once the libraries are loaded and warm (a tiny model of the family built and run,
    then dropped) and the trace loaded: what a process holds before the benchmark's model."""
    import gc

    import torch

    from moeray.traces.record import tiny_model

    with torch.no_grad():
        tiny_model("gpt-oss", dtype="bfloat16")(torch.tensor([[1, 2, 3]]))
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def drop_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def accelerate_offload(model, budget_bytes, layer_bytes, device, folder):
    """dispatch_model with the experts modules of budget // layer_bytes layers kept on the
    device, the others offloaded (CPU: disk; CUDA: CPU memory). Returns (offloaded layers,
    files to drop)."""
    import torch
    from accelerate import dispatch_model

    keep = int(budget_bytes // layer_bytes)
    main = 0 if device == "cuda" else "cpu"
    slow = "cpu" if device == "cuda" else "disk"
    device_map, offloaded = {}, 0

    def visit(prefix, module):
        nonlocal offloaded
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full.endswith(".mlp.experts"):
                layer = int(full.split(".")[2])
                device_map[full] = main if layer < keep else slow
                offloaded += layer >= keep
            elif any(n.endswith(".experts") for n, _ in child.named_modules(prefix=full)):
                visit(full + ".", child)
            else:
                device_map[full] = main

    visit("", model)
    dispatch_model(model, device_map, main_device=torch.device(main), offload_dir=folder)
    files = [str(p) for p in Path(folder).glob("*")] if slow == "disk" else []
    return offloaded, files


def decode(model, tokens, warmup, device, before_token=None, after_prompt=None):
    """(seconds of each decode step, generated ids): a 4-token prompt, ``warmup`` greedy steps
    (not timed, their bytes not counted: ``after_prompt`` runs after them), then ``tokens``."""
    import inspect

    import torch

    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt = torch.arange(3, 3 + PROMPT_TOKENS, device=device)[None]
    ids = []
    with torch.no_grad():
        if before_token:
            before_token()
        out = model(input_ids=prompt, use_cache=True)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = []
        for step in range(-warmup, tokens):
            if step == 0 and after_prompt:
                after_prompt()
            nxt = out.logits[:, -1:].argmax(dim=-1)
            ids.append(int(nxt))
            if before_token:
                before_token()
            start = time.perf_counter()
            out = model(input_ids=nxt, use_cache=True, **{cache: out[cache]})
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 0:
                elapsed.append(time.perf_counter() - start)
    return elapsed, ids


def child(spec: dict) -> dict:
    import torch

    from moeray.integrations.transformers import force_routing, offload
    from moeray.traces import load_trace

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    trace = load_trace(spec["trace"])
    baseline_rss = library_rss()
    model = build_model(argparse.Namespace(**spec))
    total, one, dense = experts_bytes(model)
    budget = int(spec["budget"] * total)
    if device == "cuda":
        model.to("cuda")
    result = dict(setting=spec["setting"], budget=spec["budget"], budget_bytes=budget)
    result.update(experts_bytes=total, expert_bytes=one, dense_bytes=dense)
    before_token, handle = None, None
    tokens = spec["tokens"]
    if spec["setting"] == "accelerate":
        folder = tempfile.mkdtemp(dir=spec["dir"], prefix="accelerate-")
        offloaded, files = accelerate_offload(
            model, budget, total // spec["layers"], device, folder
        )
        drop_page_cache(files)
        if files:
            before_token = lambda: drop_page_cache(files)  # noqa: E731
        result["bytes_per_token"] = offloaded * (total // spec["layers"])
        tokens = spec["accelerate_tokens"]
    elif spec["setting"] in ("lru", "moeray", "moeray-demand"):
        policy, _, demand = spec["setting"].partition("-")
        handle = offload(
            model, budget_bytes=budget, policy=policy, shards=spec["shards"], prefetch=not demand
        )
        result["capacity"] = handle.session.config.capacity[0]
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    forced = force_routing(model, trace, start=TRACE_START)
    reset_peak_rss()
    at_prompt = {}

    def after_prompt():  # the prompt's and warm-up's bytes and memory are not decode's
        at_prompt["peak_rss"] = peak_rss()
        reset_peak_rss()
        at_prompt["read"] = disk_read_bytes()
        at_prompt["stats"] = handle.stats().as_dict() if handle is not None else {}

    reader = ColdReader(Path(spec["shards"])) if spec.get("reader") else None
    try:
        steps, ids = decode(model, tokens, spec["warmup"], device, before_token, after_prompt)
    finally:
        if reader is not None:
            result["reader_bytes_per_s"] = reader.stop()
    result.update(tokens=tokens, step_s=steps, ids=ids, routed_tokens=forced.tokens)
    result["seconds"] = sum(steps)
    result["disk_bytes_per_token"] = (disk_read_bytes() - at_prompt["read"]) / tokens
    result["peak_rss"] = peak_rss()
    result["peak_rss_prompt"] = at_prompt["peak_rss"]  # the prompt: up to T x top_k experts
    result["baseline_rss"] = baseline_rss
    if device == "cuda":
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    if spec["setting"] == "accelerate":
        shutil.rmtree(folder, ignore_errors=True)
    if handle is not None:
        stats = handle.stats().as_dict()
        result["stats"] = {k: v - at_prompt["stats"][k] for k, v in stats.items()}
        result["bytes_per_token"] = result["stats"]["bytes_moved"] / tokens
        handle.close()
    result.setdefault("bytes_per_token", 0)
    return result


# ---------------------------------------------------------------------------- the parent


class ColdReader:
    """A thread that reads the checkpoint cold (its pages dropped before each pass) in 64 MiB
    preads until stopped: the compute's neighbour when a prefetch overlaps it."""

    def __init__(self, shards: Path):
        import threading

        self._files = sorted(shards.glob("*.safetensors"))
        self._stop = threading.Event()
        self._bytes, self._start = 0, time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        view = memoryview(bytearray(64 * 2**20))
        while not self._stop.is_set():
            drop_page_cache(self._files)
            for path in self._files:
                fd = os.open(path, os.O_RDONLY)
                try:
                    offset = 0
                    while not self._stop.is_set() and (got := os.preadv(fd, [view], offset)):
                        offset += got
                        self._bytes += got
                finally:
                    os.close(fd)

    def stop(self) -> float:
        """Stops the thread; returns the bytes per second it read."""
        self._stop.set()
        self._thread.join()
        drop_page_cache(self._files)
        return self._bytes / (time.perf_counter() - self._start)


def measure_bandwidth(shards: Path, device: str) -> tuple[float, float]:
    """(bytes per second of the slow tier, the reading thread's CPU seconds per wall second):
    CPU, a cold read (page cache dropped) of the whole checkpoint in 64 MiB preads; CUDA,
    pinned host to device copies (CPU share not measured: 0)."""
    if device == "cuda":
        import torch

        host = torch.empty(512 * 2**20, dtype=torch.uint8).pin_memory()
        dev = torch.empty_like(host, device="cuda")
        dev.copy_(host)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        return 4 * host.numel() / (time.perf_counter() - start), 0.0
    files = sorted(shards.glob("*.safetensors"))
    drop_page_cache(files)
    buffer = bytearray(64 * 2**20)
    view = memoryview(buffer)
    total, start, cpu = 0, time.perf_counter(), time.thread_time()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while got := os.preadv(fd, [view], offset):
                offset += got
            total += offset
        finally:
            os.close(fd)
    seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
    drop_page_cache(files)
    return total / seconds, cpu / seconds


def belady_stalls(trace_path: str, layers: int, capacity: int, warmup: int, tokens: int) -> float:
    """Misses per timed token of the offline optimum of demand caching (Belady's MIN) on the
    timed tokens' routing, each layer's hot set starting with the best content a cache could
    have (the first ``capacity`` experts the window uses): the fewest transfers any policy,
    prefetching or not, can make on those tokens (a demand cache stalls on each)."""
    from moeray.policy.belady import belady_hits
    from moeray.traces import load_trace

    trace = load_trace(trace_path)
    first = TRACE_START + PROMPT_TOKENS + warmup
    rows = (first + np.arange(tokens)) % trace.num_tokens  # force_routing wraps at the end
    window = np.asarray(trace.expert_ids[rows, :layers], dtype=np.int64)
    top_k, misses = window.shape[2], 0
    for layer in range(layers):
        ids = window[:, layer]
        order = list(dict.fromkeys(ids.reshape(-1).tolist()))[:capacity]
        # the warm start as leading rows of distinct experts: each a miss, none evicted
        start = np.array(order + order[-1:] * (-len(order) % top_k)).reshape(-1, top_k)
        stream = np.concatenate([start, ids])
        hits = belady_hits(stream, trace.num_experts, capacity)
        misses += stream.size - hits - len(order)
    return misses / tokens


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"bench_offload: setting {spec['setting']} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers at 1/8 size, 8 tokens")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--scale", type=int, default=1, help="divide hidden and intermediate sizes")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per setting")
    p.add_argument("--accelerate-tokens", type=int, default=6, help="its steps read every "
                   "offloaded expert from disk: fewer")  # fmt: skip
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--rounds", type=int, default=2, help="runs of each moeray setting and of "
                   "resident; the fastest is printed (the machine is shared)")  # fmt: skip
    p.add_argument("--budgets", default="0.25,0.5")
    p.add_argument("--trace", default=None, help="default: the shared gpt-oss-20b trace")
    p.add_argument("--dir", default=None, help="work directory (checkpoints, kept); default a "
                   "temp dir, removed at the end")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        args.layers, args.scale, args.tokens, args.accelerate_tokens, args.warmup = 2, 8, 8, 4, 2
        args.rounds = 1
    import torch

    from moeray.traces import default_trace_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    trace = args.trace or (
        str(GPT_OSS_20B_TRACE) if GPT_OSS_20B_TRACE.exists() else default_trace_path()
    )
    work = Path(args.dir or tempfile.mkdtemp(prefix="moeray-bench-offload-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.dir is None:  # the checkpoint is GBs: a temp dir goes with the run, however it ends
        atexit.register(shutil.rmtree, work, True)
    budgets = [float(b) for b in args.budgets.split(",")]
    base = dict(
        layers=args.layers,
        scale=args.scale,
        tokens=args.tokens,
        warmup=args.warmup,
        accelerate_tokens=args.accelerate_tokens,
        trace=str(trace),
        dir=str(work),
        shards=str(work / "shards"),
        device=device,
        threads=args.threads,
    )
    # each round: resident, then every setting at every budget (accelerate in the first only);
    # then resident once more and, on CPU, resident beside a cold reader
    total = args.rounds * (1 + len(budgets) * (len(SETTINGS) - 1)) + len(budgets) + 1
    total += device == "cpu"
    started, done = time.monotonic(), [0]

    def run(spec: dict) -> dict:  # one child, and a progress line on stderr (a run takes minutes)
        result = run_child(spec)
        done[0] += 1
        print(
            f"bench_offload: {done[0]}/{total} {spec['setting']} at {spec['budget']:.0%}"
            f"{' beside a reader' if spec.get('reader') else ''}: "
            f"{statistics.median(result['step_s']) * 1e3:,.0f} ms/token "
            f"({time.monotonic() - started:,.0f} s so far)",
            file=sys.stderr,
            flush=True,
        )
        return result

    runs = []
    for round_ in range(args.rounds):
        runs.append(run(dict(base, setting="resident", budget=1.0)))
        for budget in budgets:
            for setting in SETTINGS[round_ > 0 :]:  # accelerate: once
                runs.append(run(dict(base, setting=setting, budget=budget)))
    # the faster of two readings: the machine is shared, and a higher bandwidth is a lower bound
    bandwidth, read_cpu = max(measure_bandwidth(work / "shards", device) for _ in range(2))
    runs.append(run(dict(base, setting="resident", budget=1.0)))
    if device == "cpu":  # what a read costs the compute beside it (not a row of the table)
        beside = run(dict(base, setting="resident", budget=1.0, reader=True))
        beside["s_per_token"] = statistics.median(beside["step_s"])
    for run in runs:
        run["s_per_token"] = statistics.median(run["step_s"])
    rows = []  # each setting's fastest run
    for run in runs:
        same = [r for r in rows if (r["setting"], r["budget"]) == (run["setting"], run["budget"])]
        if not same:
            rows.append(run)
        elif run["s_per_token"] < same[0]["s_per_token"]:
            rows[rows.index(same[0])] = run
    compute = rows[0]["s_per_token"]
    reference_ids = rows[0]["ids"]
    for row in runs:
        row["tokens_per_s"] = 1 / row["s_per_token"]
        row["bound_s"] = max(compute, row["bytes_per_token"] / bandwidth)
        row["to_bound"] = row["s_per_token"] / row["bound_s"]
        row["same_ids"] = row["ids"] == reference_ids[: len(row["ids"])]
        row["rss_goal"] = row["budget_bytes"] + row["dense_bytes"] + 2 * row["expert_bytes"]
    for row in rows:
        if row["setting"] == "lru":  # the same routing and capacity for every policy
            row["belady_stalls_per_token"] = belady_stalls(
                str(trace), args.layers, row["capacity"], args.warmup, args.tokens
            )
    print_table(rows, bandwidth, compute, device, args)
    if device == "cpu":
        read = rows[0]["expert_bytes"] / bandwidth
        print(
            f"a cold expert read: {read * 1e3:.0f} ms, {read_cpu:.0%} of it the reading "
            f"thread's CPU; compute beside a cold reader ({beside['reader_bytes_per_s'] / 1e9:.2f}"
            f" GB/s): {beside['s_per_token'] * 1e3:.0f} ms/token, "
            f"{beside['s_per_token'] / compute:.2f}x alone"
        )
    print(
        f"(each setting's fastest of {args.rounds} rounds, accelerate's one, resident's "
        f"{args.rounds + 1}; every run in the JSON)"
    )
    if args.json:
        meta = dict(
            device=device,
            card=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            cpus=os.cpu_count(),
            threads=args.threads,
            trace=str(trace),
            layers=args.layers,
            scale=args.scale,
            bandwidth_bytes_per_s=bandwidth,
            read_cpu_share=read_cpu,
            beside_reader=beside if device == "cpu" else None,
            compute_s_per_token=compute,
            command=" ".join(["python", "benchmarks/bench_offload.py", *sys.argv[1:]]),
            commit=subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )
        Path(args.json).write_text(
            json.dumps(dict(meta=meta, rows=rows, runs=runs), indent=1) + "\n"
        )
    return 0


def print_table(rows, bandwidth, compute, device, args) -> None:
    first = rows[0]
    print(
        f"bench_offload: gpt-oss-20b experts / {args.scale}, {args.layers} layers, "
        f"{mib(first['expert_bytes'])} MiB per expert, {mib(first['experts_bytes'])} MiB of "
        f"experts, {mib(first['dense_bytes'])} MiB dense; {device}, {args.threads} threads"
    )
    print(
        f"slow tier {bandwidth / 1e9:.2f} GB/s ({'pinned host -> GPU' if device == 'cuda' else 'cold disk read'}), "
        f"compute {compute * 1e3:.0f} ms/token (all resident); per setting the median decode step"
    )
    memory = "peak GPU MiB" if device == "cuda" else "RSS+ MiB"
    header = (
        f"{'setting':<13} {'budget':>6} {'cap':>4} {'tok/s':>7} {'MiB/tok':>8} {'disk MiB/tok':>12} "
        f"{memory:>13} {'goal MiB':>9} {'stalls/tok':>10} {'x bound':>8} {'same ids':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        stats = row.get("stats", {})
        stalls = f"{stats['stalls'] / row['tokens']:.2f}" if stats else "-"
        peak = row.get("peak_gpu", row["peak_rss"] - row["baseline_rss"])
        goal = "-" if row["setting"] == "resident" else mib(row["rss_goal"])
        print(
            f"{row['setting']:<13} {row['budget']:>6.0%} {row.get('capacity', '-')!s:>4} "
            f"{row['tokens_per_s']:>7.2f} {mib(row['bytes_per_token']):>8} "
            f"{mib(row['disk_bytes_per_token']):>12} {mib(peak):>13} {goal:>9} {stalls:>10} "
            f"{row['to_bound']:>8.2f} {'yes' if row['same_ids'] else 'NO':>8}"
        )
    by = {(r["setting"], r["budget"]): r for r in rows}
    read = first["expert_bytes"] / bandwidth  # one expert from the slow tier
    for budget in sorted({r["budget"] for r in rows if r["setting"] != "resident"}):
        m, lru, acc = by[("moeray", budget)], by[("lru", budget)], by[("accelerate", budget)]
        d = by[("moeray-demand", budget)]
        print(
            f"at {budget:.0%}: moeray / lru {m['tokens_per_s'] / lru['tokens_per_s']:.2f}x, "
            f"moeray / accelerate {m['tokens_per_s'] / acc['tokens_per_s']:.2f}x, "
            f"moeray {m['to_bound']:.2f}x its bound; moeray-demand / lru "
            f"{d['tokens_per_s'] / lru['tokens_per_s']:.2f}x ({d['to_bound']:.2f}x its bound)"
        )
        # What any schedule could make of these counts: a layer computes once its stalled
        # experts are in (stalls x read + compute), and the slow tier moves one expert at a
        # time (transfers x read). Belady: the fewest transfers any policy makes on these
        # tokens; a demand cache stalls on each, a clairvoyant prefetcher could hide them all.
        stalls = m["stats"]["stalls"] / m["tokens"]
        fastest = max(compute + stalls * read, m["bytes_per_token"] / bandwidth)
        belady = lru["belady_stalls_per_token"]
        need = (lru["s_per_token"] / 1.3 - compute) / read
        demand = lru["s_per_token"] / (compute + belady * read)
        oracle = lru["s_per_token"] / max(compute, belady * read)
        print(
            f"  moeray's counts allow at best {fastest * 1e3:.0f} ms/token "
            f"({lru['s_per_token'] / fastest:.2f}x lru: {stalls:.2f} stalls x "
            f"{read * 1e3:.0f} ms + compute); 1.3x lru needs "
            f"{f'<= {need:.2f} stalls/token' if need >= 0 else 'a step under the compute alone'}; "
            f"Belady's optimum {belady:.2f} transfers/token: {demand:.2f}x lru as a demand "
            f"cache, {oracle:.2f}x with every transfer hidden"
        )


if __name__ == "__main__":
    sys.exit(main())
