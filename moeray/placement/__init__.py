"""Expert placement across GPUs and nodes: which slot holds which expert, which experts get
replicas, when to move them, and which replica serves each token of a batch.

Pure policy (numpy and ``moeray.native`` only, never Ray):
- ``placement``: the ``Topology`` and ``Placement`` values, ``balancedness``;
- ``eplb``: the published EPLB method (``rebalance_eplb``), the baseline;
- ``forecast``: ``LoadForecast``, the per-layer load forecast from routing history;
- ``planner``: ``place_moeray`` (full, or incremental under a migration budget), ``place_static``,
  ``allocate_redundant`` (a shared budget's split over the layers);
- ``dispatch``: which replica serves each token of a batch (``dispatch``, ``GpuBatches``);
- ``formats``: the engines' map formats (SGLang, TensorRT-LLM, vLLM) and load inputs;
- ``replay``: ``replay_placement``, the ``moeray place`` report of a trace.
"""

from moeray.placement.dispatch import GpuBatches, dispatch, dispatched_gpu_loads
from moeray.placement.eplb import rebalance_eplb
from moeray.placement.forecast import LoadForecast
from moeray.placement.formats import MAP_FORMATS, read_load, read_map, write_map
from moeray.placement.placement import Placement, PlacementError, Topology, balancedness
from moeray.placement.planner import (
    allocate_redundant,
    budget_slots,
    place_moeray,
    place_static,
)
from moeray.placement.replay import ALGORITHMS, PlaceConfig, replay_placement

__all__ = [
    "ALGORITHMS",
    "MAP_FORMATS",
    "GpuBatches",
    "LoadForecast",
    "PlaceConfig",
    "Placement",
    "PlacementError",
    "Topology",
    "allocate_redundant",
    "balancedness",
    "budget_slots",
    "dispatch",
    "dispatched_gpu_loads",
    "place_moeray",
    "place_static",
    "read_load",
    "read_map",
    "rebalance_eplb",
    "replay_placement",
    "write_map",
]
