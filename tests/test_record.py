"""``moeray record`` on tiny randomly initialised models of each supported family: the recorded ids
are the top-k of the model's own router logits (``output_router_logits``), chosen by each family's
rule re-implemented here; the recorded trace replays through ``moeray replay``."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("MOERAY_REQUIRE_HF") == "1":  # CI's hf step: a missing torch is a failure
    import torch
    import transformers  # noqa: F401
else:
    torch = pytest.importorskip(
        "torch", reason="moeray record needs torch and transformers (the hf extra)"
    )
    pytest.importorskip(
        "transformers", reason="moeray record needs torch and transformers (the hf extra)"
    )

from moeray import cli  # noqa: E402
from moeray.traces import load_trace  # noqa: E402
from moeray.traces.mtrace import TraceReader  # noqa: E402
from moeray.traces.record import FAMILIES, RouterRecorder, tiny_model  # noqa: E402


def expected_top_k(family: str, logits: torch.Tensor, router) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, weights in that order) per token, from router logits [T, E], by the family's rule."""
    k = router.top_k
    if family in ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe"):
        probs = logits.float().softmax(-1)
        weights, ids = probs.topk(k, dim=-1)
        if family == "mixtral" or getattr(router, "norm_topk_prob", False):
            weights = weights / weights.sum(-1, keepdim=True)
    elif family == "gpt-oss":
        top, ids = logits.topk(k, dim=-1)
        weights = top.softmax(-1)
    else:  # DeepSeek: choose among the best groups only, then scale
        groups, chosen = router.num_group, router.topk_group
        if family == "deepseek-v2":
            scores = logits.float().softmax(-1)
            group_score = scores.view(len(scores), groups, -1).max(-1).values
            choice_scores = scores
        else:
            scores = logits.float().sigmoid()
            choice_scores = scores + router.e_score_correction_bias
            group_score = choice_scores.view(len(scores), groups, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(chosen, dim=-1).indices, True)
        mask = keep.repeat_interleave(scores.shape[1] // groups, dim=1)
        ids = choice_scores.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices
        weights = scores.gather(1, ids)
        if family == "deepseek-v3":
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * router.routed_scaling_factor
    order = ids.argsort(-1)
    return ids.gather(1, order).numpy(), weights.gather(1, order).detach().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_is_the_top_k_of_the_router_logits(family):
    model = tiny_model(family, seed=1)
    input_ids = torch.randint(
        0, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(5)
    )
    with RouterRecorder(model) as recorder, torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
        ids, weights = recorder.take()
    logits = out.router_logits
    assert logits is not None and len(logits) == len(recorder.routers) == ids.shape[0]
    assert ids.shape == (len(recorder.routers), 13, 2)
    if family.startswith("deepseek"):
        assert recorder.layer_ids == (1, 2)  # layer 0 is dense
    for layer, (_, router) in enumerate(recorder.routers):
        want_ids, want_weights = expected_top_k(family, logits[layer].reshape(13, -1), router)
        order = ids[layer].argsort(-1)
        got_ids = np.take_along_axis(ids[layer], order, -1)
        got_weights = np.take_along_axis(weights[layer], order, -1)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_weights, want_weights, rtol=1e-5, atol=1e-6)
    # Random routers still spread tokens over several experts.
    assert len(np.unique(ids)) > 2


def test_record_cli_writes_a_trace_that_replays(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('the quick brown fox\n\n{"prompt": "jumps over the lazy dog"}\nhi\n')
    out = tmp_path / "olmoe.mtrace"
    argv = [
        "record",
        "--model",
        "tiny-olmoe",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
    ]
    assert cli.main(argv) == 0
    prompt_tokens = [len("the quick brown fox"), len("jumps over the lazy dog"), len("hi")]
    total = sum(prompt_tokens) + 3 * 4
    assert f"{total:,} tokens x 2 MoE layers x top-2, 8 experts" in capsys.readouterr().out
    with TraceReader(out) as reader:
        assert (reader.header.model, reader.header.weights_dtype) == ("tiny-olmoe", "float32")
        records = list(reader)
    # per prompt: the prefill, then one record per decoded token, positions continuing
    assert [r.num_tokens for r in records] == [19, 1, 1, 1, 1, 23, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert records[1].positions.tolist() == [19] and records[4].positions.tolist() == [22]
    trace = load_trace(out)
    assert trace.num_tokens == total and trace.seq_offsets.tolist() == [0, 23, 50, 56]
    assert (
        cli.main(["replay", str(out), "--backend", "local", "--capacity", "0.5", "--policy", "lru"])
        == 0
    )
    assert "olmoe.mtrace: 56 tokens x 2 layers x top-2, 8 experts" in capsys.readouterr().out


def test_record_cli_errors_exit_2(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    for model in ("tiny-nonesuch", str(tmp_path)):
        assert (
            cli.main(
                [
                    "record",
                    "--model",
                    model,
                    "--prompts",
                    str(prompts),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--model" in err[0], err
