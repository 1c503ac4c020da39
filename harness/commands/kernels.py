"""`kernels`: op-level VQ-attention (and reference attention kernels) time vs length."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
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

    from harness.kernels import (
        DEFAULT_IMPLS,
        H100_PEAK_GBPS,
        IMPLS,
        MODES,
        OpShape,
        benchmark,
        check_length,
        peak_bandwidth_gbps,
        plot_rows,
        rows_as_dicts,
    )
    from harness.measure import DTYPES
    from harness.provenance import provenance

    device = resolve_device(args.device)
    spec = DEFAULT_IMPLS.get(device, DEFAULT_IMPLS["cpu"]) if args.impls == "auto" else args.impls
    impls = [name.strip() for name in spec.split(",") if name.strip()]
    for name in impls:
        if name not in IMPLS:
            raise UsageError(f"--impls: unknown implementation {name!r}; known: {', '.join(IMPLS)}")
    if args.window < 0:
        raise UsageError(f"--window: {args.window} must be >= 0 (0: no local part)")
    if args.window == 0:  # no local part: no bias, and key_grad="window" would train no key
        if not args.no_bias:
            raise UsageError("--window 0 has no local part, so no local bias: add --no-bias")
        windowed = [name for name in impls if IMPLS[name].key_grad == "window"]
        if windowed and args.impls != "auto":
            raise UsageError(f"--window 0: {', '.join(windowed)} use key_grad=window, which "
                             "needs a window >= 1; leave them out of --impls")
        impls = [name for name in impls if name not in windowed]
    modes = ["fwd+bwd"] if args.backward else [m.strip() for m in args.modes.split(",")
                                                if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise UsageError(f"--modes: unknown mode {mode!r}; known: {', '.join(MODES)}")
    if not modes:
        raise UsageError("--modes: give at least one of fwd, fwd+bwd")
    if args.lengths is None:
        args.lengths = "256,512" if args.quick else "2k,4k,8k,16k"
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    lengths = parse_int_list(args.lengths, "--lengths")
    if args.attn_fn not in ("softmax", "laplace"):
        raise UsageError(f"--attn-fn: {args.attn_fn!r}; choose softmax or laplace")
    if args.value_dim < 0:
        raise UsageError(f"--value-dim: {args.value_dim} must be >= 0 (0: same as --dim)")
    for flag, value in (("--batch", args.batch), ("--heads", args.heads), ("--dim", args.dim),
                        ("--codebook-size", args.codebook_size), ("--repeats", args.repeats)):
        if value < 1:
            raise UsageError(f"{flag}: {value} must be >= 1")
    if args.peak_gbps is not None and args.peak_gbps <= 0:
        raise UsageError(f"--peak-gbps: {args.peak_gbps} must be > 0")
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
    if args.peak_gbps is None:
        args.peak_gbps = peak_bandwidth_gbps(prov["device"]) or H100_PEAK_GBPS
    console.print(f"[bold]kernels[/bold]: {', '.join(modes)} on {prov['device']}, {shape}, "
                  f"{str(dtype).removeprefix('torch.')}; VQ impls first checked against the "
                  f"naive oracle at L={check_length(shape)}")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def on_row(row) -> None:
        if row.ms_median is None:
            text = f"{row.status}" + (f" ({row.note})" if row.note else "")
        else:
            text = f"{row.ms_median:.3f} ms"
            if row.growth:
                text += f" (x{row.growth:.2f} vs L/2)"
            if row.gbps is not None:
                text += f", {row.gbps:.1f} GB/s = {100 * row.bw_frac:.1f}% of peak"
        console.print(f"  {row.impl:>13} {row.mode:>7} L={row.seq_len:>6}: {text}", markup=False)

    rows = benchmark(impls, lengths, shape, device, dtype, modes, args.warmup, args.repeats,
                     peak_gbps=args.peak_gbps, cell_budget_s=args.cell_budget, on_row=on_row)
    columns = ("impl", "mode", "L", "status", "ms (median)", "growth per doubling", "GB/s",
               "% of peak BW", "rel err vs naive", "peak MiB", "note")
    table = Table(title=f"op time vs L ({prov['device']})")
    for column in columns:
        table.add_column(column)
    cells = [
        (row.impl, row.mode, str(row.seq_len), row.status, fmt(row.ms_median, ".3f"),
         fmt(row.growth, ".2f"), fmt(row.gbps, ".1f"),
         fmt(None if row.bw_frac is None else 100 * row.bw_frac, ".1f"),
         fmt(row.rel_err_vs_naive, ".1e"), fmt(row.peak_mem_mib, ".0f"), row.note)
        for row in rows
    ]
    for cell in cells:
        table.add_row(*(escape(c) for c in cell))
    console.print(table)
    console.print(
        "GB/s (VQ forward rows) = bytes / time, bytes = B*H*L*((2*D + 2*Dv)*elem + 8 (int64 "
        f"codes) + 4 (softmax lse)) + H*S*D*elem; peak {args.peak_gbps:.0f} GB/s. sdpa-flash is "
        "exact softmax attention without bias or VQ; fla-linear is fla's causal chunk kernel.",
        markup=False,
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        extra = {"dtype": str(dtype).removeprefix("torch."), "peak_gbps": args.peak_gbps,
                 **prov}
        frame = pd.DataFrame(rows_as_dicts(rows, shape, extra))
        frame.to_csv(out / "kernels.csv", index=False)
        title = (f"{shape.attn_fn}, {'causal' if shape.causal else 'bidirectional'}, "
                 f"B={shape.batch} H={shape.heads} D={shape.dim} Dv={shape.value_dim} "
                 f"S={shape.codebook_size} W={shape.window}, {extra['dtype']}, {prov['device']}")
        plot_rows(rows, out / "kernels.png", title)
        lines = [
            "# VQ attention and reference kernels: time vs sequence length",
            "",
            f"Device `{prov['device']}`, torch {prov['torch']}, dtype {extra['dtype']}, "
            f"commit {prov['git_commit']}, {prov['timestamp']}. Shape: {shape}. "
            f"Median of up to {args.repeats} runs after {max(1, args.warmup)} warm-up runs "
            "(a warm-up run over 1 s gets one more; an op over 1 s in two runs in a row: 2 "
            "timed runs); on CUDA the timed runs go back to back, "
            "each between CUDA events (device time, without the host's per-call preamble). "
            "VQ implementations are checked against the "
            f"naive oracle at L={check_length(shape)} first (outputs, and gradients when "
            "fwd+bwd is timed); a failing one is `wrong` and not timed.",
            "",
            "GB/s (VQ forward rows): bytes / time with bytes = B·H·L·((2·D + 2·Dv)·elem + 8 "
            "[int64 codes] + 4 [softmax lse]) + H·S·D·elem (read q, k_hat, v, codes, codebook; "
            f"write O, lse); % of a {args.peak_gbps:.0f} GB/s peak. `sdpa-flash`: exact softmax "
            "attention (no bias, no VQ); `fla-linear`: fla's causal `chunk_linear_attn`.",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        lines += ["| " + " | ".join(cell) + " |" for cell in cells]
        lines += ["", "![time vs L](kernels.png)", "",
                  "Command: `python run_bench.py " + " ".join(sys.argv[1:]) + "`", ""]
        (out / "kernels.md").write_text("\n".join(lines))
        console.print(f"wrote {out / 'kernels.csv'}, {out / 'kernels.md'}, {out / 'kernels.png'}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p_ker = sub.add_parser(
        "kernels",
        parents=[common],
        help="time of the VQ-attention ops (and reference kernels) vs length",
        description="Time the VQ-attention implementations (naive L x L oracle, torch "
        "linear-time, fused Triton) and reference kernels (SDPA flash, fla linear attention) "
        "over sequence lengths, forward and/or forward + backward, with the growth per "
        "doubling of L and the Triton forward's achieved bandwidth. Each VQ implementation is "
        "first checked against the naive oracle on this device; a wrong one is not timed.",
    )
    p_ker.add_argument(
        "--impls", default="auto",
        help="comma-separated: naive, linear, linear-window, triton, triton-window, sdpa-flash, "
        "fla-linear (auto: triton,triton-window,linear,sdpa-flash,fla-linear on cuda, "
        "naive,linear on cpu)",
    )
    p_ker.add_argument("--lengths", default=None,
                       help="sequence lengths (1k = 1024; default 2k,4k,8k,16k, --quick 256,512)")
    p_ker.add_argument("--modes", default="fwd", help="comma-separated: fwd, fwd+bwd (fwd)")
    p_ker.add_argument("--batch", type=int, default=1, help="batch size (1)")
    p_ker.add_argument("--heads", type=int, default=1, help="heads (1: LongVQ is single-head)")
    p_ker.add_argument("--dim", type=int, default=64, help="head dim of q/k (and of v) (64)")
    p_ker.add_argument(
        "--value-dim", type=int, default=0, help="head dim of v (0: same as --dim)"
    )
    p_ker.add_argument("--codebook-size", type=int, default=256, help="codes S (256)")
    p_ker.add_argument("--window", type=int, default=128,
                       help="local window W (128); 0: no local part (needs --no-bias; the "
                       "key_grad=window impls are left out)")
    p_ker.add_argument("--attn-fn", default="softmax", help="softmax or laplace")
    p_ker.add_argument("--causal", action="store_true", help="causal (default bidirectional)")
    p_ker.add_argument("--no-bias", action="store_true", help="no local bias")
    p_ker.add_argument("--backward", action="store_true",
                       help="time forward + backward only (same as --modes fwd+bwd)")
    p_ker.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="input dtype (auto: bf16 on cuda, fp32 on cpu)",
    )
    p_ker.add_argument("--warmup", type=int, default=2,
                       help="untimed runs per cell, at least 1 (2); one more after a run "
                       "over 1 s (compile, autotune), so that none is timed right after it")
    p_ker.add_argument("--repeats", type=int, default=None,
                       help="timed runs per cell (5; 2 with --quick; 2 for an op over 1 s a "
                       "run); on CUDA back to back between CUDA events (device time)")
    p_ker.add_argument("--quick", action="store_true",
                       help="CPU smoke run: lengths 256,512 and 2 timed runs per cell unless given")
    p_ker.add_argument("--peak-gbps", type=float, default=None,
                       help="peak memory bandwidth (GB/s) for the %% column (default: by device "
                       "name, H100 SXM 3350, H200 4800; unknown devices 3350)")
    p_ker.add_argument("--cell-budget", type=float, default=60.0,
                       help="seconds; a cell slower than this skips the longer lengths of its "
                       "impl and mode (60)")
    p_ker.add_argument("--out", default=None,
                       help="folder for kernels.csv, kernels.md and kernels.png")
    p_ker.set_defaults(func=run)
