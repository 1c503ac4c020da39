"""A/B of the dk/dv kernel: d8e9ffd's (value tile 0's programs also do dk) vs the final one
(dk in a program of its own when there are several value tiles), at LongVQ's op shape (H 1, D 64, Dv 256, S 256, W 64, CH 128, bias, key_grad=window,
bf16). Each op is replayed from a CUDA graph (no launch overhead); also peak memory of fwd+bwd
and the max difference between the two outputs / gradients. argv: lengths (B = 32768 // L)."""
import sys

import torch

from models.vq_attention.triton import vq_attention_triton as new_op
from vq_old.triton_old import vq_attention_triton as old_op


def graphed(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps, out


print(torch.cuda.get_device_name(), flush=True)
for length in map(int, sys.argv[1:]):
    bsz = max(1, 32768 // length)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(bsz, 1, length, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cb = torch.randn(1, 256, 64, device="cuda", generator=g)
    codes = torch.randint(0, 256, (bsz, 1, length), device="cuda", generator=g)
    k_hat = cb[0][codes].to(torch.bfloat16)
    v = torch.randn(bsz, 1, length, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    bias = torch.randn(127, device="cuda") * 0.5
    dout = torch.randn_like(v)
    leaves = [x.requires_grad_() for x in (q, k_hat, v, bias)]
    kw = dict(attn_fn="softmax", causal=False, window=64, key_grad="window")
    res = {}
    for name, op in (("old", old_op), ("new", new_op)):
        with torch.no_grad():
            fwd, _ = graphed(lambda op=op: op(q, k_hat, v, cb, codes, bias, **kw))

        def both(op=op):
            o = op(q, k_hat, v, cb, codes, bias, **kw)
            return (o, *torch.autograd.grad(o, leaves, dout))
        t, outs = graphed(both)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        both()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        res[name] = [x.float().clone() for x in outs]
        print(f"L{length} B{bsz} {name}: fwd {fwd:.3f} ms  fwd+bwd {t:.3f} ms  "
              f"peak above inputs {peak:.0f} MiB", flush=True)
    for label, a, b in zip(["o", "dq", "dk", "dv", "dbias"], res["old"], res["new"]):
        rel = ((a - b).norm() / a.norm()).item()
        print(f"  {label}: rel diff new vs old {rel:.2e}", flush=True)
