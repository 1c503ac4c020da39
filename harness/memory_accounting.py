"""Where a training step's memory goes, counted from tensors rather than from an allocator.

A step's peak is about: the resident state (parameters, their gradients, the optimizer's
moments) + what the forward saves for the backward + the backward's temporaries at its peak.
The first two are counted exactly here, on any device (CPU included):

- *Saved for backward*: one forward + loss (``TrainStep.forward_loss``), then a walk over its
  autograd graph reading every node's saved tensors (built-in nodes' ``_saved_*``, custom
  Functions' and compiled graphs' ``saved_tensors``). Each storage is counted once, at its
  full size: a saved view keeps its whole base alive (the first L of a 2L FFT buffer costs 2L),
  so both the tensors' own bytes and their storages' are reported. Parameters and buffers are
  resident anyway and not counted as saved.
- *By module* (eager only): a saved-tensors pack hook records the innermost module running
  when each tensor is saved. Compiled graphs save from AOTAutograd's partitioner, outside any
  module, so there the holders are the graphs themselves (numbered in forward order).

The partitioner is the same code on every device, so a CPU run of a compiled model shows
what its CUDA run saves, except inside device-specific kernels (LongVQ's Triton VQ attention
on CUDA also saves its per-chunk code cache; on CPU the linear op runs instead). On CUDA the
allocator's peak over one step is measured too (what efficiency rows report): peak minus the
resident state and the saved storages is the backward's temporaries plus allocator slack. And
the allocator's own record of that step (``torch.cuda.memory._record_memory_history``) is
replayed to the moment the step's allocations peak: the blocks alive then, summed by the line
that allocated them (the first frame in this repository or in inductor's generated code).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.measure import EfficiencyCell, build_step, free_memory
from harness.registry import Entry
from harness.report_doc import Table

MIB = 2**20
REPO_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class SavedTensor:
    """One storage the forward keeps for the backward."""

    holder: str  # the backward node (or compiled graph) that saves it
    shape: tuple[int, ...]
    dtype: str
    tensor_bytes: int  # numel x itemsize of the saved tensor
    storage_bytes: int  # what it keeps alive (its base's storage when it is a view)


@dataclass
class MemoryAccount:
    parameters: int
    gradients: int
    optimizer_state: int
    saved: list[SavedTensor]
    by_module: dict[str, int] | None  # eager only: module -> saved storage bytes
    cuda_resident: int | None = None  # allocated before a step (CUDA)
    cuda_step_peak: int | None = None  # max allocated during one step (CUDA)
    # the step's own allocations alive at their peak, by where they were made (CUDA)
    cuda_peak_live: dict[str, int] | None = None

    @property
    def saved_bytes(self) -> int:
        return sum(t.storage_bytes for t in self.saved)


def _tensors_of(node: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for name in dir(node):
        if not (name.startswith("_saved_") or name == "saved_tensors"):
            continue
        try:
            value = getattr(node, name)
        except (RuntimeError, AttributeError):  # a slot that holds no tensor now
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        found += [v for v in values if isinstance(v, torch.Tensor)]
    return found


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def _new_storage_bytes(t: torch.Tensor, counted: set[tuple[str, int]]) -> int:
    """The bytes of t's storage the first time it is met (then remembered in ``counted``),
    0 after that and for empty storages: each storage counts once, at its full size."""
    key, size = _storage_key(t), t.untyped_storage().nbytes()
    if key in counted or size == 0:
        return 0
    counted.add(key)
    return size


def _holder_names(nodes: list[Any]) -> dict[Any, str]:
    """Node -> label; compiled graphs are numbered in forward (creation) order."""
    compiled = sorted((n for n in nodes if type(n).__name__ == "CompiledFunctionBackward"),
                      key=lambda n: n._sequence_nr())
    names = {n: f"compiled graph {i + 1} of {len(compiled)}" for i, n in enumerate(compiled)}
    return {n: names.get(n, type(n).__name__) for n in nodes}


def saved_for_backward(loss: torch.Tensor, resident: set[tuple[str, int]]) -> list[SavedTensor]:
    """Every storage the autograd graph of ``loss`` keeps, once each, largest first; storages
    in ``resident`` (parameters, buffers) are left out."""
    nodes, stack, seen = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack += [child for child, _ in node.next_functions]
    names = _holder_names(nodes)
    counted = set(resident)
    saved = []
    for node in sorted(nodes, key=lambda n: n._sequence_nr()):
        for t in _tensors_of(node):
            storage = _new_storage_bytes(t, counted)
            if storage:
                saved.append(SavedTensor(names[node], tuple(t.shape), str(t.dtype).removeprefix(
                    "torch."), t.numel() * t.element_size(), storage))
    return sorted(saved, key=lambda t: -t.storage_bytes)


@contextlib.contextmanager
def saved_by_module(model: torch.nn.Module, resident: set[tuple[str, int]],
                    into: dict[str, int]):
    """Record into ``into`` the storage bytes saved while each (innermost) module runs."""
    running: list[str] = []
    counted = set(resident)

    def leave(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
        running.pop()  # returns None: a forward hook's return value replaces the output

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, name=name: running.append(name or "(model)")))
        handles.append(module.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _new_storage_bytes(t, counted)
        if storage:
            where = running[-1] if running else "(outside the model: loss)"
            into[where] = into.get(where, 0) + storage
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _allocated_at(event: dict[str, Any], root: str) -> str:
    for frame in event.get("frames", []):
        name = frame["filename"]
        if name.startswith(root) or "torchinductor" in name:
            return f"{name.rsplit('/', 1)[-1]}:{frame['line']} {frame['name']}"
    frames = event.get("frames")
    return "elsewhere: " + (frames[0]["name"] if frames else "?")


def live_at_peak(trace: list[dict[str, Any]], root: str = REPO_ROOT) -> dict[str, int]:
    """Replay an allocator trace (one device's ``torch.cuda.memory._snapshot()`` events:
    "alloc" and "free_completed" with addr, size and Python frames) to the moment the
    allocations it records peak; the bytes alive then, by where they were allocated (see
    ``_allocated_at``). Blocks allocated before the trace began are not in it."""
    live: dict[int, dict[str, Any]] = {}
    current = best = best_at = 0
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > best:
                best, best_at = current, i
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    live.clear()
    for event in trace[:best_at + 1]:  # again, up to the peak
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups: dict[str, int] = {}
    for event in live.values():
        where = _allocated_at(event, root)
        groups[where] = groups.get(where, 0) + event["size"]
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def _cuda_step(step: Any, device: torch.device) -> tuple[int, int, dict[str, int]]:
    """(allocated before, peak allocated, blocks alive at the peak by source) of one step."""
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return resident, peak, live_at_peak(snapshot["device_traces"][index])


def account_cell(entry: Entry, model_config: Any, cell: EfficiencyCell) -> MemoryAccount:
    """The resident state and the saved tensors of ``cell``'s training step (after its warm-up
    steps, so compiled graphs are built); on CUDA also the allocator's peak over one step. The
    step runs without a CUDA graph (the graph would hide the autograd graph)."""
    cell = dataclasses.replace(cell, cuda_graph=False)
    device = torch.device(cell.device)
    try:
        built = build_step(entry, model_config, cell, device)
        for _ in range(max(1, cell.warmup)):
            built.step()
        cuda_resident = cuda_peak = cuda_live = None
        if device.type == "cuda":
            cuda_resident, cuda_peak, cuda_live = _cuda_step(built.step, device)
        model = built.model
        resident = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
        by_module: dict[str, int] | None = None if cell.compile else {}
        hooks = (contextlib.nullcontext() if by_module is None
                 else saved_by_module(model, resident, by_module))
        with hooks:
            loss = built.forward_loss()
        saved = saved_for_backward(loss, resident)
        del loss
        params = [p for p in model.parameters() if p.requires_grad]
        state = [t for s in built.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return MemoryAccount(
            parameters=sum(p.numel() * p.element_size() for p in model.parameters()),
            gradients=sum(p.numel() * p.element_size() for p in params),
            optimizer_state=sum(t.numel() * t.element_size() for t in state),
            saved=saved, by_module=by_module, cuda_resident=cuda_resident,
            cuda_step_peak=cuda_peak, cuda_peak_live=cuda_live)
    finally:
        free_memory(device)


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def memory_tables(account: MemoryAccount, caption: str, top: int = 20) -> list[Table]:
    """Summary, saved bytes by holder (and by module, eager) and the ``top`` largest saved
    storages."""
    saved_own = sum(t.tensor_bytes for t in account.saved)
    rows = [["parameters", _mib(account.parameters)],
            ["gradients (during the backward)", _mib(account.gradients)],
            ["optimizer state", _mib(account.optimizer_state)],
            ["saved for backward: the tensors", _mib(saved_own)],
            ["saved for backward: the storages they keep alive", _mib(account.saved_bytes)]]
    if account.cuda_step_peak is not None:
        resident = account.cuda_resident or 0
        rest = account.cuda_step_peak - resident - account.saved_bytes
        rows += [["CUDA: allocated before a step", _mib(resident)],
                 ["CUDA: peak allocated in one step", _mib(account.cuda_step_peak)],
                 ["CUDA: peak - before - saved storages (backward temporaries, slack)",
                  _mib(rest)]]
    tables = [Table(["what", "MiB"], rows, caption=caption)]
    holders: dict[str, list[SavedTensor]] = {}
    for t in account.saved:
        holders.setdefault(t.holder, []).append(t)
    ranked = sorted(holders.items(), key=lambda kv: -sum(t.storage_bytes for t in kv[1]))
    tables.append(Table(
        ["saved by", "storages", "MiB", "MiB beyond the saved views"],
        [[name, str(len(ts)), _mib(sum(t.storage_bytes for t in ts)),
          _mib(sum(t.storage_bytes - t.tensor_bytes for t in ts))] for name, ts in ranked],
        caption="saved for backward, by the node (or compiled graph) that keeps it"))
    if account.by_module:
        tables.append(Table(["module", "MiB"], [
            [name, _mib(size)] for name, size in
            sorted(account.by_module.items(), key=lambda kv: -kv[1])],
            caption="saved for backward, by the innermost module running when it was saved"))
    if account.cuda_peak_live:
        live = list(account.cuda_peak_live.items())
        tables.append(Table(["allocated at", "MiB"], [
            [where, _mib(size)] for where, size in live[:top]],
            caption=f"CUDA: the step's allocations alive at their peak "
                    f"({_mib(sum(account.cuda_peak_live.values()))} MiB), by where they were "
                    f"allocated ({min(top, len(live))} of {len(live)} places)"))
    tables.append(Table(
        ["saved by", "shape", "dtype", "MiB", "storage MiB"],
        [[t.holder, "x".join(map(str, t.shape)) or "scalar", t.dtype, _mib(t.tensor_bytes),
          _mib(t.storage_bytes)] for t in account.saved[:top]],
        caption=f"the {min(top, len(account.saved))} largest saved storages"))
    return tables


def saved_rows(account: MemoryAccount) -> list[dict[str, Any]]:
    """Every saved storage as a CSV row."""
    return [{"holder": t.holder, "shape": "x".join(map(str, t.shape)), "dtype": t.dtype,
             "tensor_bytes": t.tensor_bytes, "storage_bytes": t.storage_bytes}
            for t in account.saved]
