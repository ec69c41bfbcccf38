"""``moeray record``: run a Hugging Face transformers MoE model and record its routing.

Every MoE layer of the supported families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3,
gpt-oss) routes through a router module (``MixtralTopKRouter``, ``DeepseekV3TopkRouter``, ...)
whose forward returns ``(router_logits, topk_weights, topk_ids)``: the ids and weights the
experts are then run with, after the family's own rule (softmax then top-k, top-k then softmax,
renormalisation, DeepSeek's group-limited choice and scaling factor). A forward hook on each
router records exactly those, so the trace holds what the model used, not a recomputation.

Needs the ``hf`` extra (torch, transformers >= 5, whose MoE blocks have these router modules).
Nothing is downloaded: MODEL is a local directory, or ``tiny-FAMILY`` for a small randomly
initialised model built from the family's config class.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import numpy as np

from moeray.traces.mtrace import TraceHeader, TraceWriter

__all__ = [
    "FAMILIES",
    "tiny_model",
    "find_routers",
    "RouterRecorder",
    "read_prompts",
    "load_model",
    "record_trace",
]

FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v2", "deepseek-v3", "gpt-oss")

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SMALL = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _require_hf():
    try:
        import torch
        import transformers
    except ImportError:
        raise ValueError(
            "moeray record needs torch and transformers: pip install 'moeray[hf]'"
        ) from None
    return torch, transformers


def _tiny_config(family: str):
    """A family's config, small enough to run in milliseconds: 8 experts, top-2 (DeepSeek:
    a dense first layer, shared experts and grouped routing, as the real models have)."""
    _, tf = _require_hf()
    small = dict(_SMALL)
    if family == "mixtral":
        return tf.MixtralConfig(**small, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2-moe":
        return tf.Qwen2MoeConfig(
            **small,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            norm_topk_prob=False,
        )
    if family == "qwen3-moe":
        return tf.Qwen3MoeConfig(
            **small,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            head_dim=8,
            norm_topk_prob=True,
        )
    if family == "olmoe":
        return tf.OlmoeConfig(**small, num_experts=8, num_experts_per_tok=2)
    deepseek = dict(
        small,
        num_hidden_layers=3,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    )
    if family == "deepseek-v2":
        return tf.DeepseekV2Config(**deepseek, topk_method="group_limited_greedy")
    if family == "deepseek-v3":
        return tf.DeepseekV3Config(**deepseek, norm_topk_prob=True)
    if family == "gpt-oss":
        return tf.GptOssConfig(
            **small, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16
        )
    raise ValueError(
        f"--model: unknown family {family!r}; expected tiny-FAMILY with FAMILY in {FAMILIES}"
    )


def tiny_model(family: str, seed: int = 0, dtype: str = "float32"):
    """A small randomly initialised causal LM of ``family`` (one of FAMILIES), in eval mode."""
    torch, tf = _require_hf()
    config = _tiny_config(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if family == "deepseek-v3":
        # The router's score-correction bias starts at zero; make it matter, as in real weights.
        with torch.no_grad():
            for _, router in find_routers(model):
                router.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model.eval()


def load_model(name_or_path: str, dtype: str = "float32", seed: int = 0):
    """(model, tokenizer or None, model name). A local directory loads with from_pretrained
    (local files only); ``tiny-FAMILY`` builds a random model without a tokenizer."""
    torch, tf = _require_hf()
    if name_or_path.startswith("tiny-") and not Path(name_or_path).exists():
        return tiny_model(name_or_path[len("tiny-") :], seed, dtype), None, name_or_path
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model: '{name_or_path}' is neither a local model directory with config.json "
            f"nor tiny-FAMILY (FAMILY in {', '.join(FAMILIES)}); nothing is downloaded"
        )
    model = tf.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True
    )
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a directory of weights without tokenizer files: fall back to bytes
        tokenizer = None
    return model.eval(), tokenizer, getattr(model.config, "_name_or_path", "") or path.name


def find_routers(model) -> list[tuple[int, object]]:
    """(model layer index, router module) of every MoE layer, in layer order."""
    routers = []
    for name, module in model.named_modules():
        if type(module).__name__.lower().endswith("topkrouter"):
            match = _LAYER_INDEX.search(name + ".")
            if match is None:
                raise ValueError(f"router '{name}' is not under a numbered decoder layer")
            routers.append((int(match.group(1)), module))
    if not routers:
        raise ValueError(
            f"{type(model).__name__}: no MoE router modules (*TopKRouter) found; supported "
            f"families: {', '.join(FAMILIES)} with transformers >= 5"
        )
    return sorted(routers, key=lambda r: r[0])


def _num_experts(router) -> int:
    return int(getattr(router, "num_experts", None) or router.weight.shape[0])


class RouterRecorder:
    """Forward hooks on every router; ``take()`` returns the routing of the last forward pass as
    (ids int64 [layers, T, top_k], weights float32 [layers, T, top_k]) and clears it."""

    def __init__(self, model):
        self.routers = find_routers(model)
        self.layer_ids = tuple(layer for layer, _ in self.routers)
        self.num_experts = _num_experts(self.routers[0][1])
        self.top_k = int(self.routers[0][1].top_k)
        self._captured: dict[int, tuple] = {}
        self._handles = []

    def _hook(self, position: int):
        def hook(module, inputs, output):
            _, weights, ids = output
            self._captured[position] = (
                ids.detach().to("cpu").numpy().astype(np.int64),
                weights.detach().float().to("cpu").numpy(),
            )

        return hook

    def __enter__(self) -> RouterRecorder:
        for position, (_, router) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(position)))
        return self

    def __exit__(self, *_) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._captured) != len(self.routers):
            raise RuntimeError(
                f"{len(self._captured)} of {len(self.routers)} routers ran in the last forward"
            )
        ids = np.stack([self._captured[p][0] for p in range(len(self.routers))])
        weights = np.stack([self._captured[p][1] for p in range(len(self.routers))])
        self._captured.clear()
        return ids, weights


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line, or per JSONL line with a "prompt" or "text" field."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"--prompts: no such file '{path}'") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                line = obj.get("prompt", obj.get("text"))
            except (json.JSONDecodeError, AttributeError):
                line = None
            if not isinstance(line, str):
                raise ValueError(
                    f"--prompts: {path}: line {number}: expected JSON with a prompt or text string"
                )
        prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompts")
    return prompts


def _tokenize(prompt: str, tokenizer, vocab_size: int, max_tokens: int) -> list[int]:
    if tokenizer is not None:
        ids = tokenizer(prompt)["input_ids"]
    else:  # no tokenizer (tiny random models): UTF-8 bytes, folded into the vocabulary
        ids = [b % vocab_size for b in prompt.encode("utf-8")]
    return list(ids[:max_tokens]) or [0]


def record_trace(
    model_name: str,
    prompts: list[str],
    out: str | os.PathLike,
    *,
    max_new_tokens: int = 0,
    max_prompt_tokens: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    progress=None,
) -> tuple[TraceHeader, int]:
    """Runs the model on each prompt (batch 1: prompt i is sequence i) and writes one record for
    its prefill and one per greedily decoded token. Returns the header and the tokens recorded."""
    if max_new_tokens < 0 or max_prompt_tokens < 1:
        raise ValueError("--max-new-tokens >= 0 and --max-prompt-tokens >= 1 expected")
    torch, _ = _require_hf()
    model, tokenizer, name = load_model(model_name, dtype, seed)
    # transformers renamed past_key_values to cache (5.2x); take whichever this version has.
    cache_name = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    tokens = 0
    with RouterRecorder(model) as recorder, torch.no_grad():
        header = TraceHeader(
            num_layers=len(recorder.routers),
            num_experts=recorder.num_experts,
            top_k=recorder.top_k,
            model=name,
            weights_dtype="float32",
            layer_ids=recorder.layer_ids,
            metadata={"recorded_with": "moeray record", "model_type": model.config.model_type},
        )
        with TraceWriter(out, header) as writer:
            for seq, prompt in enumerate(prompts):
                input_ids = torch.tensor(
                    [_tokenize(prompt, tokenizer, model.config.vocab_size, max_prompt_tokens)]
                )
                output = model(input_ids=input_ids, use_cache=True)
                writer.write(*recorder.take(), seq=seq)
                tokens += input_ids.shape[1]
                _advance(progress)
                for _ in range(max_new_tokens):
                    next_id = output.logits[:, -1:].argmax(dim=-1)
                    output = model(
                        input_ids=next_id, use_cache=True, **{cache_name: output[cache_name]}
                    )
                    writer.write(*recorder.take(), seq=seq)
                    tokens += 1
                    _advance(progress)
    return header, tokens


def _advance(progress) -> None:
    if progress is not None:
        progress.advance(1)
