"""Pure-Python twin of ``moeray.native._core``: same classes, same functions, same decisions.

One module per header of ``src/``: ``affinity`` (affinity.hpp), ``expert_cache``
(expert_cache.hpp), ``routing`` (routing.hpp), ``matvec`` (matvec.hpp), ``predict``
(predict.hpp), ``prefetch`` (prefetch.hpp), ``placement`` (placement.hpp), ``session``
(session.hpp); ``_checks`` holds the argument checks they share, with the binding's messages.
This package exposes exactly the API ``_core`` exposes.
Selected by ``MOERAY_PURE_PYTHON=1``; the test suite runs against both and compares them on the
same inputs. Written to be obviously correct rather than fast.
"""

from __future__ import annotations

from moeray.native._reference.affinity import AffinityCore
from moeray.native._reference.expert_cache import ADAPTIVE, LFU, LRU, ExpertCacheCore
from moeray.native._reference.matvec import expert_matvec
from moeray.native._reference.placement import (
    _dispatch_allocation,
    _improve,
    _pack,
    _replicate,
    dispatch,
)
from moeray.native._reference.predict import _PredictKernel
from moeray.native._reference.prefetch import PrefetcherCore
from moeray.native._reference.routing import _stack_histogram, belady_hits, schedule
from moeray.native._reference.session import _DemandSession, _HotPlan, _LayerAffinities

__all__ = [
    "ADAPTIVE",
    "LFU",
    "LRU",
    "AffinityCore",
    "ExpertCacheCore",
    "PrefetcherCore",
    "_DemandSession",
    "_HotPlan",
    "_LayerAffinities",
    "_PredictKernel",
    "_dispatch_allocation",
    "_improve",
    "_pack",
    "_replicate",
    "_stack_histogram",
    "belady_hits",
    "dispatch",
    "expert_matvec",
    "schedule",
]
