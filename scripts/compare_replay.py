"""Checks that a change keeps every replay decision: runs ``moeray replay --backend local --json``
over a fixed set of cases and writes their JSON without its physical readings (``record``), or
compares a new run with such a record field by field (``compare``; exit 1 on any difference).

    python scripts/compare_replay.py record before.json     # on the old code
    python scripts/compare_replay.py compare before.json    # on the new code

Cases: each shared trace (``--traces DIR``, default ../shared/traces) with every policy, plus the
bundled slice with engine hints, with a capacity re-split and with a synthetic checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["CASES", "main"]

# Physical readings, the only fields allowed to differ between runs of the same decisions:
# wall-clock rates, and mincore's largest resident-bytes reading of a shard, which the page cache
# decides (the same commit reads peaks a few pages apart from run to run on a loaded machine).
_TIMING_KEYS = {"decisions_per_s", "resident_bytes_max"}
# Keys renamed since a record was made (old -> new), applied to the record before comparing:
# the shard table's on-demand loads were "stalls" before 0.2.0 (CHANGELOG.md).
_RENAMED = {"stalls": "cold_reads"}

CASES = {
    "gpt-oss-20b": ["{traces}/gpt-oss-20b/gpt_oss_20b_decode_routing.npz"],
    "deepseek-v2-lite": [
        "{traces}/deepseek-v2-lite-chat/deepseek_v2_lite_chat_prefill_routing.npz"
    ],
    "bundled-hints": ["--hint-accuracy", "0.8", "--tokens", "2000"],
    "bundled-resplit": ["--resplit-every", "64", "--tokens", "2000", "--policy", "moeray"],
    "bundled-shards": ["--shards", "{ckpt}", "--tokens", "300", "--step-tokens", "4"],
}


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in _TIMING_KEYS and k != "path"}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def _run(traces: str, workdir: Path) -> dict:
    ckpt = workdir / "ckpt"
    subprocess.run(
        [
            "moeray",
            "shards",
            "synth",
            "--shape",
            "gpt-oss-20b",
            "--layers",
            "24",
            "--scale",
            "64",
            "--out",
            str(ckpt),
        ],
        check=True,
        capture_output=True,
    )
    out = {}
    for name, args in CASES.items():
        path = workdir / f"{name}.json"
        argv = [a.format(traces=traces, ckpt=ckpt) for a in args]
        print(f"replay {name} ...", file=sys.stderr, flush=True)
        subprocess.run(
            ["moeray", "replay", *argv, "--backend", "local", "--json", str(path)],
            check=True,
            capture_output=True,
        )
        out[name] = _strip(json.loads(path.read_text()))
    return out


def _renamed(doc, inside_shards: bool = False):
    """The record with keys renamed since it was made (only inside "shards", where they were)."""
    if isinstance(doc, dict):
        return {
            (_RENAMED.get(k, k) if inside_shards else k): _renamed(
                v, inside_shards or k == "shards"
            )
            for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_renamed(v, inside_shards) for v in doc]
    return doc


def _diff(a, b, where: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                found.append(f"{where}.{key}: only in {'before' if key in a else 'after'}")
            else:
                _diff(a[key], b[key], f"{where}.{key}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", found)
    elif a != b:
        found.append(f"{where}: {a!r} != {b!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "compare"))
    parser.add_argument("record_path", type=Path)
    parser.add_argument(
        "--traces", default=str(Path(__file__).resolve().parents[2] / "shared/traces")
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        now = _run(args.traces, Path(tmp))
    if args.mode == "record":
        args.record_path.write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"recorded {len(now)} cases in {args.record_path}")
        return 0
    found: list[str] = []
    _diff(_strip(_renamed(json.loads(args.record_path.read_text()))), now, "", found)
    for line in found[:50]:
        print(line)
    print(
        f"{len(now)} cases: {'identical' if not found else f'{len(found)} differences'} "
        "in every field but the physical readings (timings, resident bytes)"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
