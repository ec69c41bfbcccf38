"""The engine's side of moeray: a session in the engine's process that plans each layer's fast
tier as its router runs (``EngineSession``), the updates a service sends it, and the streaming
of each layer's plan to the node's prefetcher (``StreamingSession``, ``CheckpointReader``)."""

from moeray.engine.session import PROTOCOL_VERSION, EngineSession, EngineUpdate, LayerPlan
from moeray.engine.stream import CheckpointReader, StreamingSession

__all__ = [
    "PROTOCOL_VERSION",
    "CheckpointReader",
    "EngineSession",
    "EngineUpdate",
    "LayerPlan",
    "StreamingSession",
]
