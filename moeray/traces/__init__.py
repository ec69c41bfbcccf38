"""Routing I/O: what the routers chose, in memory, on disk and on the wire.

``trace`` holds the ``Trace`` value (a leaf); ``mtrace`` the ``.mtrace`` format (a versioned
msgpack stream, docs/trace-format.md); ``loading`` reads an ``.mtrace`` or ``.npz`` (told apart
by content) into a ``Trace``, salvaging a truncated ``.mtrace`` on request; ``convert`` turns
engines' dumps into traces; ``record`` hooks a transformers model's routers; ``info``
summarises a trace; ``wire`` is the msgpack form of one service step. Modules here import
numpy, msgpack, the standard library and ``moeray.policy._validate``; never Ray, never the
service.
"""

from moeray.traces.loading import default_trace_path, load_trace
from moeray.traces.mtrace import (
    SalvageReport,
    TraceFormatError,
    TraceHeader,
    TraceReader,
    TraceWriter,
    is_trace_file,
    read_trace,
    write_trace,
)
from moeray.traces.trace import DEFAULT_TRACE_NAME, Trace, TraceNotFoundError

__all__ = [
    "DEFAULT_TRACE_NAME",
    "SalvageReport",
    "Trace",
    "TraceFormatError",
    "TraceHeader",
    "TraceNotFoundError",
    "TraceReader",
    "TraceWriter",
    "default_trace_path",
    "is_trace_file",
    "load_trace",
    "read_trace",
    "write_trace",
]
