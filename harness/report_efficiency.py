"""The efficiency presets' tables: the paper's speed x / memory x format, crossovers, growth.

Used by ``efficiency --preset`` (printed, and written with ``--out``) and by the report (rows of
the store that carry a ``preset``; other efficiency rows keep the generic section of
harness/report.py).

Definitions (all within one preset run: same device, dtype, compile setting and backbone):

- speed x = ms(reference) / ms(model), memory x = peak(reference) / peak(model), at the same L and
  batch, for reference = transformer_vanilla and transformer_sdpa (> 1: faster / smaller). The
  paper's "5.3x faster, 10x less memory" are speed x and memory x against vanilla. Rows of a
  causal-only entry (LM head) are compared with the classification-head references and flagged
  by their ``head`` column.
- crossover with transformer_sdpa: the first L from which the model stays faster. At each L the
  model is *faster* (it finished and sdpa was slower or failed), *not faster* (it was slower, or
  it failed while sdpa finished) or *unknown* (both failed, or one was not measured); the
  crossover is the smallest measured L at which it is faster and from which it is never "not
  faster". None: never faster, or slower again at the longest lengths.
- growth from L1 to L2 = 8 x L1 (8K -> 64K in the GPU preset): step time ratio ms(L2)/ms(L1) and
  per-sequence time ratio (ms/batch)(L2) / (ms/batch)(L1). With constant tokens per step a
  linear-time model's step time stays flat and its per-sequence time grows ~8x (the issue's test:
  <= 9x); a quadratic one grows ~64x.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import field_names
from harness.efficiency_presets import CROSSOVER_REFERENCE, REFERENCE_MODELS
from harness.plots import plot_vs_length
from harness.registry import ModelSpec, parse_model_spec
from harness.report_doc import (
    Block,
    Bullets,
    Heading,
    Image,
    Images,
    Table,
    Text,
    render_markdown,
)

GROWTH_LIMIT = 9.0  # the bound on per-sequence time growth 8K -> 64K (linear models)
BACKBONE_KEYS = ["d_model", "n_layers", "d_ffn", "n_heads"]
RUN_KEYS = ["preset", "device", "dtype", "compile", "cuda_graph"]


def normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows written before a field existed get its default (compile and CUDA graph off, no
    preset)."""
    frame = frame.copy()
    for column, default in (("compile", False), ("cuda_graph", False), ("preset", ""),
                            ("message", "")):
        if column not in frame:
            frame[column] = default
        frame[column] = frame[column].astype(object).where(frame[column].notna(), default)
    frame["compile"] = frame["compile"].map(bool)
    frame["cuda_graph"] = frame["cuda_graph"].map(bool)
    return frame


def _like_default(value: Any, default: Any) -> Any:
    """A stored value in its field's type (pandas gives 64.0 for a column with gaps)."""
    if pd.isna(value):
        return default
    if isinstance(default, bool) or not isinstance(default, int | float):
        return value
    number = float(value)
    return int(number) if isinstance(default, int) and number.is_integer() else number


def label_config_variants(frame: pd.DataFrame, shared: Sequence[str] = ()) -> pd.DataFrame:
    """Tell apart the rows of one model label whose model configs differ (runs with different
    ``--set`` values into one store): each such row's label gets the fields that vary among
    them, where they differ from the label's own config, as variant fields, the way
    ``--models`` writes variants (``longvq[codebook_size=64]``; a row at the config's values
    keeps its plain label, so the references stay references). ``shared``: fields the tables
    group by (the backbone), left out. Labels the registry cannot parse are kept."""
    frame = frame.copy()
    for label, rows in frame.groupby("model", sort=False):
        try:
            spec = parse_model_spec(str(label))
        except (KeyError, ValueError):  # RegistryError is a KeyError
            continue
        config = spec.entry.make_config(**dict(spec.overrides))
        defaults = {name: getattr(config, name) for name in field_names(config)
                    if name in rows and name not in shared}
        values = {name: rows[name].map(lambda v, d=default: _like_default(v, d))
                  for name, default in defaults.items()}
        varying = [name for name, column in values.items() if column.astype(str).nunique() > 1]
        for index in rows.index:
            extra = tuple((name, str(values[name][index])) for name in varying
                          if str(values[name][index]) != str(defaults[name]))
            if extra:
                frame.at[index, "model"] = ModelSpec(spec.entry, spec.overrides + extra).label
    return frame


def reference_ratios(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``frame`` with speed_x_{vanilla,sdpa} and mem_x_{vanilla,sdpa}: reference / model between
    rows that agree on ``keys`` (NaN where either did not finish). A reference measured twice
    at the same keys (a cell rerun with other warm-up/steps/seed) counts once: the last row."""
    frame = frame.copy()
    keys = list(keys)
    ok = frame[frame["status"] == "ok"]
    ms = pd.to_numeric(frame["ms_median"], errors="coerce").to_numpy()
    mem = pd.to_numeric(frame["peak_mem_mib"], errors="coerce").to_numpy()
    finished = (frame["status"] == "ok").to_numpy()
    for ref in REFERENCE_MODELS:
        short = ref.removeprefix("transformer_")
        base = ok[ok["model"] == ref][keys + ["ms_median", "peak_mem_mib"]]
        base = base.drop_duplicates(subset=keys, keep="last")
        base = base.rename(columns={"ms_median": "_ref_ms", "peak_mem_mib": "_ref_mem"})
        merged = frame.merge(base, on=keys, how="left")
        frame[f"speed_x_{short}"] = pd.to_numeric(merged["_ref_ms"]).to_numpy() / ms
        frame[f"mem_x_{short}"] = pd.to_numeric(merged["_ref_mem"]).to_numpy() / mem
        frame.loc[~finished, [f"speed_x_{short}", f"mem_x_{short}"]] = float("nan")
    return frame


def paper_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """The ratios (``reference_ratios``) at the same L, batch, device, dtype, compile setting,
    preset and backbone."""
    frame = normalised(frame)
    keys = [k for k in RUN_KEYS + BACKBONE_KEYS if k in frame] + ["seq_len", "batch"]
    return reference_ratios(frame, keys)


def crossover_length(model_ms: Mapping[int, float | None],
                     ref_ms: Mapping[int, float | None]) -> int | None:
    """The first L from which the model stays faster than the reference (module docstring).

    Both maps: L -> ms/step, None where the cell failed (oom, error); a missing L was not run.
    """
    candidate: int | None = None
    for length in sorted(model_ms, reverse=True):
        mine, theirs = model_ms[length], ref_ms.get(length)
        ref_failed = length in ref_ms and theirs is None
        if mine is None:
            if theirs is not None:
                break  # the model failed where the reference ran: not faster
            continue  # both failed / reference not run: unknown
        if theirs is None and not ref_failed:
            continue  # reference not measured here: unknown
        if ref_failed or mine < theirs:
            candidate = length
        else:
            break
    return candidate


def _ms_by_length(rows: pd.DataFrame) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    for _, row in rows.iterrows():
        ok = row["status"] == "ok" and pd.notna(row.get("ms_median"))
        out[int(row["seq_len"])] = float(row["ms_median"]) if ok else None
    return out


def crossovers(frame: pd.DataFrame,
               reference: str = CROSSOVER_REFERENCE) -> dict[str, int | None]:
    """Crossover length of every model of one run against ``reference`` (absent: no reference
    rows)."""
    ref_rows = frame[frame["model"] == reference]
    if ref_rows.empty:
        return {}
    ref = _ms_by_length(ref_rows)
    return {str(model): crossover_length(_ms_by_length(rows), ref)
            for model, rows in frame.groupby("model", sort=True) if model != reference}


def growth_lengths(frame: pd.DataFrame) -> tuple[int, int] | None:
    """(L/8, L) for the longest L of the run when both were planned (8K -> 64K on the GPU)."""
    lengths = sorted({int(v) for v in frame["seq_len"]})
    if len(lengths) < 2:
        return None
    longest = lengths[-1]
    return (longest // 8, longest) if longest // 8 in lengths else (lengths[0], longest)


def growth(rows: pd.DataFrame, short: int, long: int) -> tuple[float, float] | None:
    """(step-time ratio, per-sequence-time ratio) of one model from ``short`` to ``long``."""
    picked = {}
    for length in (short, long):
        hit = rows[(rows["seq_len"] == length) & (rows["status"] == "ok")]
        if hit.empty:
            return None
        picked[length] = (float(hit["ms_median"].iloc[-1]), int(hit["batch"].iloc[-1]))
    (ms_a, batch_a), (ms_b, batch_b) = picked[short], picked[long]
    return ms_b / ms_a, (ms_b / batch_b) / (ms_a / batch_a)


def _fmt_len(length: int | None) -> str:
    if length is None:
        return ""
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _fmt(value: object, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: object) -> str:
    text = _fmt(value, 2)
    return text + "×" if text else "–"


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    """References first, then the other models by name; one length: by model, several: each
    model's lengths together (ascending)."""
    rank = {name: i for i, name in enumerate(REFERENCE_MODELS)}
    keyed = frame.assign(_rank=frame["model"].map(lambda m: rank.get(m, len(rank))))
    return keyed.sort_values(["_rank", "model", "seq_len"]).drop(columns="_rank")


def status_text(row: pd.Series) -> str:
    message = str(row.get("message") or "")
    if message.startswith("skipped-"):
        return f"{row['status']} (skipped)"
    if message.startswith("too-slow"):
        return "too slow"
    return str(row["status"])


PAPER_HEADER = ["model", "backend", "L", "batch", "head", "compile", "status", "ms/step",
                "tokens/s", "peak MiB", "params", "speed × vanilla", "memory × vanilla",
                "speed × sdpa", "memory × sdpa"]


def paper_table(frame: pd.DataFrame) -> Table:
    """The paper-format table of one preset run (frame from :func:`paper_ratios`)."""
    table = Table(PAPER_HEADER, [])
    for _, row in _order(frame).iterrows():
        ok = row["status"] == "ok"
        params = row.get("params")
        table.rows.append([
            str(row["model"]),
            row["backend"] if isinstance(row.get("backend"), str) else "",
            str(int(row["seq_len"])),
            str(int(row["batch"])),
            str(row.get("head") or ""),
            "on" if row.get("compile") else "off",
            status_text(row),
            _fmt(row.get("ms_median")) if ok else "",
            f"{row['tokens_per_s']:,.0f}" if ok else "",
            _fmt(row.get("peak_mem_mib")) if ok else "",
            f"{int(params):,}" if ok and pd.notna(params) else "",
            _ratio(row.get("speed_x_vanilla")),
            _ratio(row.get("mem_x_vanilla")),
            _ratio(row.get("speed_x_sdpa")),
            _ratio(row.get("mem_x_sdpa")),
        ])
    return table


SCALING_HEADER = ["model", "crossover vs sdpa", "first oom L", "step time ×",
                  "per-sequence time ×", f"per-sequence ≤ {GROWTH_LIMIT:g}×"]


def scaling_table(frame: pd.DataFrame) -> tuple[Table, dict[str, int | None]]:
    """Per model: crossover with transformer_sdpa, first failing length, time growth."""
    cross = crossovers(frame)
    lengths = growth_lengths(frame)
    span = f"{_fmt_len(lengths[0])} → {_fmt_len(lengths[1])}" if lengths else ""
    header = list(SCALING_HEADER)
    header[3] = f"step time × {span}".strip()
    header[4] = f"per-sequence time × {span}".strip()
    table = Table(header, [], caption="Crossover: the first L from which the model stays "
                  "faster than transformer_sdpa (– never / not measured). Growth: step time and "
                  "time per sequence (step time / batch) between the two lengths; "
                  f"linear-time models should stay ≤ {GROWTH_LIMIT:g}× per sequence.")
    for model, rows in frame.groupby("model", sort=True):
        failed = rows[rows["status"] == "oom"]["seq_len"]
        grew = growth(rows, *lengths) if lengths else None
        if model == CROSSOVER_REFERENCE:
            cross_text = "(reference)"
        else:
            cross_text = _fmt_len(cross.get(str(model))) or "–"
        table.rows.append([
            str(model),
            cross_text,
            _fmt_len(int(failed.min())) if not failed.empty else "",
            f"{grew[0]:.2f}×" if grew else "–",
            f"{grew[1]:.2f}×" if grew else "–",
            ("yes" if grew[1] <= GROWTH_LIMIT else "no") if grew else "–",
        ])
    return table, cross


def backbone_text(frame: pd.DataFrame) -> str:
    """One line stating the shared backbone, batches and parameter counts of a run."""
    first = frame.iloc[0]
    parts = [f"{k} {int(first[k])}" for k in BACKBONE_KEYS if k in frame and pd.notna(first[k])]
    if "vocab_size" in frame and pd.notna(first.get("vocab_size")):
        parts.append(f"vocab {int(first['vocab_size'])}")
    heads = ", ".join(sorted({str(h) for h in frame.get("head", pd.Series(dtype=str))
                               if isinstance(h, str)}))
    batches = sorted({(int(r["seq_len"]), int(r["batch"])) for _, r in frame.iterrows()})
    batch_text = ", ".join(f"L={_fmt_len(length)}: {batch}" for length, batch in batches)
    ok = frame[(frame["status"] == "ok") & frame["params"].notna()] if "params" in frame \
        else frame.iloc[0:0]
    params = ", ".join(f"{m} {int(p):,}" for m, p in
                       ok.groupby("model")["params"].first().items())
    first_row = frame.iloc[0]
    run = (f"device {first_row.get('device')}, dtype {first_row.get('dtype')}, "
           f"torch.compile {'on' if first_row.get('compile') else 'off'}, "
           f"CUDA graph {'on' if first_row.get('cuda_graph') else 'off'}")
    budgets = _memory_budgets(frame)
    if budgets:
        run += f", activation memory budget {budgets} (the others: torch's default, 1)"
    return (f"Backbone: {', '.join(parts)}; heads: {heads or '-'}. Batch: {batch_text}. {run}. "
            f"Params: {params or '-'}.")


def check_text(frame: pd.DataFrame) -> str:
    """The fast-path checks of the rows (harness/fast_path_check.py), one clause per model."""
    if "check" not in frame or frame["check"].isna().all():
        return ("Fast-path check: not recorded (rows written before the harness checked each "
                "model's fast kernels against its reference).")
    clauses = []
    for model, rows in frame.groupby("model", sort=True):
        statuses = set(rows["check"].dropna().astype(str))
        errors = pd.to_numeric(rows.get("check_rel_err"), errors="coerce").dropna()
        against = ", ".join(sorted(set(rows["check_reference"].dropna().astype(str))))
        if statuses & {"failed", "error"}:
            text = "FAILED (rows not timed)" if "failed" in statuses else "could not run"
        elif "passed" in statuses:
            text = f"passed vs {against}, max rel err {errors.max():.1e}"
        elif "reference" in statuses:
            text = f"no fast path ran ({against})"
        elif "skipped" in statuses:
            text = "skipped (--skip-check)"
        else:
            text = "no reference (the model is its own)" if statuses else "not recorded"
        clauses.append(f"`{model}` {text}")
    return ("Fast-path check (before timing, each model's fast kernels against its reference "
            "on this device: logits and every gradient, one layer): " + "; ".join(clauses) + ".")


def _memory_budgets(frame: pd.DataFrame) -> str:
    """'0.5 (longvq[...])' for the models run with an activation memory budget below 1."""
    if "activation_memory_budget" not in frame:
        return ""
    budget = pd.to_numeric(frame["activation_memory_budget"], errors="coerce").fillna(1.0)
    lean = frame[budget < 1.0].assign(_budget=budget[budget < 1.0])
    return ", ".join(f"{b:g} ({', '.join(sorted(map(str, rows['model'].unique())))})"
                     for b, rows in lean.groupby("_budget"))


def preset_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(description, rows) of each preset run in the frame (one device/dtype/compile/backbone)."""
    frame = normalised(frame)
    keys = [k for k in RUN_KEYS + BACKBONE_KEYS if k in frame]
    out = []
    for group, rows in frame.groupby(keys, dropna=False, sort=True):
        desc = ", ".join(f"{k}={v}" for k, v in zip(keys, group, strict=True))
        out.append((desc, label_config_variants(rows, shared=keys)))
    return out


def preset_blocks(rows: pd.DataFrame, out_dir: Path | None, plot_dir_rel: str, stem: str,
                  title: str) -> list[Block]:
    """Backbone line, paper-format table, and for a multi-length run the crossovers, growth
    table and log-log plots of time and memory vs L (written under ``out_dir``; no plots when
    it is None)."""
    rows = paper_ratios(rows)
    blocks: list[Block] = [Text(backbone_text(rows)), paper_table(rows), Text(check_text(rows))]
    causal_only = sorted(set(rows[rows["head"] == "lm"]["model"])) if "head" in rows else []
    if causal_only:
        blocks.append(Text(f"{', '.join(f'`{m}`' for m in causal_only)}: no bidirectional mode, "
                           "measured with the causal LM head (a vocab-sized projection at "
                           "every position); ratios compare with the classification-head "
                           "references."))
    if rows["seq_len"].nunique() > 1:
        summary, cross = scaling_table(rows)
        blocks.append(summary)
        found = {m: length for m, length in cross.items() if length is not None}
        paths = [] if out_dir is None else plot_vs_length(
            rows, out_dir, title, stem=stem, crossovers=found, reference=CROSSOVER_REFERENCE)
        if paths:
            blocks.append(Images([Image(p, f"{plot_dir_rel}{p.name}", p.stem) for p in paths]))
    failures = rows[(rows["status"] != "ok")]
    failures = failures[~failures["message"].astype(str).str.startswith("skipped-")]
    if not failures.empty:
        blocks.append(Bullets([f"`{row['model']}` L={row['seq_len']}: **{row['status']}** — "
                               f"{str(row['message'])[:200]}" for _, row in failures.iterrows()]))
    return blocks


def _slug(text: str) -> str:
    """A file-name stem: the readable start of ``text`` plus a hash of all of it (unique)."""
    import hashlib

    short = "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:48]
    return f"{short}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def preset_sections(frame: pd.DataFrame, out_dir: Path) -> list[Block]:
    """Report sections of the preset rows (plots under ``out_dir/plots``)."""
    if frame.empty:
        return []
    blocks: list[Block] = [Heading(2, "Efficiency presets"), Text(
        "Rows of `efficiency --preset` runs, in the paper's format: speed × = ms(reference) / "
        "ms(model) and memory × = peak(reference) / peak(model) at the same L and batch "
        "(> 1: faster / smaller; the paper reports 5.3× and 10× for LongVQ against vanilla at "
        "4K). Peak memory is allocated memory. Skipped cells were not run because a shorter "
        "one of the same model already failed.")]
    for desc, rows in preset_groups(frame):
        blocks.append(Heading(3, desc))
        blocks += preset_blocks(rows, out_dir / "plots", "plots/", _slug(desc) + "_", desc)
    return blocks


def efficiency_report(frame: pd.DataFrame, out_dir: Path,
                      generic: Callable[[pd.DataFrame, Path], list[Block]]) -> list[Block]:
    """The report's efficiency part: ``generic`` sections for plain rows, preset sections for
    rows of ``efficiency --preset`` runs (whose batch varies with L in the scaling preset)."""
    if "preset" in frame:
        preset = frame["preset"].fillna("").astype(str) != ""
    else:
        preset = pd.Series(False, index=frame.index)
    blocks = generic(frame[~preset], out_dir) if (~preset).any() else []
    return blocks + preset_sections(frame[preset], out_dir)


# -- files of `efficiency --preset ... --out DIR` and `--profile` ------------------------------
PRESET_CSV_COLUMNS = [
    "model", "backend", "seq_len", "batch", "head", "compile", "activation_memory_budget",
    "cuda_graph", "status", "message", "check", "check_rel_err", "check_reference",
    "ms_median",
    "ms_p20", "ms_p80", "tokens_per_s", "peak_mem_mib", "params", "speed_x_vanilla",
    "mem_x_vanilla", "speed_x_sdpa", "mem_x_sdpa", "d_model", "n_layers", "d_ffn", "n_heads",
    "vocab_size", "n_classes", "device", "dtype", "preset", "warmup", "steps", "torch", "cuda",
    "tf32", "git_commit", "timestamp", "cell_key",
]


def write_preset_files(frame: pd.DataFrame, name: str, out_dir: Path,
                       blocks: list[Block]) -> list[Path]:
    """efficiency.csv (every column), NAME.csv (the paper table's numbers), NAME.md (blocks)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "efficiency.csv", out_dir / f"{name}.csv", out_dir / f"{name}.md"]
    frame.to_csv(paths[0], index=False)
    ratios = paper_ratios(frame)
    ratios[[c for c in PRESET_CSV_COLUMNS if c in ratios]].to_csv(paths[1], index=False)
    paths[2].write_text(render_markdown([Heading(1, f"efficiency --preset {name}"), *blocks]))
    return paths


def profile_table(rows: list[dict[str, Any]], caption: str) -> Table:
    header = ["rank", "name", "calls", "self ms (total)", "self ms / step", "self %"]
    return Table(header, [[str(r["rank"]), r["name"][:90], str(r["calls"]),
                           f"{r['self_ms_total']:.3f}", f"{r['self_ms_per_step']:.3f}",
                           f"{r['self_pct']:.1f}"] for r in rows], caption=caption)


def profile_category_table(categories: list[dict[str, Any]], total_ms_per_step: float,
                           caption: str) -> Table:
    """Every kernel of the profile summed by category (``harness/kernel_categories.py``)."""
    header = ["category", "calls / step", "self ms / step", "self %"]
    body = [[r["category"], f"{r['calls_per_step']:.0f}", f"{r['self_ms_per_step']:.3f}",
             f"{r['self_pct']:.1f}"] for r in categories]
    per_step = sum(r["calls_per_step"] for r in categories)
    body.append(["total", f"{per_step:.0f}", f"{total_ms_per_step:.3f}", "100.0"])
    return Table(header, body, caption=caption)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        writer.writerows(rows)


def write_profile_files(rows: list[dict[str, Any]], tables: list[Table], stem: Path,
                        categories: list[dict[str, Any]] | None = None) -> list[Path]:
    """``stem``.csv (full kernel names, numbers), ``stem``.md (the tables) and, given the
    category totals, ``stem``_categories.csv."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    # appended, not with_suffix: a label's number (budget=0.5) would read as a suffix
    csv_path, md_path = (stem.with_name(stem.name + ext) for ext in (".csv", ".md"))
    _write_csv(csv_path, rows)
    md_path.write_text(render_markdown(tables))
    paths = [csv_path, md_path]
    if categories is not None:
        paths.append(stem.with_name(stem.name + "_categories.csv"))
        _write_csv(paths[-1], categories)
    return paths
