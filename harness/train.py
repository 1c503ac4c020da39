"""Training and evaluation of one model on one task: one ``train`` cell.

Loop (``steps`` optimizer updates, batches from ``task.batches("train", batch, seed)``)::

    loss_s   = task_loss(model, model(x_s), y_s)       cross-entropy (targets == IGNORE_INDEX
                                                       ignored) + the model's aux loss (VQ)
    g_s      = clip(grad loss_s, max_norm=clip)        clip = 0: no clipping (norm still logged)
    theta   <- AdamW(theta, g_s, lr_s)                 groups from harness.optim (``_optim`` hints)
    lr_s     = lr_group * w(s),  s = 0 .. steps-1,  W = round(warmup_frac * steps)
    w(s)     = (s + 1) / W                              for s < W  (linear warm-up, never 0)
             = 1/2 (1 + cos(pi (s - W) / (steps - W)))  after     (cosine; 0 at s = steps)

Mixed precision: ``dtype="bf16"`` runs forward and loss under ``torch.autocast(bfloat16)`` (meant
for CUDA; it also works on CPU, slowly); fp32 runs without autocast. No GradScaler: fp16 is not
offered for training.

Evaluation every ``eval_every`` steps and after the last one, on the first ``eval_batches``
batches of the ``val`` split (``model.eval()``, no_grad, same autocast). Accuracy:
``cls`` heads: argmax(logits) == label per sequence; ``lm`` heads: argmax == target over the
positions whose target is not IGNORE_INDEX (for MQAR that is the standard per-query accuracy).
Val/test data use the fixed seed ``EVAL_SEED`` so every training seed is scored on the same
held-out examples. Model selection as in LRA: ``test_acc`` is the test accuracy of the weights
with the best val accuracy (kept in memory); ``test_acc_final`` that of the last weights. A task
with ``select_by = "loss"`` (the byte LM) selects the weights with the lowest val loss instead;
``val_acc_best`` is then the val accuracy of those weights.
``lm`` heads also sum the loss per window position; a task may turn those sums into metrics of
its own (``Task.position_metrics``: bits per byte by position for ``lm-bytes``), stored prefixed
``val_`` (last evaluation; scalars also on the curve) and ``test_`` (the selected weights).
``eval_seq_len`` > 0 (and != seq_len): the selected weights are also scored on the test split of
the task built at that length (``test_long_*``; batch = max(1, batch * seq_len // eval_seq_len),
the same tokens per batch), e.g. bits per byte at 64K after training at 16K. A model that cannot
run there (OOM, a length limit) leaves ``test_long_status``/``test_long_message`` and a warning;
the cell stays ``ok``.

Measured: ``tokens_per_s`` = batch·L summed over training steps / training wall time
(evaluation excluded; data generation included, its share reported as ``data_s``). Peak memory:
CUDA ``max_memory_allocated`` over training and validation (reset at the cell's start; allocated,
not reserved); CPU: bytes of the resident tensors only (parameters, buffers, gradients, AdamW
state) — the profiler probe of harness/measure.py is skipped to keep training cheap, so
activations are not counted there. Losses are read back from the GPU every ``CUDA_SYNC_EVERY``
steps (not every step) so the host keeps queueing work; a NaN/Inf loss stops the run with status
``diverged`` (at most that many steps late), keeping the curve so far. OOM -> ``oom``; any other
exception -> ``error``; :class:`StopTraining` from the step callback -> ``pruned``; Ctrl-C ->
:class:`TrainInterrupted` carrying the curve so far.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from harness import distributed
from harness.backbone import task_loss
from harness.config import ModelConfig
from harness.evaluate import autocast_for, evaluate, task_scores
from harness.measure import (
    CellOutcome,
    Diverged,
    _summarise_stats,
    _tensor_bytes,
    free_memory,
    is_oom,
)
from harness.optim import build_optimizer
from harness.registry import REGISTRY, Entry
from harness.tasks import TASKS, Task, TaskConfig

EVAL_SEED = 0  # val/test data are the same for every training seed
MAX_CURVE_POINTS = 5000  # longer runs log the mean loss of every ceil(steps / 5000) steps
CUDA_SYNC_EVERY = 10  # steps between loss read-backs on GPU
CPU_SYNC_EVERY = 1  # on CPU a read-back costs nothing
TRAIN_DTYPES = ("fp32", "bf16")
# task_options keys that are TaskConfig fields rather than task-specific options
TASK_CONFIG_FIELDS = ("n_train", "n_val", "n_test", "data_dir")

StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainConfig:
    """Everything that defines a train cell (its hash, with the model config, keys the store)."""

    model: str
    task: str
    seq_len: int
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1  # linear warm-up over this fraction of steps, then cosine to 0
    clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 10  # val batches per evaluation
    test_batches: int = 0  # 0: the whole test split
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"  # "bf16": autocast
    time_limit_s: float = 0.0  # > 0: stop (and evaluate) once steps 2.. have run this long
    eval_seq_len: int = 0  # > 0: also test the selected weights at this length (docstring)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            ("seq_len", self.seq_len >= 1, ">= 1"), ("steps", self.steps >= 1, ">= 1"),
            ("batch", self.batch >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_frac", 0 <= self.warmup_frac < 1, "in [0, 1)"),
            ("clip", self.clip >= 0, ">= 0 (0 = no clipping)"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("test_batches", self.test_batches >= 0, ">= 0 (0 = whole split)"),
            ("time_limit_s", self.time_limit_s >= 0, ">= 0"),
            ("eval_seq_len", self.eval_seq_len >= 0, ">= 0 (0 = seq_len only)"),
            ("dtype", self.dtype in TRAIN_DTYPES, f"one of {', '.join(TRAIN_DTYPES)}"),
            ("device", self.device.split(":")[0] in ("cpu", "cuda"), "cpu or cuda"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {expected}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["eval_seq_len"]:  # added later: cells without it keep their store keys
            del out["eval_seq_len"]
        return out


class StopTraining(Exception):  # a signal to stop, not an error
    """Raised by an ``on_step`` callback (e.g. an optuna pruner) to stop: status ``pruned``."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``outcome`` holds the curve so far (status ``interrupted``)."""

    def __init__(self, outcome: CellOutcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


# -- building the task and the model --------------------------------------------------------------
def task_config(cfg: TrainConfig) -> TaskConfig:
    known: dict[str, Any] = {}
    for name in TASK_CONFIG_FIELDS:
        if name in cfg.task_options:
            value = cfg.task_options[name]
            if name != "data_dir" and not str(value).isdigit():
                raise ValueError(f"task option {name}={value!r}: expected a count >= 0")
            known[name] = str(value) if name == "data_dir" else int(value)
    options = {k: v for k, v in cfg.task_options.items() if k not in TASK_CONFIG_FIELDS}
    return TaskConfig(seq_len=cfg.seq_len, options=options, **known)


def build_task(cfg: TrainConfig) -> Task:
    return TASKS.build(cfg.task, task_config(cfg))


def build_eval_task(cfg: TrainConfig) -> Task | None:
    """The task at ``eval_seq_len`` (None when there is no longer evaluation)."""
    if not cfg.eval_seq_len or cfg.eval_seq_len == cfg.seq_len:
        return None
    return TASKS.build(cfg.task, replace(task_config(cfg), seq_len=cfg.eval_seq_len))


def model_config(cfg: TrainConfig, task: Task) -> tuple[Entry, ModelConfig]:
    """The registry entry and its full config: the task fixes head, vocab_size and n_classes."""
    entry = REGISTRY.get(cfg.model)
    if task.head == "lm" and not entry.causal:
        raise ValueError(f"task {cfg.task!r} trains a causal LM head, and model {cfg.model!r} "
                         "has no causal mode")
    if task.head == "cls" and not entry.bidirectional:
        raise ValueError(f"task {cfg.task!r} is sequence classification, and model "
                         f"{cfg.model!r} has no bidirectional mode")
    from_task = {"head": task.head, "vocab_size": task.vocab_size, "n_classes": task.n_classes}
    for name, value in from_task.items():
        if name in cfg.model_overrides and str(cfg.model_overrides[name]) != str(value):
            raise ValueError(f"{name}={cfg.model_overrides[name]!r}: task {cfg.task!r} fixes "
                             f"{name}={value!r}")
    model_cfg = entry.make_config(**{**cfg.model_overrides, **from_task})
    model_cfg.check_memory_budget(compiled=False)  # training steps run eagerly
    return entry, model_cfg


def lr_scale(step: int, steps: int, warmup_frac: float) -> float:
    """w(step) of the module docstring: the factor on each group's lr at update ``step``."""
    warmup = round(warmup_frac * steps)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _long_eval(cfg: TrainConfig, task: Task, model: torch.nn.Module,
               device: torch.device) -> dict[str, Any]:
    """The current weights on ``task`` (at eval_seq_len)'s test split (module docstring)."""
    out: dict[str, Any] = {"eval_seq_len": cfg.eval_seq_len}
    batch = max(1, cfg.batch * cfg.seq_len // cfg.eval_seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = evaluate(model, task.batches("test", batch, EVAL_SEED), cfg.test_batches,
                          device, cfg.dtype)
    except Exception as exc:  # noqa: BLE001 - the trained cell stays ok; the failure is recorded
        status = "oom" if is_oom(exc) else "error"
        message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        free_memory(device)
        warnings.warn(f"test at eval_seq_len={cfg.eval_seq_len} failed ({status}): {message}",
                      stacklevel=2)
        return {**out, "test_long_status": status, "test_long_message": message}
    out.update(test_long_status="ok", test_long_loss=result["loss"],
               test_long_acc=result["acc"], test_long_targets=result["targets"],
               test_long_batch=batch, **task_scores(task, result, "test_long_"))
    if device.type == "cuda":
        out["test_long_peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# -- the per-step log ---------------------------------------------------------------------------
class TrainLog:
    """The learning curve: one record per step (or per window of steps), evals merged in."""

    def __init__(self, steps: int, on_step: StepCallback | None) -> None:
        self.steps = steps
        self.on_step = on_step
        self.record_every = max(1, math.ceil(steps / MAX_CURVE_POINTS))
        self.curve: list[dict[str, Any]] = []
        self.static: dict[str, Any] = {}  # facts known before training ends (params, groups)
        self.recent: deque[float] = deque(maxlen=20)  # final_train_loss = their mean
        self.steps_done = 0
        self._window: list[tuple[float, float]] = []

    def add_steps(self, pending: list[tuple[int, torch.Tensor, torch.Tensor, float]],
                  force_last: bool) -> None:
        """Read back pending (step, loss, grad_norm, lr); raise Diverged on a non-finite loss."""
        if not pending:
            return
        values = torch.stack([t for _, loss, norm, _ in pending for t in (loss, norm)])
        flat = values.float().cpu().tolist()  # the one device sync of this flush
        for i, (step, _, _, lr) in enumerate(pending):
            loss, norm = flat[2 * i], flat[2 * i + 1]
            self.steps_done = step
            self.recent.append(loss)
            self._window.append((loss, norm))
            finite = math.isfinite(loss)
            last = i == len(pending) - 1
            if step % self.record_every == 0 or step == self.steps or not finite or (
                    force_last and last):
                losses, norms = zip(*self._window, strict=True)
                record = {"step": step, "train_loss": sum(losses) / len(losses),
                          "grad_norm": max(norms), "lr": lr}
                self._window.clear()
                self.curve.append(record)
                if self.on_step:
                    self.on_step(record)
            if not finite:
                raise Diverged(f"loss is {loss} at step {step}")

    def add_eval(self, step: int, result: dict[str, float], stats: dict[str, Any]) -> None:
        if self.curve and self.curve[-1]["step"] == step:
            record = self.curve[-1]
        else:
            record = {"step": step}
            self.curve.append(record)
        record.update(val_loss=result["loss"], val_acc=result["acc"])
        record.update({k: v for k, v in stats.items() if not isinstance(v, dict)})
        if self.on_step:
            self.on_step(record)

    def partial(self) -> dict[str, Any]:
        """What a failed or interrupted cell keeps."""
        return {**self.static, "steps_done": self.steps_done, "curve": self.curve}


# -- the cell ------------------------------------------------------------------------------------
def train_cell(cfg: TrainConfig, on_step: StepCallback | None = None, *,
               task: Task | None = None) -> CellOutcome:
    """Train and evaluate; never raises except on Ctrl-C (as :class:`TrainInterrupted`).

    ``on_step`` gets each curve record as it is written ({step, train_loss, grad_norm, lr}), and
    the same record again after an evaluation added ``val_loss``/``val_acc`` to it; it may raise
    :class:`StopTraining` to end the run (status ``pruned``, curve kept). ``task`` skips
    rebuilding the task when the caller already has it.
    """
    device = torch.device(cfg.device)
    log = TrainLog(cfg.steps, on_step)
    try:
        return CellOutcome("ok", "", _train(cfg, task, device, log))
    except Diverged as exc:
        return CellOutcome("diverged", str(exc), log.partial())
    except StopTraining as exc:
        return CellOutcome("pruned", str(exc) or "stopped by the caller", log.partial())
    except KeyboardInterrupt as exc:
        raise TrainInterrupted(CellOutcome("interrupted", "interrupted (Ctrl-C)",
                                           log.partial())) from exc
    except Exception as exc:  # noqa: BLE001 - every failure becomes the cell's status
        if is_oom(exc):
            first_line = (str(exc).splitlines() or [""])[0][:300]
            return CellOutcome("oom", f"{type(exc).__name__}: {first_line}", log.partial())
        return CellOutcome("error", f"{type(exc).__name__}: {exc}", log.partial())
    finally:
        free_memory(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> tuple[int, str]:
    """Peak bytes since the cell started (CUDA) or resident tensor bytes (CPU), and the method."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    resident = [*model.parameters(), *model.buffers()]
    resident += [p.grad for p in model.parameters() if p.grad is not None]
    resident += [t for state in optimizer.state.values() for t in state.values()
                 if isinstance(t, torch.Tensor)]
    return (_tensor_bytes(resident),
            "cpu resident tensors (params, grads, optimizer state; no activations)")


def _train(cfg: TrainConfig, task: Task | None, device: torch.device,
           log: TrainLog) -> dict[str, Any]:
    cfg.validate()
    wall_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    task = task if task is not None else build_task(cfg)
    entry, model_cfg = model_config(cfg, task)
    long_task = build_eval_task(cfg)  # a bad eval_seq_len fails here, before training
    here, device = distributed.setup(device, cfg.batch)
    torch.manual_seed(cfg.seed)
    model = entry.build(model_cfg).to(device)
    # DDP: forward through the wrapper (its hooks all-reduce the gradients); everything that
    # reads the model (loss heads, stats, state_dict) uses the module itself
    forward = (torch.nn.parallel.DistributedDataParallel(model) if here.is_distributed
               else model)
    optimizer, groups = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = LambdaLR(optimizer, lambda s: lr_scale(s, cfg.steps, cfg.warmup_frac))
    log.static.update(params=model.num_params(), optimizer_groups=groups, world_size=here.size)
    max_norm = cfg.clip if cfg.clip > 0 else math.inf
    sync_every = CUDA_SYNC_EVERY if device.type == "cuda" else CPU_SYNC_EVERY
    train_iter = task.batches("train", cfg.batch, cfg.seed)
    model.train()

    pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
    best: dict[str, Any] = {"score": -math.inf, "acc": -1.0, "step": 0, "state": None}
    last_eval: dict[str, float] = {}
    stats: dict[str, Any] = {}
    train_s = data_s = 0.0
    n_tokens = 0
    stopped_early = False
    segment_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        fetch_start = time.perf_counter()
        tokens, targets = next(train_iter)
        data_s += time.perf_counter() - fetch_start
        tokens = distributed.shard(tokens, here).to(device, non_blocking=True)
        targets = distributed.shard(targets, here).to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(device, cfg.dtype):
            loss = task_loss(model, forward(tokens), targets)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        lr_now = optimizer.param_groups[0]["lr"]  # the un-hinted group: lr * w(step - 1)
        optimizer.step()
        scheduler.step()
        n_tokens += tokens.numel() * here.size
        pending.append((step, distributed.mean_over_ranks(loss.detach(), here),
                        grad_norm.detach(), lr_now))

        # a time limit stops early, evaluating the weights reached so far; its clock starts
        # after the first step, which holds one-off Triton compiles / autotuning (~100 s for
        # Mamba-2 or fla on a fresh GPU machine) that are no part of a model's training cost
        if step == 1:
            limit_start = time.perf_counter()
        stopped_early = (cfg.time_limit_s > 0 and step < cfg.steps
                         and time.perf_counter() - limit_start > cfg.time_limit_s)
        eval_now = step % cfg.eval_every == 0 or step == cfg.steps or stopped_early
        if eval_now or len(pending) >= sync_every:
            log.add_steps(pending, force_last=eval_now)
            pending.clear()
        if not eval_now:
            continue
        _sync(device)
        train_s += time.perf_counter() - segment_start
        log.static["backend"] = model.backend
        stats = _summarise_stats(model.layer_stats())  # of the last training forward
        val_iter = task.batches("val", cfg.batch, EVAL_SEED)
        last_eval = evaluate(model, val_iter, cfg.eval_batches, device, cfg.dtype)
        curve_scores = {k: v for k, v in task_scores(task, last_eval, "val_").items()
                        if isinstance(v, int | float)}
        log.add_eval(step, last_eval, {**stats, **curve_scores})
        score = -last_eval["loss"] if task.select_by == "loss" else last_eval["acc"]
        if score > best["score"]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = {"score": score, "acc": last_eval["acc"], "step": step, "state": state}
        if stopped_early:
            break
        segment_start = time.perf_counter()
    steps_done = log.steps_done
    peak_bytes, method = _peak_memory(model, optimizer, device)
    optimizer.zero_grad(set_to_none=True)
    test = evaluate(model, task.batches("test", cfg.batch, EVAL_SEED), cfg.test_batches,
                    device, cfg.dtype)
    test_best = test
    if best["step"] != steps_done and best["state"] is not None:
        model.load_state_dict(best["state"])
        test_best = evaluate(model, task.batches("test", cfg.batch, EVAL_SEED),
                             cfg.test_batches, device, cfg.dtype)
    long_scores = _long_eval(cfg, long_task, model, device) if long_task is not None else {}

    metrics: dict[str, Any] = {
        **log.static,
        "steps_done": steps_done,
        "stopped_early": stopped_early,
        "final_train_loss": sum(log.recent) / len(log.recent),
        "val_acc_best": best["acc"],
        "best_step": best["step"],
        "selected_by": f"val_{task.select_by}",
        "val_acc_final": last_eval["acc"],
        "val_loss_final": last_eval["loss"],
        "val_targets": last_eval["targets"],
        "test_acc": test_best["acc"],
        "test_loss": test_best["loss"],
        "test_acc_final": test["acc"],
        "test_targets": test["targets"],
        "tokens_per_s": n_tokens / train_s if train_s > 0 else float("nan"),
        "train_s": train_s,
        "data_s": data_s,
        "wall_s": time.perf_counter() - wall_start,
        "peak_mem_mib": peak_bytes / 2**20,
        "peak_mem_method": method,
        "curve": log.curve,
        **task_scores(task, last_eval, "val_"),
        **task_scores(task, test_best, "test_"),
        **long_scores,
    }
    metrics.update(stats)
    return metrics
