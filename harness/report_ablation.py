"""Ablation sweeps in the report: one table per sweep, field contrasts, codebook statistics.

Sweep cells carry ``sweep``/``study``/``sweep_keys`` (harness/sweep.py); a sweep's rows are
grouped by its grid fields except ``seed``, each group summarised over its seeds as in
harness/report_train.py (mean ± sample std). A field f the sweep varies (``attn_fn``,
``local_bias``) is contrasted value by value: the pooled mean ± std over every run with f = v,
and the *matched* difference against the baseline value b (the model config's default when it is
one of the values, else the first)::

    delta(v) = mean over settings c of the other grid fields that have both v and b of
               ( mean_acc(v, c) - mean_acc(b, c) )          in accuracy points (x100)

Codebook statistics per layer are means over seeds of the last training forward's
``layer_stats`` (``blocks.<i>.codebook_utilisation``: fraction of codes used in the batch;
``...perplexity``: exp of the entropy of the code histogram, at most S).

Sweeps whose only grid field is ``seed`` (one variant per sweep, e.g. the component ablation) are
shown together per task, one row per sweep, with the fields that differ between them.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pandas as pd

from harness import plots
from harness.report_doc import Block, Heading, Images, Table, Text
from harness.report_train import (
    SUMMARY_HEADER,
    _image,
    _value_text,
    fmt_num,
    fmt_pm,
    group_by,
    key_fields,
    label_of,
    mean_std,
    slug,
    summary_cells,
)

STATS = ("utilisation", "perplexity")
COMPARED_FIELDS = ("attn_fn", "local_bias")  # contrasted value by value when a sweep varies them


def ablation_sections(runs: pd.DataFrame, out_dir: Path) -> list[Block]:
    swept = runs[runs["study"].fillna("").str.startswith("sweep-")]
    if swept.empty:
        return []
    blocks: list[Block] = [Heading(2, "Ablations"), Text(
        "One table per sweep, rows grouped by the sweep's grid fields (seed excluded); accuracy "
        "in %, mean ± sample std over seeds. Field contrasts pool every run with a value and "
        "give the matched difference against the baseline value (same other grid fields), in "
        "accuracy points.")]
    seed_only: list[pd.DataFrame] = []
    for study, rows in swept.groupby("study", sort=True):
        keys = rows["sweep_keys"].dropna()
        grid = [k for k in str(keys.iloc[0] if len(keys) else "").split(",")
                if k and k != "seed"]
        if not grid:
            seed_only.append(rows)
            continue
        kind = rows["kind"].iloc[0]
        blocks += [Heading(3, f"Sweep `{rows['sweep'].iloc[0]}`"), Text(
            f"Study `{study}`: {kind} cells" + (f" on task `{rows['task'].iloc[0]}`"
                                                if kind == "train" else "")
            + f", grid over {', '.join(f'`{g}`' for g in grid)}; {len(rows)} cells.")]
        blocks += sweep_blocks(rows, grid, kind, out_dir, slug(study))
    if seed_only:
        combined = pd.concat(seed_only)
        for (kind, task), rows in combined.groupby(["kind", "task"], sort=True):
            fields = ["sweep", *key_fields(rows)]
            blocks += [Heading(3, f"Single-setting sweeps ({kind}, task `{task}`)" if task
                               else f"Single-setting sweeps ({kind})"),
                       Text("Sweeps over seeds only, one row per sweep, with the fields that "
                            "differ between them.")]
            blocks += sweep_blocks(rows, fields, kind, out_dir, slug(f"single-{kind}-{task}"))
    return blocks


def sweep_blocks(rows: pd.DataFrame, grid: list[str], kind: str, out_dir: Path,
                 stem: str) -> list[Block]:
    groups = group_by(rows, grid)
    table = Table([*grid, *SUMMARY_HEADER[kind]],
                  [[*(_value_text(values[g]) for g in grid), *summary_cells(group, kind)]
                   for values, group in groups])
    blocks: list[Block] = [table]
    if kind != "train":
        return blocks
    for name in COMPARED_FIELDS:
        if name in grid and len({str(v[name]) for v, _ in groups}) > 1:
            blocks += contrast_blocks(rows, groups, grid, name)
    images = []
    if "codebook_size" in grid:
        lines = codebook_lines(groups, [g for g in grid if g != "codebook_size"])
        if lines:
            images.append(_image(plots.plot_acc_vs_codebook(
                lines, out_dir / "plots" / f"{stem}_codebook.png",
                "test accuracy vs codebook size"), out_dir, "accuracy vs codebook size"))
    points = cost_points(groups)
    if not points.empty:
        images.append(_image(plots.plot_acc_vs_cost(
            points, out_dir / "plots" / f"{stem}_cost.png", "test accuracy vs cost"),
            out_dir, "accuracy vs wall time and throughput"))
    if images:
        blocks.append(Images(images))
    stats = layer_stats_table(groups, grid)
    if stats is not None:
        blocks += [Heading(4, "Codebook usage per layer"), stats]
    return blocks


# -- contrasts -----------------------------------------------------------------------------------
def baseline_value(model: str, name: str, values: list[Any]) -> Any:
    """The model config's default for ``name`` when it is among ``values``, else the first."""
    try:
        from harness.registry import REGISTRY

        cls = REGISTRY.get(model).config_cls
        default = {f.name: f.default for f in dataclasses.fields(cls)}.get(name)
    except Exception:  # noqa: BLE001 - a missing/broken registry entry only loses the default
        default = None
    matches = [v for v in values if str(v) == str(default)]
    return matches[0] if matches else values[0]


def contrast_blocks(rows: pd.DataFrame, groups: list, grid: list[str], name: str) -> list[Block]:
    values = []
    for group_values, _ in groups:
        if not any(str(v) == str(group_values[name]) for v in values):
            values.append(group_values[name])
    base = baseline_value(str(rows["model"].iloc[0]), name, values)
    others = [g for g in grid if g not in (name, "sweep")]  # one sweep per variant: not matched
    means: dict[tuple[str, str], float] = {}  # (value, setting of the others) -> mean acc
    for group_values, group in groups:
        setting = label_of({o: group_values[o] for o in others})
        mean, _, n = mean_std(group.loc[group["status"] == "ok", "test_acc"])
        if n:
            means[(str(group_values[name]), setting)] = mean
    table = Table([name, "runs", "test acc % (mean ± std, pooled)",
                   f"Δ vs {_value_text(base)} (points, matched)", "matched settings"], [])
    for value in values:
        pooled = rows[[str(c.get(name)) == str(value) for c in rows["config"]]]
        mean, std, n = mean_std(pooled.loc[pooled["status"] == "ok", "test_acc"])
        diffs = [acc - means[(str(base), setting)] for (v, setting), acc in means.items()
                 if v == str(value) and (str(base), setting) in means]
        delta = "baseline" if str(value) == str(base) else (
            f"{100 * sum(diffs) / len(diffs):+.2f}" if diffs else "")
        table.rows.append([_value_text(value), str(n), fmt_pm(mean, std), delta,
                           "" if str(value) == str(base) else str(len(diffs))])
    return [Heading(4, f"`{name}` comparison"), table]


# -- plots data ----------------------------------------------------------------------------------
def codebook_lines(groups: list, others: list[str]) -> dict[str, pd.DataFrame]:
    points: dict[str, list[dict[str, float]]] = {}
    for values, group in groups:
        mean, std, n = mean_std(group.loc[group["status"] == "ok", "test_acc"])
        try:
            size = float(values["codebook_size"])
        except (TypeError, ValueError):
            continue
        if n:
            label = label_of({o: values[o] for o in others})
            points.setdefault(label, []).append({"codebook_size": size, "mean": mean,
                                                 "std": std})
    return {label: pd.DataFrame(p) for label, p in points.items()}


def cost_points(groups: list) -> pd.DataFrame:
    points = []
    for values, group in groups:
        ok = group[group["status"] == "ok"]
        mean, std, n = mean_std(ok["test_acc"])
        if n:
            points.append({"label": label_of(values), "mean": mean, "std": std,
                           "wall_s": ok["wall_s"].mean(),
                           "tokens_per_s": ok["tokens_per_s"].mean()})
    return pd.DataFrame(points)


# -- codebook statistics -------------------------------------------------------------------------
def per_layer(layer_stats: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"blocks.0.codebook_utilisation": u, "blocks.0.quantizer.perplexity": p, ...}`` ->
    ``{"0": {"utilisation": u, "perplexity": p}}``; the first value of a (layer, stat) wins (the
    block's own stat and its quantizer's are the same number)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in layer_stats.items():
        stat = next((s for s in STATS if key.endswith(s)), None)
        if stat is None:
            continue
        match = re.search(r"(?:^|\.)(?:blocks|layers)\.(\d+)(?:\.|$)", key)
        layer = match.group(1) if match else key.rsplit(".", 1)[0]
        out.setdefault(layer, {}).setdefault(stat, float(value))
    return out


def layer_stats_table(groups: list, grid: list[str]) -> Table | None:
    table = Table([*grid, "layer", "codebook utilisation (mean)", "codebook perplexity (mean)"],
                  [])
    for values, group in groups:
        frames = [pd.DataFrame(per_layer(s)).T for s in group["layer_stats"] if s]
        frames = [f for f in frames if not f.empty]
        if not frames:
            continue
        stats = pd.concat(frames).groupby(level=0).mean()
        order = sorted(stats.index, key=lambda x: (0, int(x)) if x.isdigit() else (1, x))
        for layer in order:
            row = stats.loc[layer]
            table.rows.append([*(_value_text(values[g]) for g in grid), layer,
                               fmt_num(row.get("utilisation", float("nan")), 3),
                               fmt_num(row.get("perplexity", float("nan")), 1)])
    return table if table.rows else None
