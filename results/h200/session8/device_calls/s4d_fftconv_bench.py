"""S4D layer fwd+bwd on CUDA: FFT conv with autograd's backward (ref) vs the hand-written one."""
import sys
import torch
import models.ssm as ms
from models.fft_conv import fft_conv, fft_conv_ref
from models.ssm import S4D

torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name())
for bsz, length in ((8, 4096), (8, 8192), (1, 65536)):
    for name, conv in (("ref", fft_conv_ref), ("new", fft_conv)):
        ms.fft_conv = conv
        layer = S4D(128, d_state=64, bidirectional=True).to(dev)
        u = torch.randn(bsz, length, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(u)
        def step():
            y = layer(u)
            y.backward(g)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            step()
        e.record(); torch.cuda.synchronize()
        ms_step = s.elapsed_time(e) / 10
        gr = torch.cuda.CUDAGraph()
        st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            for _ in range(2): step()
        torch.cuda.current_stream().wait_stream(st)
        with torch.cuda.graph(gr):
            step()
        gr.replay(); torch.cuda.synchronize()
        s.record()
        for _ in range(20): gr.replay()
        e.record(); torch.cuda.synchronize()
        print(f"B{bsz} L{length} {name} eager {ms_step:.3f} ms  graph {s.elapsed_time(e)/20:.3f} ms  "
              f"peak {torch.cuda.max_memory_allocated()/2**20:.0f} MiB", flush=True)
        torch.cuda.reset_peak_memory_stats()
