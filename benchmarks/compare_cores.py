"""Two installed moeray cores side by side in one run: bench_core.py's native column under a
baseline interpreter (e.g. a venv holding an older wheel) and under this one, alternating rounds
so both see the same machine, medians per row and their ratio.

usage: python benchmarks/compare_cores.py --baseline /path/to/old-venv/bin/python [--rounds 3]
       [--quick]

Each interpreter runs this checkout's ``bench_core.py`` from an empty directory, so it imports
the moeray it has installed, not the source tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]

BENCH_CORE = Path(__file__).resolve().parent / "bench_core.py"


def _version(python: str, cwd: str) -> str:
    code = "import moeray, moeray.native as n; print(moeray.__version__, n.IS_NATIVE)"
    return subprocess.run(
        [python, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def _run(python: str, cwd: str, quick: bool, out: Path) -> list[dict]:
    argv = [python, str(BENCH_CORE), "--json", str(out), *(["--quick"] if quick else [])]
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="python of the baseline installation")
    parser.add_argument(
        "--candidate", default=sys.executable, help="python of the candidate (default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--quick", action="store_true", help="bench_core --quick per round")
    args = parser.parse_args(argv)
    runs: dict[str, list[list[dict]]] = {"baseline": [], "candidate": []}
    with tempfile.TemporaryDirectory(prefix="moeray-cores-") as empty:
        pythons = {"baseline": args.baseline, "candidate": args.candidate}
        versions = {k: _version(p, empty) for k, p in pythons.items()}
        for k, v in versions.items():
            print(f"{k}: {pythons[k]} (moeray {v.split()[0]}, native {v.split()[1]})")
        for r in range(args.rounds):
            for key in ("baseline", "candidate"):
                print(f"round {r + 1}/{args.rounds}: {key}", file=sys.stderr, flush=True)
                out = Path(empty) / f"{key}-{r}.json"
                runs[key].append(_run(pythons[key], empty, args.quick, out))
    print(f"\nnative column, median of {args.rounds} alternating rounds (lower is faster)\n")
    print("| operation | unit | baseline | candidate | candidate / baseline |")
    print("|---|---|---|---|---|")
    for i, first in enumerate(runs["baseline"][0]):
        base = statistics.median(run[i]["native"] for run in runs["baseline"])
        cand = statistics.median(run[i]["native"] for run in runs["candidate"])
        assert runs["candidate"][0][i]["name"] == first["name"], "the rows differ"
        print(
            f"| {first['name']} | {first['unit']} | {base:.3g} | {cand:.3g} | {cand / base:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
