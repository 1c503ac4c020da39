# What the Triton VQ attention op saves for its backward, counted under Triton's CPU interpreter
# (session 11): LongVQ's shape at B 1, L 512 (the interpreter is too slow at 4096; every saved
# tensor but the codebook and the bias is linear in B x L). Run from the repository root:
#   TRITON_INTERPRET=1 LONGVQ_TRITON_AUTOTUNE=0 PYTHONPATH=. python results/cpu-saved-memory/triton_op_saved.py
import time, torch
from tests.triton_interpreter import patch_interpreter
patch_interpreter()
from models.vq_attention.triton import vq_attention_triton
from harness.memory_accounting import saved_for_backward
B, L, D, DV, S, W = 1, 512, 64, 256, 256, 64
g = torch.Generator().manual_seed(0)
q = torch.randn(B, 1, L, D, generator=g).bfloat16().requires_grad_()
cb = torch.randn(1, S, D, generator=g)
codes = torch.randint(0, S, (B, 1, L), generator=g)
k = cb[0][codes].bfloat16().requires_grad_()
v = torch.randn(B, 1, L, DV, generator=g).bfloat16().requires_grad_()
bias = torch.randn(2 * W - 1, generator=g).requires_grad_()
t = time.time()
out = vq_attention_triton(q, k, v, cb, codes, bias, attn_fn="softmax", causal=False, window=W, key_grad="window")
print(f"forward {time.time()-t:.0f} s")
saved = saved_for_backward(out.float().sum(), set())
for s in saved:
    print(s.holder, s.shape, s.dtype, s.storage_bytes)
print("total MiB at B=1:", sum(s.storage_bytes for s in saved) / 2**20, " x64 (B 8, L 4096):", 64 * sum(s.storage_bytes for s in saved) / 2**20)
