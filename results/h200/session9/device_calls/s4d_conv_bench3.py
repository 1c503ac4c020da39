"""S4D layer fwd+bwd on CUDA (eager and CUDA-graph replay): conv="fft" vs conv="chunked"."""
import torch

from models.ssm import S4D

torch.manual_seed(0)
print(torch.cuda.get_device_name())
import sys
sizes = [tuple(map(int, a.split("x"))) for a in sys.argv[1:]]
for bsz, length in sizes:
    for conv in ("fft", "chunked"):
        try:
            layer = S4D(128, d_state=64, bidirectional=True, conv=conv).cuda()
            u = torch.randn(bsz, length, 128, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True)
            g = torch.randn_like(u)

            def step():
                layer(u).backward(g)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                step()
            e.record()
            torch.cuda.synchronize()
            eager = s.elapsed_time(e) / 10
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                step()
            graph.replay()
            torch.cuda.synchronize()
            s.record()
            for _ in range(20):
                graph.replay()
            e.record()
            torch.cuda.synchronize()
            print(f"B{bsz} L{length} {conv:8s} eager {eager:.3f} ms  graph "
                  f"{s.elapsed_time(e) / 20:.3f} ms  peak "
                  f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)
            torch.cuda.reset_peak_memory_stats()
        except Exception as exc:  # noqa: BLE001
            print(f"B{bsz} L{length} {conv} FAILED {type(exc).__name__}: {exc}", flush=True)
