"""Type stub of moeray's native core; the package _reference/ implements the same API in Python.

tests/test_native_stub.py keeps this file in step with the compiled module and with the twin,
private kernels included.
"""

import numpy as np
import numpy.typing as npt

__version__: str  # native only: pyproject.toml's version, from the build

LRU: int
LFU: int
ADAPTIVE: int

class AffinityCore:
    def __init__(
        self, num_experts: int, decay: float, activation_boost: float, max_score: float
    ) -> None: ...
    def num_experts(self) -> int: ...
    def update(self, activated: list[int]) -> None: ...
    def update_batch(self, expert_ids: npt.NDArray[np.int32]) -> None: ...
    def score(self, expert_id: int) -> float: ...
    def scores(self) -> npt.NDArray[np.float64]: ...
    def activation_count(self, expert_id: int) -> int: ...
    def activation_counts(self) -> npt.NDArray[np.int64]: ...
    def top_k_by_affinity(self, k: int) -> list[int]: ...
    def top_k_by_frequency(self, k: int) -> list[int]: ...
    def least_affinity(self, candidates: list[int]) -> int | None: ...
    def frequency_percentile(self, expert_id: int) -> float: ...
    def load_state(
        self, scores: npt.NDArray[np.float64], activation_counts: npt.NDArray[np.int64]
    ) -> None: ...
    def reset(self) -> None: ...

class ExpertCacheCore:
    def __init__(
        self, num_experts: int, max_hot: int, prefetch_threshold: float, policy: int
    ) -> None: ...
    def num_experts(self) -> int: ...
    def access(self, expert_id: int) -> bool: ...
    def should_prefetch(self, expert_id: int, router_weight: float) -> bool: ...
    def suggest_eviction(self) -> int | None: ...
    def evict(self, expert_id: int) -> None: ...
    def admit(self, expert_id: int) -> None: ...
    def prefetch_admit(self, expert_id: int) -> None: ...
    def is_hot(self, expert_id: int) -> bool: ...
    def stats(self) -> tuple[int, int, int, int]: ...
    def reset_stats(self) -> None: ...
    def hot_count(self) -> int: ...
    def max_hot(self) -> int: ...
    def hot_experts(self) -> list[int]: ...
    def suggest_eviction_with_affinity(
        self, affinity: AffinityCore, affinity_weight: float
    ) -> int | None: ...
    def prefetch_by_affinity(self, affinity: AffinityCore, budget: int) -> list[int]: ...
    def access_batch(
        self,
        expert_ids: npt.NDArray[np.int32],
        affinity: AffinityCore | None = None,
        affinity_weight: float = 0.0,
    ) -> npt.NDArray[np.bool_]: ...

def schedule(
    expert_ids: npt.NDArray[np.int32], weights: npt.NDArray[np.float32], num_experts: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]: ...
def belady_hits(expert_ids: npt.NDArray[np.int32], num_experts: int, capacity: int) -> int: ...
def expert_matvec(
    layout: str,
    hidden_size: int,
    intermediate_size: int,
    tensors: dict[str, tuple[str, npt.NDArray[np.generic], npt.NDArray[np.float32] | None, int]],
    x: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]: ...

# Private: the kernels behind moeray.policy (predict.PredictiveCaches, split.CapacitySplit).
class _PredictKernel:
    def __init__(
        self,
        hot: npt.NDArray[np.bool_],
        hot_count: npt.NDArray[np.int64],
        pending: npt.NDArray[np.bool_],
        touch: npt.NDArray[np.float64],
        capacity: npt.NDArray[np.int64],
        resplit_out: npt.NDArray[np.bool_] | None,
        cross: npt.NDArray[np.float64],
        cross_n: npt.NDArray[np.float64],
        pair: npt.NDArray[np.float64],
        pair_n: npt.NDArray[np.float64],
        prev: npt.NDArray[np.float64],
        prev_n: npt.NDArray[np.float64],
        affinity: npt.NDArray[np.float64],
        hits: npt.NDArray[np.int64],
        stalls: npt.NDArray[np.int64],
        prefetches: npt.NDArray[np.int64],
        prefetch_hits: npt.NDArray[np.int64],
        wasted_prefetches: npt.NDArray[np.int64],
        evictions: npt.NDArray[np.int64],
        resplit_transfers: npt.NDArray[np.int64],
        predictor_hits: npt.NDArray[np.int64],
        predictor_guesses: npt.NDArray[np.int64],
        predictor_uses: npt.NDArray[np.int64],
        top_k: int,
        prefetch_budget: int,
        cross_weight: float,
        previous_weight: float,
        affinity_weight: float,
        prefetch_margin: float,
        prefetch_threshold: float,
        keep_previous_weight: float,
        keep_affinity_weight: float,
        victim_next_weight: float,
        victim_affinity_weight: float,
        pair_prior: float,
        affinity_decay: float,
    ) -> None: ...
    def step(
        self,
        ids: npt.NDArray[np.int64],
        last_ids: npt.NDArray[np.int64] | None,
        clock: int,
        scale: float,
        next_scale: float,
        next_prev_scale: float,
    ) -> None: ...
    def run_window(
        self,
        ids: npt.NDArray[np.int64],
        new_sequence: npt.NDArray[np.bool_] | None,
        last_ids: npt.NDArray[np.int64] | None,
        clock: int,
        scale: float,
        prev_scale: float,
        transition_decay: float,
        previous_decay: float,
        first_layer: int,
    ) -> tuple[int, float, float]: ...
    def open_batch(
        self,
        last_ids: npt.NDArray[np.int64] | None,
        new_sequence: npt.NDArray[np.bool_],
        clock: int,
        scale: float,
        prev_scale: float,
        transition_decay: float,
        previous_decay: float,
        record: bool,
    ) -> tuple[int, float, float]: ...
    def serve_layer(self, layer: int, ids: npt.NDArray[np.int64]) -> None: ...
    def take_events(self) -> npt.NDArray[np.int64]: ...
    def close_batch(self) -> npt.NDArray[np.int64]: ...
    def flush(self) -> None: ...

# Private: the placement kernels behind moeray.placement (one layer per row).
def _replicate(
    weight: npt.NDArray[np.float32], num_slots: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
def _pack(
    weight: npt.NDArray[np.float32],
    num_packs: int,
    labels: npt.NDArray[np.int32] | None = None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
def _improve(
    slots: npt.NDArray[np.int32],
    load: npt.NDArray[np.float64],
    num_gpus: int,
    gpus_per_node: int,
    budget: int,
    candidates: int,
    min_gain: float,
    node_cost: float,
) -> npt.NDArray[np.int32]: ...
def _dispatch_allocation(
    counts: npt.NDArray[np.int64], slots: npt.NDArray[np.int32], num_gpus: int
) -> npt.NDArray[np.int64]: ...
def dispatch(
    expert_ids: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    slots: npt.NDArray[np.int32],
    num_gpus: int,
    num_experts: int,
    token_nodes: npt.NDArray[np.int32] | None = None,
    gpus_per_node: int = 1,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]
]: ...
def _stack_histogram(
    last: npt.NDArray[np.int64],
    histogram: npt.NDArray[np.float64],
    ids: npt.NDArray[np.int64],
    counter: int,
    scales: npt.NDArray[np.float64],
) -> None: ...

class PrefetcherCore:
    def __init__(self, paths: list[str], num_experts: int) -> None: ...
    def num_experts(self) -> int: ...
    def set_ranges(self, expert_id: int, ranges: list[tuple[int, int, int]]) -> None: ...
    def expert_bytes(self, expert_id: int) -> int: ...
    def prefetch(self, expert_id: int) -> None: ...
    def ready(self, expert_id: int) -> bool: ...
    def wait(self, expert_id: int) -> bool: ...
    def release(self, expert_id: int) -> None: ...
    def resident_bytes(self, expert_id: int) -> int: ...
    def read_ahead(self, expert_id: int, bytes: int) -> None: ...
    def file_array(self, file: int) -> np.ndarray: ...
    def stats(self) -> dict[str, float]: ...

class _DemandSession:
    def __init__(
        self,
        caches: list[ExpertCacheCore],
        affinities: list[AffinityCore],
        blended: bool,
        affinity_weight: float,
    ) -> None: ...
    def num_layers(self) -> int: ...
    def num_experts(self) -> int: ...
    def check(self, ids: npt.NDArray[np.int64]) -> None: ...
    def route(
        self, layer: int, ids: npt.NDArray[np.int64], budget: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]: ...

class _HotPlan:
    def __init__(self, hot: npt.NDArray[np.bool_]) -> None: ...
    def check(self, ids: npt.NDArray[np.int64]) -> None: ...
    def before(self, layer: int) -> None: ...
    def plan(
        self, layer: int, ids: npt.NDArray[np.int64]
    ) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
    ]: ...
