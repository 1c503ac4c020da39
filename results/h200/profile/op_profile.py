"""Per-kernel device time of the Triton VQ attention at one shape (torch.profiler)."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from models.vq_attention import vq_attention

L = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
B, H, D, S, W = 8, 8, 64, 256, 64
torch.manual_seed(0)
dev = "cuda"
q = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
cb = torch.randn(H, S, D, device=dev)
codes = torch.randint(0, S, (B, H, L), device=dev)
k = cb[torch.arange(H, device=dev)[None, :, None], codes].bfloat16().requires_grad_()
v = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
bias = (0.02 * torch.randn(2 * W - 1, device=dev)).requires_grad_()
g = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16)
for key_grad in ("window", "ste"):
    for mode in ("fwd", "fwd+bwd"):
        def run(key_grad=key_grad, mode=mode):
            out = vq_attention(q, k, v, cb, codes, bias, attn_fn="softmax", causal=True,
                               window=W, impl="triton", key_grad=key_grad)
            if mode == "fwd+bwd":  # input gradients returned, not accumulated into .grad
                torch.autograd.grad(out, (q, k, v, bias), g)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        n = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                run()
            torch.cuda.synchronize()
        rows = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
                t = getattr(e, "self_device_time_total", 0)
                if t > 0:
                    rows[e.key] = (t / 1e3 / n, e.count // n)
        total = sum(t for t, _ in rows.values())
        print(f"\n== L={L} key_grad={key_grad} {mode}: device total {total:.3f} ms/iter")
        for name, (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:12]:
            print(f"  {t:8.3f} ms  x{c:<3d} {name[:90]}")

# the configs the autotuner picked (last key of each kernel)
import models.vq_attention.triton as tri  # noqa: E402

for name, kernel in tri._TUNED.items():
    best = getattr(kernel, "best_config", None)
    if best is not None:
        print(f"best config {name}: {best}")

# chunk size A/B (fwd, and fwd+bwd with key_grad=window)
from models.vq_attention.triton import vq_attention_triton  # noqa: E402


def time_call(fn, reps=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for chunk in (128, 256):
    def fwd(chunk=chunk):
        with torch.no_grad():
            vq_attention_triton(q, k, v, cb, codes, bias, attn_fn="softmax", causal=True,
                                window=W, key_grad="window", chunk=chunk)

    def fwdbwd(chunk=chunk):
        out = vq_attention_triton(q, k, v, cb, codes, bias, attn_fn="softmax", causal=True,
                                  window=W, key_grad="window", chunk=chunk)
        torch.autograd.grad(out, (q, k, v, bias), g)

    print(f"chunk {chunk}: fwd {time_call(fwd):.3f} ms, fwd+bwd (window) "
          f"{time_call(fwdbwd):.3f} ms")
