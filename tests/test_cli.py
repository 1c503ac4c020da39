"""The CLI end to end on CPU: efficiency -> CSV/plots, resume, clear errors, report."""

from __future__ import annotations

import pandas as pd
import pytest

import harness.runner
from harness.cli import main

REQUIRED = ["model", "backend", "seq_len", "batch", "status", "ms_median", "tokens_per_s",
            "peak_mem_mib", "params", "device"]


def run_efficiency(tmp_path, *extra: str) -> int:
    return main(["efficiency", "--models", "transformer_vanilla,transformer_sdpa",
                 "--lengths", "32,64", "--device", "cpu", "--quick", "--warmup", "1",
                 "--steps", "2", "--store", str(tmp_path / "bench.db"),
                 "--out", str(tmp_path / "out"), *extra])


def test_efficiency_writes_csv_and_plots_and_resumes(tmp_path, capsys):
    assert run_efficiency(tmp_path) == 0
    csv = pd.read_csv(tmp_path / "out" / "efficiency.csv")
    assert set(REQUIRED) <= set(csv.columns)
    assert len(csv) == 4 and set(csv["status"]) == {"ok"}
    assert csv["device"].str.startswith("cpu").all()
    assert (tmp_path / "out" / "time_vs_length.png").stat().st_size > 1000
    assert (tmp_path / "out" / "memory_vs_length.png").stat().st_size > 1000
    capsys.readouterr()
    assert run_efficiency(tmp_path) == 0  # rerun: every cell skipped, no duplicate rows
    assert capsys.readouterr().out.count("already in store") == 4
    assert len(pd.read_csv(tmp_path / "out" / "efficiency.csv")) == 4


def test_interrupt_keeps_finished_rows_and_rerun_finishes(tmp_path, monkeypatch):
    real_run_cell = harness.runner.run_cell
    calls = {"n": 0}

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(harness.runner, "run_cell", interrupt_second)
    assert run_efficiency(tmp_path) == 130
    partial = pd.read_csv(tmp_path / "out" / "efficiency.csv")  # written for what finished
    assert list(partial["status"]) == ["ok"]
    monkeypatch.setattr(harness.runner, "run_cell", real_run_cell)
    ran = []
    monkeypatch.setattr(harness.runner, "run_cell",
                        lambda item, *a, **k: ran.append(item.key) or real_run_cell(item, *a, **k))
    assert run_efficiency(tmp_path) == 0
    assert len(ran) == 3  # the first cell was kept, only the other three ran
    assert len(pd.read_csv(tmp_path / "out" / "efficiency.csv")) == 4


def test_sigterm_ends_the_run_as_an_interrupt_with_its_tables(tmp_path, monkeypatch, capsys):
    """`timeout` stops a run with SIGTERM, which run_bench.py's main turns into an interrupt: the
    finished rows' tables and the run's wall time are still written (call45's capped sweep lost
    its tables only because the device call's own limit came seconds later), exit code 130."""
    import os
    import signal

    real_run_cell = harness.runner.run_cell
    calls = {"n": 0}

    def terminate_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(harness.runner, "run_cell", terminate_second)
    assert run_efficiency(tmp_path) == 130
    printed = capsys.readouterr().out
    assert "interrupted" in printed and "Wall time of this run" in printed
    assert list(pd.read_csv(tmp_path / "out" / "efficiency.csv")["status"]) == ["ok"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


@pytest.mark.parametrize(("argv", "needle"), [
    (["efficiency", "--models", "nope"], "'nope'"),
    (["efficiency", "--models", "transformer_sdpa", "--lengths", "12x"], "'12x'"),
    (["efficiency", "--models", "transformer_sdpa", "--lengths", "0"], "0"),
    (["efficiency", "--models", "transformer_sdpa", "--set", "d_modle=3"], "'d_modle'"),
    (["efficiency", "--models", "transformer_sdpa", "--set", "n_layers=two"], "'two'"),
    (["efficiency", "--models", "transformer_sdpa", "--set", "oops"], "'oops'"),
    (["sweep", "--kind", "efficiency", "--model", "transformer_sdpa", "--grid",
      "activation_memory_budget=0.5,1.0", "--quick", "--device", "cpu"],
     "activation_memory_budget=0.5"),  # nothing compiles: the budget would do nothing
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, needle):
    assert main([*argv, "--store", str(tmp_path / "s.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("command", [
    ["efficiency", "--models", "transformer_sdpa", "--quick", "--device", "cpu"],
    ["kernels", "--device", "cpu"],
    ["report"],
])
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    import harness.runner

    monkeypatch.setattr(harness.runner, "run_cells", lambda *a, **k: pytest.fail("ran cells"))
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main([*command, "--store", str(tmp_path / "s.db"), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a folder" in err and str(taken) in err


def test_unknown_model_suggests_names(tmp_path, capsys):
    assert main(["efficiency", "--models", "transformer_sdp", "--store",
                 str(tmp_path / "s.db")]) == 2
    assert "Did you mean: transformer_sdpa" in capsys.readouterr().err


def test_bad_flag_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["efficiency", "--dtype", "fp64"])
    assert info.value.code == 2
    assert "fp64" in capsys.readouterr().err


def test_report_from_store(tmp_path):
    assert run_efficiency(tmp_path) == 0
    assert main(["report", "--store", str(tmp_path / "bench.db"), "--out",
                 str(tmp_path / "results")]) == 0
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "transformer_vanilla" in report and "speed × vanilla" in report
    assert len(list((tmp_path / "results" / "plots").glob("*.png"))) == 2


def test_report_without_store_is_clear(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "missing.db")]) == 2
    assert "missing.db" in capsys.readouterr().err


def test_list_shows_entries(capsys, tmp_path):
    missing = tmp_path / "none.db"
    assert main(["list", "--device", "cpu", "--store", str(missing)]) == 0
    out = capsys.readouterr().out
    assert "transformer_vanilla" in out and "transformer_sdpa" in out and "sdpa-" in out
    assert "no store at" in out and not missing.exists()  # list never creates a store


def test_list_shows_the_longest_length_each_model_ran(tmp_path):
    from harness.commands.list_models import max_tested_lengths

    store = tmp_path / "b.db"
    assert main(["efficiency", "--models", "transformer_vanilla,longvq[key_grad=window]",
                 "--lengths", "16,32", "--batch", "2", "--device", "cpu", "--warmup", "1",
                 "--steps", "1", "--set", "d_model=16", "n_layers=1", "n_heads=2", "d_ffn=32",
                 "--store", str(store)]) == 0
    tested = max_tested_lengths(str(store))
    assert set(tested) == {"transformer_vanilla", "longvq"}  # a variant counts for its entry
    assert tested["longvq"].startswith("32 on cpu")


def test_efficiency_notes_a_warmup_below_the_method(tmp_path, capsys):
    base = ["efficiency", "--models", "transformer_sdpa", "--lengths", "16", "--batch", "2",
            "--device", "cpu", "--steps", "1", "--set", "d_model=16", "n_layers=1",
            "n_heads=2", "d_ffn=32", "--store", str(tmp_path / "b.db")]
    assert main([*base, "--warmup", "1"]) == 0
    assert "below the method's 3 warm-up steps" in capsys.readouterr().out
    assert main([*base, "--warmup", "3", "--force"]) == 0
    assert "below the method" not in capsys.readouterr().out
