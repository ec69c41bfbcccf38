"""Helpers shared by the tests of the service on a real local Ray (``test_service_ray``,
``test_service_recovery``)."""

from __future__ import annotations

from moeray import service


def config(name: str, **kw) -> service.ServiceConfig:
    """The tests' service: the bundled slice's shape (24 layers of 32 experts, top-4), lru with
    8 hot experts, two layer actors of 12 layers, windows of 2 steps; ``kw`` overrides."""
    base = dict(
        num_layers=24,
        num_experts=32,
        top_k=4,
        capacity=8,
        policy="lru",
        layers_per_actor=12,
        window_steps=2,
        name=name,
    )
    base.update(kw)
    return service.ServiceConfig(**base)
