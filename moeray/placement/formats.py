"""Engines' expert-placement files, both ways, and the expert loads a placement starts from.

Maps (``write_map`` / ``read_map``; docs/placement-formats.md shows each file):
- ``sglang``: SGLang's ``--init-expert-location`` JSON, ``{"physical_to_logical_map": rows}``;
- ``trtllm``: TensorRT-LLM's MoE load-balancer YAML, ``num_slots`` and
  ``initial_global_assignments: {layer: row}``;
- ``vllm``: the expert-map JSON of vLLM-Ascend's static EPLB (``expert_map_path``): per layer,
  per EP rank, the experts of its slots (``device_expert``) and vLLM's ``expert_map`` (the
  local index of every expert on that rank, -1 where absent).
A row is the expert of every slot of one layer, in moeray's slot order, which is also the
engines': EP rank g holds slots ``[g * slots_per_gpu, (g + 1) * slots_per_gpu)``.
Every engine here loads the same slots in every layer, so a shared budget's empty slots (-1) are
filled before writing (``Placement.filled``: a second copy of an expert that GPU alone holds,
which changes no GPU's load) for sglang and trtllm; vllm's map allows an expert once per rank,
so it refuses a placement with empty slots.
``first_layer``: the engine's index of placement layer 0, where dense layers come first (3 for
DeepSeek-V3); SGLang's map also holds rows for those layers, TensorRT-LLM keys layers by it.

Loads (``read_load``): float64 [layers, experts] token counts, from an SGLang expert-distribution
dump (``logical_count``), a routing trace (``.mtrace`` / ``.npz``) or a CSV of counts.
Every file is at most 256 MiB and 4096 layers; anything else is a one-line ``PlacementError``
naming the field.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import yaml

from moeray.placement.placement import (
    _MAX_EXPERTS,
    _MAX_LAYERS,
    Placement,
    PlacementError,
    Topology,
)
from moeray.policy._validate import check_int
from moeray.traces.loading import load_trace, trace_kind

__all__ = [
    "MAP_FORMATS",
    "MAX_FILE_BYTES",
    "read_load",
    "read_map",
    "write_map",
    "write_sglang",
    "write_trtllm",
    "write_vllm",
]

MAP_FORMATS = ("sglang", "trtllm", "vllm")
MAX_FILE_BYTES = 256 * 2**20

_SGLANG_KEY = "physical_to_logical_map"
_SNIFF_BYTES = 4096


# --------------------------------------------------------------------------- writers


def write_sglang(placement: Placement, path: str | os.PathLike, *, first_layer: int = 0) -> Path:
    """SGLang's ``--init-expert-location`` file: ``{"physical_to_logical_map": rows}``.

    rows: int [first_layer + layers, slots], one JSON list per line; row ``first_layer + l`` is
    ``placement.physical_to_logical[l]``. SGLang's map has a row for every decoder layer, so the
    ``first_layer`` dense layers before the first MoE layer get SGLang's trivial row (slot s
    holds expert ``s % num_experts``), which they never read. Empty slots are filled first
    (``Placement.filled``). Returns the path written.
    """
    first_layer = check_int(first_layer, "first_layer", 0, _MAX_LAYERS)
    placement = placement.filled()
    slots = np.arange(placement.num_slots) % placement.num_experts
    rows = [slots.tolist()] * first_layer + placement.physical_to_logical.tolist()
    body = ",\n".join(f"  {json.dumps(row)}" for row in rows)
    return _write_text(path, f'{{"{_SGLANG_KEY}": [\n{body}\n]}}\n')


def write_trtllm(placement: Placement, path: str | os.PathLike, *, first_layer: int = 0) -> Path:
    """TensorRT-LLM's MoE load-balancer YAML (``moe_config.load_balancer``), with
    ``yaml.safe_dump``: exactly the three fields of its ``MoeLoadBalancerConfig``.

    num_slots: int, slots per layer over all EP ranks (``topology.num_slots``);
    initial_global_assignments: {first_layer + l: int [slots], the expert of each slot};
    layer_updates_per_iter: 0 (a static placement: the engine moves no expert).
    Empty slots are filled first (``Placement.filled``). Returns the path written.
    """
    first_layer = check_int(first_layer, "first_layer", 0, _MAX_LAYERS)
    placement = placement.filled()
    rows = placement.physical_to_logical.tolist()
    config = {
        "num_slots": placement.num_slots,
        "initial_global_assignments": {first_layer + l: row for l, row in enumerate(rows)},
        "layer_updates_per_iter": 0,
    }
    # default_flow_style=None: each layer's list on one line, as TensorRT-LLM's own generator.
    text = yaml.safe_dump(config, default_flow_style=None, sort_keys=False, width=2**31 - 1)
    return _write_text(path, text)


def write_vllm(placement: Placement, path: str | os.PathLike) -> Path:
    """The expert map of vLLM-Ascend's static EPLB (``expert_map_path``), one rank per line:

    ``{"moe_layer_count": layers, "layer_list": [{"layer_id": l, "device_count": gpus,
    "device_list": [{"device_id": g, "device_expert": int [slots_per_gpu],
    "expert_map": int [num_experts]}, ...]}, ...]}``;
    device_expert: the expert of each of rank g's slots, in slot order; expert_map: vLLM's
    per-rank map, the local slot of each expert on rank g, -1 where g holds none. Layers are MoE
    layers only (layer_id 0 is the first one). A rank holds an expert at most once there, so a
    placement that gives one GPU two replicas of an expert raises PlacementError, and so does
    one with empty slots (a shared budget's; write sglang or trtllm, which fill them).
    Returns the path written.
    """
    empty = np.argwhere(placement.physical_to_logical < 0)
    if len(empty):
        raise PlacementError(
            f"placement: layer {empty[0][0]} slot {empty[0][1]} is empty (a shared budget); a "
            "vLLM expert map needs every slot filled with an expert new to its rank"
        )
    per_gpu = _per_gpu(placement.physical_to_logical, placement.topology)
    _check_no_twins(per_gpu, "placement")
    maps = _expert_maps(per_gpu, placement.num_experts)
    layers = []
    for l in range(placement.num_layers):
        devices = ",\n".join(
            f'    {{"device_id": {g}, "device_expert": {json.dumps(per_gpu[l, g].tolist())}, '
            f'"expert_map": {json.dumps(maps[l, g].tolist())}}}'
            for g in range(per_gpu.shape[1])
        )
        layers.append(
            f'  {{"layer_id": {l}, "device_count": {per_gpu.shape[1]}, "device_list": [\n'
            f"{devices}\n  ]}}"
        )
    body = ",\n".join(layers)
    return _write_text(
        path, f'{{"moe_layer_count": {placement.num_layers}, "layer_list": [\n{body}\n]}}\n'
    )


def write_map(
    placement: Placement, format: str, path: str | os.PathLike, *, first_layer: int = 0
) -> Path:
    """``placement`` in one of ``MAP_FORMATS`` (see ``write_sglang``, ``write_trtllm``,
    ``write_vllm``); ``first_layer`` applies to sglang and trtllm (vllm counts MoE layers only,
    so it must be 0 there). Returns the path written."""
    _check_format(format)
    if format == "vllm":
        if first_layer != 0:
            raise PlacementError(
                f"first_layer: the vllm map counts MoE layers only (layer_id 0 is the first), "
                f"so first_layer must be 0, got {first_layer!r}"
            )
        return write_vllm(placement, path)
    writer = write_sglang if format == "sglang" else write_trtllm
    return writer(placement, path, first_layer=first_layer)


# --------------------------------------------------------------------------- map readers


def read_map(
    path: str | os.PathLike,
    format: str,
    topology: Topology,
    num_experts: int,
    *,
    first_layer: int = 0,
) -> Placement:
    """The ``Placement`` an engine's map file holds (``format`` one of ``MAP_FORMATS``), to
    start from: physical_to_logical int32 [layers, topology.num_slots], each in
    [0, num_experts), every expert in every layer.

    first_layer (sglang, trtllm): the engine's index of the first MoE layer. SGLang's rows before
    it are checked and dropped; TensorRT-LLM's layers must run from it without gaps (vllm: 0).
    Raises PlacementError naming the field: a file over 256 MiB or 4096 layers, malformed
    JSON/YAML, a wrong type or shape, a layer of other than ``topology.num_slots`` slots, an
    unknown expert id, an expert that holds no slot of a layer.
    """
    _check_format(format)
    num_experts = check_int(num_experts, "num_experts", 1, _MAX_EXPERTS)
    first_layer = check_int(first_layer, "first_layer", 0, _MAX_LAYERS)
    topology.check_holds(num_experts)
    path = Path(path)
    if format == "sglang":
        table = _sglang_rows(_read_json(path), path, topology, num_experts, first_layer)
    elif format == "trtllm":
        table = _trtllm_rows(_read_yaml(path), path, topology, num_experts, first_layer)
    else:
        if first_layer != 0:
            raise PlacementError(
                f"first_layer: the vllm map counts MoE layers only, so first_layer must be 0, "
                f"got {first_layer}"
            )
        table = _vllm_rows(_read_json(path), path, topology, num_experts)
    return Placement(table, topology, num_experts)


def _sglang_rows(data, path: Path, topology: Topology, num_experts: int, first_layer: int):
    if not isinstance(data, dict):
        raise PlacementError(
            f"{path.name}: expected a JSON object with '{_SGLANG_KEY}', got {_type(data)}"
        )
    if _SGLANG_KEY not in data:
        hint = (
            " (this is an SGLang logical_count file, expert loads: read_load reads it)"
            if "logical_count" in data
            else ""
        )
        raise PlacementError(
            f"{_SGLANG_KEY}: missing from {path.name} (keys: {sorted(data)}){hint}"
        )
    rows = data[_SGLANG_KEY]
    if not isinstance(rows, list):
        raise PlacementError(f"{_SGLANG_KEY}: expected a list of layers, got {_type(rows)}")
    _check_layer_count(len(rows), _SGLANG_KEY)
    if first_layer >= len(rows):
        raise PlacementError(
            f"first_layer: {first_layer}, but {_SGLANG_KEY} has {len(rows)} layers "
            f"(0..{len(rows) - 1})"
        )
    table = _int_rows(rows, range(len(rows)), _SGLANG_KEY, topology.num_slots, num_experts)
    return table[first_layer:]


def _trtllm_rows(data, path: Path, topology: Topology, num_experts: int, first_layer: int):
    if isinstance(data, dict) and isinstance(data.get("moe_config"), dict):
        # An LLM-API options file: the load balancer sits at moe_config.load_balancer.
        data = data["moe_config"].get("load_balancer")
        if isinstance(data, str):
            raise PlacementError(
                f"moe_config.load_balancer: names the file '{data}'; read that file instead"
            )
    if not isinstance(data, dict):
        raise PlacementError(
            f"{path.name}: expected a YAML mapping with num_slots and initial_global_assignments, "
            f"got {_type(data)}"
        )
    num_slots = data.get("num_slots")
    if type(num_slots) is not int:
        raise PlacementError(f"num_slots: expected an int, got {_type(num_slots)}")
    if num_slots != topology.num_slots:
        raise PlacementError(
            f"num_slots: the file has {num_slots} slots per layer, the topology has "
            f"{topology.num_slots} ({topology.num_gpus} GPUs x {topology.slots_per_gpu})"
        )
    field = "initial_global_assignments"
    assignments = data.get(field)
    if not isinstance(assignments, dict) or not assignments:
        raise PlacementError(
            f"{field}: expected a mapping of layer index to the expert of each slot, got "
            f"{_type(assignments)}"
        )
    _check_layer_count(len(assignments), field)
    layers = {}
    for key, row in assignments.items():
        # TensorRT-LLM's config model reads keys as ints; pydantic also takes digit strings.
        index = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if type(index) is not int or index < 0:
            raise PlacementError(f"{field}: layer keys must be ints >= 0, got {key!r}")
        if index in layers:
            raise PlacementError(f"{field}: layer {index} appears twice")
        layers[index] = row
    indices = sorted(layers)
    if indices[0] < first_layer:
        raise PlacementError(
            f"{field}: layer {indices[0]} comes before first_layer={first_layer} (the engine's "
            "index of the first MoE layer)"
        )
    expected = range(first_layer, first_layer + len(indices))
    if indices != list(expected):
        missing = next(i for i in expected if i not in layers)
        raise PlacementError(
            f"{field}: layer {missing} is missing; the layers must run from first_layer="
            f"{first_layer} without gaps, got {_span(indices)}"
        )
    rows = [layers[i] for i in indices]
    seen: dict[int, int] = {}
    for i, row in zip(indices, rows):
        # safe_load shares the object behind a YAML alias: one small file could stand for
        # 4096 full layers. Parsed lists are never shared, so a shared one is an alias.
        if id(row) in seen and isinstance(row, list):
            raise PlacementError(
                f"{field}: layer {i} is an alias of layer {seen[id(row)]}; write every layer out"
            )
        seen[id(row)] = i
    return _int_rows(rows, indices, field, topology.num_slots, num_experts)


def _vllm_rows(data, path: Path, topology: Topology, num_experts: int):
    if not isinstance(data, dict):
        raise PlacementError(
            f"{path.name}: expected a JSON object with moe_layer_count and layer_list, got "
            f"{_type(data)}"
        )
    count = data.get("moe_layer_count")
    if type(count) is not int:
        raise PlacementError(f"moe_layer_count: expected an int, got {_type(count)}")
    layer_list = data.get("layer_list")
    if not isinstance(layer_list, list):
        raise PlacementError(f"layer_list: expected a list of layers, got {_type(layer_list)}")
    _check_layer_count(len(layer_list), "layer_list")
    if count != len(layer_list):
        raise PlacementError(
            f"moe_layer_count: {count}, but layer_list holds {len(layer_list)} layers"
        )
    gpus, width = topology.num_gpus, topology.slots_per_gpu
    rows, maps = [], []
    for l, layer in enumerate(layer_list):
        where = f"layer_list[{l}]"
        devices = layer.get("device_list") if isinstance(layer, dict) else None
        if not isinstance(devices, list):
            raise PlacementError(f"{where}.device_list: expected a list of EP ranks")
        if len(devices) != gpus:
            raise PlacementError(
                f"{where}.device_list: {len(devices)} EP ranks, the topology has {gpus} GPUs"
            )
        declared = layer.get("device_count", gpus)
        if declared != gpus:
            raise PlacementError(
                f"{where}.device_count: {declared!r}, but device_list holds {gpus} ranks"
            )
        row, layer_maps = [], []
        for g, device in enumerate(devices):
            experts = device.get("device_expert") if isinstance(device, dict) else None
            if not isinstance(experts, list) or len(experts) != width:
                got = f"{len(experts)} slots" if isinstance(experts, list) else _type(experts)
                raise PlacementError(
                    f"{where}.device_list[{g}].device_expert: expected the experts of the "
                    f"topology's {width} slots per GPU, got {got}"
                )
            row += experts
            layer_maps.append(device.get("expert_map"))
        rows.append(row)
        maps.append(layer_maps)
    table = _int_rows(rows, range(len(rows)), "layer_list", topology.num_slots, num_experts)
    per_gpu = _per_gpu(table, topology)
    _check_no_twins(per_gpu, "layer_list")
    derived = _expert_maps(per_gpu, num_experts)
    for l, layer_maps in enumerate(maps):
        for g, stored in enumerate(layer_maps):
            if stored is not None and stored != derived[l, g].tolist():
                raise PlacementError(
                    f"layer_list[{l}].device_list[{g}].expert_map: disagrees with its "
                    f"device_expert {per_gpu[l, g].tolist()}"
                )
    return table


def _int_rows(rows: list, labels, field: str, width: int, num_experts: int) -> np.ndarray:
    """rows (lists of ints) as int32 [layers, width], each id in [0, num_experts), every expert
    in every row; labels: the file's index of each row, for the messages."""
    for label, row in zip(labels, rows):
        if not isinstance(row, list):
            raise PlacementError(f"{field}: layer {label} is {_type(row)}, expected a list")
        if len(row) != width:
            raise PlacementError(
                f"{field}: layer {label} has {len(row)} slots, the topology has {width}"
            )
        for slot, value in enumerate(row):
            if type(value) is not int or not 0 <= value < num_experts:
                what = f"expert {value}" if type(value) is int else _type(value)
                raise PlacementError(
                    f"{field}: layer {label} slot {slot} holds {what}; expected an expert id "
                    f"in [0, {num_experts})"
                )
    table = np.array(rows, dtype=np.int32).reshape(len(rows), width)
    for label, row in zip(labels, table):
        counts = np.bincount(row, minlength=num_experts)
        if not counts.all():
            expert = int(np.flatnonzero(counts == 0)[0])
            raise PlacementError(
                f"{field}: expert {expert} holds no slot in layer {label} (every expert needs "
                "at least one)"
            )
    return table


def _per_gpu(table: np.ndarray, topology: Topology) -> np.ndarray:
    """int [layers, gpus, slots_per_gpu]: each GPU's slots."""
    return table.reshape(table.shape[0], topology.num_gpus, topology.slots_per_gpu)


def _check_no_twins(per_gpu: np.ndarray, field: str) -> None:
    ordered = np.sort(per_gpu, axis=-1)
    twins = ordered[..., 1:] == ordered[..., :-1]
    if twins.any():
        l, g, s = (int(i) for i in np.argwhere(twins)[0])
        raise PlacementError(
            f"{field}: GPU {g} holds expert {int(ordered[l, g, s])} twice in layer {l}; a vLLM "
            "expert map gives an expert at most one slot per EP rank"
        )


def _expert_maps(per_gpu: np.ndarray, num_experts: int) -> np.ndarray:
    """int32 [layers, gpus, num_experts]: the local slot of each expert on each GPU, or -1."""
    layers, gpus, width = per_gpu.shape
    maps = np.full((layers, gpus, num_experts), -1, dtype=np.int32)
    l, g = np.meshgrid(np.arange(layers), np.arange(gpus), indexing="ij")
    maps[l[..., None], g[..., None], per_gpu] = np.arange(width, dtype=np.int32)
    return maps


# --------------------------------------------------------------------------- loads


def read_load(path: str | os.PathLike, *, first_layer: int = 0) -> tuple[np.ndarray, str]:
    """(load float64 [layers, experts], each finite and >= 0; a line saying where it came from).

    path, told apart by content (and ``.pt`` / ``.pth`` by name):
    - an SGLang expert-distribution dump: a JSON object with ``logical_count``, int
      [layers, experts] or [steps, layers, experts] (summed over steps), or the ``.pt`` the
      recorder writes in ``stat`` mode (read with torch, ``weights_only=True``);
    - a routing trace moeray reads (``.mtrace``, ``.npz``): tokens routed to each expert of
      each layer;
    - a CSV of counts: one row per layer, one column per expert, an optional header line whose
      first cell is not a number.
    first_layer: drop that many leading layers (the dense layers SGLang's dumps count too);
    they must hold no load. Raises PlacementError naming the field for anything else.
    """
    first_layer = check_int(first_layer, "first_layer", 0, _MAX_LAYERS)
    path = Path(path)
    size = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if path.suffix.lower() in (".pt", ".pth"):
        load, source = _load_torch(path)
    elif head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1] in (b"{", b"["):
        load, source = _load_sglang_json(path)
    else:
        try:
            trace_kind(path)
        except ValueError as exc:
            if not _is_text(head):
                raise PlacementError(
                    f"{path.name}: not a load file moeray reads (an SGLang logical_count dump, a "
                    f"routing trace or a CSV of counts): {exc}"
                ) from None
            load, source = _load_csv(path, size)
        else:
            load, source = _load_trace(path)
    if first_layer:
        if first_layer >= load.shape[0]:
            raise PlacementError(
                f"first_layer: {first_layer}, but {path.name} has {load.shape[0]} layers"
            )
        loaded = np.flatnonzero(load[:first_layer].sum(axis=1))
        if loaded.size:
            layer = int(loaded[0])
            raise PlacementError(
                f"first_layer: layer {layer} of {path.name} has load {load[layer].sum():g}, so it "
                f"is no dense layer; is first_layer={first_layer} right?"
            )
        load = load[first_layer:]
        source += f"; layers before {first_layer} dropped"
    return load, source


def _load_sglang_json(path: Path) -> tuple[np.ndarray, str]:
    data = _read_json(path)
    if not isinstance(data, dict) or "logical_count" not in data:
        if not isinstance(data, dict):
            raise PlacementError(
                f"logical_count: expected a JSON object holding it in {path.name}, got "
                f"{_type(data)}"
            )
        hint = " (a placement map: read_map reads it)" if _SGLANG_KEY in data else ""
        raise PlacementError(
            f"logical_count: missing from {path.name}, a JSON file of SGLang expert loads "
            f"(keys: {sorted(data)}){hint}"
        )
    value = data["logical_count"]
    if not isinstance(value, list) or not value:
        raise PlacementError(f"logical_count: expected a non-empty nested list, got {_type(value)}")
    depth, inner = 0, value
    while isinstance(inner, list) and inner and depth < 4:
        depth, inner = depth + 1, inner[0]
    if depth == 3:
        layers = len(value[0])
    elif depth == 2:
        layers = len(value)
    else:
        raise PlacementError(
            f"logical_count: expected [layers, experts] or [steps, layers, experts] numbers, got "
            f"{depth} levels of lists"
        )
    _check_layer_count(layers, "logical_count")
    return _as_load(value, "logical_count", f"SGLang logical_count in {path.name}")


def _load_torch(path: Path) -> tuple[np.ndarray, str]:
    try:
        import torch  # only this reader needs it: an optional dependency
    except ImportError:
        raise PlacementError(
            f"{path.name}: a .pt dump needs torch to read; install it with pip install 'moeray[hf]'"
        ) from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime) for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlacementError(
            f"{path.name}: torch cannot load it with weights_only=True ({first})"
        ) from None
    if isinstance(data, dict) and "records" in data and "logical_count" not in data:
        raise PlacementError(
            f"logical_count: missing from {path.name}, an SGLang per_pass/per_token dump; record "
            "with --expert-distribution-recorder-mode stat, or `moeray convert` it to a trace"
        )
    if not isinstance(data, dict) or "logical_count" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else _type(data)
        raise PlacementError(
            f"logical_count: missing from {path.name} (expected SGLang's stat-mode dump, a dict "
            f"with logical_count; got {keys})"
        )
    value = data["logical_count"]
    if isinstance(value, torch.Tensor):
        if value.dim() not in (2, 3):
            raise PlacementError(
                f"logical_count: expected [layers, experts] or [steps, layers, experts], got "
                f"shape {list(value.shape)}"
            )
        value = value.detach().cpu().double().numpy()
    return _as_load(value, "logical_count", f"SGLang logical_count in {path.name}")


def _as_load(value, field: str, source: str) -> tuple[np.ndarray, str]:
    """``value`` (nested lists or an array) as float64 [layers, experts], steps summed."""
    if isinstance(value, list):
        # bool is an int to numpy; a count never is one.
        flat = value
        while flat and isinstance(flat[0], list):
            flat = [x for row in flat for x in (row if isinstance(row, list) else [row])]
        if any(isinstance(x, (bool, str)) or x is None for x in flat):
            bad = next(x for x in flat if isinstance(x, (bool, str)) or x is None)
            raise PlacementError(f"{field}: expected numbers, got {bad!r}")
    try:
        load = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        reason = "rows of different lengths" if "inhomogeneous" in str(exc) else str(exc)
        raise PlacementError(f"{field}: not a rectangular array of numbers ({reason})") from None
    steps = ""
    if load.ndim == 3:
        steps = f", {load.shape[0]} steps summed"
        load = load.sum(axis=0)
    if load.ndim != 2 or 0 in load.shape:
        raise PlacementError(
            f"{field}: expected [layers, experts] or [steps, layers, experts], got shape "
            f"{list(np.shape(value))}"
        )
    _check_layer_count(load.shape[0], field)
    if load.shape[1] > _MAX_EXPERTS:
        raise PlacementError(f"{field}: {load.shape[1]} experts, more than {_MAX_EXPERTS}")
    bad = ~np.isfinite(load) | (load < 0)
    if bad.any():
        l, e = (int(i) for i in np.argwhere(bad)[0])
        raise PlacementError(
            f"{field}: layer {l} expert {e} is {load[l, e]}; loads are finite counts >= 0"
        )
    return load, f"{source}: {load.shape[0]} layers x {load.shape[1]} experts{steps}"


def _load_trace(path: Path) -> tuple[np.ndarray, str]:
    try:
        trace = load_trace(path)
    except ValueError as exc:
        raise PlacementError(str(exc)) from None
    ids = trace.expert_ids
    load = np.empty((trace.num_layers, trace.num_experts), dtype=np.float64)
    for l in range(trace.num_layers):
        load[l] = np.bincount(ids[:, l, :].ravel(), minlength=trace.num_experts)
    source = (
        f"routing trace {path.name}: {trace.num_tokens} tokens x top-{trace.top_k}, "
        f"{trace.num_layers} layers x {trace.num_experts} experts"
    )
    return load, source


_ROUTING_COLUMNS = {"token", "token_idx", "token_id", "position", "layer", "layer_id", "layer_idx"}


def _load_csv(path: Path, size: int) -> tuple[np.ndarray, str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PlacementError(f"{path.name}: not UTF-8 text, so not a CSV of counts") from None
    first_line = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first_line else ";" if ";" in first_line else ","
    rows: list[list[float]] = []
    width = header = None
    for line, cells in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        if not cells or not "".join(cells).strip() or cells[0].lstrip().startswith("#"):
            continue
        if width is None and header is None and not rows and not _is_number(cells[0]):
            names = {c.strip().lower() for c in cells}
            if not cells[0].strip():
                raise PlacementError(
                    f"{path.name}: line {line}: the header's first cell is empty, as pandas "
                    "writes an index column; save with index=False (one column per expert)"
                )
            if names & _ROUTING_COLUMNS:
                raise PlacementError(
                    f"{path.name}: line {line}: the header names {sorted(names & _ROUTING_COLUMNS)}"
                    ", so this looks like routing (one row per token) or a table with an index "
                    "column; read_load takes one row per layer and one column per expert (for "
                    "routing, `moeray convert` it to a trace and read that)"
                )
            header = line
            continue
        if width is None:
            width = len(cells)
            if width > _MAX_EXPERTS:
                raise PlacementError(
                    f"{path.name}: line {line} has {width} columns, more than {_MAX_EXPERTS} experts"
                )
        elif len(cells) != width:
            raise PlacementError(
                f"{path.name}: line {line} has {len(cells)} columns, the first row has {width} "
                "(one column per expert in every row)"
            )
        if len(rows) == _MAX_LAYERS:
            raise PlacementError(f"{path.name}: more than {_MAX_LAYERS} rows (layers)")
        row = []
        for column, cell in enumerate(cells, start=1):
            value = _number(cell)
            if value is None or not np.isfinite(value) or value < 0:
                raise PlacementError(
                    f"{path.name}: line {line} column {column}: {cell.strip()!r} is not a count "
                    "(a finite number >= 0)"
                )
            row.append(value)
        rows.append(row)
    if not rows:
        raise PlacementError(f"{path.name}: no rows of counts ({size} bytes)")
    load = np.array(rows, dtype=np.float64)
    return load, f"counts CSV {path.name}: {load.shape[0]} layers x {load.shape[1]} experts"


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _is_number(cell: str) -> bool:
    return _number(cell) is not None


# --------------------------------------------------------------------------- files


def _check_format(format: str) -> None:
    if format not in MAP_FORMATS:
        raise PlacementError(f"format: expected one of {', '.join(MAP_FORMATS)}, got {format!r}")


def _check_file(path: Path) -> int:
    """The file's size in bytes; PlacementError when it is missing, empty or too large."""
    try:
        size = path.stat().st_size
    except OSError:
        raise PlacementError(f"path: no file at '{path}'") from None
    if not path.is_file():
        raise PlacementError(f"path: '{path}' is not a file")
    if size == 0:
        raise PlacementError(f"path: '{path}' is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise PlacementError(
            f"path: '{path}' is {size / 2**20:.0f} MiB, more than the {MAX_FILE_BYTES // 2**20} "
            "MiB moeray reads"
        )
    return size


def _read_json(path: Path):
    _check_file(path)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # json refuses the mark Windows editors add
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise PlacementError(
            f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise PlacementError(f"{path.name}: not valid JSON ({type(exc).__name__})") from None


def _read_yaml(path: Path):
    _check_file(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(path.read_bytes(), Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise PlacementError(f"{path.name}: not valid YAML ({problem}{where})") from None
    except RecursionError:
        raise PlacementError(f"{path.name}: not valid YAML (nested too deeply)") from None


def _write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes through a temporary file beside ``path``, so an engine never reads half a map."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_layer_count(layers: int, field: str) -> None:
    if layers > _MAX_LAYERS:
        raise PlacementError(f"{field}: {layers} layers, more than the {_MAX_LAYERS} moeray reads")
    if layers == 0:
        raise PlacementError(f"{field}: no layers")


def _span(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:6]))
    return f"{shown}, ..." if len(indices) > 6 else shown


def _type(value) -> str:
    if value is None:
        return "nothing"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _is_text(head: bytes) -> bool:
    try:
        # final=False: the sniffed bytes may end inside a multi-byte character
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text.lstrip("\ufeff"))
