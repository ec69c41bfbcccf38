"""Cache decisions move real bytes: ``moeray replay --shards`` keeps each layer's hot set resident
in a synthetic gpt-oss-20b checkpoint, and mincore shows the memory bound (capacity plus one
expert) holds while every miss really loads its expert.

The checkpoint is written with a final fsync (clean pages can leave the page cache) into pytest's
temporary directory, on the machine's disk: pages of a tmpfs would always be resident.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeray.cli import main
from moeray.replay import ReplayConfig, replay_shards, replay_trace
from moeray.shards import ShardStore
from moeray.shards.residency import ShardResidency
from moeray.shards.synth import MODEL_SHAPES, SynthConfig, write_checkpoint
from moeray.traces import Trace, default_trace_path, load_trace

LAYERS, TOKENS, CAPACITY = 2, 160, 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """gpt-oss-20b names and layout, hidden and intermediate 360: experts of 761 KiB, large
    against the pages a hot set shares with cold neighbours (the bound's slack is one expert)."""
    out = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(
        SynthConfig(MODEL_SHAPES["gpt-oss-20b"].scaled(8), num_layers=LAYERS), out, progress=False
    )
    return out


@pytest.fixture(scope="module")
def trace():
    full = load_trace(default_trace_path())
    return Trace(
        full.expert_ids[:TOKENS, :LAYERS],
        full.weights[:TOKENS, :LAYERS],
        np.array([0, TOKENS]),
        full.num_experts,
        "gpt-oss-20b-head",
    )


def lru_cold_reads(ids: np.ndarray, capacity: int) -> int:
    """Experts of each token that were not hot when the token reached the layer (plain LRU).

    Fewer than LRU's misses: within a token, a miss may evict an expert the same token uses
    next, which then misses again although its bytes never left."""
    hot: list[int] = []  # least recently used first
    cold = 0
    for row in ids.tolist():
        cold += len(set(row) - set(hot))
        for e in row:
            if e in hot:
                hot.remove(e)
            elif len(hot) == capacity:
                hot.pop(0)
            hot.append(e)
    return cold


def test_every_stall_moves_one_expert_and_the_bound_holds(checkpoint, trace):
    config = ReplayConfig(capacity=CAPACITY, policies=("lru", "affinity-lru", "belady"))
    report = replay_shards(trace, config, str(checkpoint), step_tokens=1)
    decisions = replay_trace(trace, config)
    with ShardStore(checkpoint) as store:
        expert = store.expert_bytes(store.layers[0], 0)
    assert "belady" not in report.shards  # an oracle: no bytes to move
    assert list(report.shards["lru"].cold_reads) == [
        lru_cold_reads(trace.layer_ids(layer), CAPACITY) for layer in range(LAYERS)
    ]
    for name in ("lru", "affinity-lru"):
        result, shards = report.results[name], report.shards[name]
        assert result.per_layer_hits == decisions.results[name].per_layer_hits
        misses = [TOKENS * trace.top_k - hits for hits in result.per_layer_hits]
        assert all(0 < s <= m for s, m in zip(shards.cold_reads, misses))
        # one token per window, no prediction: each stall loads its expert once, nothing else
        assert list(shards.bytes_moved) == [s * expert for s in shards.cold_reads]
        assert shards.capacity_bytes == (CAPACITY * expert,) * LAYERS
        assert shards.over_bound() == [], (shards.resident_bytes_max, shards.capacity_bytes)
        # the hot set really was held in memory, not just bounded from above
        assert all(r >= CAPACITY * expert for r in shards.resident_bytes_max)


@pytest.mark.parametrize("hint_accuracy", [None, 0.9])
def test_moeray_moves_the_bytes_of_its_hot_sets(checkpoint, trace, hint_accuracy):
    """Under the predictive policy the bytes follow its hot sets too: after every window the
    resident experts are exactly the policy's hot set, the bound holds, and every expert
    populated was one the policy brought in (a stall or a prefetch). Its counts, predictors
    included, are the in-process replay's, with engine hints too."""
    from moeray.actors.layer import LayerCaches
    from moeray.actors.messages import LayerWindow
    from moeray.policy.predict import PredictiveCaches

    config = ReplayConfig(capacity=CAPACITY, policies=("moeray",), hint_accuracy=hint_accuracy)
    report = replay_shards(trace, config, str(checkpoint), step_tokens=4)
    decisions = replay_trace(trace, config).results["moeray"]
    with ShardStore(checkpoint) as store:
        expert = store.expert_bytes(store.layers[0], 0)
    result, shards = report.results["moeray"], report.shards["moeray"]
    assert result.per_layer_hits == decisions.per_layer_hits
    assert result.per_layer_transfers == decisions.per_layer_transfers
    assert result.per_layer_wasted == decisions.per_layer_wasted
    assert result.predictors == decisions.predictors
    assert ("hints" in result.predictors) == (hint_accuracy is not None)
    assert all(moved % expert == 0 for moved in shards.bytes_moved)
    # experts prefetched and evicted within one window never reach the shard: at most the
    # policy's transfers, and at least a full hot set
    assert all(
        CAPACITY * expert <= moved <= transfers * expert
        for moved, transfers in zip(shards.bytes_moved, decisions.per_layer_transfers)
    )
    assert shards.over_bound() == [], (shards.resident_bytes_max, shards.capacity_bytes)
    assert all(r >= CAPACITY * expert for r in shards.resident_bytes_max)

    # window by window, in the layer body: resident experts == the policy's hot set
    layers = list(range(LAYERS))
    body = LayerCaches(
        layers,
        trace.num_experts,
        dict.fromkeys(layers, CAPACITY),
        "moeray",
        shards=str(checkpoint),
        settle=True,
    )
    mirror = PredictiveCaches(LAYERS, trace.num_experts, trace.top_k, CAPACITY)
    for number, first in enumerate(range(0, 64, 16), start=1):
        step = slice(first, first + 16)
        body.apply(
            [
                LayerWindow(layer, number, trace.layer_ids(layer)[step], trace.top_k)
                for layer in layers
            ]
        )
        for t in range(first, first + 16):
            mirror.step(trace.expert_ids[t], new_sequence=t == 0)
        for layer in layers:
            hot, _ = mirror.hot_set(layer)
            assert body._residency[layer].resident_experts() == hot.tolist(), (number, layer)
    del body  # unmaps the shards


def test_the_resident_reading_sees_a_hot_set_over_capacity(checkpoint):
    """The bound check can fail: holding 12 experts under a capacity of 8 reads over the bound."""
    with ShardStore(checkpoint) as store:
        layer = store.layers[1]
        residency = ShardResidency(store, layer, CAPACITY)
        assert residency.measure() < store.expert_bytes(layer, 0)  # starts cold
        residency.sync(range(12))
        residency.settle()
        stats = residency.stats()
        assert residency.measure() > stats.capacity_bytes + stats.expert_bytes
        residency.sync(range(4))  # releases 4..11
        assert residency.measure() < 5 * stats.expert_bytes


def test_use_counts_in_time_late_and_cold_reads(checkpoint):
    with ShardStore(checkpoint) as store:
        residency = ShardResidency(store, store.layers[0], CAPACITY)
        residency.sync([1, 2, 3], ahead=[2, 3])
        residency.settle()
        residency.use(
            [1, 2, 5, 5]
        )  # 1: on demand earlier; 2: prefetched ahead, ready; 5: cold read
        stats = residency.stats()
        assert (stats.in_time, stats.late, stats.cold_reads) == (1, 0, 1)
        assert stats.bytes_moved == 3 * store.expert_bytes(store.layers[0], 0)
        residency.use([3])
        assert residency.stats().in_time == 2
        with pytest.raises(ValueError, match="capacity"):
            ShardResidency(store, store.layers[0], 33)


def test_cli_replay_local_shards_writes_the_shards_object(checkpoint, trace, tmp_path, capsys):
    small = tmp_path / "small.npz"
    np.savez(
        small,
        expert_ids=trace.expert_ids[:64],
        expert_probs=trace.weights[:64],
        seq_offsets=np.array([0, 64]),
        num_experts=trace.num_experts,
    )
    out = tmp_path / "out.json"
    code = main(
        [
            "replay",
            str(small),
            "--backend",
            "local",
            "--shards",
            str(checkpoint),
            "--policy",
            "lru",
            "--policy",
            "belady",
            "--json",
            str(out),
            "--no-progress",
            "--tokens",
            "48",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "resident" in printed and "held" in printed
    assert "48 tokens" in printed  # --tokens cut the trace
    document = json.loads(out.read_text())
    shards = document["shards"]
    assert shards["path"] == str(checkpoint)
    lru = shards["policies"]["lru"]
    assert set(lru) >= {"capacity_bytes", "resident_bytes_max", "bytes_moved", "late_prefetches"}
    assert len(lru["resident_bytes_max"]) == LAYERS
    assert all(0 < r <= c * 9 / 8 for r, c in zip(lru["resident_bytes_max"], lru["capacity_bytes"]))
    assert "belady" not in shards["policies"]


def test_cli_capacity_in_bytes_across_all_layers(checkpoint, trace, tmp_path, capsys):
    """--capacity-bytes: one byte budget for every layer's hot set, as many experts per layer as
    it holds; the bound then holds against those experts' bytes."""
    small = tmp_path / "small.npz"
    np.savez(
        small,
        expert_ids=trace.expert_ids[:32],
        expert_probs=trace.weights[:32],
        seq_offsets=np.array([0, 32]),
        num_experts=trace.num_experts,
    )
    with ShardStore(checkpoint) as store:
        expert = store.expert_bytes(store.layers[0], 0)
    budget = 5 * LAYERS * expert + expert // 2  # 5 experts per layer and half of one more
    out = tmp_path / "bytes.json"
    argv = [
        "replay",
        str(small),
        "--backend",
        "local",
        "--shards",
        str(checkpoint),
        "--policy",
        "lru",
        "--no-progress",
    ]
    assert main(argv + ["--capacity-bytes", f"{budget // 1024}KiB", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["capacity_experts"] == 5
    assert document["capacity_budget_bytes"] == budget // 1024 * 1024
    assert document["shards"]["policies"]["lru"]["capacity_bytes"] == [5 * expert] * LAYERS
    assert "5 experts per layer" in capsys.readouterr().out
    # too small for one expert per layer, no checkpoint to size experts by, not a size
    assert main(argv + ["--capacity-bytes", str(LAYERS * expert - 1)]) == 2
    assert "one expert per layer" in capsys.readouterr().err
    assert main(["replay", str(small), "--backend", "local", "--capacity-bytes", "1GiB"]) == 2
    assert "needs --shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--capacity-bytes", "lots"])
    with pytest.raises(SystemExit):
        main(argv + ["--capacity-bytes", "1GiB", "--capacity", "0.5"])


def test_service_config_capacity_in_bytes(checkpoint):
    from moeray.service import ServiceConfig

    with ShardStore(checkpoint) as store:
        expert = store.expert_bytes(store.layers[0], 0)
    config = ServiceConfig.from_byte_budget(
        7 * LAYERS * expert + 1, str(checkpoint), num_layers=LAYERS, num_experts=32, top_k=4
    )
    assert config.capacity == (7,) * LAYERS and config.shards == str(checkpoint)
    json_config = ServiceConfig.from_dict(
        {
            "num_layers": LAYERS,
            "num_experts": 32,
            "top_k": 4,
            "shards": str(checkpoint),
            "capacity_bytes": 7 * LAYERS * expert + 1,
        }
    )
    assert json_config == config
    with pytest.raises(ValueError, match="needs shards"):
        ServiceConfig.from_dict(
            {"num_layers": LAYERS, "num_experts": 32, "top_k": 4, "capacity_bytes": 2**30}
        )
    with pytest.raises(ValueError, match="one expert per layer"):
        ServiceConfig.from_byte_budget(
            expert, str(checkpoint), num_layers=LAYERS, num_experts=32, top_k=4
        )


def test_replay_shards_rejects_a_checkpoint_that_does_not_fit(checkpoint, trace):
    wide = Trace(np.zeros((4, 3, 4), np.uint8), None, np.array([0, 4]), 32, "three layers")
    with pytest.raises(ValueError, match="MoE layers"):
        replay_shards(wide, ReplayConfig(capacity=8, policies=("lru",)), str(checkpoint))
    narrow = Trace(np.zeros((4, 2, 4), np.uint8), None, np.array([0, 4]), 64, "64 experts")
    with pytest.raises(ValueError, match="experts"):
        replay_shards(narrow, ReplayConfig(capacity=8, policies=("lru",)), str(checkpoint))
    with pytest.raises(ValueError, match="step_tokens"):
        replay_shards(trace, ReplayConfig(capacity=8, policies=("lru",)), str(checkpoint), 0)


def test_release_drops_pages_a_kernel_read_through_the_store(checkpoint):
    """A page some mapping still maps stays in the page cache: releasing an expert a kernel has
    read through ``expert_weights`` must unmap it from the store's mapping too."""
    from moeray.shards import expert_matvec

    with ShardStore(checkpoint) as store:
        layer = store.layers[0]
        expert = store.expert_bytes(layer, 5)
        residency = ShardResidency(store, layer, CAPACITY)
        weights = store.expert_weights(layer, 5)
        residency.sync([5])
        residency.settle()
        x = np.ones((1, weights.hidden_size), np.float32)
        assert np.isfinite(expert_matvec(weights, x)).all()
        assert residency.measure() >= expert
        residency.sync([])
        assert residency.measure() < expert // 4
        del weights


def test_trace_head_cuts_tokens_and_sequences():
    full = load_trace(default_trace_path())
    head = full.head(600)
    assert head.num_tokens == 600 and head.num_layers == full.num_layers
    assert np.array_equal(head.expert_ids, full.expert_ids[:600])
    assert head.seq_offsets.tolist() == [0, 511, 600]  # the bundled slice's first sequence is 511
    assert full.head(10**9).num_tokens == full.num_tokens
    with pytest.raises(ValueError, match="tokens"):
        full.head(0)


def test_moeray_resplit_moves_the_bytes_of_its_hot_sets(checkpoint, trace):
    """With one capacity re-split across layers the layer body takes the split a coordinator
    sends: the counts and re-split costs are the in-process replay's, and each layer's bound
    is its largest capacity."""
    from moeray.policy.predict import PredictConfig
    from moeray.policy.split import SplitConfig

    split = SplitConfig(every_tokens=16, max_move=2, min_gain=0.0)
    config = ReplayConfig(
        capacity=CAPACITY, policies=("moeray",), predict=PredictConfig(split=split)
    )
    report = replay_shards(trace, config, str(checkpoint), step_tokens=5)
    decisions = replay_trace(trace, config).results["moeray"]
    result, shards = report.results["moeray"], report.shards["moeray"]
    assert result.per_layer_hits == decisions.per_layer_hits
    assert result.per_layer_transfers == decisions.per_layer_transfers
    assert result.resplit == decisions.resplit and decisions.resplit["moved"] > 0
    with ShardStore(checkpoint) as store:
        expert = store.expert_bytes(store.layers[0], 0)
    assert max(shards.capacity_bytes) > CAPACITY * expert  # some layer grew
    assert all(
        c >= f * expert for c, f in zip(shards.capacity_bytes, decisions.resplit["final_capacity"])
    )
    assert shards.over_bound() == [], (shards.resident_bytes_max, shards.capacity_bytes)
