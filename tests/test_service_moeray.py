"""The ``moeray`` policy hosted by the service's layer actors.

Pure tests first (no Ray): the decomposition the actors rely on (a ``PredictiveCaches`` over
layers a-1..b makes the whole model's decisions for a..b), and a layer actor's body applying
windows. Then the real service on a local Ray: per-layer hits, stalls, transfers, prefetches
and wasted prefetches equal the in-process replay's, and a layer actor killed mid-replay loses
no window and applies none twice. Expectations come from ``PredictiveCaches`` run in-process
over the whole model, never from the service's code.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moeray.actors.layer import LayerCaches
from moeray.actors.messages import LayerWindow, WindowGapError
from moeray.policy.predict import PREDICTOR_NAMES, PredictConfig, PredictiveCaches
from moeray.policy.registry import PolicySettings
from moeray.traces import Trace, default_trace_path, load_trace

PER_PREDICTOR = ("predictor_hits", "predictor_guesses", "predictor_uses")

COUNTERS = ("hits", "stalls", "prefetches", "prefetch_hits", "wasted_prefetches", "evictions")


@pytest.fixture(scope="module")
def trace():
    """The bundled gpt-oss-20b slice's first 700 tokens (four sequences: starts 0, 511, 612,
    677) and first 6 layers."""
    full = load_trace(default_trace_path()).head(700)
    t = Trace(
        full.expert_ids[:, :6], full.weights[:, :6], full.seq_offsets, full.num_experts, "head"
    )
    assert t.num_sequences == 4
    return t


_WHOLE: dict = {}


def whole_model(trace, capacity):
    """PredictStats of the default moeray policy over every layer of ``trace`` (memoised)."""
    key = (id(trace), str(capacity))
    if key not in _WHOLE:
        caches = PredictiveCaches(trace.num_layers, trace.num_experts, trace.top_k, capacity)
        _WHOLE[key] = caches.run(trace.expert_ids, trace.seq_offsets)
    return _WHOLE[key]


def starts_of(trace):
    starts = np.zeros(trace.num_tokens, dtype=bool)
    starts[trace.seq_offsets[:-1]] = True
    return starts


@pytest.mark.pure
@pytest.mark.parametrize("first,last", [(0, 2), (1, 3), (3, 5), (5, 5)])
def test_a_shadow_layer_gives_the_whole_models_decisions(trace, first, last):
    """Layers first..last with layer first-1 as a shadow (its counters dropped) decide exactly
    as the model's PredictiveCaches over every layer does."""
    capacity = [8, 6, 8, 10, 8, 7]
    full = whole_model(trace, capacity)
    lo = max(first - 1, 0)
    part = PredictiveCaches(last + 1 - lo, trace.num_experts, trace.top_k, capacity[lo : last + 1])
    part = part.run(trace.expert_ids[:, lo : last + 1], trace.seq_offsets)
    skip = first - lo
    for key in COUNTERS:
        assert (
            getattr(part, key)[skip:].tolist() == getattr(full, key)[first : last + 1].tolist()
        ), key
    assert full.prefetches[first : last + 1].sum() > 0 and full.wasted_prefetches.sum() > 0


@pytest.mark.pure
def test_without_the_shadow_layer_the_first_layers_decisions_differ(trace):
    """The shadow matters: layer 3 alone has no cross-layer prediction and decides otherwise."""
    full = whole_model(trace, 8)
    alone = PredictiveCaches(3, trace.num_experts, trace.top_k, 8).run(
        trace.expert_ids[:, 3:6], trace.seq_offsets
    )
    assert alone.stalls[0] != full.stalls[3] or alone.prefetches[0] != full.prefetches[3]


def apply_all(body, trace, layers, window_tokens, starts=True):
    """Feeds body the trace in windows of window_tokens, as the coordinator would; sums acks."""
    seq_starts = starts_of(trace) if starts else None
    totals = {
        layer: {
            **dict.fromkeys(
                ("hits", "stalls", "prefetches", "prefetch_hits", "wasted_prefetches", "evictions"),
                0,
            ),
            **{key: np.zeros(len(PREDICTOR_NAMES), np.int64) for key in PER_PREDICTOR},
        }
        for layer in layers
    }
    for seq, lo in enumerate(range(0, trace.num_tokens, window_tokens), start=1):
        hi = lo + window_tokens
        windows = [
            LayerWindow(
                layer,
                seq,
                trace.layer_ids(layer)[lo:hi],
                prefetch_budget=4,
                previous_layer_ids=(
                    trace.layer_ids(layer - 1)[lo:hi] if layer == layers[0] and layer > 0 else None
                ),
                seq_starts=None if seq_starts is None else seq_starts[lo:hi],
            )
            for layer in layers
        ]
        for ack in body.apply(windows):
            for key in totals[ack.layer]:
                totals[ack.layer][key] += (
                    np.asarray(getattr(ack.counters, key))
                    if key in PER_PREDICTOR
                    else getattr(ack.counters, key)
                )
    return totals


@pytest.mark.pure
def test_layer_actor_body_runs_moeray_as_the_whole_model(trace):
    full = whole_model(trace, 8)
    layers = [2, 3, 4]
    body = LayerCaches(layers, trace.num_experts, dict.fromkeys(layers, 8), "moeray")
    totals = apply_all(body, trace, layers, window_tokens=64)
    for layer in layers:
        got = totals[layer]
        assert got["hits"] == full.hits[layer] and got["stalls"] == full.stalls[layer]
        assert got["prefetches"] == full.prefetches[layer]
        assert got["prefetch_hits"] == full.prefetch_hits[layer]
        assert got["wasted_prefetches"] == full.wasted_prefetches[layer]
        assert got["evictions"] == full.evictions[layer]
        # every transfer beyond the first 8 (the hot set filling up) evicted one expert
        assert got["evictions"] == got["stalls"] + got["prefetches"] - 8
        for key in PER_PREDICTOR:  # the shadow layer's guesses are not counted
            assert got[key].tolist() == getattr(full, key)[:, layer].tolist(), key
    assert body.applied() == dict.fromkeys(layers, 11)


class _FakeCounter:
    """Stands in for ray.util.metrics.Counter: sums every inc by its full tag set."""

    def __init__(self, name, description, tag_keys):
        self.name, self.tag_keys, self.default, self.totals = name, tag_keys, {}, {}

    def set_default_tags(self, tags):
        self.default = dict(tags)

    def inc(self, value, tags):
        key = tuple(sorted({**self.default, **tags}.items()))
        assert {k for k, _ in key} == set(self.tag_keys), key  # every declared tag is set
        self.totals[key] = self.totals.get(key, 0) + value


def test_prometheus_counters_carry_moerays_wasted_prefetches_and_predictors(trace, monkeypatch):
    """The acks of a moeray layer body, fed to ServiceMetrics as the coordinator does, count
    per layer and predictor what the whole-model policy counted."""
    import types

    from moeray.actors import _ray

    made = {}

    def counter(name, description, tag_keys):
        made[name] = _FakeCounter(name, description, tag_keys)
        return made[name]

    monkeypatch.setattr(_ray, "metrics", types.SimpleNamespace(Counter=counter))
    sink = _ray.ServiceMetrics("svc")
    full = whole_model(trace, 8)
    layers = [2, 3]
    body = LayerCaches(layers, trace.num_experts, dict.fromkeys(layers, 8), "moeray")
    for seq, lo in enumerate(range(0, trace.num_tokens, 100), start=1):
        windows = [
            LayerWindow(
                layer,
                seq,
                trace.layer_ids(layer)[lo : lo + 100],
                prefetch_budget=4,
                previous_layer_ids=(trace.layer_ids(1)[lo : lo + 100] if layer == 2 else None),
                seq_starts=starts_of(trace)[lo : lo + 100],
            )
            for layer in layers
        ]
        for ack in body.apply(windows):
            sink.record_ack(ack)

    def total(metric, layer, predictor=None):
        tags = {
            "service": "svc",
            "layer": str(layer),
            **({} if predictor is None else {"predictor": predictor}),
        }
        return made[metric].totals.get(tuple(sorted(tags.items())), 0)

    for layer in layers:
        assert total("moeray_wasted_prefetches", layer) == full.wasted_prefetches[layer] > 0
        for i, name in enumerate(PREDICTOR_NAMES):
            for field in ("hits", "guesses", "uses"):
                expected = getattr(full, f"predictor_{field}")[i, layer]
                assert total(f"moeray_predictor_{field}", layer, name) == expected, (name, field)
        assert total("moeray_predictor_hits", layer, "cross-layer") > 0


@pytest.mark.pure
def test_sequence_starts_reach_the_predictor(trace):
    """Dropping the sequence starts changes decisions (the previous-token predictor would chain
    sequences), so the windows' seq_starts are really used."""
    layers = [0, 1]
    with_starts = apply_all(LayerCaches(layers, 32, {0: 8, 1: 8}, "moeray"), trace, layers, 100)
    without = apply_all(
        LayerCaches(layers, 32, {0: 8, 1: 8}, "moeray"), trace, layers, 100, starts=False
    )
    assert with_starts != without
    one_stream = PredictiveCaches(6, 32, 4, 8).run(trace.expert_ids)
    assert [without[layer]["stalls"] for layer in layers] == one_stream.stalls[:2].tolist()


@pytest.mark.pure
def test_moeray_body_refuses_what_it_cannot_apply(trace):
    ids = trace.layer_ids(2)[:10]
    body = LayerCaches([2, 3], 32, {2: 8, 3: 8}, "moeray")
    with pytest.raises(ValueError, match="previous_layer_ids"):
        body.apply([LayerWindow(2, 1, ids), LayerWindow(3, 1, ids)])
    with pytest.raises(ValueError, match="every hosted layer"):
        body.apply([LayerWindow(2, 1, ids, previous_layer_ids=ids)])
    with pytest.raises(WindowGapError):
        body.apply([LayerWindow(2, 2, ids, previous_layer_ids=ids), LayerWindow(3, 2, ids)])
    with pytest.raises(ValueError, match="one budget"):
        body.apply([LayerWindow(2, 1, ids, 4, ids), LayerWindow(3, 1, ids, 2)])
    with pytest.raises(ValueError, match="seq_starts"):
        body.apply(
            [
                LayerWindow(2, 1, ids, previous_layer_ids=ids, seq_starts=np.ones(3, bool)),
                LayerWindow(3, 1, ids),
            ]
        )
    for bad in (((10, (8,) * 4),), ((0, (8,) * 3),)):  # offset past the window, too few layers
        with pytest.raises(ValueError, match="resplits"):
            body.apply(
                [
                    LayerWindow(2, 1, ids, previous_layer_ids=ids, resplits=bad),
                    LayerWindow(3, 1, ids, resplits=bad),
                ]
            )
    assert body.applied() == {2: 0, 3: 0}  # nothing was applied
    with pytest.raises(ValueError, match="consecutive"):
        LayerCaches([1, 3], 32, {1: 8, 3: 8}, "moeray")
    with pytest.raises(TypeError, match="predict"):
        LayerCaches(
            [0], 32, {0: 8}, "moeray", settings=PolicySettings(predict={"prefetch_budget": 2})
        )


# --- the real service on a local Ray ---


@pytest.mark.parametrize("hint_accuracy", [None, 0.8])
def test_replay_through_service_equals_the_in_process_replay(ray_local, trace, hint_accuracy):
    """Per layer: hits, stalls, transfers, prefetches and wasted prefetches of the service's
    moeray equal the in-process replay's; 3 sequences start inside the 50-token steps. With
    synthetic engine hints, which reach the layer actors with each step, likewise, and the
    hints' recall and precision too."""
    from moeray.replay import ReplayConfig, replay_trace
    from moeray.replay.service import replay_through_service

    config = ReplayConfig(
        capacity=8,
        policies=("moeray", "lru"),
        hint_accuracy=hint_accuracy,
        predict=PredictConfig(prefetch_budget=3),
    )
    report, throughput = replay_through_service(
        trace, config, step_tokens=50, window_steps=3, layers_per_actor=4
    )
    served = report.results["moeray"]
    local = replay_trace(trace, replace(config, policies=("moeray",))).results["moeray"]
    assert served.per_layer_hits == local.per_layer_hits
    assert served.stalls == local.stalls
    assert served.transfers == local.transfers
    assert served.per_layer_wasted == local.per_layer_wasted
    assert (served.prefetches, served.prefetch_hits) == (local.prefetches, local.prefetch_hits)
    assert served.transfers_per_token == local.transfers_per_token
    assert served.predictors == local.predictors
    assert ("hints" in served.predictors) == (hint_accuracy is not None)
    assert local.prefetches > 0 and local.wasted_prefetches > 0
    assert (
        report.results["lru"].per_layer_hits
        == replay_trace(trace, ReplayConfig(capacity=8, policies=("lru",)))
        .results["lru"]
        .per_layer_hits
    )
    assert [t.policy for t in throughput] == ["moeray", "lru"]


def test_moeray_layer_actor_killed_mid_replay(ray_local, trace):
    """Layers of the killed actor lose no routing and count none twice; the other actor's
    layers still decide exactly as the whole model does. Every third step comes as msgpack
    (its sequence starts as positions), between the handle's own windows."""
    from moeray import service
    from moeray.traces.wire import encode_step

    ids = np.ascontiguousarray(trace.expert_ids.transpose(1, 0, 2), dtype=np.int32)
    weights = np.ascontiguousarray(trace.weights.transpose(1, 0, 2))
    starts = starts_of(trace)
    handle = service.start(
        service.ServiceConfig(
            num_layers=6,
            num_experts=32,
            top_k=4,
            capacity=8,
            policy="moeray",
            layers_per_actor=3,
            window_steps=2,
            name="svc-moeray-kill",
        )
    )
    try:
        victims = handle.layer_actor_handles()
        for i, lo in enumerate(range(0, trace.num_tokens, 50)):
            if i % 3 == 2:
                handle.submit_msgpack(
                    encode_step(
                        ids[:, lo : lo + 50],
                        weights[:, lo : lo + 50],
                        seq_starts=starts[lo : lo + 50],
                    )
                )
            else:
                handle.submit(
                    ids[:, lo : lo + 50], weights[:, lo : lo + 50], seq_starts=starts[lo : lo + 50]
                )
            if i == 5:
                ray_local.kill(victims[1], no_restart=True)  # layers 3..5
        stats = handle.stats()
    finally:
        handle.shutdown()
    whole = whole_model(trace, 8)
    for s in stats.layers:
        assert s.tokens == trace.num_tokens, f"layer {s.layer} lost or repeated routing"
        assert s.hits + s.stalls == trace.num_tokens * 4
        if s.layer < 3:
            assert s.restarts == 0
            assert (s.hits, s.stalls, s.prefetches, s.wasted_prefetches) == (
                whole.hits[s.layer],
                whole.stalls[s.layer],
                whole.prefetches[s.layer],
                whole.wasted_prefetches[s.layer],
            )
        else:
            assert s.restarts >= 1


@pytest.mark.parametrize("resplit", [[], ["--resplit-every", "48"]], ids=["fixed", "resplit"])
def test_cli_service_backend_serves_moeray(ray_local, tmp_path, resplit):
    """`moeray replay` (service backend) with moeray served by the layer actors: the same
    stall rates as --backend local, and with a capacity re-split (the coordinator's) the same
    re-splits and costs."""
    import json

    from moeray import cli

    full = load_trace(default_trace_path())
    small = tmp_path / "small.npz"
    np.savez(
        small,
        expert_ids=full.expert_ids[:600, :4],
        expert_probs=full.weights[:600, :4],
        seq_offsets=np.array([0, 511, 600]),
        num_experts=np.array(32),
    )
    argv = [
        "replay",
        str(small),
        "--policy",
        "moeray",
        "--policy",
        "belady",
        "--layers-per-actor",
        "2",
        "--step-tokens",
        "64",
        "--window-steps",
        "2",
        *resplit,
    ]
    assert cli.main(argv + ["--json", str(tmp_path / "service.json")]) == 0
    assert cli.main(argv + ["--backend", "local", "--json", str(tmp_path / "local.json")]) == 0
    service_doc = json.loads((tmp_path / "service.json").read_text())
    local_doc = json.loads((tmp_path / "local.json").read_text())
    assert set(service_doc["service"]) == {"moeray"}  # served, with its throughput
    for key in (
        "per_layer_hit_rate",
        "per_layer_stall_rate",
        "per_layer_transfers",
        "wasted_prefetches",
        "prefetches",
        "resplit",
    ):
        assert service_doc["policies"]["moeray"].get(key) == local_doc["policies"]["moeray"].get(
            key
        ), key
    if resplit:
        assert service_doc["policies"]["moeray"]["resplit"]["moved"] > 0
