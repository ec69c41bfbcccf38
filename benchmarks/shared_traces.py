"""Where the benchmarks find the real routing traces: ``../shared/traces`` beside the checkout
(absent on a machine without them: each benchmark then says so and uses the bundled slice)."""

from __future__ import annotations

from pathlib import Path

SHARED_TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces"
REAL_TRACES = (  # under SHARED_TRACES (or a benchmark's --traces folder)
    "gpt-oss-20b/gpt_oss_20b_decode_routing.npz",
    "deepseek-v2-lite-chat/deepseek_v2_lite_chat_prefill_routing.npz",
)
GPT_OSS_20B_TRACE = SHARED_TRACES / REAL_TRACES[0]
