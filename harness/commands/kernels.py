"""`kernels`: op-level VQ-attention time vs length."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.cli_args import (
    UsageError,
    parse_int_list,
    resolve_device,
    resolve_dtype,
)


def run(args: argparse.Namespace, console: Console) -> int:
    import pandas as pd
    import torch

    from harness.kernels import IMPLS, OpShape, benchmark, rows_as_dicts
    from harness.measure import DTYPES
    from harness.provenance import provenance

    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    for name in impls:
        if name not in IMPLS:
            raise UsageError(f"--impls: unknown implementation {name!r}; known: {', '.join(IMPLS)}")
    lengths = parse_int_list(args.lengths, "--lengths")
    device = resolve_device(args.device)
    if args.attn_fn not in ("softmax", "laplace"):
        raise UsageError(f"--attn-fn: {args.attn_fn!r}; choose softmax or laplace")
    if args.value_dim < 0:
        raise UsageError(f"--value-dim: {args.value_dim} must be >= 0 (0: same as --dim)")
    shape = OpShape(
        batch=args.batch,
        heads=args.heads,
        dim=args.dim,
        value_dim=args.value_dim or args.dim,
        codebook_size=args.codebook_size,
        window=args.window,
        attn_fn=args.attn_fn,
        causal=args.causal,
        local_bias=not args.no_bias,
    )
    dtype = DTYPES[resolve_dtype(args.dtype, device)]
    prov = provenance(torch.device(device))
    mode = "fwd+bwd" if args.backward else "fwd"
    console.print(f"[bold]kernels[/bold]: vq_attention {mode} on {prov['device']}, {shape}")

    def on_row(row) -> None:
        ms = f"{row.ms_median:.2f} ms" if row.ms_median is not None else row.status
        growth = f" (x{row.growth:.2f} vs L/2)" if row.growth else ""
        console.print(f"  {row.impl:>7} L={row.seq_len:>6}: {ms}{growth}")

    rows = benchmark(
        impls,
        lengths,
        shape,
        device,
        dtype,
        args.backward,
        args.warmup,
        args.repeats,
        on_row=on_row,
    )
    table = Table(title=f"vq_attention {mode} time vs L ({prov['device']})")
    for column in ("impl", "L", "status", "ms (median)", "growth per doubling", "rel err"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.impl,
            str(row.seq_len),
            row.status,
            f"{row.ms_median:.2f}" if row.ms_median is not None else "-",
            f"{row.growth:.2f}" if row.growth else "-",
            f"{row.rel_err_vs_naive:.1e}",
        )
    console.print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        extra = {"mode": mode, "dtype": str(dtype).removeprefix("torch."), **prov}
        frame = pd.DataFrame(rows_as_dicts(rows, shape, extra))
        frame.to_csv(out / "kernels.csv", index=False)
        lines = [
            f"# vq_attention {mode}: time vs sequence length",
            "",
            f"Device `{prov['device']}`, torch {prov['torch']}, dtype {extra['dtype']}, "
            f"commit {prov['git_commit']}, {prov['timestamp']}. Shape: {shape}. "
            f"Median of {args.repeats} runs after {args.warmup} warm-up runs.",
            "",
            "| impl | L | status | ms (median) | growth per doubling | rel err vs naive |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row.impl} | {row.seq_len} | {row.status} | "
                f"{'-' if row.ms_median is None else f'{row.ms_median:.2f}'} | "
                f"{'-' if not row.growth else f'{row.growth:.2f}'} | "
                f"{row.rel_err_vs_naive:.1e} |"
            )
        lines += ["", "Command: `python run_bench.py " + " ".join(sys.argv[1:]) + "`", ""]
        (out / "kernels.md").write_text("\n".join(lines))
        console.print(f"wrote {out / 'kernels.csv'}, {out / 'kernels.md'}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p_ker = sub.add_parser(
        "kernels",
        parents=[common],
        help="time of the VQ-attention ops vs length",
        description="Time the VQ-attention implementations (naive L x L oracle, linear-time) "
        "over sequence lengths and print the growth per doubling of L. Each "
        "implementation is first checked against the naive oracle on this device; "
        "a wrong one is not timed.",
    )
    p_ker.add_argument(
        "--impls", default="naive,linear", help="comma-separated implementations (naive, linear)"
    )
    p_ker.add_argument("--lengths", default="2k,4k,8k,16k", help="sequence lengths (1k = 1024)")
    p_ker.add_argument("--batch", type=int, default=1, help="batch size (1)")
    p_ker.add_argument("--heads", type=int, default=1, help="heads (1: LongVQ is single-head)")
    p_ker.add_argument("--dim", type=int, default=64, help="head dim of q/k (and of v) (64)")
    p_ker.add_argument(
        "--value-dim", type=int, default=0, help="head dim of v (0: same as --dim)"
    )
    p_ker.add_argument("--codebook-size", type=int, default=256, help="codes S (256)")
    p_ker.add_argument("--window", type=int, default=128, help="local window W (128)")
    p_ker.add_argument("--attn-fn", default="softmax", help="softmax or laplace")
    p_ker.add_argument("--causal", action="store_true", help="causal (default bidirectional)")
    p_ker.add_argument("--no-bias", action="store_true", help="no local bias")
    p_ker.add_argument("--backward", action="store_true", help="time forward + backward")
    p_ker.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="input dtype (auto: bf16 on cuda, fp32 on cpu)",
    )
    p_ker.add_argument("--warmup", type=int, default=2, help="untimed runs per cell (2)")
    p_ker.add_argument("--repeats", type=int, default=5, help="timed runs per cell (5)")
    p_ker.add_argument("--out", default=None, help="folder for kernels.csv and kernels.md")
    p_ker.set_defaults(func=run)
