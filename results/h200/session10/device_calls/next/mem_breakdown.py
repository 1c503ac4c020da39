"""Where a compiled training step's peak memory goes (CUDA): the allocator's history over one
step after warm-up, replayed to the peak; the blocks alive there summed by the first frame
in this repository (or in generated inductor code). argv: model spec, L, batch."""
import collections
import os
import sys

import torch

from harness.measure import EfficiencyCell, build_step
from harness.registry import parse_model_spec

spec = parse_model_spec(sys.argv[1])
length, bsz = int(sys.argv[2]), int(sys.argv[3])
config = spec.entry.make_config(d_model=128, n_layers=2, d_ffn=256, n_heads=4, vocab_size=257,
                                n_classes=2, **dict(spec.overrides))
cell = EfficiencyCell(spec.label, length, bsz, "cuda", "bf16", compile=True)
step = build_step(spec.entry, config, cell, torch.device("cuda")).step
for _ in range(3):
    step()
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
step()
torch.cuda.synchronize()
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
peak = torch.cuda.max_memory_allocated()
live, cur, best, best_live = {}, 0, 0, {}
for ev in snap["device_traces"][0]:
    if ev["action"] == "alloc":
        live[ev["addr"]] = ev
        cur += ev["size"]
        if cur > best:
            best, best_live = cur, dict(live)
    elif ev["action"] in ("free_completed",) and ev["addr"] in live:
        cur -= live.pop(ev["addr"])["size"]


ROOT = os.getcwd()


def where(ev):
    for f in ev.get("frames", []):
        name = f["filename"]
        if name.startswith(ROOT) or "torchinductor" in name:
            return f"{name.split('/')[-1]}:{f['line']} {f['name']}"
    return "other: " + (ev["frames"][0]["name"] if ev.get("frames") else "?")


groups = collections.Counter()
for ev in best_live.values():
    groups[where(ev)] += ev["size"]
print(f"{sys.argv[1]} L{length} B{bsz}: resident before the step {base / 2**20:.0f} MiB, "
      f"max_memory_allocated {peak / 2**20:.0f} MiB, step allocations live at their peak "
      f"{best / 2**20:.0f} MiB")
for name, size in groups.most_common(40):
    print(f"{size / 2**20:9.1f} MiB  {name}")
