"""Rebuild a preset's tables and plots from a store (the device call's own output files did not
come back: its time limit cut the tar)."""
import sys
from pathlib import Path

from rich.console import Console

from harness.commands.efficiency import print_preset
from harness.runner import CSV_COLUMNS
from harness.store import Store

store_path, preset, out = sys.argv[1:4]
frame = Store(store_path).dataframe("efficiency")
frame = frame[frame["preset"] == preset].sort_values("id" if "id" in frame else "cell_key")
for column in CSV_COLUMNS:
    if column not in frame:
        frame[column] = None
frame = frame[CSV_COLUMNS + [c for c in frame.columns if c not in CSV_COLUMNS]].reset_index(drop=True)
print_preset(frame, preset, Path(out), Console(width=200))
