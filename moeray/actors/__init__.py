"""The service's mechanism: the coordinator and layer-actor bodies and what they send each other.

``config`` holds ``ServiceConfig``; ``messages`` the windows, acknowledgements, state and
counters; ``steps`` the checks of a step and its coalescing into windows (shared by the engine's
``ServiceHandle`` and the coordinator); ``coordinator`` the ``Coordinator`` and its transport
protocol; ``layer`` the layer-actor body over the registry's policies; ``transport`` the
in-process transport the replays and tests use; ``journal`` a client's windows kept until every
layer actor acknowledged them. Bodies are plain classes; ``_ray`` is the one
module that imports Ray (actors, calls, the local session, metrics). Modules here may import
policy, shards and traces; never replay, service or cli.
"""

__all__: list[str] = []
