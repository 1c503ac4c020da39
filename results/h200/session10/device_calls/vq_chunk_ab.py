"""The new bidirectional kernels (totals less band) vs the query chunk CH at LongVQ's op shape
(H 1, D 64, Dv 256, S 256, W 64, bias, key_grad=window, bf16), replayed from CUDA graphs; peak
memory of fwd+bwd above the inputs. argv: lengths (B = 32768 // L)."""
import sys

import torch

from models.vq_attention.triton import vq_attention_triton

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
    for chunk in (64, 128, 256):
        kw = dict(attn_fn="softmax", causal=False, window=64, key_grad="window", chunk=chunk)
        with torch.no_grad():
            fwd, _ = graphed(lambda: vq_attention_triton(q, k_hat, v, cb, codes, bias, **kw))

        def both():
            o = vq_attention_triton(q, k_hat, v, cb, codes, bias, **kw)
            return (o, *torch.autograd.grad(o, leaves, dout))
        t, _ = graphed(both)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        both()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"L{length} B{bsz} CH{chunk}: fwd {fwd:.3f} ms  fwd+bwd {t:.3f} ms  "
              f"peak above inputs {peak:.0f} MiB", flush=True)
