"""The compute core behind moeray's policies: the C++ extension ``_core`` or its Python twin.

``backend`` is ``_core`` unless ``MOERAY_PURE_PYTHON=1`` is set (or the extension is missing,
which only happens in a source checkout that was never built). Both expose the same API:
``ExpertCacheCore``, ``AffinityCore``, ``PrefetcherCore``, ``schedule``, ``belady_hits``,
``expert_matvec`` (one expert's FFN, weights read in place; the twin calls the numpy reference
``moeray.shards.kernels.expert_matvec``) and the policy codes ``LRU``, ``LFU``, ``ADAPTIVE``;
``IS_NATIVE`` says which one is in use. ``_core`` also has ``_predict_step``, one token of the
``moeray`` policy (``moeray.policy.predict.PredictiveCaches``) over that class's numpy state, and
``_stack_histogram``, the LRU stack distances behind ``moeray.policy.split.CapacitySplit``; their
pure-Python twins are those classes' own numpy paths, which run wherever ``backend`` is
``_reference``.
"""

from __future__ import annotations

import os
import warnings

from moeray.native import _reference

__all__ = ["backend", "IS_NATIVE", "reference"]

reference = _reference

if os.environ.get("MOERAY_PURE_PYTHON", "") not in ("", "0"):
    backend = _reference
else:
    try:
        from moeray.native import _core as backend
    except ImportError as exc:  # pragma: no cover - only in an unbuilt source tree
        warnings.warn(
            f"moeray's native core is not built ({exc}); using the pure-Python reference",
            RuntimeWarning,
            stacklevel=2,
        )
        backend = _reference

IS_NATIVE = backend is not _reference
