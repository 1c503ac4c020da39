"""Store: upsert by cell key, resumable statuses, WAL, flat DataFrame with provenance."""

from __future__ import annotations

import sqlite3

import pytest

from harness.store import CellRecord, Store


def record(key: str, status: str = "ok", **result) -> CellRecord:
    return CellRecord(cell_key=key, kind="efficiency", model="m", status=status,
                      cell={"seq_len": 128, "device": "cpu", "model_config": {"d_model": 8}},
                      result={"ms_median": 1.5, **result}, provenance={"device": "cpu (x86)"})


def test_write_replaces_row_with_same_key(tmp_path):
    store = Store(tmp_path / "s.db")
    store.write(record("a", "error"))
    assert not store.is_finished("a") and store.status_of("a") == "error"
    store.write(record("a", "ok", ms_median=2.0))
    frame = store.dataframe()
    assert len(frame) == 1 and frame.loc[0, "status"] == "ok" and frame.loc[0, "ms_median"] == 2.0
    assert store.is_finished("a")


@pytest.mark.parametrize(("status", "final"), [("ok", True), ("oom", True), ("diverged", True),
                                               ("error", False), ("interrupted", False)])
def test_final_statuses(tmp_path, status, final):
    store = Store(tmp_path / "s.db")
    store.write(record("k", status))
    assert store.is_finished("k") is final
    assert store.status_of("missing") is None


def test_unknown_status_rejected():
    with pytest.raises(ValueError, match="bogus"):
        record("x", "bogus")


def test_sqlite_is_in_wal_mode(tmp_path):
    path = tmp_path / "s.db"
    Store(path).write(record("a"))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_dataframe_flattens_and_names_device(tmp_path):
    store = Store(tmp_path / "s.db")
    store.write(record("a"))
    store.write(record("b", "oom"))
    frame = store.dataframe("efficiency", keys=["b"])
    assert list(frame["cell_key"]) == ["b"]
    row = frame.iloc[0]
    assert row["seq_len"] == 128 and row["d_model"] == 8 and row["device"] == "cpu (x86)"
    assert store.dataframe("train").empty


def test_directory_store_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        Store(tmp_path)
