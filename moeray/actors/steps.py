"""A step's checks and the coalescing of steps into windows, shared by ``ServiceHandle`` (in the
engine's process) and ``Coordinator``.

``check_step`` validates one step (routing of every layer for T tokens, sequence starts, engine
hints) before anything is buffered; ``WindowBuffer`` holds consecutive checked steps until their
window is due (``window_steps`` steps, or ``window_ms`` since it opened, by an injected clock)
and hands them over as one ``Window``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moeray.actors.config import ServiceConfig
from moeray.policy._validate import as_weights
from moeray.policy.scheduler import ExpertBatches, schedule

__all__ = [
    "Step",
    "Window",
    "WindowBuffer",
    "check_hints",
    "check_routing",
    "check_seq_starts",
    "check_step",
    "check_window",
    "join_hints",
    "schedule_step",
]


@dataclass(frozen=True)
class Step:
    """A checked step: expert_ids int32 [num_layers, T, top_k]; weights float32 of the same
    shape or None; seq_starts bool [T] with a True, or None; hints int32 [num_layers, T, h] or
    None."""

    expert_ids: np.ndarray
    weights: np.ndarray | None = None
    seq_starts: np.ndarray | None = None
    hints: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[1]


def routing_bytes(config: ServiceConfig, tokens: int, hint_width: int) -> int:
    """Bytes of ``tokens`` tokens of routing as a window buffers them: ids at the config's ids
    dtype, hints int32 ``hint_width`` wide, one byte per token for sequence starts."""
    per_token = config.num_layers * (config.top_k * config.ids_dtype().itemsize + 4 * hint_width)
    return tokens * (per_token + 1)


def _check_bytes(config: ServiceConfig, tokens: int, hints, what: str) -> None:
    width = 0 if hints is None else hints.shape[2]
    size = routing_bytes(config, tokens, width)
    if size > config.max_window_bytes:
        raise ValueError(
            f"{what}: {tokens:,} tokens with hints {width} wide take {size:,} bytes, more than "
            f"ServiceConfig.max_window_bytes={config.max_window_bytes:,}"
        )


def check_step(
    config: ServiceConfig, expert_ids, weights=None, seq_starts=None, hints=None
) -> Step:
    """One step checked against ``config`` (see ``check_routing``, ``check_seq_starts``,
    ``check_hints``; its bytes within ``max_window_bytes``). TypeError / ValueError naming the
    argument; nothing changes on failure."""
    ids, w = check_routing(expert_ids, weights, config)
    step = Step(
        ids,
        w,
        check_seq_starts(seq_starts, ids.shape[1]),
        check_hints(hints, config, ids.shape[1]),
    )
    _check_bytes(config, ids.shape[1], step.hints, "step")
    return step


def check_window(config: ServiceConfig, expert_ids, steps, seq_starts=None, hints=None):
    """A window of ``steps`` coalesced steps as a client sends it to the coordinator (``Window``'s
    fields): expert_ids int [num_layers, T, top_k], T at most steps x max_step_tokens, each id
    in [0, num_experts); steps an int in [1, window_steps]; seq_starts, hints as for a step.
    Returns (expert_ids, seq_starts, hints) checked (``check_seq_starts``, ``check_hints``).
    TypeError / ValueError naming the argument: the coordinator's entry for any Ray client."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
    if not 1 <= steps <= config.window_steps:
        raise ValueError(f"steps: expected an int in [1, {config.window_steps}], got {steps}")
    if not isinstance(expert_ids, np.ndarray):
        raise TypeError(f"expert_ids: expected a numpy array, got {type(expert_ids).__name__}")
    if expert_ids.dtype.kind not in "iu":
        raise TypeError(f"expert_ids: expected an integer dtype, got {expert_ids.dtype}")
    shape = (config.num_layers, config.top_k)
    if expert_ids.ndim != 3 or (expert_ids.shape[0], expert_ids.shape[2]) != shape:
        raise ValueError(
            f"expert_ids: expected shape [num_layers={config.num_layers}, T, "
            f"top_k={config.top_k}], got {expert_ids.shape}"
        )
    if expert_ids.shape[1] > steps * config.max_step_tokens:
        raise ValueError(
            f"expert_ids: {expert_ids.shape[1]:,} tokens in {steps} steps exceed "
            f"ServiceConfig.max_step_tokens={config.max_step_tokens:,} per step"
        )
    if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= config.num_experts):
        raise ValueError(f"expert_ids: every id must be in [0, {config.num_experts})")
    num_tokens = expert_ids.shape[1]
    checked = (
        expert_ids,
        check_seq_starts(seq_starts, num_tokens),
        check_hints(hints, config, num_tokens),
    )
    _check_bytes(config, num_tokens, checked[2], "window")
    return checked


def check_routing(expert_ids, weights, config: ServiceConfig):
    """A step's routing as int32 [num_layers, T, top_k] ids and float32 weights (or None).

    Raises TypeError / ValueError naming the argument; nothing is changed on failure."""
    if not isinstance(expert_ids, np.ndarray):
        raise TypeError(f"expert_ids: expected a numpy array, got {type(expert_ids).__name__}")
    if expert_ids.ndim != 3 or expert_ids.shape[0] != config.num_layers:
        raise ValueError(
            f"expert_ids: expected shape [num_layers={config.num_layers}, T, top_k], "
            f"got {expert_ids.shape}"
        )
    if expert_ids.shape[2] != config.top_k:
        raise ValueError(f"expert_ids: expected top_k={config.top_k}, got {expert_ids.shape[2]}")
    if expert_ids.shape[1] > config.max_step_tokens:
        raise ValueError(
            f"expert_ids: {expert_ids.shape[1]:,} tokens in one step exceed the limit "
            f"ServiceConfig.max_step_tokens={config.max_step_tokens:,}"
        )
    if expert_ids.dtype.kind not in "iu":
        raise TypeError(f"expert_ids: expected an integer dtype (int32), got {expert_ids.dtype}")
    if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= config.num_experts):
        raise ValueError(f"expert_ids: every id must be in [0, {config.num_experts})")
    ids = np.ascontiguousarray(expert_ids, dtype=np.int32)
    if weights is None:
        return ids, None
    w = as_weights(weights, ids.shape)
    if not np.isfinite(w).all():
        raise ValueError("weights: every weight must be finite (no NaN or inf)")
    return ids, w


def check_seq_starts(seq_starts, num_tokens: int) -> np.ndarray | None:
    """seq_starts: bool [T] (True where a token begins a sequence) or None; returned as a bool
    array, or None when no token begins one. TypeError / ValueError naming the argument."""
    if seq_starts is None:
        return None
    if not isinstance(seq_starts, np.ndarray):
        raise TypeError(
            f"seq_starts: expected a numpy bool array or None, got {type(seq_starts).__name__}"
        )
    if seq_starts.dtype != np.bool_:
        raise TypeError(f"seq_starts: expected dtype bool, got {seq_starts.dtype}")
    if seq_starts.shape != (num_tokens,):
        raise ValueError(f"seq_starts: expected shape [T={num_tokens}], got {seq_starts.shape}")
    return seq_starts if seq_starts.any() else None


def check_hints(hints, config: ServiceConfig, num_tokens: int) -> np.ndarray | None:
    """hints: None, or an engine's predicted experts of each token at each layer, int
    [num_layers, T, h], 1 <= h <= num_experts (a wider hint names no more experts, and a window
    pads its steps' hints to the widest), each in [-1, num_experts) (-1: no hint; see
    ``moeray.policy.predict``, "Engine hints"), which only ``moeray`` reads; returned as int32.
    TypeError / ValueError naming the argument."""
    if hints is None:
        return None
    if not config.entry.predictive:
        raise ValueError(
            f"hints: only the moeray policy reads engine hints, this service runs {config.policy!r}"
        )
    if not isinstance(hints, np.ndarray):
        raise TypeError(
            f"hints: expected a numpy integer array or None, got {type(hints).__name__}"
        )
    if hints.dtype.kind not in "iu":
        raise TypeError(f"hints: expected an integer dtype, got {hints.dtype}")
    if hints.ndim != 3 or hints.shape[:2] != (config.num_layers, num_tokens) or hints.shape[2] < 1:
        raise ValueError(
            f"hints: expected shape [num_layers={config.num_layers}, T={num_tokens}, "
            f"h >= 1], got {hints.shape}"
        )
    if hints.shape[2] > config.num_experts:
        raise ValueError(
            f"hints: width {hints.shape[2]:,} exceeds num_experts={config.num_experts} (the "
            "most distinct experts a hint can name)"
        )
    if hints.size and (hints.min() < -1 or hints.max() >= config.num_experts):
        raise ValueError(f"hints: every id must be in [0, {config.num_experts}) or -1 (no hint)")
    return np.ascontiguousarray(hints, dtype=np.int32)


def join_hints(parts: list[tuple[int, np.ndarray | None]]) -> np.ndarray | None:
    """The hints of consecutive steps, (tokens, validated hints or None) each, as one int32
    [num_layers, tokens, h] array, h the widest step's, -1 where a step had fewer or none; None
    when no step had any."""
    given = [h for _, h in parts if h is not None]
    if not given:
        return None
    out = np.full(
        (given[0].shape[0], sum(n for n, _ in parts), max(h.shape[2] for h in given)),
        -1,
        dtype=np.int32,
    )
    at = 0
    for n, h in parts:
        if h is not None:
            out[:, at : at + n, : h.shape[2]] = h
        at += n
    return out


def schedule_step(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> list[ExpertBatches]:
    """Each layer's routing of a checked step grouped by expert (``schedule`` per layer)."""
    return [schedule(ids[layer], weights[layer], num_experts) for layer in range(len(ids))]


@dataclass(frozen=True)
class Window:
    """Consecutive steps coalesced: expert_ids [num_layers, T, top_k] in the config's ids dtype
    (``ServiceConfig.ids_dtype``), steps: how many submits, seq_starts bool [T] with a True or
    None, hints int32 [num_layers, T, h] (narrower steps padded with -1) or None."""

    expert_ids: np.ndarray
    steps: int
    seq_starts: np.ndarray | None
    hints: np.ndarray | None


class WindowBuffer:
    """Checked routing not yet sent, until its window is due. timer: seconds, monotonic."""

    def __init__(self, config: ServiceConfig, timer: Callable[[], float] = time.monotonic):
        self._config = config
        self._timer = timer
        self._ids: list[np.ndarray] = []
        self._starts: list[np.ndarray | None] = []
        self._hints: list[tuple[int, np.ndarray | None]] = []
        self.steps = 0
        self.opened: float | None = None  # when the first step of the open window came
        self._tokens = 0
        self._width = 0  # the widest step's hints: the window pads every step's to it
        self._hint_cells = 0  # [layer, token, hint] cells the steps' own hints hold

    def __bool__(self) -> bool:
        return self.steps > 0

    def fits(self, ids: np.ndarray, hints: np.ndarray | None = None) -> bool:
        """Whether a checked step (ids [num_layers, T, top_k], hints or None) may join the open
        window: the window stays within ``max_window_bytes``, and padding every step's hints to
        the widest does not more than double their own cells. An empty window takes any
        checked step."""
        if not self.steps:
            return True
        tokens = self._tokens + ids.shape[1]
        width = max(self._width, 0 if hints is None else hints.shape[2])
        cells = self._hint_cells + (0 if hints is None else hints[0].size)
        if routing_bytes(self._config, tokens, width) > self._config.max_window_bytes:
            return False
        return tokens * width <= 2 * cells

    def add(self, ids: np.ndarray, steps: int = 1, seq_starts=None, hints=None) -> None:
        """Buffers checked routing (int [num_layers, T, top_k]) of ``steps`` submits, its
        checked sequence starts and hints (or None)."""
        if self.opened is None:
            self.opened = self._timer()
        self._ids.append(ids.astype(self._config.ids_dtype(), copy=False))
        self._starts.append(seq_starts)
        self._hints.append((ids.shape[1], hints))
        self.steps += steps
        self._tokens += ids.shape[1]
        if hints is not None:
            self._width = max(self._width, hints.shape[2])
            self._hint_cells += hints[0].size

    def due(self) -> bool:
        """``window_steps`` steps are in, or the window is ``window_ms`` old."""
        if self.steps >= self._config.window_steps:
            return True
        ms = self._config.window_ms
        return (
            ms is not None
            and self.opened is not None
            and ((self._timer() - self.opened) * 1e3 >= ms)
        )

    def take(self) -> Window | None:
        """The open window, emptied (None when nothing is buffered)."""
        if not self.steps:
            return None
        ids = self._ids[0] if len(self._ids) == 1 else np.concatenate(self._ids, axis=1)
        starts = None
        if any(s is not None for s in self._starts):
            starts = np.concatenate(
                [
                    np.zeros(part.shape[1], dtype=bool) if s is None else s
                    for part, s in zip(self._ids, self._starts)
                ]
            )
            starts = starts if starts.any() else None
        window = Window(np.ascontiguousarray(ids), self.steps, starts, join_hints(self._hints))
        self._ids, self._starts, self._hints = [], [], []
        self.steps = 0
        self.opened = None
        self._tokens = self._width = self._hint_cells = 0
        return window
