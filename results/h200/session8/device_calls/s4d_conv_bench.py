"""S4D conv fwd+bwd on CUDA: fft vs chunked (T = 64/128/256), and max error vs fft in fp32."""
import sys
import torch
import models.s4d_chunked as sc
from models.ssm import S4D

torch.manual_seed(0)
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
print(torch.cuda.get_device_name() if dev == "cuda" else dev)
for bsz, length in ((8, 4096), (8, 8192), (1, 65536)):
    for conv, chunk in (("fft", None), ("chunked", 64), ("chunked", 128), ("chunked", 256)):
      try:
        layer = S4D(128, d_state=64, bidirectional=True, conv=conv).to(dev)
        sc.s4d_chunk_size = (lambda L, c=chunk: c) if chunk else sc.s4d_chunk_size
        import models.ssm as ms
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
        # graph-replayed time (no launch overhead), as the --cuda-graph rows see it
        gr = torch.cuda.CUDAGraph()
        st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            for _ in range(2): step()
        torch.cuda.current_stream().wait_stream(st)
        with torch.cuda.graph(gr):
            step()
        gr.replay(); torch.cuda.synchronize()
        s.record()
        for _ in range(10): gr.replay()
        e.record(); torch.cuda.synchronize()
        print(f"B{bsz} L{length} {conv:8s} T={chunk} eager {ms_step:.3f} ms  graph {s.elapsed_time(e)/10:.3f} ms  "
              f"peak {torch.cuda.max_memory_allocated()/2**20:.0f} MiB", flush=True)
        torch.cuda.reset_peak_memory_stats()
      except Exception as exc:  # noqa: BLE001
        print(f"B{bsz} L{length} {conv} T={chunk} FAILED {type(exc).__name__}: {exc}", flush=True)
    x = torch.randn(bsz, 128, length, device=dev)
    ref_layer = S4D(128, d_state=64, bidirectional=True).to(dev)
    from models.ssm import _fft_conv
    dt_a, d_b, c = ref_layer.kernel.discretize()
    with torch.no_grad():
        ref = _fft_conv(x.double(), ref_layer.conv_kernel(length).double(), 2 * length)
        for chunk in (64, 128, 256):
            got = sc.s4d_chunked_conv(x, c * d_b, dt_a, chunk)
            print(f"  err chunked T={chunk} fp32 vs fp64 fft: {(got - ref).abs().max().item():.2e}")
        got = _fft_conv(x, ref_layer.conv_kernel(length), 2 * length)
        print(f"  err fft fp32 vs fp64 fft: {(got - ref).abs().max().item():.2e}  (|ref| max {ref.abs().max().item():.1f})")
