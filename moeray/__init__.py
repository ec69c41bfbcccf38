"""moeray keeps the right Mixture-of-Experts expert weights hot, per MoE layer and per node.

Vocabulary (docs/design.md):
- ``layer`` l in [0, num_layers); ``expert`` e in [0, num_experts); ``top_k`` experts per token.
- routing of one layer for T tokens: ``expert_ids`` int32 [T, top_k] and ``weights`` float32
  [T, top_k] (router probabilities of the chosen experts); a ``step`` is all layers' routing for
  one forward pass.
- ``hot set``: the experts of one layer kept resident; ``capacity``: its size.
- ``hit``: an accessed expert was hot. ``stall``: neither hot nor being prefetched.
  ``transfer``: bytes or experts moved into the fast tier.
- ``affinity``: per-expert EMA score. ``transition``: P(expert e' at layer l+1 | e at layer l).
- ``shard``: one layer's expert bytes held by one node. ``placement``: which GPU of which node
  holds each expert of each layer, and which node hosts each layer actor.

The compute core is C++ (``moeray.native._core``) with a pure-Python twin selected by
``MOERAY_PURE_PYTHON=1``; ``moeray.native.IS_NATIVE`` says which is in use.
"""

from importlib import metadata as _metadata

from moeray.policy import (
    AffinityConfig,
    EvictionPolicy,
    ExpertAffinity,
    ExpertBatch,
    ExpertBatches,
    ExpertCache,
    ExpertCacheConfig,
    ExpertCacheStats,
    MoeBatchScheduler,
    NullPrefetcher,
    Prefetcher,
    align_to_cache_line,
    belady_hits,
    expert_memory_footprint,
    schedule,
)
from moeray.traces import Trace, TraceNotFoundError, load_trace

try:  # one version: pyproject.toml's, as installed (the native core carries the same)
    __version__ = _metadata.version("moeray")
except _metadata.PackageNotFoundError:  # an unbuilt source tree
    __version__ = "0+unknown"

__all__ = [
    "AffinityConfig",
    "EvictionPolicy",
    "ExpertAffinity",
    "ExpertBatch",
    "ExpertBatches",
    "ExpertCache",
    "ExpertCacheConfig",
    "ExpertCacheStats",
    "MoeBatchScheduler",
    "NullPrefetcher",
    "Prefetcher",
    "Trace",
    "TraceNotFoundError",
    "align_to_cache_line",
    "belady_hits",
    "expert_memory_footprint",
    "load_trace",
    "schedule",
]
