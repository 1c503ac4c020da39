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
