"""`train`: train + evaluate one model on one task; accuracy, learning curve, tokens/s, memory.

Precedence of settings: TrainConfig defaults < ``--preset`` < ``--quick`` < explicit flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.cli_args import (
    UsageError,
    parse_assignments,
    parse_task_options,
    progress_bar,
    resolve_device,
    resolve_dtype,
)

DEFAULT_SEQ_LEN = 512
# flag dest -> TrainConfig field, for the flags that default to None (= not given)
FLAG_FIELDS = ("task", "seq_len", "steps", "batch", "lr", "weight_decay", "warmup_frac", "clip",
               "eval_every", "eval_batches", "test_batches", "time_limit_s", "eval_seq_len")


def build_config(args: argparse.Namespace):
    from harness.presets import QUICK_DATA, QUICK_RUN, get_preset
    from harness.registry import REGISTRY
    from harness.runner import QUICK_BACKBONE
    from harness.train import TrainConfig

    REGISTRY.get(args.model)  # an unknown name fails here, with suggestions
    values: dict[str, Any] = get_preset(args.preset) if args.preset else {}
    model_overrides = dict(values.pop("model_overrides", {}))
    task_options = dict(values.pop("task_options", {}))
    if args.quick:
        values.update(QUICK_RUN)
        model_overrides.update(QUICK_BACKBONE)
        task_options.update(QUICK_DATA)
    for name in FLAG_FIELDS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    model_overrides.update(parse_assignments(args.set or [], "--set"))
    task_options.update(parse_task_options(args.task_opt or []))
    if "task" not in values:
        raise UsageError("--task: required (or give --preset)")
    values.setdefault("seq_len", DEFAULT_SEQ_LEN)
    device = resolve_device(args.device)
    cfg = TrainConfig(model=args.model, seed=args.seed, device=device,
                      dtype=resolve_dtype(args.dtype, device), model_overrides=model_overrides,
                      task_options=task_options, **values)
    cfg.validate()
    return cfg


def launch_processes(args: argparse.Namespace, console: Console) -> int:
    """``--nproc N``: the same command under ``torch.distributed.run`` (torchrun), N processes."""
    import subprocess
    import sys

    from harness.provenance import REPO_ROOT

    if args.nproc < 1:
        raise UsageError(f"--nproc: {args.nproc} must be >= 1")
    argv = list(sys.argv[1:])
    index = next(i for i, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc="))
    del argv[index : index + (1 if "=" in argv[index] else 2)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", str(REPO_ROOT / "run_bench.py"), *argv]
    console.print(f"[bold]train[/bold]: {args.nproc} processes via torch.distributed.run (DDP)")
    return subprocess.call(command)


def run(args: argparse.Namespace, console: Console) -> int:
    if args.nproc != 1:
        return launch_processes(args, console)
    from harness import distributed
    from harness.store import Store
    from harness.train import build_eval_task, build_task, model_config
    from harness.train_runner import run_train, stored_result, write_outputs

    cfg = build_config(args)
    task = build_task(cfg)  # bad task options / model fields fail here, before any output
    model_config(cfg, task)
    build_eval_task(cfg)
    store = Store(args.store)
    label = f"{cfg.model} on {cfg.task} L={cfg.seq_len}"
    console.print(f"[bold]train[/bold]: {label}, {cfg.steps} steps x batch {cfg.batch}, "
                  f"lr {cfg.lr:g} on {cfg.device} ({cfg.dtype}), store {store.url}")
    last_val: dict[str, float] = {}
    with progress_bar(console, with_eta=True) as progress:
        bar = progress.add_task(label, total=cfg.steps)

        def on_step(record: dict[str, Any]) -> None:
            text = f"{label} loss {record.get('train_loss', float('nan')):.4f} " \
                   f"lr {record.get('lr', 0.0):.2e}"
            if "val_acc" in record:
                if record.get("step") != last_val.get("step"):
                    progress.console.print(f"  step {record['step']}: val loss "
                                           f"{record['val_loss']:.4f}, val acc "
                                           f"{record['val_acc']:.4f}")
                last_val.update(step=record["step"], acc=record["val_acc"])
            if "acc" in last_val:
                text += f" val acc {last_val['acc']:.3f}"
            progress.update(bar, completed=record["step"], description=text)

        try:
            record, key = run_train(cfg, store, force=args.force, on_step=on_step, task=task)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]: the curve so far is in the store (status "
                          "interrupted); rerun the same command to train the cell again")
            return 130
    if record is None:
        console.print(f"  [dim]already in store ({key}), skipped; --force reruns it[/dim]")
        stored = stored_result(store, key) or {"status": "?", "message": "", "result": {}}
        status, message, result = stored["status"], stored["message"], stored["result"]
    else:
        status, message, result = record.status, record.message, record.result
    if not distributed.world().is_main:
        return 1 if status == "error" else 0
    print_summary(cfg, status, message, result, console)
    if args.out:
        paths = write_outputs(result, status, Path(args.out), label)
        console.print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if status == "error" else 0


def print_summary(cfg, status: str, message: str, result: dict[str, Any],
                  console: Console) -> None:
    def num(name: str, fmt: str) -> str:
        value = result.get(name)
        return format(value, fmt) if isinstance(value, int | float) else "-"

    table = Table(title=f"train: {cfg.model} on {cfg.task} (L={cfg.seq_len})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("status", status + (f" ({message[:100]})" if message else "")),
        ("steps done", f"{result.get('steps_done', 0)} / {cfg.steps}"),
        ("final train loss", num("final_train_loss", ".4f")),
        ("best val acc (step)", f"{num('val_acc_best', '.4f')} ({result.get('best_step', '-')})"),
        ("final val acc", num("val_acc_final", ".4f")),
        ("test acc (best val weights)", num("test_acc", ".4f")),
        ("test acc (final weights)", num("test_acc_final", ".4f")),
        ("tokens/s (training)", num("tokens_per_s", ",.0f")),
        ("peak memory MiB", num("peak_mem_mib", ".1f")),
        *bpb_rows(result),
        ("params", num("params", ",")),
        ("backend", str(result.get("backend", "-"))),
        ("wall s", num("wall_s", ".1f")),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def bpb_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Bits per byte (overall, then by position bucket) of the byte-LM task's evaluations."""
    rows = []
    for prefix, name in (("val_", "val"), ("test_", "test"),
                         ("test_long_", f"test at L={result.get('eval_seq_len')}")):
        if f"{prefix}bpb" in result:
            buckets = result.get(f"{prefix}bpb_buckets", {})
            rows.append((f"{name} bits per byte", f"{result[f'{prefix}bpb']:.4f}" + "".join(
                f"  [{label}: {value:.3f}]" for label, value in buckets.items())))
        elif result.get(f"{prefix}status") not in (None, "ok"):
            rows.append((name, f"{result[f'{prefix}status']}: {result[f'{prefix}message']}"))
    return rows


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from harness.presets import preset_names

    p = sub.add_parser(
        "train", parents=[common], help="train + evaluate one model on one task",
        description="Train one model on one task (AdamW, warm-up + cosine, grad clipping), "
        "evaluate on the val split during training and on the test split at the end; store "
        "accuracy, the learning curve, tokens/s and peak memory. A cell already in the store "
        "with a final status is skipped. Precedence: defaults < --preset < --quick < flags.",
    )
    p.add_argument("--model", required=True, help="registry name (see `list`)")
    p.add_argument("--task", default=None, help="task name (listops, text, pathfinder, mqar, ...)")
    p.add_argument("--preset", default=None, help=f"task preset: {', '.join(preset_names())}")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None,
                   help=f"sequence length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (1000)")
    p.add_argument("--batch", type=int, default=None, help="batch size (32)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (1e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=None,
                   help="AdamW weight decay on matrices (0.01)")
    p.add_argument("--warmup-frac", dest="warmup_frac", type=float, default=None,
                   help="fraction of steps of linear warm-up before the cosine decay (0.1)")
    p.add_argument("--clip", type=float, default=None, help="max grad norm, 0 = off (1.0)")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=None,
                   help="steps between val evaluations (100)")
    p.add_argument("--eval-batches", dest="eval_batches", type=int, default=None,
                   help="val batches per evaluation (10)")
    p.add_argument("--test-batches", dest="test_batches", type=int, default=None,
                   help="test batches at the end, 0 = the whole test split (0)")
    p.add_argument("--time-limit", dest="time_limit_s", type=float, default=None,
                   help="seconds of training after the first step (which holds one-off "
                        "compiles) after which training stops early and evaluates (0 = none)")
    p.add_argument("--eval-seq-len", dest="eval_seq_len", type=int, default=None,
                   help="also test the selected weights at this length, e.g. 65536 after "
                   "training at 16384 (0 = no)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE",
                   help="model config overrides, e.g. --set d_model=256 codebook_size=512")
    p.add_argument("--task-opt", dest="task_opt", nargs="+", action="extend",
                   metavar="KEY=VALUE", help="task options, e.g. --task-opt n_pairs=16 "
                   "(n_train, n_val, n_test, data_dir set the TaskConfig fields)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: small backbone, 40 steps x batch 8, 2 eval/test batches, "
                   "512 train / 64 val / 64 test examples")
    p.add_argument("--force", action="store_true", help="retrain even if the store has the cell")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes (DDP through torch.distributed.run: NCCL on "
                        "CUDA with one GPU each, gloo on CPU); the global --batch is split "
                        "evenly, so the run computes what one process with that batch does")
    p.add_argument("--out", default=None,
                   help="folder for curve.csv, learning_curve.png and result.json")
    p.set_defaults(func=run)
