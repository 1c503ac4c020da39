"""Saved-for-backward bytes of compiled LongVQ cells run one after another in one process (inductor,
small shape): a budget cell after a default cell, and the reverse, must save what each saves in
a fresh process (the compile caches key on the budget)."""
import sys, torch
from harness.measure import EfficiencyCell
from harness.memory_accounting import account_cell
from harness.registry import parse_model_spec
torch.set_num_threads(2)
for name in sys.argv[1:]:
    spec = parse_model_spec(name)
    config = spec.entry.make_config(d_model=64, n_layers=2, n_heads=2, d_ffn=128, **dict(spec.overrides))
    a = account_cell(spec.entry, config, EfficiencyCell(spec.label, 512, 2, "cpu", "bf16", warmup=1, compile=True))
    print(name, round(a.saved_bytes / 2**20, 3))
