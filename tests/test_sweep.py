"""Sweeps and tuning: optuna GridSampler studies on the store, resumable, several workers run
every cell exactly once (SQLite, and PostgreSQL when a local server can be started)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

from harness.cli import main
from harness.store import Store
from harness.sweep import SweepSpec, load_sweep_file, parse_grid

REPO = Path(__file__).resolve().parent.parent
# a tiny mqar cell: a few steps of a small model, so 8 cells take seconds
TINY = ["--task", "mqar", "--quick", "--device", "cpu", "--set", "steps=3", "eval_every=3",
        "d_model=16", "n_layers=1", "--task-opt", "n_train=16", "n_val=8", "n_test=8",
        "--set", "seq_len=64"]
GRID = ["--grid", "codebook_size=16,32", "attn_fn=softmax,laplace", "local_bias=on,off"]


def sweep_argv(store: str) -> list[str]:
    return ["sweep", *GRID, *TINY, "--store", store]


def test_grid_sweep_runs_8_cells_and_rerun_adds_none(tmp_path, monkeypatch):
    log = tmp_path / "ran.log"
    monkeypatch.setenv("LONGVQ_SWEEP_RUN_LOG", str(log))
    store_path = str(tmp_path / "bench.db")
    assert main(sweep_argv(store_path)) == 0
    frame = Store(store_path).dataframe("train")
    assert len(frame) == 8 and set(frame["status"]) == {"ok"}
    assert set(frame["sweep"]) == {"cli-attn_fn-codebook_size-local_bias"}
    assert set(frame["device_shared_by"]) == {1}  # one process: its cells ran alone
    assert len(log.read_text().splitlines()) == 8
    assert main(sweep_argv(store_path)) == 0  # resume: nothing left to run
    assert len(Store(store_path).dataframe("train")) == 8
    assert len(log.read_text().splitlines()) == 8
    study = optuna.load_study(study_name=frame["study"].iloc[0], storage=Store(store_path).url)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 8


def run_workers(store: str, log: Path, n: int) -> None:
    env = {**os.environ, "LONGVQ_SWEEP_RUN_LOG": str(log), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "run_bench.py"), *sweep_argv(store)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(n)]
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors


def assert_each_cell_once(store: str, log: Path) -> None:
    frame = Store(store).dataframe("train")
    assert len(frame) == 8 and set(frame["status"]) == {"ok"}
    counts = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert set(counts) == set(frame["cell_key"]) and set(counts.values()) == {1}, counts


def test_two_workers_on_one_sqlite_study_run_each_cell_once(tmp_path):
    store, log = str(tmp_path / "bench.db"), tmp_path / "ran.log"
    run_workers(store, log, 2)
    assert_each_cell_once(store, log)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url(tmp_path):
    """A throwaway PostgreSQL server (unix socket in tmp_path); skipped without initdb/pg_ctl."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (PostgreSQL driver) not installed")
    # a short path outside pytest's 0700 tmp dir: the server may run as another user, and unix
    # socket paths are limited to ~100 characters
    root = Path(tempfile.mkdtemp(prefix="longvq-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser")
        try:
            shutil.chown(root, "postgres")
        except LookupError:
            pytest.skip("running as root and there is no postgres user")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                    f"-p {port} -k {root} -c listen_addresses=''", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_one_postgres_study_run_each_cell_once(tmp_path, postgres_url):
    log = tmp_path / "ran.log"
    run_workers(postgres_url, log, 2)
    assert_each_cell_once(postgres_url, log)


def test_dead_worker_cell_is_taken_over(tmp_path):
    """A `running` row whose worker is gone (same host, pid no longer exists) is run again."""
    store_path = str(tmp_path / "bench.db")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    store = Store(store_path)
    from harness.sweep import plan_sweep

    spec = SweepSpec(name="t", model="longvq", task="mqar", grid=parse_grid(["seed=0"]),
                     base={"steps": "3", "eval_every": "3", "d_model": "16", "n_layers": "1",
                           "seq_len": "64", "task.n_train": 16, "task.n_val": 8,
                           "task.n_test": 8})
    (cell,) = plan_sweep(spec, "cpu", "fp32", True).values()
    from harness.store import CellRecord, cells_table

    store.claim(CellRecord(cell.key, "train", "longvq", "running", cell.describe))
    with store.engine.begin() as conn:  # pretend the claim was made by the dead process
        conn.execute(cells_table.update().values(
            message=f"running on {socket.gethostname()}:{proc.pid}"))
    time.sleep(0.01)
    assert store.claim(CellRecord(cell.key, "train", "longvq", "running", cell.describe))


@pytest.mark.parametrize(("items", "needle"), [(["x"], "'x'"), (["a=1,,2"], "'a=1,,2'"),
                                               (["a=1", "a=2"], "'a'")])
def test_bad_grid_syntax(items, needle):
    with pytest.raises(ValueError, match=needle):
        parse_grid(items)


def test_unknown_grid_field_is_one_clear_line(tmp_path, capsys):
    code = main(["sweep", "--grid", "codebok_size=1,2", *TINY, "--store",
                 str(tmp_path / "s.db")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'codebok_size'" in err


def test_shipped_sweep_files_load_and_route(tmp_path):
    from harness.sweep import _route

    files = sorted((REPO / "sweeps").glob("*.toml")) + sorted((REPO / "sweeps").glob("*.py"))
    assert len(files) >= 6
    from harness.registry import REGISTRY
    from harness.train import TrainConfig

    run_fields = set(TrainConfig.__dataclass_fields__)
    names = []
    for path in files:
        for spec in load_sweep_file(path):
            names.append(spec.name)
            entry = REGISTRY.get(spec.model)
            for point in spec.points():
                _route(entry, {**spec.base, **point}, run_fields)  # raises on a bad field
    assert {"paper-s256-listops", "paper-attn-fn-listops", "paper-local-bias-text",
            "codebook-size-listops", "codebook-size-text",
            "component-ablation-no-vq"} <= set(names)


def test_tune_completes_and_stores_best(tmp_path):
    store_path = str(tmp_path / "bench.db")
    assert main(["tune", "--model", "longvq", "--trials", "3", *TINY, "--store",
                 store_path]) == 0
    summaries = optuna.get_all_study_summaries(Store(store_path).url)
    (summary,) = [s for s in summaries if s.study_name.startswith("tune-longvq-mqar")]
    assert summary.n_trials == 3
    study = optuna.load_study(study_name=summary.study_name, storage=Store(store_path).url)
    assert "best_params" in study.user_attrs
    assert len(Store(store_path).dataframe("train")) >= 1


# -- tune: objective, storage, bad input -----------------------------------------------------------
def test_tune_objective_is_validation_accuracy_not_test(tmp_path, monkeypatch):
    """The study maximises the record's val_acc_best; test_acc is only a trial user attribute."""
    import harness.sweep as sweep_module
    from harness.store import CellRecord
    from harness.sweep import Cell
    from harness.tune import run_tune

    def fake_cell(spec, params, device, dtype, quick, note):
        lr = float(params["lr"])
        result = {"val_acc_best": 0.5 + lr, "test_acc": 0.1 - lr}  # val and test disagree

        def run(store, on_step=None):
            return CellRecord(f"k{lr}", "train", "longvq", "ok", {}, result=result)

        return Cell(params, f"k{lr}", "longvq", "train", {}, run)

    monkeypatch.setattr(sweep_module, "make_cell", fake_cell)
    spec = SweepSpec(name="obj", model="longvq", task="mqar", base={}, grid={"_": [0]})
    store = Store(str(tmp_path / "bench.db"))
    result = run_tune(spec, store, {"lr": ("float", 0.0, 0.1)}, 3, "cpu", "fp32", True, 0)
    study = optuna.load_study(study_name=result.study_name, storage=store.url)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3
    for trial in trials:
        lr = trial.params["lr"]
        assert trial.value == pytest.approx(0.5 + lr)
        assert trial.user_attrs["test_acc"] == pytest.approx(0.1 - lr)
    assert study.user_attrs["objective"] == "val_acc_best"
    best = max(trials, key=lambda t: t.params["lr"])  # highest val accuracy, lowest test
    assert result.best_value == pytest.approx(best.value)
    assert result.best_test_acc == pytest.approx(best.user_attrs["test_acc"])


def test_tune_trial_values_are_the_stored_validation_accuracies(tmp_path):
    store_path = str(tmp_path / "bench.db")
    assert main(["tune", "--model", "longvq", "--trials", "2", *TINY, "--store",
                 store_path]) == 0
    store = Store(store_path)
    rows = {row["cell_key"]: row for _, row in store.dataframe("train").iterrows()}
    (summary,) = optuna.get_all_study_summaries(store.url)
    study = optuna.load_study(study_name=summary.study_name, storage=store.url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for trial in complete:
        row = rows[trial.user_attrs["cell_key"]]
        assert trial.value == pytest.approx(row["val_acc_best"])
        assert trial.user_attrs["test_acc"] == pytest.approx(row["test_acc"])


def test_tune_help_names_the_objective_and_storage(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "objective is validation accuracy" in text and "--storage URL" in text


def test_tune_storage_flag_puts_the_study_elsewhere(tmp_path):
    store_path, study_db = str(tmp_path / "bench.db"), tmp_path / "studies.db"
    assert main(["tune", "--model", "longvq", "--trials", "1", *TINY, "--store", store_path,
                 "--storage", f"sqlite:///{study_db}"]) == 0
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{study_db}")
    assert summary.study_name.startswith("tune-longvq-mqar") and summary.n_trials == 1
    assert optuna.get_all_study_summaries(Store(store_path).url) == []  # not in the store's db
    assert len(Store(store_path).dataframe("train")) == 1  # the trial's row is in the store


@pytest.mark.parametrize(("storage", "needle"), [
    ("notaurl", "expected an optuna storage URL"),
    ("nosuchdialect://x", "cannot open the optuna storage"),
    ("sqlite:////no/such/dir/x.db", "cannot open the optuna storage")])
def test_tune_bad_storage_is_one_line_exit_2(tmp_path, capsys, storage, needle):
    code = main(["tune", "--model", "longvq", "--trials", "1", *TINY, "--store",
                 str(tmp_path / "bench.db"), "--storage", storage])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err and storage in err


@pytest.mark.parametrize(("extra", "needle"), [
    (["--set", "fooo=3"], "'fooo'"),
    (["--space", "foo=int:1:4"], "'foo'"),
    (["--set", "attn_fn=foo"], "attn_fn='foo'"),
    (["--set", "window=abc"], "'abc'"),
    (["--space", "window=cat:32,abc"], "window='abc'"),
    (["--space", "attn_fn=cat:softmax,nope"], "'nope'"),
    (["--set", "window=32", "--space", "window=cat:32,64"], "given in both --set and --space: "
                                                            "window"),
    (["--task-opt", "n_pairs=4", "--space", "task.n_pairs=cat:4,8"],
     "given in both --task-opt and --space: task.n_pairs"),
])
def test_tune_bad_input_fails_before_any_study(tmp_path, capsys, extra, needle):
    store_path = str(tmp_path / "bench.db")
    code = main(["tune", "--model", "longvq", "--trials", "1", *TINY, *extra,
                 "--store", store_path])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in captured.out + captured.err
    if Path(store_path).exists():  # no study, no trial, no row
        assert optuna.get_all_study_summaries(Store(store_path).url) == []
        assert len(Store(store_path).dataframe()) == 0


def test_tune_set_fixes_a_field_of_the_default_space(tmp_path):
    from harness.tune import search_space

    assert "window" not in search_space("longvq", {}, {"window": "32"})
    store_path = str(tmp_path / "bench.db")
    assert main(["tune", "--model", "longvq", "--trials", "2", *TINY, "--set", "window=16",
                 "--store", store_path]) == 0
    frame = Store(store_path).dataframe("train")
    assert len(frame) >= 1 and set(frame["window"]) == {16}  # --set won, every trial


def test_sweep_field_in_both_set_and_grid_is_refused(tmp_path, capsys):
    store_path = str(tmp_path / "bench.db")
    code = main(["sweep", "--grid", "codebook_size=16", *TINY, "--set", "codebook_size=32",
                 "--store", store_path])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [
        "run_bench.py sweep: error: given in both --set and --grid: codebook_size"]
    code = main(["sweep", "--grid", "task.n_pairs=2,4", *TINY, "--task-opt", "n_pairs=4",
                 "--store", store_path])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "given in both --task-opt and --grid: task.n_pairs" in err
    if Path(store_path).exists():
        assert len(Store(store_path).dataframe()) == 0
