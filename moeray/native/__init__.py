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
from pathlib import Path

from moeray.native import _reference

__all__ = ["backend", "IS_NATIVE", "reference"]

reference = _reference


def _fallback_reason(exc: ImportError, this_file: Path) -> str:
    """Why the pure-Python core runs instead of ``_core``, and what to run about it."""
    root = this_file.resolve().parents[2]
    if (root / "pyproject.toml").is_file():  # imported from a checkout, not an install
        return (
            f"moeray is imported from its source tree at {root}, where the native core is not "
            "built, so it runs the pure-Python core (tens of times slower): run from another "
            "directory to use the installed moeray, or build here with `pip install -e .`"
        )
    return (
        f"moeray's native core cannot be imported ({exc}), so it runs the pure-Python core "
        "(tens of times slower): reinstall moeray (`pip install --force-reinstall moeray`)"
    )


if os.environ.get("MOERAY_PURE_PYTHON", "") not in ("", "0"):
    backend = _reference
else:
    try:
        from moeray.native import _core as backend
    except ImportError as exc:  # an unbuilt source tree, or a broken install
        warnings.warn(_fallback_reason(exc, Path(__file__)), RuntimeWarning, stacklevel=2)
        backend = _reference

IS_NATIVE = backend is not _reference
