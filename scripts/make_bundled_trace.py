"""Writes moeray/data/gpt-oss-20b-slice.npz: the first whole sequences of the gpt-oss-20b trace
that reach 10,000 tokens (all 24 layers, with router probabilities).

usage: python scripts/make_bundled_trace.py [SOURCE_NPZ]
"""

import sys
from pathlib import Path

import numpy as np

SOURCE = (
    Path(__file__).resolve().parents[1]
    / "../shared/traces/gpt-oss-20b/gpt_oss_20b_decode_routing.npz"
)
TARGET = Path(__file__).resolve().parents[1] / "moeray/data/gpt-oss-20b-slice.npz"
MIN_TOKENS = 10_000

if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    with np.load(source, allow_pickle=False) as data:
        offsets = data["seq_offsets"]
        num_sequences = int(np.searchsorted(offsets, MIN_TOKENS))
        end = int(offsets[num_sequences])
        np.savez_compressed(
            TARGET,
            expert_ids=data["expert_ids"][:end],
            expert_probs=data["expert_probs"][:end],
            seq_offsets=offsets[: num_sequences + 1].astype(np.int64),
            num_experts=np.int64(32),
        )
    print(f"wrote {TARGET}: {num_sequences} sequences, {end} tokens")
