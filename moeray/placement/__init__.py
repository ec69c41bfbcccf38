"""Expert placement across GPUs and nodes: which slot holds which expert, which experts get
replicas, when to move them, and which replica serves each token of a batch.

Pure policy (numpy and ``moeray.native`` only, never Ray): ``placement`` (the ``Topology`` and
``Placement`` values).
"""

from moeray.placement.placement import Placement, PlacementError, Topology, balancedness

__all__ = ["Placement", "PlacementError", "Topology", "balancedness"]
