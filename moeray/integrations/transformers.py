"""Offload a transformers MoE model's experts: only each layer's hot set stays on the device.

``offload(model, budget_bytes=... | capacity=..., policy="moeray", shards=DIR)`` writes every MoE
layer's experts to a safetensors checkpoint that ``moeray.shards.ShardStore`` reads (or reuses
one that matches the model), then replaces each layer's experts module (what the MoE block calls
as ``experts(hidden [T, H], top_k_index int64 [T, k], top_k_weights [T, k])``) by an
``OffloadedExperts``. At each forward it sends the router's ids to an ``EngineSession``
(``route(layer, ids)``, layers in order), loads the plan's misses from the shards before the
experts run (a stall), starts the plan's prefetch of the next layer on a background thread (CPU)
or a copy stream (CUDA), and frees the plan's evictions. The slow tier is the checkpoint on disk
(CPU: every read is a real read, its pages dropped from the page cache after it) or pinned host
memory (CUDA).

Exact: the experts run through the model's own experts forward (whatever
``config._experts_implementation`` picks), on a bank of slots instead of the [E, ...] stacks,
with the ids renumbered to slots. That gives the same bits as the original where the renumbering
cannot change an order the arithmetic depends on: a one-token batch under grouped_mm (the
default; its sort is not stable, so a group of several rows may be reordered), any batch under
batched_mm (per-row gathers), and any implementation when the used experts' slots ascend with
their ids. Otherwise (prefill, eager) the used experts are first gathered in id order into a
compact stack, the ids renumbered by rank.

Memory: per layer a bank of ``capacity + top_k`` slots; the top_k spare ones are touched only when
a batch uses experts the policy does not keep, and their pages are given back once the layer
holds its hot set again (CPU). A batch whose experts do not fit the bank (a long prefill) runs on
a transient stack of them.
``force_routing(model, trace)`` makes every router choose a recorded trace's ids (benchmarks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

try:
    import torch
except ImportError:  # the hf extra is missing: offload() says so
    torch = None

from moeray._progress import Progress
from moeray.actors.config import ServiceConfig
from moeray.engine.session import EngineSession
from moeray.shards import ShardStore
from moeray.shards.errors import ShardFormatError, ShardNotFoundError
from moeray.traces.record import FAMILIES, find_routers

__all__ = [
    "ExpertOffload",
    "ForcedRouting",
    "OffloadStats",
    "OffloadedExperts",
    "force_routing",
    "offload",
]

# config.model_type -> moeray record's family name
_MODEL_TYPES = dict(
    zip(
        ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"),
        FAMILIES,
    )
)
_FORMATS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SWIGLU_ROLES = ("gate", "up", "down")
_GPT_OSS_ROLES = ("gate_up", "gate_up_bias", "down", "down_bias")
# implementations whose result does not depend on how experts are numbered (per-row gathers)
_NUMBERING_FREE = ("batched_mm",)
_MADV_DONTNEED = 4  # Linux
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
except OSError:  # no libc to call: spare slots keep their pages
    _LIBC = None


def _torch():
    if torch is None:
        raise ValueError("offload needs torch and transformers: pip install 'moeray[hf]'")
    return torch


@dataclass
class OffloadStats:
    """Counters since ``offload``. bytes_moved: expert bytes copied from the slow tier into the
    device's banks (loads and prefetches). stalls: experts a layer had to load before its experts
    ran (nobody had asked for them ahead); stall_s: seconds spent on those loads and on waiting
    for late prefetches. prefetches: experts prefetched; prefetch_in_time / prefetch_late: used
    ones whose bytes were / were not ready when their layer came; prefetch_unused: prefetched and
    freed unused. evictions: experts freed. compact_batches: layer passes that gathered their
    experts in id order (module doc). batches: forwards routed to the last layer."""

    bytes_moved: int = 0
    stalls: int = 0
    stall_s: float = 0.0
    prefetches: int = 0
    prefetch_in_time: int = 0
    prefetch_late: int = 0
    prefetch_unused: int = 0
    evictions: int = 0
    compact_batches: int = 0
    batches: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class _Layer:
    """One MoE layer of the model: its position among MoE layers, its decoder layer number (the
    checkpoint's), the block and its experts module."""

    position: int
    model_layer: int
    block: object
    experts: object


@dataclass(frozen=True)
class _Shape:
    family: str
    layout: str  # "swiglu" or "gpt-oss" (moeray.shards' layouts)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: object  # torch.dtype
    device: object  # torch.device
    params: tuple[tuple[str, tuple[int, ...]], ...]  # experts' parameters: (name, per-expert shape)

    @property
    def expert_bytes(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.params) * self.dtype.itemsize

    @property
    def roles(self) -> tuple[str, ...]:
        return _GPT_OSS_ROLES if self.layout == "gpt-oss" else _SWIGLU_ROLES

    def role_slot(self, role: str):
        """(bank parameter, row slice or None) that holds ``role`` of one expert."""
        if self.layout == "gpt-oss":
            return {
                "gate_up": ("gate_up_proj", None),
                "gate_up_bias": ("gate_up_proj_bias", None),
                "down": ("down_proj", None),
                "down_bias": ("down_proj_bias", None),
            }[role]
        size = self.intermediate_size
        return {
            "gate": ("gate_up_proj", slice(0, size)),
            "up": ("gate_up_proj", slice(size, 2 * size)),
            "down": ("down_proj", None),
        }[role]

    def tensor_name(self, layer: int, expert: int, role: str) -> str:
        """The checkpoint name of one expert's role (``moeray.shards.store``'s patterns)."""
        if self.layout == "gpt-oss":  # stacked: one tensor per role for all experts
            name = {"gate_up": "gate_up_proj", "down": "down_proj"}.get(role)
            name = name or role.replace("gate_up_bias", "gate_up_proj_bias").replace(
                "down_bias", "down_proj_bias"
            )
            return f"model.layers.{layer}.mlp.experts.{name}"
        return f"model.layers.{layer}.mlp.experts.{expert}.{role}_proj.weight"


# ---------------------------------------------------------------------------- the slow tier


class _DiskSource:
    """Experts read from the checkpoint with pread into the bank (CPU); each read's pages then
    leave the page cache (``drop_page_cache``), so the next read of that expert is a disk read
    again and memory stays the banks'."""

    def __init__(self, store: ShardStore, shape: _Shape, drop_page_cache: bool):
        self._store, self._shape, self._drop = store, shape, drop_page_cache
        self._fds = {path: os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in store.files}
        self._reads: dict[tuple[int, int], list] = {}

    def _plan(self, layer: int, expert: int) -> list:
        """[(role, fd, offset, length)] or, where one expert spans files, [(role, view)]."""
        key = (layer, expert)
        if key not in self._reads:
            weights = self._store.expert_weights(layer, expert)
            ranges = self._store.expert_ranges(layer, expert)
            views = {role: weights[role].data for role in self._shape.roles}
            if len({r.path for r in ranges}) == 1:
                # one file: a view's address minus the mapping's base is its offset in the file;
                # the first range starts at the lowest view
                base = min(v.ctypes.data for v in views.values()) - ranges[0].offset
                fd = self._fds[ranges[0].path]
                self._reads[key] = [
                    (role, fd, v.ctypes.data - base, v.nbytes) for role, v in views.items()
                ]
            else:
                self._reads[key] = [(role, views[role]) for role in self._shape.roles]
        return self._reads[key]

    def read(self, layer: int, expert: int, dst: dict) -> None:
        """Copies one expert's roles into ``dst`` (role -> CPU tensor, contiguous)."""
        for item in self._plan(layer, expert):
            target = dst[item[0]].view(-1).view(torch.uint8).numpy()
            if len(item) == 2:
                np.copyto(target, item[1].reshape(-1).view(np.uint8))
                continue
            _, fd, offset, length = item
            done = 0
            while done < length:
                got = os.preadv(fd, [memoryview(target)[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"short read at {offset + done} of {self._store.path}")
                done += got
            if self._drop:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

    def drop_all(self) -> None:
        for fd in self._fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._store.close()


class _HostSource:
    """Experts held in pinned host memory (CUDA), one [E, ...] stack per parameter and layer,
    copied to the device's banks asynchronously."""

    def __init__(self, stacks: list[dict]):
        self._stacks = stacks  # per layer position: parameter name -> pinned [E, ...]

    def copy(self, position: int, expert: int, bank: dict, slot: int) -> None:
        for name, host in self._stacks[position].items():
            bank[name][slot].copy_(host[expert], non_blocking=True)

    def close(self) -> None:
        self._stacks = []


class _EventLoad:
    """A prefetch on the copy stream: done when its event is; ``result`` makes the compute
    stream wait for it (the host does not block)."""

    def __init__(self, event):
        self._event = event

    def done(self) -> bool:
        return self._event.query()

    def result(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


# ---------------------------------------------------------------------------- one layer


class OffloadedExperts(torch.nn.Module if torch is not None else object):
    """Stands in for a MoE layer's experts module: the same call, the hot set's weights in a bank
    of slots (module doc). Holds no parameters: ``state_dict`` has no experts."""

    def __init__(self, owner: ExpertOffload, position: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule
        self.position = position

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self._owner._forward(self.position, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        bank = self._owner._banks[self.position]
        return f"layer={self.position}, slots={bank.num_slots}, resident={len(bank.slot_of)}"


class _Bank:
    """One layer's slots on the device: parameter name -> [slots, ...]; which expert each holds,
    and loads in flight into them."""

    def __init__(self, shape: _Shape, capacity: int, proxy):
        self.shape = shape
        self.capacity = capacity
        # top_k spare slots: a token's experts the policy does not keep (touched only then)
        self.num_slots = num_slots = capacity + shape.top_k
        self.touched = 0  # slots [0, touched) may hold pages
        self.tensors = {
            name: torch.empty((num_slots, *s), dtype=shape.dtype, device=shape.device)
            for name, s in shape.params
        }
        self.slot_of: dict[int, int] = {}  # resident expert -> slot
        self.free = list(range(num_slots - 1, -1, -1))  # pop() takes the lowest slot first
        self.pending: dict[int, object] = {}  # expert -> load in flight (_Ready / Future)
        self.ahead: set[int] = set()  # prefetched, not used yet
        self.proxy = proxy
        for name, tensor in self.tensors.items():
            proxy.__dict__[name] = tensor
        proxy.num_experts = num_slots

    def role_views(self, slot: int) -> dict:
        out = {}
        for role in self.shape.roles:
            name, rows = self.shape.role_slot(role)
            view = self.tensors[name][slot]
            out[role] = view if rows is None else view[rows]
        return out

    def take_slot(self, expert: int) -> int:
        slot = self.free.pop()
        self.slot_of[expert] = slot
        self.touched = max(self.touched, slot + 1)
        return slot

    def trim(self) -> None:
        """Once at most ``capacity`` experts are resident: moves those in spare slots down and
        gives the spare slots' pages back (CPU), so memory is the hot set's again."""
        if self.touched <= self.capacity or len(self.slot_of) > self.capacity:
            return
        high = [e for e, slot in self.slot_of.items() if slot >= self.capacity]
        if any(e in self.pending for e in high):
            return  # a load in flight lands there: next time
        for e in high:
            old = self.slot_of.pop(e)
            self.free.append(old)
            self.free.sort(reverse=True)
            new = self.take_slot(e)
            for tensor in self.tensors.values():
                tensor[new].copy_(tensor[old])
        if self.shape.device.type == "cpu":
            for tensor in self.tensors.values():
                _release_pages(tensor[self.capacity :])
        self.touched = self.capacity

    def release(self, expert: int) -> None:
        self.free.append(self.slot_of.pop(expert))
        self.free.sort(reverse=True)


# ---------------------------------------------------------------------------- the offload


class ExpertOffload:
    """What ``offload`` returns (also ``model.moeray_offload``): the session, the banks, the
    slow tier and the counters (``stats()``). ``close()`` stops the prefetch thread, closes the
    checkpoint and the session's link; the model is not usable after it."""

    def __init__(self, model, layers, shape, session, source):
        self.model = model
        self.session = session
        self.shape = shape
        self.layers = layers
        self._source = source
        self._stats = OffloadStats()
        self._cuda = shape.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(shape.device) if self._cuda else None
        self._executor = None if self._cuda else ThreadPoolExecutor(1, "moeray-prefetch")
        self._starts = None  # the batch's sequence starts, from the model's pre-hook
        capacity = session.config.capacity
        capacity = capacity if isinstance(capacity, tuple) else (capacity,) * len(layers)
        self._banks = []
        for layer in layers:
            proxy = _proxy(layer.experts)
            self._banks.append(_Bank(shape, capacity[layer.position], proxy))
        self._forward_impl = type(layers[0].experts).forward
        impl = getattr(model.config, "_experts_implementation", None)
        self._numbering_free = impl in _NUMBERING_FREE
        self._grouped = impl == "grouped_mm"

    # -- reporting ------------------------------------------------------------------------
    def stats(self) -> OffloadStats:
        return OffloadStats(**self._stats.as_dict())

    def resident(self, position: int) -> list[int]:
        """Experts of MoE layer ``position`` (0..L-1) whose weights are in its bank."""
        return sorted(self._banks[position].slot_of)

    def bank_bytes(self) -> int:
        """Bytes of every layer's bank (its slots, touched or not)."""
        return sum(b.num_slots for b in self._banks) * self.shape.expert_bytes

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._source.close()
        self.session.close()

    # -- the forward ----------------------------------------------------------------------
    def _forward(self, position, hidden_states, top_k_index, top_k_weights):
        ids = top_k_index.detach().to("cpu").numpy().astype(np.int64, copy=False)
        starts = None
        if position == 0 and self._starts is not None and len(self._starts) == ids.shape[0]:
            starts = self._starts
        plan = self.session.route(position, ids, new_sequence=starts)
        bank = self._banks[position]
        used = np.unique(ids)
        used_set = {int(e) for e in used}
        self._settle(bank, used_set | {int(e) for e in plan.evict})
        # what the plan frees and this batch does not use goes first: its slots take the loads
        for e in plan.evict:
            if int(e) not in used_set and int(e) in bank.slot_of:
                self._free(bank, int(e))
        hot = {int(e) for e in self.session.hot(position)}
        missing = sorted((used_set | {int(e) for e in plan.load}) - set(bank.slot_of))
        fits = len(missing) <= len(bank.free)
        if fits:
            for e in missing:
                self._load_now(bank, position, e, stall=e in used_set)
        # the next layer's loads run while this layer's experts compute (after this layer's
        # own misses: those are needed first)
        if position + 1 < len(self._banks) and len(plan.prefetch):
            self._prefetch_next(position + 1, plan.prefetch_evict, plan.prefetch)
        if fits:
            out = self._compute(bank, hidden_states, top_k_index, top_k_weights, used)
        else:  # the batch's experts do not fit the bank: gather them, keep the hot ones
            out = self._compute_compact(bank, position, hidden_states, top_k_index, top_k_weights)
            for e in missing:
                if e in hot and bank.free:
                    self._load_now(bank, position, e, stall=False)
        for e in sorted(set(bank.slot_of) - hot):  # the plan's evictions, and any drift
            self._free(bank, e)
        bank.trim()
        if position == len(self._banks) - 1:
            self._stats.batches += 1
            self._starts = None
        return out

    def _compute(self, bank, hidden_states, top_k_index, top_k_weights, used):
        slots = np.array([bank.slot_of[int(e)] for e in used])
        repeated = top_k_index.shape[0] > 1  # then an expert may serve several rows
        if (
            self._numbering_free
            or bool(np.all(np.diff(slots) > 0))
            or (self._grouped and not repeated)
        ):
            table = torch.full((self.shape.num_experts,), -1, dtype=torch.int64)
            table[torch.from_numpy(used)] = torch.from_numpy(slots)
            slot_ids = table.to(top_k_index.device)[top_k_index]
            return self._forward_impl(bank.proxy, hidden_states, slot_ids, top_k_weights)
        return self._compact(bank, hidden_states, top_k_index, top_k_weights, used, None)

    def _compute_compact(self, bank, position, hidden_states, top_k_index, top_k_weights):
        used = np.unique(top_k_index.detach().to("cpu").numpy())
        return self._compact(bank, hidden_states, top_k_index, top_k_weights, used, position)

    def _compact(self, bank, hidden_states, top_k_index, top_k_weights, used, position):
        """The used experts gathered in id order (ranks as ids: the original's row order)."""
        self._stats.compact_batches += 1
        index = torch.as_tensor(used)
        stacks = {}
        resident = [int(e) in bank.slot_of for e in used]
        for name, tensor in bank.tensors.items():
            stacks[name] = torch.empty(
                (len(used), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
            )
        for rank, e in enumerate(used):
            if resident[rank]:
                for name, tensor in bank.tensors.items():
                    stacks[name][rank].copy_(tensor[bank.slot_of[int(e)]])
            else:
                self._read_into(position, int(e), stacks, rank, stall=True)
        table = torch.full((self.shape.num_experts,), -1, dtype=torch.int64)
        table[index] = torch.arange(len(used))
        proxy = bank.proxy
        saved = {name: proxy.__dict__[name] for name in stacks}
        proxy.__dict__.update(stacks)
        proxy.num_experts = len(used)
        try:
            rank_ids = table.to(top_k_index.device)[top_k_index]
            return self._forward_impl(proxy, hidden_states, rank_ids, top_k_weights)
        finally:
            proxy.__dict__.update(saved)
            proxy.num_experts = bank.num_slots

    # -- moving bytes ---------------------------------------------------------------------
    def _read_into(self, position, expert, tensors, slot, stall):
        start = time.perf_counter()
        if self._cuda:
            self._source.copy(position, expert, tensors, slot)
        else:
            views = {}
            for role in self.shape.roles:
                name, rows = self.shape.role_slot(role)
                view = tensors[name][slot]
                views[role] = view if rows is None else view[rows]
            self._source.read(self.layers[position].model_layer, expert, views)
        self._stats.bytes_moved += self.shape.expert_bytes
        if stall:
            self._stats.stalls += 1
            self._stats.stall_s += time.perf_counter() - start

    def _load_now(self, bank, position, expert, stall):
        slot = bank.take_slot(expert)
        self._read_into(position, expert, bank.tensors, slot, stall)

    def _free(self, bank, expert):
        load = bank.pending.pop(expert, None)
        if load is not None:
            load.result()
        if expert in bank.ahead:
            bank.ahead.discard(expert)
            self._stats.prefetch_unused += 1
        bank.release(expert)
        self._stats.evictions += 1

    def _settle(self, bank, experts):
        """Waits for the loads in flight of ``experts``; counts used prefetches in time or late."""
        for e in sorted(experts & set(bank.pending)):
            load = bank.pending.pop(e)
            if e in bank.ahead:
                start = time.perf_counter()
                in_time = load.done()
                load.result()
                if in_time:
                    self._stats.prefetch_in_time += 1
                else:
                    self._stats.prefetch_late += 1
                    self._stats.stall_s += time.perf_counter() - start
                bank.ahead.discard(e)
            else:
                load.result()
        for e in experts & bank.ahead:  # prefetched, finished earlier, used now
            bank.ahead.discard(e)
            self._stats.prefetch_in_time += 1

    def _prefetch_next(self, position, evict, prefetch):
        bank = self._banks[position]
        for e in evict:
            if int(e) in bank.slot_of:
                self._free(bank, int(e))
        todo = [int(e) for e in prefetch if int(e) not in bank.slot_of]
        todo = todo[: len(bank.free)]
        if not todo:
            return
        if self._cuda:
            # after everything already issued on the compute stream (the slots' last readers)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.shape.device))
            with torch.cuda.stream(self._copy_stream):
                for e in todo:
                    slot = bank.take_slot(e)
                    self._source.copy(position, e, bank.tensors, slot)
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
                    bank.pending[e] = _EventLoad(event)
                    bank.ahead.add(e)
        else:
            layer = self.layers[position].model_layer
            for e in todo:
                slot = bank.take_slot(e)
                views = bank.role_views(slot)
                bank.pending[e] = self._executor.submit(self._source.read, layer, e, views)
                bank.ahead.add(e)
        self._stats.prefetches += len(todo)
        self._stats.bytes_moved += len(todo) * self.shape.expert_bytes

    def _note_batch(self, module, args, kwargs):
        """The model's forward pre-hook: a batch with an empty cache starts its sequences; a
        forward that failed before its last MoE layer left its batch open: it ends here."""
        self.session.abort_batch()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or getattr(input_ids, "ndim", 0) != 2:
            self._starts = None
            return
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if past:
            self._starts = None
            return
        rows, length = input_ids.shape
        starts = np.zeros(rows * length, dtype=bool)
        starts[::length] = True
        self._starts = starts


def _release_pages(tensor) -> None:
    """MADV_DONTNEED over the whole pages of a contiguous CPU tensor: they read as zeros after,
    and hold no memory until written."""
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start and _LIBC is not None:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _proxy(experts):
    """A parameterless copy of an experts module: same class, attributes and submodules (act_fn),
    whose weight stacks ``_Bank`` sets."""
    proxy = object.__new__(type(experts))
    proxy.__dict__ = dict(experts.__dict__)
    proxy.__dict__["_parameters"] = {}
    proxy.__dict__["_buffers"] = dict(experts._buffers)
    proxy.__dict__["_modules"] = dict(experts._modules)
    return proxy


# ---------------------------------------------------------------------------- checking


def _moe_layers(model) -> tuple[list[_Layer], _Shape]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _MODEL_TYPES.get(model_type)
    if family is None:
        raise ValueError(
            f"model: unknown family {model_type!r} ({type(model).__name__}); supported: "
            f"{', '.join(FAMILIES)}"
        )
    routers = find_routers(model)
    parents = {}
    for module in model.modules():
        for child in module.children():
            parents[id(child)] = module
    layers = []
    for position, (model_layer, router) in enumerate(routers):
        block = parents.get(id(router))
        experts = getattr(block, "experts", None)
        if experts is None or isinstance(experts, OffloadedExperts):
            what = "already offloaded" if experts is not None else "has no experts module"
            raise ValueError(f"model: the MoE block of layer {model_layer} {what}")
        layers.append(_Layer(position, model_layer, block, experts))
    first = layers[0].experts
    layout = "gpt-oss" if family == "gpt-oss" else "swiglu"
    expected = (True, False) if layout == "gpt-oss" else (False, True)
    got = (bool(getattr(first, "is_transposed", False)), bool(getattr(first, "is_concatenated", 1)))
    if layout == "swiglu" and (getattr(first, "has_bias", False) or got != expected):
        raise ValueError(f"model: {family} experts in an unexpected layout {got}")
    params = tuple((n, tuple(p.shape[1:])) for n, p in first.named_parameters())
    dtypes = {p.dtype for layer in layers for p in layer.experts.parameters()}
    devices = {p.device for layer in layers for p in layer.experts.parameters()}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError("model: every layer's experts must share one dtype and one device")
    dtype, device = dtypes.pop(), devices.pop()
    if str(dtype).removeprefix("torch.") not in _FORMATS:
        raise ValueError(f"model: experts of dtype {dtype}; expected float32, float16 or bfloat16")
    for layer in layers:
        shapes = tuple((n, tuple(p.shape[1:])) for n, p in layer.experts.named_parameters())
        if shapes != params or layer.experts.num_experts != first.num_experts:
            raise ValueError(f"model: layer {layer.model_layer}'s experts differ from layer 0's")
    router = routers[0][1]
    if layout == "gpt-oss":
        hidden, intermediate = params[0][1][0], params[0][1][1] // 2
    else:
        intermediate, hidden = params[0][1][0] // 2, params[0][1][1]
    shape = _Shape(
        family,
        layout,
        int(first.num_experts),
        int(router.top_k),
        int(hidden),
        int(intermediate),
        dtype,
        device if isinstance(device, torch.device) else torch.device(device),
        params,
    )
    return layers, shape


def _session(
    layers, shape, budget_bytes, capacity, policy, service, prefetch, options
) -> EngineSession:
    num_layers, top_k = len(layers), shape.top_k
    if service is not None:
        if budget_bytes is not None or capacity is not None:
            raise ValueError("service: the service's config decides capacity; give no budget")
        config = service.config
        if (config.num_layers, config.num_experts, config.top_k) != (
            num_layers,
            shape.num_experts,
            top_k,
        ):
            raise ValueError(
                f"service: its config has {config.num_layers} layers, {config.num_experts} "
                f"experts, top_k {config.top_k}; the model {num_layers}, {shape.num_experts}, "
                f"{top_k}"
            )
        caps = config.capacity if isinstance(config.capacity, tuple) else (config.capacity,)
        if min(caps) < top_k:  # the session would refuse it; say so before any weight moves
            raise ValueError(f"service: its capacity {min(caps)} is below top_k {top_k}")
        if config.policy == "moeray" and config.predict.split is not None:
            # each layer's bank is allocated once, at its capacity; a re-split would move memory
            raise ValueError(
                "service: its capacity re-split (predict.split) changes each layer's memory; "
                "offload needs a service with fixed capacities"
            )
        if not prefetch and any(config.prefetch_budgets()):
            raise ValueError(
                f"prefetch=False: the service plans {max(config.prefetch_budgets())} prefetches "
                "per layer and token, and the session follows its plan (give a service whose "
                "prefetch budget is 0)"
            )
        return EngineSession.attach(service)
    if (budget_bytes is None) == (capacity is None):
        raise ValueError("budget_bytes / capacity: give exactly one of them")
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
            raise ValueError(f"budget_bytes: expected an int, got {budget_bytes!r}")
        per_layer = int(budget_bytes) // (num_layers * shape.expert_bytes)
        need = num_layers * top_k * shape.expert_bytes
        if per_layer < top_k:
            raise ValueError(
                f"budget_bytes: {budget_bytes} holds {per_layer} experts per layer, below one "
                f"layer's top_k {top_k}: at least {need} bytes ({num_layers} layers x {top_k} "
                f"experts x {shape.expert_bytes} bytes)"
            )
        capacity = min(per_layer, shape.num_experts)
    if isinstance(capacity, float) and not isinstance(capacity, bool):
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity: a fraction must be in (0, 1], got {capacity}")
        capacity = max(1, round(capacity * shape.num_experts))
    caps = capacity if isinstance(capacity, (tuple, list)) else (capacity,) * num_layers
    if len(caps) != num_layers or any(
        isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in caps
    ):
        raise ValueError(f"capacity: expected an int or {num_layers} ints, got {capacity!r}")
    if min(caps) < top_k or max(caps) > shape.num_experts:
        raise ValueError(
            f"capacity: each layer must hold [{top_k}, {shape.num_experts}] experts (one token's "
            f"top_k at least), got {min(caps)}..{max(caps)}"
        )
    config = ServiceConfig(
        num_layers=num_layers,
        num_experts=shape.num_experts,
        top_k=top_k,
        capacity=tuple(int(c) for c in caps),
        policy=policy,
        **options,
    )
    return EngineSession(config if prefetch else _without_prefetch(config))


def _without_prefetch(config: ServiceConfig) -> ServiceConfig:
    """config with its prefetch budget 0, for prefetch=False: the policy plans no prefetch (an
    expert planned hot but never loaded would take a victim's place for nothing). A budget the
    caller gave contradicts it: refused."""
    if config.entry.predictive:
        given = config.predict.prefetch_budget  # None: top_k, the default
        if given:
            raise ValueError(
                f"prefetch=False with predict.prefetch_budget={given}: give one of them"
            )
        return replace(config, predict=replace(config.predict, prefetch_budget=0))
    if config.prefetch_budget:
        raise ValueError(
            f"prefetch=False with prefetch_budget={config.prefetch_budget}: give one of them"
        )
    return config


def _has_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.safetensors"))


def _expert_arrays(layer: _Layer, shape: _Shape, expert: int) -> dict:
    """role -> CPU tensor of one expert (views of the model's stacks)."""
    params = dict(layer.experts.named_parameters())
    out = {}
    for role in shape.roles:
        name, rows = shape.role_slot(role)
        tensor = params[name].detach()[expert]
        out[role] = tensor if rows is None else tensor[rows]
    return out


def _check_store(path: Path, layers, shape) -> ShardStore:
    """Opens an existing checkpoint and checks it holds the model's experts: layers, names,
    shapes, dtype, and the bytes of expert 0 of every layer."""
    try:
        store = ShardStore(path)
    except (ShardFormatError, ShardNotFoundError) as exc:
        raise ValueError(f"shards: {exc}") from None
    try:
        want = tuple(layer.model_layer for layer in layers)
        if store.layers != want:
            raise ValueError(
                f"shards: {path} holds MoE layers {list(store.layers)}, the model {list(want)}"
            )
        fmt = _FORMATS[str(shape.dtype).removeprefix("torch.")]
        for layer in layers:
            spec = store.layer_spec(layer.model_layer)
            got = (spec.num_experts, spec.layout, spec.format, spec.hidden_size)
            expect = (shape.num_experts, shape.layout, fmt, shape.hidden_size)
            if got + (spec.intermediate_size,) != expect + (shape.intermediate_size,):
                raise ValueError(
                    f"shards: {path} layer {layer.model_layer} holds (experts, layout, dtype, "
                    f"hidden, intermediate) {got + (spec.intermediate_size,)}, the model "
                    f"{expect + (shape.intermediate_size,)}"
                )
            weights = store.expert_weights(layer.model_layer, 0)
            mine = _expert_arrays(layer, shape, 0)
            for role in shape.roles:
                if role not in weights:
                    raise ValueError(f"shards: {path} layer {layer.model_layer} lacks {role}")
                theirs = torch.from_numpy(np.array(weights[role].data).view(np.uint8))
                ours = mine[role].to("cpu").contiguous().view(-1).view(torch.uint8)
                if theirs.numel() != ours.numel() or not torch.equal(theirs.view(-1), ours):
                    raise ValueError(
                        f"shards: {path} layer {layer.model_layer} expert 0 {role} holds other "
                        "weights than the model's (another model's checkpoint?)"
                    )
        for layer in layers:  # the check mapped these pages: unmap them
            store.release_pages(store.expert_ranges(layer.model_layer, 0))
    except BaseException:
        store.close()
        raise
    return store


def _write_checkpoint(path: Path, layers, shape) -> None:
    """One safetensors file per MoE layer, with the names ``ShardStore`` reads, fsynced so that
    its pages can be dropped from the page cache."""
    path.mkdir(parents=True, exist_ok=True)
    with Progress(len(layers), "moeray: writing experts") as progress:  # a real model: minutes
        for layer in layers:
            _write_layer(path, layer, shape)
            progress.advance(1)


def _write_layer(path: Path, layer, shape) -> None:
    """One MoE layer's experts to their file, written aside then renamed."""
    from safetensors.torch import save_file

    params = {n: p.detach().to("cpu") for n, p in layer.experts.named_parameters()}
    if shape.layout == "gpt-oss":
        tensors = {
            f"model.layers.{layer.model_layer}.mlp.experts.{n}": t.contiguous()
            for n, t in params.items()
        }
    else:
        tensors = {}
        for e in range(shape.num_experts):
            for role, tensor in _expert_arrays(layer, shape, e).items():
                name = shape.tensor_name(layer.model_layer, e, role)
                tensors[name] = tensor.to("cpu").contiguous()
    file = path / f"moeray-experts-{layer.model_layer:05d}.safetensors"
    tmp = file.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "moeray": "offload"})
    del tensors
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, file)


def offload(
    model,
    budget_bytes: int | None = None,
    capacity=None,
    policy: str = "moeray",
    shards: str | os.PathLike | None = None,
    service=None,
    *,
    prefetch: bool = True,
    drop_page_cache: bool = True,
    **options,
) -> ExpertOffload:
    """Keeps only each MoE layer's hot set of ``model``'s experts on its device (module doc).

    model: a transformers causal LM of a family of ``moeray.traces.record.FAMILIES``, experts
    float32 / float16 / bfloat16 on one device (CPU or CUDA). budget_bytes: the bytes of every
    layer's hot set together (capacity = budget / (layers x expert bytes) per layer), or
    capacity: experts per layer (an int, one per layer, or a fraction of num_experts); each at
    least top_k. policy: ``moeray.policy.registry``'s (``moeray`` predicts and prefetches the
    next layer; lru, lfu, adaptive, affinity-lru load on demand). shards: a directory: written
    (one file per MoE layer) when it holds no checkpoint, else checked against the model and
    reused. service: a running service's handle: the session takes its config and reports to
    it (``EngineSession.attach``). prefetch: False loads only on demand, the policy planning no
    prefetch (its budget 0: where reads overlapped with compute cost more than the stalls they
    save, see BENCHMARKS.md's Offload). drop_page_cache: CPU
    reads leave no pages in the page cache (the slow tier stays the disk). options: more
    ``ServiceConfig`` fields (``predict``, ``prefetch_budget``, ...).

    Bad input raises a one-line ValueError before any weight moves. Returns the
    ``ExpertOffload``, also set as ``model.moeray_offload``.
    """
    _torch()
    layers, shape = _moe_layers(model)
    if shards is None:
        raise ValueError("shards: a directory for the experts' checkpoint is required")
    path = Path(shards)
    if not isinstance(prefetch, bool):
        raise ValueError(f"prefetch: expected True or False, got {prefetch!r}")
    session = _session(layers, shape, budget_bytes, capacity, policy, service, prefetch, options)
    try:
        if _has_checkpoint(path):
            store = _check_store(path, layers, shape)
        else:
            if path.exists() and not path.is_dir():
                raise ValueError(f"shards: {path} is not a directory")
            need = len(layers) * shape.num_experts * shape.expert_bytes
            probe = path if path.exists() else next(p for p in path.parents if p.exists())
            free = shutil.disk_usage(probe).free
            if need > free:
                raise ValueError(f"shards: the checkpoint needs {need} bytes, {probe} has {free}")
            _write_checkpoint(path, layers, shape)
            store = _check_store(path, layers, shape)
    except BaseException:
        session.close()
        raise
    if shape.device.type == "cuda":
        stacks = [
            {
                n: p.detach().to("cpu", copy=True).pin_memory()
                for n, p in layer.experts.named_parameters()
            }
            for layer in layers
        ]
        store.close()
        source = _HostSource(stacks)
    else:
        source = _DiskSource(store, shape, drop_page_cache)
        if drop_page_cache:
            source.drop_all()
    handle = ExpertOffload(model, layers, shape, session, source)
    for layer in layers:
        layer.block.experts = OffloadedExperts(handle, layer.position)
    # the original stacks go with their last references (the handle keeps none)
    handle.layers = [_Layer(x.position, x.model_layer, x.block, None) for x in layers]
    del layers
    model.register_forward_pre_hook(handle._note_batch, with_kwargs=True)
    model.moeray_offload = handle
    if shape.device.type == "cuda":
        torch.cuda.empty_cache()
    return handle


# ---------------------------------------------------------------------------- forced routing


class ForcedRouting:
    """Forward hooks that replace every router's top-k ids (and weights, where the trace has
    them) by a trace's, token after token: MoE layer i takes trace layer i; each forward of T
    tokens takes the trace's next T tokens, wrapping at its end. ``tokens``: taken so far.
    ``remove()`` (or leaving the ``with``) takes the hooks off."""

    def __init__(self, model, trace, start: int = 0):
        routers = find_routers(model)
        top_k = int(routers[0][1].top_k)
        num_experts = int(getattr(routers[0][1], "num_experts", 0) or routers[0][1].weight.shape[0])
        if trace.num_experts != num_experts or trace.top_k != top_k:
            raise ValueError(
                f"trace: {trace.num_experts} experts top-{trace.top_k}, the model "
                f"{num_experts} top-{top_k}"
            )
        if trace.num_layers < len(routers):
            raise ValueError(
                f"trace: {trace.num_layers} layers, the model has {len(routers)} MoE layers"
            )
        if not 0 <= start < trace.num_tokens:
            raise ValueError(f"start: expected an int in [0, {trace.num_tokens}), got {start}")
        self._ids = trace.expert_ids  # [tokens, layers, top_k]: views, read a forward's rows
        self._weights = trace.weights
        self._cursor = [start] * len(routers)
        self.tokens = 0
        self._handles = [
            router.register_forward_hook(self._hook(i)) for i, (_, router) in enumerate(routers)
        ]

    def _take(self, position: int, tokens: int) -> np.ndarray:
        n = len(self._ids)
        rows = (self._cursor[position] + np.arange(tokens)) % n
        self._cursor[position] = int((self._cursor[position] + tokens) % n)
        if position == 0:
            self.tokens += tokens
        return rows

    def _hook(self, position: int):
        def hook(module, inputs, output):
            torch = _torch()
            logits, weights, ids = output
            rows = self._take(position, ids.shape[0])
            forced = torch.from_numpy(self._ids[rows, position].astype(np.int64))
            forced = forced.to(ids.device, ids.dtype)
            if self._weights is not None:
                weights = torch.from_numpy(self._weights[rows, position].astype(np.float32))
                weights = weights.to(output[1].device, output[1].dtype)
            return logits, weights, forced.reshape(ids.shape)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ForcedRouting:
        return self

    def __exit__(self, *_) -> None:
        self.remove()


def force_routing(model, trace, start: int = 0) -> ForcedRouting:
    """Makes ``model``'s routers choose ``trace``'s ids (a ``moeray.traces.Trace`` or a path for
    ``load_trace``) from token ``start`` on: a random-weight model then routes as the traced
    model did. Works before or after ``offload`` (the hooks sit on the routers)."""
    if isinstance(trace, (str, os.PathLike)):
        from moeray.traces import load_trace

        trace = load_trace(trace)
    return ForcedRouting(model, trace, start)
