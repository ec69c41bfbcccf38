"""The engine's side of moeray: a session in the engine's process that plans each layer's fast
tier as its router runs (``EngineSession``), and the updates a service sends it."""

from moeray.engine.session import PROTOCOL_VERSION, EngineSession, EngineUpdate, LayerPlan

__all__ = ["PROTOCOL_VERSION", "EngineSession", "EngineUpdate", "LayerPlan"]
