"""Lazy affinity decay against the seed's eager form on the shared traces' routing, token by token.

For each trace and (decay, boost, max_score), every layer's EMA is computed both ways (numpy,
vectorised over layers, the same operations as ``src/affinity.hpp``; the lazy state is checked
against ``AffinityCore`` at the end, bit for bit), and after every token the two rankings of each
layer (score desc, id asc) are compared: rows where they differ at all, rows where they differ
among scores >= 1e-200 (above the subnormal range, where the eager form's repeated decay has lost
its precision), rows where the top-k differs, and the largest relative difference of a score.

    python scripts/affinity_lazy_ranking.py [--traces ../shared/traces] [--tokens N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moeray.native import _core

TRACES = {  # file under --traces: experts per layer
    "gpt-oss-20b/gpt_oss_20b_decode_routing.npz": 32,
    "deepseek-v2-lite-chat/deepseek_v2_lite_chat_prefill_routing.npz": 64,
}
PARAMS = [(0.95, 0.05, 1.0), (0.99, 1.0, 1.0)]  # the service's and replay's; bench_core's
MIN_SCALE = 2.0**-64
TINY = 1e-200


def compare(ids: np.ndarray, n: int, decay: float, boost: float, max_score: float) -> dict:
    tokens, layers, k = ids.shape
    eager, lazy, scale = np.zeros((layers, n)), np.zeros((layers, n)), 1.0
    rows = np.arange(layers)
    out = {"rows": tokens * layers, "differ": 0, "differ_above_tiny": 0, "top_k_differ": 0}
    max_rel = 0.0
    for t in range(tokens):
        eager *= decay
        for j in range(k):
            e = ids[t, :, j]
            eager[rows, e] = np.minimum(eager[rows, e] + boost, max_score)
        next_scale = scale * decay
        if next_scale < MIN_SCALE:
            lazy, next_scale = np.minimum(lazy * scale, max_score), decay
        scale = next_scale
        inverse = 1.0 / scale
        for j in range(k):
            e = ids[t, :, j]
            lazy[rows, e] = np.minimum(lazy[rows, e] + boost * inverse, max_score * inverse)
        read = np.minimum(lazy * scale, max_score)
        r1 = np.argsort(-eager, axis=1, kind="stable")
        r2 = np.argsort(-read, axis=1, kind="stable")
        bad = r1 != r2
        out["differ"] += int(bad.any(axis=1).sum())
        above = np.take_along_axis(eager, r1, axis=1) >= TINY
        out["differ_above_tiny"] += int((bad & above).any(axis=1).sum())
        out["top_k_differ"] += int(bad[:, :k].any(axis=1).sum())
        big = eager >= TINY
        if big.any():
            max_rel = max(max_rel, float(np.max(np.abs(read[big] - eager[big]) / eager[big])))
    for layer in range(layers):
        core = _core.AffinityCore(n, decay, boost, max_score)
        core.update_batch(np.ascontiguousarray(ids[:, layer, :], dtype=np.int32))
        assert core.scores().tobytes() == read[layer].tobytes(), f"layer {layer}: not the core's"
    out["max_rel"] = max_rel
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=Path("../shared/traces"))
    parser.add_argument("--tokens", type=int, default=None, help="first N tokens of each trace")
    args = parser.parse_args()
    print(
        "| trace | decay, boost, cap | (layer, token) rows | ranking differs | among >= 1e-200 "
        "| top-k differs | max relative difference (>= 1e-200) |"
    )
    print("|---|---|---|---|---|---|---|")
    for relative, n in TRACES.items():
        ids = np.load(args.traces / relative)["expert_ids"][: args.tokens].astype(np.int64)
        for params in PARAMS:
            r = compare(ids, n, *params)
            print(
                f"| {relative.split('/')[0]} | {', '.join(map(str, params))} | {r['rows']:,} | "
                f"{r['differ']:,} | {r['differ_above_tiny']} | {r['top_k_differ']} | "
                f"{r['max_rel']:.2g} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
