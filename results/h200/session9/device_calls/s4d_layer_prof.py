"""Kernel table of one S4D layer fwd+bwd (eager) on CUDA: argv conv B L."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from models.ssm import S4D

conv, bsz, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
layer = S4D(128, d_state=64, bidirectional=True, conv=conv).cuda()
u = torch.randn(bsz, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(u)
for _ in range(3):
    layer(u).backward(g)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        layer(u).backward(g)
    torch.cuda.synchronize()
print(f"{conv} B{bsz} L{length}: per step, 5 steps")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
