"""``moeray trace info``: the shape of a trace, each layer's expert load and how much a token's
experts repeat the previous token's, computed in one streaming pass (constant memory for moeray
trace files)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeray.traces.loading import empty_trace_error, load_trace, salvage_hint, trace_kind
from moeray.traces.mtrace import SalvageReport, TraceFormatError, TraceReader
from moeray.traces.trace import TraceNotFoundError

__all__ = ["MAX_LOAD_COUNTERS", "TraceSummary", "summarize_trace", "format_summary", "plot_load"]

# The load table holds num_layers x num_experts counters, and --json writes each; a header
# declaring more (a 154-byte file may declare 2^31 - 1 experts) is refused before allocating.
MAX_LOAD_COUNTERS = 2**20
_SLICE_IDS = 2**20  # ids counted at once: a few int64 copies of them, 8 MiB each


@dataclass(frozen=True)
class TraceSummary:
    """load: int64 [num_layers, num_experts], tokens routed to each expert; overlap_pairs: int64
    [num_layers], the summed count of a token's experts also chosen by the previous token of the
    same sequence; pairs: how many (token, previous token) pairs there were."""

    name: str
    model: str
    num_tokens: int
    num_layers: int
    num_experts: int
    top_k: int
    num_sequences: int
    num_records: int
    has_weights: bool
    layer_ids: tuple[int, ...] | None
    load: np.ndarray
    overlap_pairs: np.ndarray
    pairs: int

    @property
    def max_over_mean_load(self) -> np.ndarray:
        """float [num_layers]: the busiest expert's load over the mean load (1 = balanced)."""
        mean = self.load.mean(axis=1)
        return np.divide(self.load.max(axis=1), mean, out=np.zeros(self.num_layers), where=mean > 0)

    @property
    def previous_token_overlap(self) -> np.ndarray:
        """float [num_layers]: the fraction of a token's experts the previous token also chose."""
        return self.overlap_pairs / max(self.pairs * self.top_k, 1)

    @property
    def random_overlap(self) -> float:
        """The same fraction for experts drawn uniformly at random: top_k / num_experts."""
        return self.top_k / self.num_experts

    def to_json(self) -> dict:
        return {
            "trace": self.name,
            "model": self.model,
            "tokens": self.num_tokens,
            "layers": self.num_layers,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "sequences": self.num_sequences,
            "records": self.num_records,
            "weights": self.has_weights,
            "layer_ids": list(self.layer_ids) if self.layer_ids else None,
            "load": self.load.tolist(),
            "max_over_mean_load": self.max_over_mean_load.tolist(),
            "previous_token_overlap": self.previous_token_overlap.tolist(),
            "random_overlap": self.random_overlap,
        }


def _steps(
    path: Path, progress, salvage: bool, on_salvage
) -> Iterator[tuple[np.ndarray, int, dict]]:
    """(ids [layers, T, top_k], sequence id, facts) per record; facts once, on the first step.
    A moeray trace holding no tokens raises at its end; one salvaged reports before it."""
    if trace_kind(path) == "mtrace":
        with TraceReader(path, salvage=salvage) as reader:
            h = reader.header
            facts = dict(
                model=h.model,
                num_layers=h.num_layers,
                num_experts=h.num_experts,
                top_k=h.top_k,
                has_weights=h.weights_dtype is not None,
                layer_ids=h.layer_ids,
            )
            yield None, -1, facts
            try:
                for record in reader:
                    if progress is not None:
                        progress.advance(record.num_tokens)
                    yield record.expert_ids, record.seq, {}
            except TraceFormatError as exc:
                raise salvage_hint(exc, reader.tokens_read) from None
            report = reader.salvage_report()
        if report.tokens_kept == 0:
            raise empty_trace_error(path, report)
        if salvage and on_salvage is not None:
            on_salvage(report)
        return
    trace = load_trace(path, salvage=salvage)
    yield (
        None,
        -1,
        dict(
            model="",
            num_layers=trace.num_layers,
            num_experts=trace.num_experts,
            top_k=trace.top_k,
            has_weights=trace.weights is not None,
            layer_ids=None,
        ),
    )
    for seq in range(trace.num_sequences):
        start, stop = trace.seq_offsets[seq], trace.seq_offsets[seq + 1]
        if progress is not None:
            progress.advance(int(stop - start))
        yield trace.expert_ids[start:stop].transpose(1, 0, 2), seq, {}


def _tally(
    load: np.ndarray, overlap: np.ndarray, ids: np.ndarray, before: np.ndarray | None
) -> int:
    """Adds the routing ids [L, T, k] (each in [0, E)) to load int64 [L, E], and to overlap
    int64 [L] how many of each token's experts the token before it also chose (``before``
    [L, 1, k]: the token before ids[:, 0], None when a sequence starts there); returns the
    (token, previous token) pairs counted. Works in slices of _SLICE_IDS ids: time and memory
    grow with the ids, never with E or k squared."""
    num_layers, num_tokens, top_k = ids.shape
    flat = load.reshape(-1)  # a view: load is C-contiguous
    rows = (np.arange(num_layers, dtype=np.int64) * load.shape[1])[:, None, None]
    step = max(1, _SLICE_IDS // (num_layers * top_k))
    pairs = 0
    for start in range(0, num_tokens, step):
        part = ids[:, start : start + step].astype(np.int64)
        np.add.at(flat, (part + rows).ravel(), 1)
        previous = before if start == 0 else ids[:, start - 1 : start].astype(np.int64)
        if previous is None:
            current, previous = part[:, 1:], part[:, :-1]
        else:
            current, previous = part, np.concatenate([previous, part[:, :-1]], axis=1)
        overlap += _shared(previous, current, load.shape[1])
        pairs += current.shape[1]
    return pairs


def _shared(previous: np.ndarray, current: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [L]: the slots of current [L, n, k] whose expert is among previous [L, n, k]'s at
    the same layer and token, by binary search: each (layer, token) row of ids is shifted into
    its own range of num_experts values, so one sorted array holds every row's set."""
    num_layers, n = current.shape[:2]
    if n == 0:
        return np.zeros(num_layers, dtype=np.int64)
    shift = (np.arange(num_layers * n, dtype=np.int64) * num_experts).reshape(num_layers, n, 1)
    keys = (np.sort(previous, axis=2) + shift).ravel()
    probe = (current + shift).ravel()
    found = keys[np.minimum(np.searchsorted(keys, probe), keys.size - 1)] == probe
    return found.reshape(num_layers, -1).sum(axis=1)


def summarize_trace(
    path: str | os.PathLike,
    progress=None,
    *,
    salvage: bool = False,
    on_salvage: Callable[[SalvageReport], None] | None = None,
) -> TraceSummary:
    """One pass over the trace at ``path`` (any format ``load_trace`` reads; ``salvage`` and
    ``on_salvage`` as there). A trace of more than MAX_LOAD_COUNTERS layers x experts is a
    ValueError, raised before the load table is made."""
    path = Path(path)
    if not path.is_file():
        raise TraceNotFoundError(2, f"path: no trace file at '{path}'", str(path))
    steps = _steps(path, progress, salvage, on_salvage)
    _, _, facts = next(steps)
    num_layers, num_experts, top_k = facts["num_layers"], facts["num_experts"], facts["top_k"]
    if num_layers * num_experts > MAX_LOAD_COUNTERS:
        steps.close()
        raise ValueError(
            f"path: '{path}': num_experts: {num_layers:,} layers x {num_experts:,} experts is "
            "more load counters than moeray trace info keeps (num_layers x num_experts <= "
            f"{MAX_LOAD_COUNTERS:,})"
        )
    load = np.zeros((num_layers, num_experts), dtype=np.int64)
    overlap = np.zeros(num_layers, dtype=np.int64)
    pairs = tokens = records = sequences = 0
    last_seq, last_ids = None, None  # the previous token's experts, per layer: [layers, 1, top_k]
    for ids, seq, _ in steps:
        records += 1
        if ids.shape[1] == 0:
            continue
        if seq != last_seq:
            sequences += 1
            last_ids = None
        pairs += _tally(load, overlap, ids, last_ids)
        tokens += ids.shape[1]
        last_seq, last_ids = seq, ids[:, -1:, :]
    return TraceSummary(
        name=path.name,
        model=facts["model"],
        num_tokens=tokens,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        num_sequences=sequences,
        num_records=records,
        has_weights=facts["has_weights"],
        layer_ids=facts["layer_ids"],
        load=load,
        overlap_pairs=overlap,
        pairs=pairs,
    )


def format_summary(s: TraceSummary) -> str:
    """The table ``moeray trace info`` prints."""
    ratio, overlap = s.max_over_mean_load, s.previous_token_overlap
    lines = [
        f"trace {s.name}" + (f" (model {s.model})" if s.model else ""),
        f"shape: {s.num_tokens:,} tokens x {s.num_layers} layers x top-{s.top_k}, {s.num_experts} experts; "
        f"{s.num_sequences:,} sequences, {s.num_records:,} records; router weights: "
        f"{'yes' if s.has_weights else 'no'}",
        f"{'layer':>6}{'max load':>10}{'mean load':>11}{'max/mean':>10}{'hottest':>9}{'prev-token overlap':>20}",
    ]
    for layer in range(s.num_layers):
        label = str(s.layer_ids[layer]) if s.layer_ids else str(layer)
        lines.append(
            f"{label:>6}{int(s.load[layer].max()):>10,}{s.load[layer].mean():>11,.1f}{ratio[layer]:>10.2f}"
            f"{int(s.load[layer].argmax()):>9}{overlap[layer]:>20.3f}"
        )
    worst = int(ratio.argmax()) if s.num_layers else 0
    lines.append(
        f"summary: load max/mean {ratio.mean():.2f} on average, worst {ratio.max():.2f} (layer "
        f"{s.layer_ids[worst] if s.layer_ids else worst}); a token shares {overlap.mean():.3f} of its "
        f"experts with the previous token ({s.random_overlap:.3f} at random)"
    )
    return "\n".join(lines)


def plot_load(s: TraceSummary, path: str | os.PathLike) -> Path:
    """A heat map of each layer's expert load (relative to the layer's mean) as an image file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot: needs matplotlib (pip install 'moeray[plot]')") from None
    mean = s.load.mean(axis=1, keepdims=True)
    relative = np.divide(s.load, mean, out=np.zeros(s.load.shape), where=mean > 0)
    fig, ax = plt.subplots(
        figsize=(min(4 + s.num_experts * 0.12, 20), min(2 + s.num_layers * 0.25, 16))
    )
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if s.layer_ids:
        step = max(1, s.num_layers // 16)
        ax.set_yticks(range(0, s.num_layers, step), [str(i) for i in s.layer_ids[::step]])
    ax.set_title(f"{s.name}: expert load / layer mean ({s.num_tokens:,} tokens)")
    fig.colorbar(image, ax=ax, label="load / mean")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
