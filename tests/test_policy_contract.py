"""The contract every online policy of the registry keeps (``moeray.policy.windows``).

For each entry: the counters add up (every use is a hit or a stall), no hot set outgrows its
capacity, each window's routing reaches the host's affinities exactly once, decisions do not
depend on how the stream is cut into windows, a policy over layers a..b decides as the whole
model's does for those layers, and a warm-up moves no counter. A new policy gets all of this by
being registered.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeray.policy.affinity import AffinityConfig, ExpertAffinity
from moeray.policy.registry import POLICIES, PolicySettings
from moeray.policy.windows import COUNTER_KEYS, PolicyWindow

pytestmark = pytest.mark.pure

LAYERS, EXPERTS, TOP_K, CAPACITY, TOKENS = 3, 16, 2, 4, 240
ONLINE = [name for name, entry in POLICIES.items() if entry.online]


def routing(seed: int = 0) -> np.ndarray:
    """int32 [layers, tokens, top_k], distinct experts per token, skewed towards low ids."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, EXPERTS + 1)
    out = np.empty((LAYERS, TOKENS, TOP_K), np.int32)
    for layer in range(LAYERS):
        for t in range(TOKENS):
            out[layer, t] = rng.choice(EXPERTS, TOP_K, replace=False, p=weights / weights.sum())
    return out


def build(name: str, layers: list[int]):
    affinities = {
        layer: ExpertAffinity(AffinityConfig.with_num_experts(EXPERTS)) for layer in layers
    }
    policy = POLICIES[name].build(
        layers, EXPERTS, dict.fromkeys(range(LAYERS), CAPACITY), affinities, PolicySettings()
    )
    return policy, affinities


def budget(name: str) -> int:
    return TOP_K if POLICIES[name].predictive else 0


def run(name: str, ids: np.ndarray, cuts: list[int], layers=None, starts=None):
    """Feeds ids [layers, T, top_k] in windows ending at ``cuts``; returns (per-layer summed
    counters, policy, affinities)."""
    layers = list(range(LAYERS)) if layers is None else layers
    policy, affinities = build(name, layers)
    totals = [dict.fromkeys(COUNTER_KEYS, 0) for _ in layers]
    first = 0
    for end in [*cuts, ids.shape[1]]:
        step = slice(first, end)
        window = PolicyWindow(
            tuple(ids[layer, step] for layer in layers),
            ids[layers[0] - 1, step] if layers[0] > 0 else None,
            None if starts is None else starts[step],
            None,
            budget(name),
        )
        for total, counts in zip(totals, policy.apply(window)):
            for key in COUNTER_KEYS:
                total[key] += counts[key]
        first = end
    return totals, policy, affinities


@pytest.mark.parametrize("name", ONLINE)
def test_counters_add_up_and_hot_sets_stay_within_capacity(name):
    ids = routing()
    totals, policy, affinities = run(name, ids, [50, 51, 130])
    for layer, (total, (hot, ahead)) in enumerate(zip(totals, policy.hot_sets())):
        assert total["hits"] + total["stalls"] == TOKENS * TOP_K
        assert 0 < total["stalls"] < TOKENS * TOP_K  # the stream really exercised the policy
        assert len(hot) <= CAPACITY and set(ahead.tolist()) <= set(hot.tolist())
        assert total["evictions"] <= total["stalls"] + total["prefetches"]
        counts = np.bincount(ids[layer].ravel(), minlength=EXPERTS)
        assert affinities[layer].activation_counts().tolist() == counts.tolist()


@pytest.mark.parametrize("name", ONLINE)
def test_windows_do_not_change_decisions(name):
    ids = routing(1)
    one, p1, _ = run(name, ids, [])
    many, p2, _ = run(name, ids, [1, 2, 17, 100, 101, 239])
    assert one == many
    for (h1, _), (h2, _) in zip(p1.hot_sets(), p2.hot_sets()):
        assert sorted(h1.tolist()) == sorted(h2.tolist())


@pytest.mark.parametrize("name", ONLINE)
def test_later_layers_alone_decide_as_the_whole_model(name):
    ids = routing(2)
    starts = np.zeros(TOKENS, bool)
    starts[[0, 90]] = True
    whole, _, _ = run(name, ids, [60], starts=starts)
    part, _, _ = run(name, ids, [60, 61], layers=[1, 2], starts=starts)
    assert part == whole[1:]


@pytest.mark.parametrize("name", ONLINE)
def test_a_warm_up_moves_no_counter(name):
    ids = routing(3)
    policy, _ = build(name, list(range(LAYERS)))
    policy.warm_up(ids.transpose(1, 0, 2)[:100], None)
    window = PolicyWindow(tuple(ids[layer, 100:] for layer in range(LAYERS)), None, None, None, 0)
    counts = policy.apply(window)
    assert all(c["hits"] + c["stalls"] == (TOKENS - 100) * TOP_K for c in counts)


def test_the_contract_can_fail():
    """A policy that drops a window's last token breaks the first test's accounting."""
    ids = routing()
    totals, _, _ = run("lru", ids[:, :-1], [])
    assert totals[0]["hits"] + totals[0]["stalls"] != TOKENS * TOP_K
