"""``moeray.integrations.transformers.offload`` on tiny random models of every family: logits and
greedy generations bit-identical to the unoffloaded model's, each layer's bank equal to the
session's hot set, bad input refused before any weight moves, and trace-forced routing."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("MOERAY_REQUIRE_HF") == "1":  # CI's hf step: a missing torch is a failure
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch", reason="offload needs torch and transformers (hf extra)")
    transformers = pytest.importorskip(
        "transformers", reason="offload needs torch and transformers (the hf extra)"
    )

from moeray.actors.config import ServiceConfig  # noqa: E402
from moeray.integrations.transformers import (  # noqa: E402
    OffloadedExperts,
    force_routing,
    offload,
)
from moeray.policy.predict import PredictConfig  # noqa: E402
from moeray.traces import Trace  # noqa: E402
from moeray.traces.record import FAMILIES, RouterRecorder, tiny_model  # noqa: E402

VOCAB = 256  # record's tiny models


def prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits


def generate(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(inputs, max_new_tokens=6, do_sample=False)


def experts_modules(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_generations_are_bit_identical(family, tmp_path):
    policy = "moeray" if FAMILIES.index(family) % 2 == 0 else "lru"
    ref, model = tiny_model(family), tiny_model(family)
    handle = offload(model, capacity=3, policy=policy, shards=tmp_path / "shards")
    assert model.moeray_offload is handle
    assert all(isinstance(m, OffloadedExperts) for m in experts_modules(model))
    for batch, length, seed in ((3, 9, 0), (1, 5, 1), (2, 1, 2)):
        inputs = prompts(batch, length, seed)
        assert torch.equal(run(ref, inputs), run(model, inputs)), (batch, length)
    inputs = prompts(2, 7, 3)
    assert torch.equal(generate(ref, inputs), generate(model, inputs))
    stats = handle.stats()
    assert stats.stalls > 0 and stats.batches == 3 + 6
    # every expert moved is counted, and each layer holds its hot set, no more
    assert stats.bytes_moved % handle.shape.expert_bytes == 0 and stats.bytes_moved > 0
    for position in range(len(handle.layers)):
        resident = handle.resident(position)
        assert resident == handle.session.hot(position).tolist()
        assert len(resident) <= 3
    handle.close()


def test_bfloat16_and_a_demand_policy_are_exact_too(tmp_path):
    ref, model = tiny_model("olmoe", dtype="bfloat16"), tiny_model("olmoe", dtype="bfloat16")
    offload(model, capacity=2, policy="lfu", shards=tmp_path)
    inputs = prompts(4, 6, 5)
    assert torch.equal(run(ref, inputs), run(model, inputs))
    assert torch.equal(generate(ref, inputs), generate(model, inputs))


def test_predictive_policy_prefetches_the_next_layer(tmp_path):
    ref, model = tiny_model("mixtral"), tiny_model("mixtral")
    handle = offload(model, capacity=4, policy="moeray", shards=tmp_path)
    inputs = prompts(1, 4, 7)
    with torch.no_grad():
        expected = ref.generate(inputs, max_new_tokens=24, do_sample=False)
        got = model.generate(inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(expected, got)
    s = handle.stats()
    assert s.prefetches > 0
    assert s.prefetch_in_time + s.prefetch_late + s.prefetch_unused <= s.prefetches
    # a demand policy prefetches nothing
    lru = tiny_model("mixtral")
    h2 = offload(lru, capacity=4, policy="lru", shards=tmp_path)
    generate(lru, inputs)
    assert h2.stats().prefetches == 0


def test_budget_bytes_sets_capacity_and_a_shards_directory_is_reused(tmp_path):
    ref, model = tiny_model("qwen3-moe"), tiny_model("qwen3-moe")
    expert_bytes = 3 * 32 * 32 * 4  # gate, up, down of 32 x 32 in float32
    layers = 2
    handle = offload(model, budget_bytes=layers * 5 * expert_bytes + 7, shards=tmp_path)
    assert handle.shape.expert_bytes == expert_bytes
    assert handle.session.config.capacity == (5, 5)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == layers
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = tiny_model("qwen3-moe")
    offload(again, capacity=2, policy="lru", shards=tmp_path)  # the same weights: reused
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    inputs = prompts(2, 5, 9)
    assert torch.equal(run(ref, inputs), run(again, inputs))
    assert torch.equal(run(ref, inputs), run(model, inputs))


def assert_untouched(model, reference, directory=None):
    """Still the original experts, still computing the reference's logits, nothing written."""
    assert not any(isinstance(m, OffloadedExperts) for m in model.modules())
    assert not hasattr(model, "moeray_offload")
    inputs = prompts(2, 4, 11)
    assert torch.equal(run(model, inputs), run(reference, inputs))
    if directory is not None:
        assert not list(directory.glob("*.safetensors"))


def test_bad_input_is_refused_before_any_weight_moves(tmp_path):
    ref, model = tiny_model("mixtral"), tiny_model("mixtral")
    out = tmp_path / "new"
    expert_bytes = 3 * 64 * 32 * 4
    cases = [
        (dict(budget_bytes=2 * 2 * expert_bytes - 1), "budget_bytes: .* below one layer's top_k"),
        (dict(capacity=1), "capacity: each layer must hold"),
        (dict(capacity=9), "capacity: each layer must hold"),
        (dict(capacity=(2, 2, 2)), "capacity: expected an int or 2 ints"),
        (dict(capacity=2, budget_bytes=10**9), "give exactly one"),
        (dict(), "give exactly one"),
        (dict(capacity=2, policy="fifo"), "policy"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            offload(model, shards=out, **kwargs)
        assert "\n" not in str(info.value)
        assert not out.exists()
    with pytest.raises(ValueError, match="shards: a directory"):
        offload(model, capacity=2)
    assert_untouched(model, ref, tmp_path)


def test_unknown_families_are_refused(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    dense = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="model: unknown family 'llama'"):
        offload(dense, capacity=2, shards=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_shards_directory_of_another_model_is_refused(tmp_path):
    offload(tiny_model("mixtral", seed=1), capacity=2, shards=tmp_path / "seed1")
    offload(tiny_model("qwen3-moe"), capacity=2, shards=tmp_path / "qwen3")
    offload(tiny_model("mixtral", dtype="bfloat16"), capacity=2, shards=tmp_path / "bf16")
    offload(tiny_model("gpt-oss"), capacity=2, shards=tmp_path / "gpt-oss")
    ref, model = tiny_model("mixtral"), tiny_model("mixtral")
    cases = {
        "seed1": "layer 0 expert 0 gate holds other weights",
        "qwen3": r"layer 0 holds \(experts, layout, dtype, hidden, intermediate\) \(8, 'swiglu', "
        r"'F32', 32, 32\), the model \(8, 'swiglu', 'F32', 32, 64\)",
        "bf16": "'BF16'.* the model .*'F32'",
        "gpt-oss": "'gpt-oss'",
    }
    for name, message in cases.items():
        before = sorted(p.stat().st_mtime_ns for p in (tmp_path / name).iterdir())
        with pytest.raises(ValueError, match=message) as info:
            offload(model, capacity=2, shards=tmp_path / name)
        assert "\n" not in str(info.value) and str(info.value).startswith("shards: ")
        assert sorted(p.stat().st_mtime_ns for p in (tmp_path / name).iterdir()) == before
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="shards: "):
        offload(model, capacity=2, shards=broken)
    assert_untouched(model, ref)


def test_a_service_whose_shape_differs_is_refused(tmp_path):
    class FakeHandle:  # the session reads only .config before attaching
        config = ServiceConfig(num_layers=2, num_experts=16, top_k=2, capacity=4)

    ref, model = tiny_model("mixtral"), tiny_model("mixtral")
    with pytest.raises(ValueError, match="service: its config has 2 layers, 16 experts"):
        offload(model, service=FakeHandle(), shards=tmp_path)
    with pytest.raises(ValueError, match="service: the service's config decides capacity"):
        offload(model, service=FakeHandle(), capacity=2, shards=tmp_path)
    assert_untouched(model, ref, tmp_path)


def trace_for(num_layers=2, num_experts=8, top_k=2, tokens=50, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack(
        [
            np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)])
            for _ in range(tokens)
        ]
    ).astype(np.uint8)
    weights = rng.random(ids.shape).astype(np.float32)
    return Trace(ids, weights, np.array([0, tokens], np.int64), num_experts, "test")


@pytest.mark.parametrize("family", ["mixtral", "gpt-oss"])
def test_forced_routing_takes_the_traces_ids_token_after_token(family, tmp_path):
    trace = trace_for()
    ref, model = tiny_model(family), tiny_model(family)
    offload(model, capacity=2, policy="lru", shards=tmp_path)
    with force_routing(ref, trace, start=45) as f_ref, force_routing(model, trace, start=45) as f:
        inputs = prompts(2, 5, 13)  # 10 tokens: rows 45..49 then 0..4 of the trace
        with RouterRecorder(model) as recorder:
            assert torch.equal(run(ref, inputs), run(model, inputs))
            ids, _ = recorder.take()
        rows = np.r_[45:50, 0:5]
        assert np.array_equal(ids, trace.expert_ids[rows].transpose(1, 0, 2))
        assert f.tokens == f_ref.tokens == 10
    with RouterRecorder(model) as recorder:  # hooks removed: the model's own routing again
        run(model, inputs)
        ids, _ = recorder.take()
    assert not np.array_equal(ids, trace.expert_ids[rows].transpose(1, 0, 2))


def test_forced_routing_refuses_a_trace_of_another_shape():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="trace: 16 experts top-2, the model 8 top-2"):
        force_routing(model, trace_for(num_experts=16))
    with pytest.raises(ValueError, match="trace: 1 layers, the model has 2 MoE layers"):
        force_routing(model, trace_for(num_layers=1))


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_other_experts_implementations_are_exact(implementation, tmp_path):
    ref, model = tiny_model("gpt-oss"), tiny_model("gpt-oss")
    for m in (ref, model):
        m.config._experts_implementation = implementation
    offload(model, capacity=3, policy="lru", shards=tmp_path)
    inputs = prompts(3, 7, 17)
    assert torch.equal(run(ref, inputs), run(model, inputs))
    assert torch.equal(generate(ref, inputs), generate(model, inputs))


def test_a_forward_that_fails_midway_leaves_the_model_serving(tmp_path):
    """An exception after the first MoE layers (the engine's forward failed): the next forward
    starts a new batch and stays exact."""
    ref, model = tiny_model("qwen3-moe"), tiny_model("qwen3-moe")
    handle = offload(model, capacity=3, policy="moeray", shards=tmp_path)
    layers = model.model.layers
    last = layers[-1]

    def fail(*args, **kwargs):
        raise RuntimeError("the engine's forward failed")

    hook = last.register_forward_pre_hook(lambda *a: fail())
    with pytest.raises(RuntimeError, match="forward failed"):
        run(model, prompts(2, 4, 7))
    hook.remove()
    assert handle.session.aborted_batches == 0  # the failed batch is still open here
    inputs = prompts(2, 5, 8)
    assert torch.equal(run(ref, inputs), run(model, inputs))
    assert handle.session.aborted_batches == 1
    assert torch.equal(generate(ref, inputs), generate(model, inputs))
    handle.close()


def tiny_service_config(name: str, **kw):
    """A service of record's tiny mixtral's shape (2 layers of 8 experts, top-2) on the
    predictive policy, one layer actor: service_helpers.config with ``kw`` on top."""
    from service_helpers import config

    shape = dict(num_layers=2, num_experts=8, top_k=2, capacity=3, layers_per_actor=2)
    return config(name, **{**shape, "policy": "moeray", **kw})


def test_a_service_re_split_is_refused(tmp_path):
    from moeray.policy.predict import PredictConfig
    from moeray.policy.split import SplitConfig

    class FakeHandle:
        config = tiny_service_config("svc-split", predict=PredictConfig(split=SplitConfig()))

    ref, model = tiny_model("mixtral"), tiny_model("mixtral")
    with pytest.raises(ValueError, match=r"service: its capacity re-split \(predict.split\)"):
        offload(model, service=FakeHandle(), shards=tmp_path)
    assert_untouched(model, ref, tmp_path)


def test_an_offload_attached_to_a_running_service_reports_and_stays_exact(ray_local, tmp_path):
    """offload(service=handle) on a real local Ray: the session starts from the service's
    config, every token the model routes reaches the layer actors, and the model stays exact."""
    from moeray import service

    ref, model = tiny_model("mixtral"), tiny_model("mixtral")
    handle = service.start(tiny_service_config("svc-offload"))
    offloaded = None
    try:
        # another engine's routing first: the offload's session starts from what it taught
        rng = np.random.default_rng(0)
        other = np.stack([rng.permutation(8)[:2] for _ in range(2 * 64)]).reshape(2, 64, 2)
        handle.submit(other.astype(np.int32))
        handle.flush()
        offloaded = offload(model, service=handle, shards=tmp_path / "shards")
        session = offloaded.session
        assert session.link is not None and session.config.capacity == (3, 3)
        assert [first for _, first in session.loaded_tables] == [0]
        tokens = 64
        for batch, length, seed in ((3, 9, 0), (1, 5, 1)):
            inputs = prompts(batch, length, seed)
            assert torch.equal(run(ref, inputs), run(model, inputs))
            tokens += batch * length
        inputs = prompts(2, 7, 3)
        assert torch.equal(generate(ref, inputs), generate(model, inputs))
        tokens += 2 * 7 + 2 * 5  # the prompt, then one token per row for 5 more steps
        for position in range(2):
            assert offloaded.resident(position) == sorted(session.hot(position).tolist())
        assert session.link.flush()
        handle.flush()
        stats = handle.stats()
        assert session.link.stats().reported_tokens == tokens - 64
        assert [layer.tokens for layer in stats.layers] == [tokens, tokens]
        assert session.link.stats().failures == 0
    finally:
        if offloaded is not None:
            offloaded.close()
        handle.shutdown()


def test_without_prefetch_the_policy_plans_none(tmp_path):
    # prefetch=False: the session's budget is 0, so every hot expert is in its bank (none is
    # planned hot and left unloaded), and the model stays exact
    ref, model = tiny_model("mixtral"), tiny_model("mixtral")
    handle = offload(model, capacity=4, policy="moeray", shards=tmp_path, prefetch=False)
    assert handle.session.config.predict.prefetch_budget == 0
    layers = range(len(handle.layers))
    unloaded = []  # after each forward: hot experts whose weights are not in their bank
    model.register_forward_hook(
        lambda *_: unloaded.append(
            sum(len(set(handle.session.hot(p).tolist()) - set(handle.resident(p))) for p in layers)
        )
    )
    inputs = prompts(1, 4, 7)
    with torch.no_grad():  # as long as the test above, where the policy prefetches
        expected = ref.generate(inputs, max_new_tokens=24, do_sample=False)
        got = model.generate(inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(expected, got)
    s = handle.stats()
    assert s.prefetches == 0 and s.stalls > 0
    assert len(unloaded) == 24 and not any(unloaded)
    handle.close()
    # a budget given with prefetch=False contradicts it: refused before any weight moves
    other = tiny_model("mixtral")
    with pytest.raises(ValueError, match="prefetch=False with predict.prefetch_budget=2"):
        offload(
            other,
            capacity=4,
            shards=tmp_path,
            prefetch=False,
            predict=PredictConfig(prefetch_budget=2),
        )
    with pytest.raises(ValueError, match="prefetch: expected True or False"):
        offload(other, capacity=4, shards=tmp_path, prefetch="yes")

    class Service:  # a service's handle as offload reads it: its config
        config = ServiceConfig(num_layers=2, num_experts=8, top_k=2, capacity=4)

    with pytest.raises(ValueError, match="prefetch=False: the service plans 2 prefetches"):
        offload(other, shards=tmp_path, service=Service(), prefetch=False)
    assert not any(isinstance(m, OffloadedExperts) for m in other.modules())
