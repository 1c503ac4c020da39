"""The generated report from a synthetic store: every section, table and plot, in both files.

The store is written directly (CellRecords and an optuna study), so nothing is trained: efficiency
rows for three models, train rows of a fake sweep over codebook_size x attn_fn x local_bias x
seed with curves and per-layer codebook stats, two single-setting sweeps, a baseline with three
seeds, and optuna studies (one with importances, one with a single complete trial, one whose
only parameter never varies).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import optuna
import pytest

from harness.cli import main
from harness.store import CellRecord, Store

PROV = {"device": "cpu (x86_64, 2 threads)", "device_type": "cpu", "torch": "2.13.0",
        "cuda": "", "tf32": False, "python": "3.11.9", "git_commit": "abc123def456",
        "timestamp": "2025-01-02T03:04:05+00:00"}
BACKBONE = {"vocab_size": 20, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 64,
            "head": "lm", "n_classes": 20, "dropout": 0.0}
SWEEP_KEYS = "codebook_size,attn_fn,local_bias,seed"
STUDY = "sweep-fake-ablation-0123abcd"


def accuracy(codebook_size: int, attn_fn: str, local_bias: bool, seed: int) -> float:
    """Mean over seeds 0/1 = base + 0.05, sample std = 0.0707 for every group."""
    base = (0.5 + 0.05 * (codebook_size == 32) + 0.02 * (attn_fn == "laplace")
            - 0.03 * (not local_bias))
    return base + 0.1 * seed


def train_record(key: str, model: str, seed: int, acc: float | None, model_config: dict,
                 status: str = "ok", notes: dict | None = None) -> CellRecord:
    cell = {"model": model, "task": "mqar", "seq_len": 128, "steps": 20, "batch": 8, "lr": 1e-3,
            "seed": seed, "device": "cpu", "dtype": "fp32", "model_overrides": {},
            "task_options": {"n_pairs": 8}, "n_pairs": 8,
            "model_config": {**BACKBONE, **model_config}, **(notes or {})}
    curve = [{"step": s, "train_loss": 3.0 / s, "grad_norm": 1.0, "lr": 1e-3} for s in (1, 5)]
    curve += [{"step": 10, "train_loss": 0.3, "lr": 1e-3, "val_loss": 1.0,
               "val_acc": (acc or 0.1) - 0.05},
              {"step": 20, "train_loss": 0.2, "lr": 0.0, "val_loss": 0.9, "val_acc": acc or 0.1}]
    result: dict = {"backend": "torch-reference", "params": 1234, "curve": curve}
    if status == "ok":
        result.update(test_acc=acc, val_acc_best=acc, final_train_loss=0.2,
                      tokens_per_s=1000.0 * (1 + seed), peak_mem_mib=12.5, wall_s=3.0 + seed)
    if "codebook_size" in model_config:
        util = 0.5 + 0.2 * seed
        stats = {f"blocks.{i}.{name}": value for i in range(2) for name, value in (
            ("codebook_utilisation", util / (i + 1)), ("codebook_perplexity", 8.0 + i),
            ("quantizer.utilisation", util / (i + 1)), ("quantizer.perplexity", 8.0 + i))}
        result.update(layer_stats=stats, codebook_utilisation=util, codebook_perplexity=8.5)
    return CellRecord(key, "train", model, status, cell, result, PROV,
                      "" if status == "ok" else "loss is nan at step 7")


def efficiency_record(model: str, seq_len: int, ms: float, status: str = "ok") -> CellRecord:
    cell = {"model": model, "seq_len": seq_len, "batch": 2, "device": "cpu", "dtype": "fp32",
            "warmup": 1, "steps": 2, "seed": 0, "lr": 1e-3,
            "model_config": {**BACKBONE, "head": "cls", "n_classes": 2}}
    result = {} if status != "ok" else {
        "backend": "sdpa-math" if model.endswith("sdpa") else "torch", "ms_median": ms,
        "tokens_per_s": 2 * seq_len / ms * 1000, "peak_mem_mib": ms * 2, "params": 5000}
    if model == "transformer_vanilla":
        result["check"] = "none"
    else:  # the fast-path check made before timing (harness/fast_path_check.py)
        result.update(check="passed", check_rel_err=3e-7 if model == "longvq" else 2e-7,
                      check_reference=f"{model} reference (naive)")
    return CellRecord(f"eff-{model}-{seq_len}", "efficiency", model, status, cell, result, PROV,
                      "" if status == "ok" else "OutOfMemoryError: fake")


def make_store(path) -> Store:
    store = Store(path)
    for model, factor in (("transformer_vanilla", 2.0), ("transformer_sdpa", 1.0),
                          ("longvq", 0.5)):
        for seq_len in (64, 128):
            store.write(efficiency_record(model, seq_len, factor * seq_len / 64))
    store.write(efficiency_record("transformer_vanilla", 256, 0, status="oom"))
    notes = {"sweep": "fake-ablation", "study": STUDY, "sweep_keys": SWEEP_KEYS}
    for size in (16, 32):
        for attn_fn in ("softmax", "laplace"):
            for local_bias in (True, False):
                for seed in (0, 1):
                    config = {"codebook_size": size, "attn_fn": attn_fn,
                              "local_bias": local_bias, "window": 16}
                    store.write(train_record(f"sw-{size}-{attn_fn}-{local_bias}-{seed}",
                                             "longvq", seed, accuracy(size, attn_fn, local_bias,
                                                                      seed), config,
                                             notes=notes))
    for seed, acc in enumerate((0.30, 0.40, 0.35)):  # mean 35.00, sample std 5.00
        store.write(train_record(f"tv-{seed}", "transformer_vanilla", seed, acc, {}))
    store.write(train_record("tv-3", "transformer_vanilla", 3, None, {}, status="diverged"))
    for variant, local_bias in (("full", True), ("no-local-bias", False)):
        for seed in (0, 1):
            notes = {"sweep": f"component-{variant}", "study": f"sweep-component-{variant}-1",
                     "sweep_keys": "seed", "device_shared_by": 2}  # 2 workers, one device
            store.write(train_record(f"comp-{variant}-{seed}", "longvq", seed,
                                     0.6 + 0.02 * seed - 0.1 * (not local_bias),
                                     {"codebook_size": 64, "attn_fn": "softmax",
                                      "local_bias": local_bias, "window": 32}, notes=notes))
    make_studies(store.url)
    return store


def make_studies(url: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "codebook_size": optuna.distributions.CategoricalDistribution([16, 32, 64])}
    study = optuna.create_study(study_name="tune-longvq-mqar-test", storage=url,
                                direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(6):
        trial = study.ask(space)
        study.tell(trial, 0.4 + 10 * trial.params["lr"] + 0.01 * i)
    flat = optuna.create_study(study_name="tune-flat", storage=url, direction="maximize")
    for value in (0.5, 0.6):
        flat.add_trial(optuna.trial.create_trial(
            params={"window": 32},
            distributions={"window": optuna.distributions.CategoricalDistribution([32])},
            value=value))
    one = optuna.create_study(study_name="tune-one-trial", storage=url, direction="maximize")
    one.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    store = make_store(root / "bench.db")
    store.close()
    out = root / "results"
    (out / "h100-reference").mkdir(parents=True)
    (out / "h100-reference" / "REPORT.md").write_text("# reference\n")
    assert main(["report", "--store", str(root / "bench.db"), "--out", str(out)]) == 0
    return out, (out / "REPORT.md").read_text(), (out / "report.html").read_text()


def table_row(markdown: str, *cells: str) -> str:
    """The one Markdown table row that starts with these cells."""
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


def test_report_has_every_section(report):
    _, markdown, _ = report
    for text in ("## Efficiency", "speed × vanilla", "**oom**", "## Training results",
                 "### Task `mqar`", "## Ablations", "### Sweep `fake-ablation`",
                 "#### `attn_fn` comparison", "#### `local_bias` comparison",
                 "#### Codebook usage per layer", "### Single-setting sweeps (train, task `mqar`)",
                 "## Optuna studies", "### Study `tune-longvq-mqar-test`",
                 "Not shown: `tune-one-trial` (1 complete)",
                 "Parameter importances not shown: no parameter took two or more values",
                 "## Provenance", "`abc123def456` (", "2025-01-02T03:04:05+00:00",
                 "## Committed reference runs", "[h100-reference](h100-reference/REPORT.md)"):
        assert text in markdown, text
    assert "| parameter | importance |" in markdown


def test_report_states_the_fast_path_checks(report):
    _, markdown, _ = report
    line = next(line for line in markdown.splitlines() if line.startswith("Fast-path check"))
    assert "`longvq` passed vs longvq reference (naive), max rel err 3.0e-07" in line
    assert "`transformer_vanilla` no reference (the model is its own)" in line


def test_report_numbers(report):
    _, markdown, _ = report
    # sweep group (16, softmax, True): accuracies 0.50, 0.60 -> 55.00 ± 7.07
    row = table_row(markdown, "16", "softmax", "True", "2 (0,1)")
    assert "| 55.00 ± 7.07 |" in row and "ok 2" in row
    # baseline transformer over three seeds: 0.30, 0.40, 0.35 -> 35.00 ± 5.00; one diverged
    row = table_row(markdown, "transformer_vanilla", "torch-reference", "128")
    assert "| 3 (0,1,2) | 35.00 ± 5.00 |" in row and "diverged 1, ok 3" in row
    # matched contrasts: laplace +2 points over softmax, no local bias -3 points (4 settings)
    assert "| laplace | 8 | " in markdown and "| +2.00 | 4 |" in table_row(markdown, "laplace")
    assert "| -3.00 | 4 |" in table_row(markdown, "False", "8")
    assert "| baseline |" in table_row(markdown, "softmax", "8")
    # layer 0 utilisation of (16, softmax, True): seeds 0.5 and 0.7 -> 0.600; layer 1 halves it
    assert "| 0 | 0.600 | 8.0 |" in table_row(markdown, "16", "softmax", "True", "0")
    assert "| 1 | 0.300 | 9.0 |" in table_row(markdown, "16", "softmax", "True", "1")
    # single-setting sweeps: full 61.00 ± 1.41 against no-local-bias 51.00 ± 1.41
    assert "61.00 ± 1.41" in table_row(markdown, "component-full", "True", "2 (0,1)")
    assert "51.00 ± 1.41" in table_row(markdown, "component-no-local-bias", "False", "2 (0,1)")
    assert "| -10.00 | 1 |" in table_row(markdown, "False", "2")  # matched across the sweeps


def test_report_marks_speeds_measured_on_a_shared_device(report):
    _, markdown, _ = report
    assert "shared its device with other workers" in markdown
    marked = [row for row in markdown.splitlines() if row.startswith("| longvq") and " †" in row]
    assert len(marked) == 2  # the two component-sweep configurations
    assert " †" not in table_row(markdown, "transformer_vanilla", "torch-reference", "128")


def test_report_images_exist_and_html_is_self_contained(report):
    out, markdown, html = report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    names = {image.split("/")[-1] for image in images}
    assert all((out / image).stat().st_size > 1000 for image in images)
    for expected in ("train_mqar_curves.png", "sweep-fake-ablation-0123abcd_codebook.png",
                     "sweep-fake-ablation-0123abcd_cost.png",
                     "optuna_tune-longvq-mqar-test_history.png",
                     "optuna_tune-longvq-mqar-test_importance.png",
                     "optuna_tune-flat_history.png"):
        assert expected in names, expected
    assert html.count('src="data:image/png;base64,') == len(images)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    assert re.findall(r'<img src="(?!data:image/png;base64,)', html) == []
    n_tables = sum(line.startswith("|---") for line in markdown.splitlines())
    assert n_tables >= 10 and html.count("<table>") == n_tables
    for text in ("55.00 ± 7.07", "35.00 ± 5.00", "speed × vanilla", "<code>attn_fn</code>",
                 'href="h100-reference/REPORT.md"', "Provenance", "<style>"):
        assert text in html, text


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no chromium/google-chrome on PATH (CI has no "
                    "browser); the structure test above covers report.html")
def test_report_html_renders_in_headless_browser(report, tmp_path):
    out, _, _ = report
    shot = tmp_path / "report.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,3000",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000


def _config_record(key: str, model: str, ms: float, **config) -> CellRecord:
    record = efficiency_record(model, 64, ms)
    record.cell["model_config"].update(config)
    return dataclasses.replace(record, cell_key=key)


def test_rows_of_one_model_with_other_configs_are_told_apart(tmp_path):
    """Two runs with different --set values into one store: each row says what differs (the
    way --models writes variants), a row at the model's own config keeps its plain label and
    stays the reference, and a reference measured twice does not break the ratios."""
    store = Store(tmp_path / "b.db")
    store.write(_config_record("v0", "transformer_vanilla", 4.0))
    store.write(_config_record("v1", "transformer_vanilla", 8.0, dropout=0.1))
    store.write(_config_record("l64", "longvq", 2.0, codebook_size=64))
    store.write(_config_record("l32", "longvq", 2.0, codebook_size=32))
    store.write(_config_record("l128", "longvq[key_grad=window]", 1.0, key_grad="window",
                               codebook_size=128))
    store.write(_config_record("l128b", "longvq[key_grad=window]", 1.0, key_grad="window",
                               codebook_size=128, activation_memory_budget=0.5))
    store.write(_config_record("x", "not_a_model", 1.0))
    assert main(["report", "--store", str(tmp_path / "b.db"), "--out", str(tmp_path)]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in (tmp_path / "REPORT.md").read_text().splitlines()
            if line.startswith("| ") and " | 64 | " in line}
    assert set(rows) == {"transformer_vanilla", "transformer_vanilla[dropout=0.1]",
                         "longvq[codebook_size=64]", "longvq[codebook_size=32]",
                         "longvq[key_grad=window]",
                         "longvq[key_grad=window;activation_memory_budget=0.5]", "not_a_model"}
    assert rows["transformer_vanilla"][8] == "1.00×"  # the default config is the reference
    assert rows["transformer_vanilla[dropout=0.1]"][8] == "0.50×"
    # one config of its label: no variant fields
    assert rows["longvq[key_grad=window]"][8] == "4.00×"


def test_report_states_how_cpu_peak_memory_is_measured(report):
    """harness/measure.py measures resident tensors + resident-set growth during one step (its
    rows' peak_mem_method); the report must not claim a profiler allocation peak."""
    _, markdown, _ = report
    assert "CPU: resident tensors + resident-set growth during one step" in markdown
    assert "profiler allocation" not in markdown


def test_report_names_each_study_objective(report):
    _, markdown, _ = report
    assert "`tune` studies maximise validation accuracy" in markdown
    # a tune study without an "objective" attribute predates that: it optimised test accuracy
    assert table_row(markdown, "`tune-longvq-mqar-test`", "tune", "test_acc", "maximize")
