"""Expert placement in the service, without Ray: the coordinator over ``InProcessTransport``
counts every flushed window into load windows of ``every_tokens`` tokens and re-plans each one
off its submit path; here a test decides when planning runs (``run_in_background``) and what
time it is (``timer``), so every expectation is exact.

What is specified: a placement appears once ``every_tokens`` tokens are routed, not before, and
not by submit itself; versions rise by one per published placement; an unchanged load is
skipped by the gate; a hot expert gains replicas; the windows a stream is cut into change no
decision; a failing planner keeps the last good placement (one log line, one error counted);
``wait_for_placement`` returns the next version or None at its deadline; the msgpack map round
trips; ``PlacementConfig`` names the field it refuses.
"""

from __future__ import annotations

import logging

import msgpack
import numpy as np
import pytest

from moeray.actors.config import ServiceConfig
from moeray.actors.coordinator import Coordinator
from moeray.actors.rebalancer import Rebalancer, wait_for_placement
from moeray.actors.transport import InProcessTransport
from moeray.placement.balancer import (
    LoadBalancer,
    PlacementConfig,
    decode_placement,
    encode_placement,
)
from moeray.placement.placement import Placement, Topology, balancedness
from moeray.placement.planner import place_moeray
from moeray.traces import default_trace_path, load_trace

pytestmark = pytest.mark.pure

LAYERS, EXPERTS, TOP_K = 4, 32, 4


@pytest.fixture(scope="module")
def routing() -> np.ndarray:
    """int32 [layers=4, T=4096, top_k=4]: the bundled gpt-oss-20b slice's first layers."""
    trace = load_trace(default_trace_path())
    ids = trace.expert_ids[:4096, :LAYERS].transpose(1, 0, 2)
    return np.ascontiguousarray(ids, dtype=np.int32)


class Jobs:
    """A background that runs nothing until told: what was queued, and ``run()`` to run it."""

    def __init__(self):
        self.queued = []

    def __call__(self, job):
        self.queued.append(job)

    def run(self) -> int:
        ran = 0
        while self.queued:
            self.queued.pop(0)()
            ran += 1
        return ran


def config(**placement) -> ServiceConfig:
    fields = dict(gpus=4, every_tokens=512)
    fields.update(placement)
    return ServiceConfig(
        num_layers=LAYERS,
        num_experts=EXPERTS,
        top_k=TOP_K,
        policy="lru",
        expert_placement=PlacementConfig(**fields),
    )


def coordinator(cfg: ServiceConfig, background=None, timer=None) -> Coordinator:
    return Coordinator(
        cfg,
        InProcessTransport(cfg),
        timer=timer or (lambda: 0.0),
        run_in_background=background or (lambda job: job()),
    )


def submit(coord: Coordinator, ids: np.ndarray, step_tokens: int = 128) -> None:
    for first in range(0, ids.shape[1], step_tokens):
        coord.add_routing(ids[:, first : first + step_tokens])


def test_a_placement_appears_after_every_tokens_routed_tokens_and_not_by_submit(routing):
    jobs = Jobs()
    coord = coordinator(config(), background=jobs)
    submit(coord, routing[:, :384])  # three windows of 128: less than a load window
    assert jobs.run() == 3 and coord.expert_placement() is None
    assert coord.stats().expert_placement.version == 0
    submit(coord, routing[:, 384:512])  # the window that completes 512 tokens
    # submit queued the planning and returned: nothing is published until the worker runs
    assert coord.expert_placement() is None and len(jobs.queued) == 1
    jobs.run()
    placement = coord.expert_placement()
    assert isinstance(placement, Placement) and placement.version == 1
    assert placement.topology == Topology.for_experts(EXPERTS, gpus=4, redundant=8)
    assert coord.expert_placement(after_version=1) is None
    stats = coord.stats().expert_placement
    assert (stats.version, stats.windows, stats.rebalances, stats.errors) == (1, 1, 1, 0)
    assert stats.slots_moved == LAYERS * placement.num_slots  # the first places every slot
    assert stats.realised_balancedness == ()  # no placement served the first window
    assert len(stats.forecast_balancedness) == LAYERS
    coord.close()


def test_versions_rise_by_one_and_realised_balancedness_scores_the_serving_placement(routing):
    published = []
    coord = Coordinator(
        config(),
        InProcessTransport(config()),
        timer=lambda: 0.0,
        run_in_background=lambda job: job(),
        on_rebalance=published.append,
    )
    submit(coord, routing[:, :512])
    first = coord.expert_placement()
    submit(coord, routing[:, 512:1024])
    result = published[-1]
    counts = LoadBalancer(config().expert_placement, LAYERS, EXPERTS).observe(routing[:, 512:1024])[
        0
    ]
    expected = balancedness(first.gpu_loads(counts))  # window 2's load on version 1, even split
    assert np.allclose(result.realised_balancedness, expected)
    submit(coord, routing[:, 1024:])
    versions = [r.version for r in published]
    assert [r.window for r in published] == list(range(1, 9))
    assert versions[0] == 1 and all(b - a in (0, 1) for a, b in zip(versions, versions[1:]))
    for r in published:
        assert r.skipped == (r.placement is None)  # no errors here
        if r.placement is not None:
            assert r.placement.version == r.version
    stats = coord.stats().expert_placement
    assert stats.version == versions[-1] == stats.rebalances
    assert stats.rebalances + stats.skipped == stats.windows == 8
    assert stats.slots_moved == sum(int(r.moved_slots.sum()) for r in published)


def test_an_unchanged_load_is_skipped_by_the_gate(routing):
    coord = coordinator(config())
    block = routing[:, :512]
    for _ in range(8):  # the same load, window after window: the forecast stops moving
        submit(coord, block)
    stats = coord.stats().expert_placement
    version = stats.version
    assert stats.skipped >= 1
    for _ in range(2):
        submit(coord, block)
    after = coord.stats().expert_placement
    assert after.version == version and after.skipped == stats.skipped + 2
    assert after.slots_moved == stats.slots_moved  # a skipped rebalance moves nothing


def test_a_hot_expert_gains_replicas():
    rng = np.random.default_rng(0)
    # every layer: top-4 of 32 uniformly at random; layer 0: expert 7 on every token
    ids = np.argsort(rng.random((LAYERS, 1024, EXPERTS)), axis=2)[:, :, :TOP_K].astype(np.int32)
    others = np.delete(np.arange(EXPERTS), 7)
    ids[0, :, 1:] = others[np.argsort(rng.random((1024, EXPERTS - 1)), axis=1)[:, : TOP_K - 1]]
    ids[0, :, 0] = 7
    coord = coordinator(config())
    submit(coord, ids)
    placement = coord.expert_placement()
    replicas = placement.replica_counts[0]
    assert replicas[7] == replicas.max() and replicas[7] >= 3
    gpus = set(placement.topology.slot_gpu[placement.logical_to_physical[0, 7, : replicas[7]]])
    assert len(gpus) == min(replicas[7], 4)  # its replicas spread over every GPU


def test_the_windows_a_stream_is_cut_into_change_no_decision(routing):
    tables = []
    for step_tokens in (100, 384, 4096):  # load windows are cut at exact token boundaries
        coord = coordinator(config())
        submit(coord, routing, step_tokens)
        tables.append(coord.expert_placement())
    assert tables[0].version == tables[1].version == tables[2].version
    for other in tables[1:]:
        assert np.array_equal(tables[0].physical_to_logical, other.physical_to_logical)


def test_a_failing_planner_keeps_the_last_good_placement(routing, caplog):
    calls = []

    def planner(load, topology, current, budget, min_gain):
        calls.append(current)
        if len(calls) == 2:
            raise RuntimeError("kernel out of memory\nsecond line")
        return place_moeray(load, topology, current, budget, min_gain)

    now = [10.0]
    rebalancer = Rebalancer(
        PlacementConfig(gpus=4, every_tokens=512, min_gain=0.0, expert_bytes=1000),
        LAYERS,
        EXPERTS,
        run_in_background=lambda job: job(),
        timer=lambda: now[0],
        planner=planner,
    )
    rebalancer.feed(routing[:, :512])
    good = rebalancer.latest()
    now[0] = 12.5
    with caplog.at_level(logging.WARNING, logger="moeray.placement"):
        rebalancer.feed(routing[:, 512:1024])
    assert rebalancer.latest() is good  # version 1 stays
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "load window 2" in lines[0] and "version 1 kept" in lines[0]
    assert "RuntimeError: kernel out of memory" in lines[0]
    stats = rebalancer.stats()
    assert (stats.version, stats.errors, stats.windows) == (1, 1, 2)
    assert stats.last_error == "RuntimeError: kernel out of memory"
    assert stats.age_s == 2.5  # published at 10.0, read at 12.5: the balancer shows its stall
    rebalancer.feed(routing[:, 1024:1536])  # the next window plans from the last good one
    assert calls[2] is good and rebalancer.latest().version == 2
    stats = rebalancer.stats()
    assert stats.bytes_moved == stats.slots_moved * 1000 and stats.age_s == 0.0


def test_wait_for_placement_returns_the_next_version_or_none_at_its_deadline(routing):
    jobs = Jobs()
    now = [0.0]

    def sleep(seconds):  # time passes, and meanwhile the worker gets to run
        now[0] += seconds
        jobs.run()

    coord = coordinator(config(), background=jobs, timer=lambda: now[0])
    submit(coord, routing[:, :512])
    first = wait_for_placement(coord.expert_placement, 0, 5.0, lambda: now[0], sleep)
    assert first.version == 1 and now[0] == pytest.approx(0.01)  # one poll's sleep
    assert wait_for_placement(coord.expert_placement, 0, 5.0, lambda: now[0], sleep) is first
    before = now[0]
    assert wait_for_placement(coord.expert_placement, 1, 0.5, lambda: now[0], sleep) is None
    assert now[0] - before == pytest.approx(0.5)  # waited to its deadline, not past it
    submit(coord, routing[:, 512:1024])
    got = wait_for_placement(coord.expert_placement, 1, 5.0, lambda: now[0], sleep)
    assert got.version == 2  # this window's forecast moved: published, not skipped


def test_the_default_worker_thread_publishes_off_the_submit_thread(routing):
    """The coordinator's own worker thread (no injected background): polled with a deadline."""
    cfg = config()
    coord = Coordinator(cfg, InProcessTransport(cfg))
    try:
        submit(coord, routing[:, :512])
        placement = wait_for_placement(coord.expert_placement, 0, timeout_s=60.0)
        assert placement is not None and placement.version == 1
    finally:
        coord.close()


def test_placement_msgpack_round_trips(routing):
    coord = coordinator(config(expert_bytes=4096))
    submit(coord, routing[:, :1024])
    placement = coord.expert_placement()
    payload = encode_placement(placement)
    plain = msgpack.unpackb(payload)  # what an engine in another language reads
    assert set(plain) == {"version", "physical_to_logical", "num_experts", "topology"}
    assert plain["version"] == placement.version and plain["num_experts"] == EXPERTS
    assert plain["physical_to_logical"] == placement.physical_to_logical.tolist()
    assert plain["topology"] == {
        "num_nodes": 1,
        "gpus_per_node": 4,
        "slots_per_gpu": 10,
        "gpu_memory_bytes": None,
        "expert_bytes": 4096,
    }
    back = decode_placement(payload)
    assert np.array_equal(back.physical_to_logical, placement.physical_to_logical)
    assert (back.topology, back.num_experts, back.version) == (
        placement.topology,
        EXPERTS,
        placement.version,
    )
    assert decode_placement(encode_placement(None)) is None
    assert msgpack.unpackb(encode_placement(None)) is None


def test_placement_off_publishes_nothing(routing):
    cfg = ServiceConfig(num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, policy="lru")
    coord = Coordinator(cfg, InProcessTransport(cfg))
    submit(coord, routing[:, :1024])
    assert coord.expert_placement() is None and coord.stats().expert_placement is None


@pytest.mark.parametrize(
    "fields,error,message",
    [
        ({"gpus": 0}, ValueError, r"^expert_placement\.gpus: expected an int \[1, 65536\]"),
        ({"gpus": "8"}, TypeError, r"^expert_placement\.gpus: expected an int"),
        ({"gpus": 8, "nodes": 3}, ValueError, r"^expert_placement\.nodes: 8 GPUs"),
        ({"gpus": 8, "redundant": 3}, ValueError, r"^expert_placement\.redundant: .*35 slots"),
        ({"gpus": 8, "redundant": -1}, ValueError, r"^expert_placement\.redundant"),
        ({"gpus": 8, "every_tokens": 0}, ValueError, r"^expert_placement\.every_tokens"),
        ({"gpus": 8, "migration_budget": -1}, ValueError, r"^expert_placement\.migration_budget"),
        ({"gpus": 8, "migration_budget": 49}, ValueError, r"at most the 48 slots"),
        ({"gpus": 8, "min_gain": 1.0}, ValueError, r"^expert_placement\.min_gain: .*\[0, 1\)"),
        ({"gpus": 8, "min_gain": float("nan")}, ValueError, r"^expert_placement\.min_gain"),
        ({"gpus": 8, "expert_bytes": 0}, ValueError, r"^expert_placement\.expert_bytes"),
    ],
)
def test_bad_placement_config_fields_are_named(fields, error, message):
    with pytest.raises(error, match=message):
        ServiceConfig(num_layers=2, num_experts=32, top_k=4, expert_placement=fields)


def test_from_dict_reads_the_placement_section():
    cfg = ServiceConfig.from_dict(
        {
            "num_layers": 2,
            "num_experts": 32,
            "top_k": 4,
            "expert_placement": {"gpus": 8, "nodes": 2, "every_tokens": 1024},
        }
    )
    assert cfg.expert_placement == PlacementConfig(gpus=8, nodes=2, every_tokens=1024)
    assert cfg.expert_placement.budget(cfg.expert_placement.topology(32)) == 4  # 48 slots / 10
    assert ServiceConfig(num_layers=2, num_experts=32, top_k=4).expert_placement is None
    with pytest.raises(ValueError, match=r"^expert_placement: unknown field gpu \(expected"):
        ServiceConfig.from_dict(
            {"num_layers": 2, "num_experts": 32, "top_k": 4, "expert_placement": {"gpu": 8}}
        )
    with pytest.raises(ValueError, match=r"^expert_placement\.gpus: required"):
        ServiceConfig.from_dict(
            {"num_layers": 2, "num_experts": 32, "top_k": 4, "expert_placement": {}}
        )
    with pytest.raises(TypeError, match="^expert_placement: expected a PlacementConfig"):
        ServiceConfig(num_layers=2, num_experts=32, top_k=4, expert_placement=8)


def test_serve_placement_flags_build_the_section_and_name_the_flag(tmp_path, capsys):
    """``moeray serve --place-*``: over the config file's section; a bad value fails in the
    caller, before any Ray starts, naming the flag."""
    import json

    from moeray import cli

    path = tmp_path / "service.json"
    fields = {"num_layers": 2, "num_experts": 32, "top_k": 4}
    path.write_text(json.dumps({**fields, "expert_placement": {"gpus": 4, "min_gain": 0.05}}))
    args = cli._parser().parse_args(
        ["serve", "--config", str(path), "--place-gpus", "8", "--place-every", "1024"]
    )
    built = cli._with_placement_flags(cli._load_service_config(args.config), args)
    assert built.expert_placement == PlacementConfig(gpus=8, every_tokens=1024, min_gain=0.05)
    path.write_text(json.dumps(fields))
    for flags, message in (
        (["--place-nodes", "2"], "--place-nodes: expert placement needs --place-gpus N"),
        (["--place-gpus", "8", "--place-redundant", "3"], "--place-redundant: 32 experts + 3"),
        (["--place-gpus", "8", "--migration-budget", "99"], "--migration-budget: expected at"),
    ):
        assert cli.main(["serve", "--config", str(path), *flags]) == 2
        assert f"moeray serve: error: {message}" in capsys.readouterr().err
