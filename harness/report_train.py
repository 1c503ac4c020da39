"""Training results for the report (and the helpers the ablation tables share), from train rows.

A *configuration* is everything that defines a run except its seed: the train cell (run fields,
the model's full config, task options) and the device's name. Per configuration, over the seeds
that finished with a test accuracy a_1..a_n::

    mean = (1/n) sum_s a_s        std = sqrt( sum_s (a_s - mean)^2 / (n - 1) )   (sample std;
                                                                                 none for n = 1)

Tuning trials (cells labelled ``tune_space`` by harness/tune.py) are left to the optuna
section; sweep cells appear here like any run and again, grouped, in harness/report_ablation.py.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from harness import plots
from harness.report_doc import Block, Bullets, Heading, Image, Images, Table, Text
from harness.store import Store

# labels, not configuration; device_shared_by: sweep workers that shared the cell's device
NOTE_FIELDS = ("sweep", "study", "sweep_keys", "tune_space", "device_shared_by")
MAX_KEY_FIELDS = 8
MAX_FAILURES = 20  # failure messages listed per task
MAX_CURVES = 12  # lines on one learning-curve plot (the best configurations by test accuracy)


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:60]


def load_runs(store: Store, kind: str) -> pd.DataFrame:
    """One row per stored cell with its ``config`` dict (no seed), curve and layer stats."""
    out = []
    for row in store.records(kind):
        cell, result = json.loads(row["cell"]), json.loads(row["result"])
        prov = json.loads(row["provenance"])
        model_config = cell.pop("model_config", {}) or {}
        task_options = cell.pop("task_options", {}) or {}
        config = {k: v for k, v in cell.items()
                  if not isinstance(v, dict | list) and k not in NOTE_FIELDS and k != "seed"}
        config.update({k: v for k, v in model_config.items() if k not in config})
        config.update({f"task.{k}": v for k, v in task_options.items()})
        config["device"] = prov.get("device", cell.get("device"))
        out.append({
            "cell_key": row["cell_key"], "kind": row["kind"], "model": row["model"],
            "status": row["status"], "message": row["message"], "task": cell.get("task", ""),
            "seed": cell.get("seed", 0), **{k: cell.get(k) for k in NOTE_FIELDS},
            "backend": result.get("backend", ""),
            **{k: _float(result.get(k)) for k in ("test_acc", "val_acc_best", "tokens_per_s",
                                                  "peak_mem_mib", "wall_s", "ms_median")},
            "config": config, "config_id": json.dumps(config, sort_keys=True, default=str),
            "curve": result.get("curve") or [], "layer_stats": result.get("layer_stats") or {},
        })
    return pd.DataFrame(out)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def field_value(row: pd.Series, name: str) -> Any:
    if name in ("model", "sweep"):
        return row[name]
    return row["config"].get(name)


def _sort_key(value: Any) -> tuple:
    if isinstance(value, bool):
        return (0, -int(value), "")  # True (component on) first
    if isinstance(value, int | float):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def key_fields(rows: pd.DataFrame) -> list[str]:
    """Fields that tell configurations apart: varying within one model, or present in every row
    and varying across models (lr, steps, d_ffn ...)."""
    found: list[str] = []
    for config_rows in (rows, *(g for _, g in rows.groupby("model"))):
        configs = list(config_rows["config"])
        names = dict.fromkeys(k for c in configs for k in c)
        for name in names:
            present = [json.dumps(c[name], default=str) for c in configs if name in c]
            everywhere = len(present) == len(configs)
            if len(set(present)) > 1 and (everywhere or config_rows is not rows):
                if name not in found:
                    found.append(name)
    return [n for n in found if n != "model"]


def mean_std(values: pd.Series) -> tuple[float, float, int]:
    values = values.dropna()
    if values.empty:
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std(ddof=1)), len(values)


def fmt_pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` (scaled; accuracy in %), ``mean`` alone for one seed, empty for none."""
    if pd.isna(mean):
        return ""
    if pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def fmt_num(value: float, digits: int = 1) -> str:
    return "" if pd.isna(value) else f"{value:,.{digits}f}"


def statuses(rows: pd.DataFrame) -> str:
    return ", ".join(f"{s} {n}" for s, n in sorted(Counter(rows["status"]).items()))


def _value_text(value: Any) -> str:
    return "" if value is None else str(value)


def summary_cells(rows: pd.DataFrame, kind: str) -> list[str]:
    """n seeds, metric mean ± std and the cost columns of one group of seeds."""
    ok = rows[rows["status"] == "ok"]
    if kind == "efficiency":
        mean, std, n = mean_std(ok["ms_median"])
        return [str(n), fmt_pm(mean, std, 1.0, 1), fmt_num(ok["tokens_per_s"].mean(), 0),
                fmt_num(ok["peak_mem_mib"].mean()), statuses(rows)]
    mean, std, n = mean_std(ok["test_acc"])
    seeds = ",".join(str(s) for s in sorted(ok.loc[ok["test_acc"].notna(), "seed"]))
    return [f"{n} ({seeds})" if n else "0", fmt_pm(mean, std),
            fmt_pm(ok["val_acc_best"].mean(), float("nan")),
            fmt_num(ok["tokens_per_s"].mean(), 0) + (SHARED_MARK if shared(ok) else ""),
            fmt_num(ok["peak_mem_mib"].mean()), fmt_num(ok["wall_s"].mean()), statuses(rows)]


SHARED_MARK = " †"
SHARED_NOTE = (f"{SHARED_MARK.strip()} measured by a sweep worker that shared its device with "
               "other workers (`sweep --workers N`): cells may have run side by side, so these "
               "tokens/s are not clean speed numbers (peak memory is per process and is).")


def shared(rows: pd.DataFrame) -> bool:
    """Any of these cells ran in a sweep whose workers shared one device."""
    if "device_shared_by" not in rows:
        return False
    return bool((pd.to_numeric(rows["device_shared_by"], errors="coerce") > 1).any())


SUMMARY_HEADER = {
    "train": ["seeds", "test acc % (mean ± std)", "best val acc %", "tokens/s", "peak MiB",
              "wall s", "status"],
    "efficiency": ["seeds", "ms/step (mean ± std)", "tokens/s", "peak MiB", "status"],
}


def group_by(rows: pd.DataFrame, names: list[str]) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Rows grouped by the values of ``names``, groups in a natural order (numbers ascending)."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for index, row in rows.iterrows():
        values = {n: field_value(row, n) for n in names}
        key = json.dumps(values, sort_keys=True, default=str)
        groups.setdefault(key, (values, []))[1].append(index)
    ordered = sorted(groups.values(), key=lambda g: [_sort_key(g[0][n]) for n in names])
    return [(values, rows.loc[index]) for values, index in ordered]


def label_of(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value_text(v)}" for k, v in values.items())


def _image(path: Path, out_dir: Path, alt: str) -> Image:
    return Image(path, path.relative_to(out_dir).as_posix(), alt)


# -- training results ----------------------------------------------------------------------------
def training_sections(runs: pd.DataFrame, out_dir: Path) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Training results")]
    tuned = runs[runs["tune_space"].notna()]
    runs = runs[runs["tune_space"].isna()]
    blocks.append(Text(
        "One row per configuration (every setting except the seed). Test accuracy is that of "
        "the weights with the best validation accuracy (LRA model selection), in %, mean ± "
        "sample std over the seeds that finished; tokens/s, peak MiB and wall s are means over "
        "them. Key fields are those that differ between the task's configurations."
        + (f" {SHARED_NOTE}" if shared(runs) else "")
        + (f" {len(tuned)} optuna tuning trials are summarised under Optuna studies instead."
           if len(tuned) else "")))
    for task, rows in runs.groupby("task", sort=True):
        all_fields = key_fields(rows)
        varies_l = "seq_len" in all_fields  # L has its own column
        fields = [f for f in all_fields if f != "seq_len"][:MAX_KEY_FIELDS]
        blocks += [Heading(3, f"Task `{task}`")]
        table = Table(["model", "backend", "L", *fields, *SUMMARY_HEADER["train"]], [])
        curves: dict[str, pd.DataFrame] = {}
        scores: dict[str, float] = {}
        order = ["seq_len", *fields]
        for _, group in sorted(rows.groupby("config_id"),
                               key=lambda g: _group_order(g[1], order)):
            first = group.iloc[0]
            backends = sorted({b for b in group["backend"] if b})
            table.rows.append([first["model"], ", ".join(backends),
                               _value_text(first["config"].get("seq_len")),
                               *(_value_text(first["config"].get(f)) for f in fields),
                               *summary_cells(group, "train")])
            label = " ".join([first["model"], *(f"{f}={first['config'][f]}" for f in order
                                                if first["config"].get(f) is not None
                                                and (f != "seq_len" or varies_l))])
            if label in curves:  # differs only in fields beyond MAX_KEY_FIELDS
                label += f" #{len(curves) + 1}"
            curve = mean_curve(group["curve"])
            if not curve.empty:
                curves[label] = curve
                scores[label] = group["test_acc"].mean()
        blocks.append(table)
        if curves:
            shown = sorted(curves, key=lambda k: -scores[k] if pd.notna(scores[k]) else 1.0)
            note = (f" (the {MAX_CURVES} best of {len(curves)} configurations)"
                    if len(curves) > MAX_CURVES else "")
            path = plots.plot_learning_curves({k: curves[k] for k in shown[:MAX_CURVES]},
                                              out_dir / "plots" / f"train_{slug(task)}_curves.png",
                                              f"{task}: learning curves, mean over seeds{note}")
            blocks.append(Images([_image(path, out_dir, f"{task} learning curves")]))
        failed = rows[rows["status"] != "ok"]
        items = [f"`{r['model']}` seed {r['seed']}: **{r['status']}** — "
                 f"{str(r['message'])[:200]}" for _, r in failed.head(MAX_FAILURES).iterrows()]
        if len(failed) > MAX_FAILURES:
            items.append(f"… and {len(failed) - MAX_FAILURES} more runs that did not finish ok")
        if items:
            blocks.append(Bullets(items))
    return blocks


def _group_order(group: pd.DataFrame, fields: list[str]) -> tuple:
    first = group.iloc[0]
    return (first["model"], *(_sort_key(first["config"].get(f)) for f in fields),
            first["config_id"])


def mean_curve(curves: pd.Series) -> pd.DataFrame:
    """The seeds' curves averaged step by step (train_loss, val_acc)."""
    frames = [pd.DataFrame(c) for c in curves if c]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    columns = [c for c in ("train_loss", "val_acc") if c in frame]
    if "step" not in frame or not columns:
        return pd.DataFrame()
    return frame.groupby("step", as_index=False)[columns].mean()
