"""Issue #9's forward at 32K, taken apart (staged in session 16, run by call38.sh).

The Triton VQ attention forward (B 8, H 8, D = Dv = 64, S 256, W 64, causal, bias, bf16,
autotuned) measured 3.73 ms against a 0.23 ms roofline (session 9). This times the op and, from
torch.profiler, each of its kernels (cache sums, segment sums, forward), for the shape above and
for variants that remove one part of the work each:

- ``no-bias``: no bias gather in the band tiles;
- ``S64`` / ``S16``: fewer codes, so fewer code tiles in the forward (the code part's cost);
- ``chunk64`` / ``chunk256``: the band / cache trade-off (CH = 128 is the default);
- ``codes-only``: bidirectional without bias: the code part alone (no band, one cache entry);
- ``sdpa-256keys``: flash SDPA with the code part's score count (2M queries x 256 keys), the
  efficiency a flash kernel reaches on rows this short on this GPU; ``sdpa-causal-32k``;
- ``fwd+bwd``: the default shape forward and backward (the 10x SDPA goal).

It also records the config the autotuner kept for each kernel and every config's time (run it
with TRITON_CACHE_AUTOTUNING=0, or the cached choices are reused without timings). One JSON
line per variant goes to stdout and ``--out``/fwd_ablation.jsonl; the registers and spills of
every compiled kernel to ``--out``/compiled_kernels_LABEL.json.
Usage: python fwd_ablation.py --out DIR [--label L] [--variants a,b].
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch

BASE = dict(batch=8, heads=8, length=32768, dim=64, value_dim=64, size=256, window=64,
            chunk=None, bias=True, backward=False, causal=True, key_grad="window", sdpa=None,
            sums_per_sm=None)
VARIANTS = {
    "base": {},
    "no-bias": {"bias": False},
    "S64": {"size": 64},
    "S16": {"size": 16},
    "chunk64": {"chunk": 64},
    "chunk256": {"chunk": 256},
    # bidirectional, no bias, key_grad="ste": one cache entry of all keys and no band, so the
    # forward kernel is the code part alone (S = 256 codes per query)
    "codes-only": {"causal": False, "bias": False, "key_grad": "ste"},
    # flash SDPA on the same 2M queries, each with 256 keys (B 1024, H 8, L 256, bidirectional):
    # the code part's score count and FLOPs, i.e. what a flash kernel reaches on rows that short
    "sdpa-256keys": {"sdpa": (1024, 8, 256, False)},
    "sdpa-causal-32k": {"sdpa": (8, 8, 32768, True)},  # the opponent, same queries
    "fwd+bwd": {"backward": True},
    # session 18: the sums kernels use ~60 registers fewer, so more of their programs fit an SM;
    # their loop is latency-bound: split the walk into more segments (SUMS_PROGRAMS_PER_SM),
    # autotuned afresh. Session 19: call51 showed sums4/sums8 ran one segment as base did (256
    # programs >= the SMs stopped the split); the split now aims for SUMS_PROGRAMS_PER_SM
    # programs per SM, and sums1 is session 18's one segment at B H = 64
    "sums1": {"sums_per_sm": 1},
    "sums2": {"sums_per_sm": 2},
    "sums4": {"sums_per_sm": 4},
    "sums8": {"sums_per_sm": 8},
    "sums16": {"sums_per_sm": 16},
}


def inputs(shape: dict, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    if shape["sdpa"]:
        b, h, n, _ = shape["sdpa"]
        return {name: torch.randn(b, h, n, shape["dim"], device=device, generator=gen,
                                  dtype=torch.bfloat16) for name in ("q", "k", "v")}
    b, h, n, d, dv, s = (shape[k] for k in ("batch", "heads", "length", "dim", "value_dim",
                                            "size"))
    codebook = torch.randn(h, s, d, device=device, generator=gen, dtype=torch.bfloat16)
    codes = torch.randint(0, s, (b, h, n), device=device, generator=gen)
    k_hat = torch.stack([codebook[i][codes[:, i]] for i in range(h)], 1)
    return {
        "q": torch.randn(b, h, n, d, device=device, generator=gen, dtype=torch.bfloat16),
        "k": k_hat.requires_grad_(shape["backward"]),
        "v": torch.randn(b, h, n, dv, device=device, generator=gen, dtype=torch.bfloat16),
        "codebook": codebook, "codes": codes,
        "bias": (torch.randn(2 * shape["window"] - 1, device=device, generator=gen)
                 if shape["bias"] else None),
    }


def step(x: dict, shape: dict, grad: torch.Tensor | None) -> None:
    from models.vq_attention import triton as vq_triton

    q = x["q"].requires_grad_(shape["backward"])
    v = x["v"].requires_grad_(shape["backward"])
    if shape["sdpa"]:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, x["k"], v,
                                                             is_causal=shape["sdpa"][3])
        return
    out = vq_triton.vq_attention_triton(
        q, x["k"], v, x["codebook"], x["codes"], x["bias"], attn_fn="softmax",
        causal=shape["causal"], window=shape["window"], key_grad=shape["key_grad"],
        chunk=shape["chunk"])
    if shape["backward"]:
        torch.autograd.grad(out, [q, x["k"], v], grad)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(name: str, shape: dict, device: torch.device, repeats: int = 20) -> dict:
    from models.vq_attention import triton as vq_triton

    x = inputs(shape, device)
    for tuned in vq_triton._TUNED.values():  # so that only this variant's timings are read
        tuned.configs_timings = None
        if shape["sums_per_sm"]:  # the same tuning keys, other launches: tune afresh
            tuned.cache.clear()
    default_per_sm = vq_triton.SUMS_PROGRAMS_PER_SM
    vq_triton.SUMS_PROGRAMS_PER_SM = shape["sums_per_sm"] or default_per_sm
    try:
        return _time_variant(name, shape, device, x, repeats)
    finally:
        vq_triton.SUMS_PROGRAMS_PER_SM = default_per_sm


def _time_variant(name: str, shape: dict, device: torch.device, x: dict, repeats: int) -> dict:
    from models.vq_attention import triton as vq_triton

    grad = (torch.randn(*x["v"].shape, device=device, dtype=torch.bfloat16)
            if shape["backward"] else None)
    t0 = time.time()
    step(x, shape, grad)  # compile + autotune
    sync(device)
    first_s = time.time() - t0
    # each config's time (ms, the autotuner's median and quantiles) where this step tuned
    timings = {name: {str(config): [round(float(t), 4) for t in
                                    (times if isinstance(times, (list, tuple)) else [times])]
                      for config, times in tuned.configs_timings.items()}
               for name, tuned in vq_triton._TUNED.items()
               if getattr(tuned, "configs_timings", None)}
    for _ in range(3):
        step(x, shape, grad)
    sync(device)
    t0 = time.perf_counter()  # many steps back to back: host time = device time
    for _ in range(repeats):
        step(x, shape, grad)
    sync(device)
    ms = (time.perf_counter() - t0) * 1000.0 / repeats
    kernels: dict[str, float] = defaultdict(float)
    profiled = 5
    activity = (torch.profiler.ProfilerActivity.CUDA if device.type == "cuda"
                else torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(profiled):
            step(x, shape, grad)
        sync(device)
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else None
    for event in prof.events():
        if kind is not None and event.device_type == kind:
            kernels[event.name] += event.device_time / 1000.0 / profiled
    best = {k: str(getattr(tuned, "best_config", None)) for k, tuned in vq_triton._TUNED.items()
            if getattr(tuned, "best_config", None) is not None}
    return {"variant": name, **shape, "ms": round(ms, 4), "first_call_s": round(first_s, 1),
            "kernels_ms": {k: round(v, 4) for k, v in sorted(kernels.items(),
                                                             key=lambda kv: -kv[1])},
            "best_configs": best, "config_timings": timings}


def compiled_kernels() -> list[dict]:
    """Registers and spills of every compiled variant of the VQ-attention kernels (ptxas's
    counts, from Triton's kernel cache): a kernel that spills reads local memory in its loop.
    Best effort: an attribute this Triton lacks is recorded as an error, not raised."""
    from models.vq_attention import triton as vq_triton

    rows = []
    for name, fn in vq_triton._KERNELS.items():
        try:
            for caches in fn.device_caches.values():
                for kernel in caches[0].values():
                    meta = kernel.metadata
                    src = getattr(kernel, "src", None)
                    names = getattr(getattr(src, "fn", None), "arg_names", [])
                    constants = {  # keyed by (argument index,) in Triton 3.x
                        names[k[0]] if isinstance(k, tuple) and k[0] < len(names) else str(k): v
                        for k, v in (getattr(src, "constants", None) or {}).items()}
                    blocks = {k: v for k, v in constants.items()
                              if "BLOCK" in k or k in ("CAUSAL", "MODE", "HAS_BIAS")}
                    rows.append({"kernel": name, "num_warps": meta.num_warps,
                                 "num_stages": meta.num_stages, "shared": meta.shared,
                                 "n_regs": kernel.n_regs, "n_spills": kernel.n_spills,
                                 "constants": blocks})
        except Exception as error:  # noqa: BLE001 -- a report, never a crash
            rows.append({"kernel": name, "error": repr(error)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", default="")
    # most wanted first: each variant's line is written when it is done, so a timeout loses
    # only the ones after it
    parser.add_argument("--variants", default="base,codes-only,sdpa-256keys,sdpa-causal-32k,"
                        "fwd+bwd,S64,no-bias,chunk64,S16,chunk256")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the script under TRITON_INTERPRET=1 "
                             "(L 256, S 32, B H 1; SDPA rows B 2, H 1, L 256)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        from tests import triton_interpreter

        triton_interpreter.patch_interpreter()  # before the kernels' module imports triton
        BASE.update(batch=1, heads=1, length=256, size=32)
    from models.vq_attention import triton as vq_triton

    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "autotune": vq_triton.autotuning(), "label": args.label,
            "commit": os.environ.get("LONGVQ_GIT_COMMIT", "")}
    with open(os.path.join(args.out, "fwd_ablation.jsonl"), "a") as sink:
        for name in args.variants.split(","):
            shape = {**BASE, **VARIANTS[name]}
            if args.smoke and shape["sdpa"]:
                shape["sdpa"] = (2, 1, 256, shape["sdpa"][3])
            row = {**info, **time_variant(name, shape, device, repeats=2 if args.smoke else 20)}
            line = json.dumps(row)
            print(line, flush=True)
            sink.write(line + "\n")
    with open(os.path.join(args.out, f"compiled_kernels{args.label and '_' + args.label}.json"),
              "w") as sink:
        json.dump(compiled_kernels(), sink, indent=1, default=str)


if __name__ == "__main__":
    main()
