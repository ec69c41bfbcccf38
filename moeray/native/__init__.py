"""The compute core behind moeray's policies and shards: the C++ extension ``_core`` (sources in
``src/``, one header per kernel) and ``_reference/``, its pure-Python twin, one module per header,
with the same API and the same decisions. ``backend`` is ``_core`` unless
``MOERAY_PURE_PYTHON=1`` is set (or the extension was never built), ``reference`` is the twin,
``IS_NATIVE`` says which one is in use. Everything here imports numpy and the standard library
only: never Ray, never another moeray package.
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
