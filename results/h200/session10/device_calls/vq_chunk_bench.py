"""LongVQ's VQ attention op alone (B 8, H 1, D 64, Dv 256, S 256, W 64, bias, key_grad=window,
bf16) fwd and fwd+bwd vs the query chunk CH, bidirectional ("far": band + per-chunk caches)
and, forward only, without bias ("all": one cache of all keys, no band): what a cache of all
keys plus a band correction could save. argv: lengths (B = 32768 // L, min 1)."""
import sys

import torch

from models.vq_attention.triton import vq_attention_triton


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


print(torch.cuda.get_device_name())
for length in map(int, sys.argv[1:]):
    bsz = max(1, 32768 // length)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(bsz, 1, length, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cb = torch.randn(1, 256, 64, device="cuda", generator=g)
    codes = torch.randint(0, 256, (bsz, 1, length), device="cuda", generator=g)
    k_hat = cb[0][codes].to(torch.bfloat16)
    v = torch.randn(bsz, 1, length, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    bias = torch.randn(127, device="cuda") * 0.02
    dout = torch.randn_like(v)
    leaves = [x.requires_grad_() for x in (q, k_hat, v, bias)]
    for chunk in (64, 128, 256, 512):
        kw = dict(attn_fn="softmax", causal=False, window=64, key_grad="window", chunk=chunk)
        try:
            fwd = timed(lambda: vq_attention_triton(q, k_hat, v, cb, codes, bias, **kw))
            both = timed(lambda: torch.autograd.grad(
                vq_attention_triton(q, k_hat, v, cb, codes, bias, **kw), leaves, dout))
            with torch.no_grad():
                nob = timed(lambda: vq_attention_triton(q, k_hat, v, cb, codes, None,
                                                        **{**kw, "key_grad": "ste"}))
            print(f"L{length} B{bsz} CH{chunk}: far fwd {fwd:.3f} ms  fwd+bwd {both:.3f} ms"
                  f"  | all (no bias) fwd {nob:.3f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"L{length} CH{chunk} FAILED {type(exc).__name__}: {exc}", flush=True)
