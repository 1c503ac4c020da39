"""The results store: one row per finished cell, keyed by the cell's config hash.

SQLite by default (WAL journal, busy timeout, one transaction per cell), or any SQLAlchemy URL
(``postgresql://...``) so several workers can share one store. A rerun of a sweep asks
:meth:`Store.is_finished` and skips cells whose outcome is final (``ok``, ``oom``,
``diverged``); ``error`` and ``interrupted`` cells are run again and their row replaced, so a
cell never has two rows.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

FINAL_STATUSES = frozenset({"ok", "oom", "diverged"})
STATUSES = FINAL_STATUSES | {"error", "interrupted", "running"}

_metadata = sa.MetaData()
cells_table = sa.Table(
    "cells",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cell_key", sa.String(64), nullable=False, unique=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.Column("cell", sa.Text, nullable=False),  # JSON: what was asked (model config included)
    sa.Column("result", sa.Text, nullable=False),  # JSON: what was measured
    sa.Column("provenance", sa.Text, nullable=False),  # JSON: where/how it was measured
)


@dataclass
class CellRecord:
    """A finished (or failed) cell as written to the store."""

    cell_key: str
    kind: str
    model: str
    status: str
    cell: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown cell status {self.status!r}")


def store_url(store: str | Path) -> str:
    """A path becomes a SQLite URL; a URL (``postgresql://…``, ``sqlite:///…``) is kept."""
    text = str(store)
    if "://" in text:
        return text
    path = Path(text)
    if path.exists() and path.is_dir():
        raise ValueError(f"--store {text!r} is a directory; give a file path or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA busy_timeout=30000")  # concurrent writers wait instead of failing
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    def __init__(self, store: str | Path) -> None:
        self.url = store_url(store)
        self.engine = sa.create_engine(self.url, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------
    def write(self, record: CellRecord) -> None:
        """Insert or replace the row of ``record.cell_key`` in one transaction."""
        values = {
            "cell_key": record.cell_key,
            "kind": record.kind,
            "model": record.model,
            "status": record.status,
            "message": record.message[:4000],
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cell": json.dumps(record.cell, sort_keys=True, default=str),
            "result": json.dumps(record.result, sort_keys=True, default=_json_default),
            "provenance": json.dumps(record.provenance, sort_keys=True, default=str),
        }
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:  # pragma: no cover - other databases: delete + insert in one transaction
            with self.engine.begin() as conn:
                conn.execute(
                    cells_table.delete().where(cells_table.c.cell_key == record.cell_key)
                )
                conn.execute(cells_table.insert().values(**values))
            return
        statement = insert(cells_table).values(**values)
        update = {k: statement.excluded[k] for k in values if k != "cell_key"}
        statement = statement.on_conflict_do_update(index_elements=["cell_key"], set_=update)
        with self.engine.begin() as conn:
            conn.execute(statement)

    # -- reading ------------------------------------------------------------------------------
    def status_of(self, cell_key: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(cells_table.c.status).where(cells_table.c.cell_key == cell_key)
            ).first()
        return None if row is None else str(row[0])

    def is_finished(self, cell_key: str) -> bool:
        return self.status_of(cell_key) in FINAL_STATUSES

    def records(self, kind: str | None = None, keys: Iterable[str] | None = None) -> list[dict]:
        query = sa.select(cells_table).order_by(cells_table.c.id)
        if kind is not None:
            query = query.where(cells_table.c.kind == kind)
        if keys is not None:
            query = query.where(cells_table.c.cell_key.in_(list(keys)))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [dict(row) for row in rows]

    def dataframe(self, kind: str | None = None, keys: Iterable[str] | None = None) -> pd.DataFrame:
        """One flat row per cell: cell fields, result metrics and provenance as columns."""
        flat: list[dict[str, Any]] = []
        for row in self.records(kind, keys):
            cell = json.loads(row["cell"])
            result = json.loads(row["result"])
            prov = json.loads(row["provenance"])
            out: dict[str, Any] = {
                "cell_key": row["cell_key"],
                "kind": row["kind"],
                "model": row["model"],
                "status": row["status"],
                "message": row["message"],
                "updated_at": row["updated_at"],
            }
            model_config = cell.pop("model_config", {})
            out.update({k: v for k, v in cell.items() if not isinstance(v, dict | list)})
            out.update({k: v for k, v in model_config.items() if k not in out})
            out.update({k: v for k, v in result.items() if not isinstance(v, dict | list)})
            # provenance wins: `device` becomes the device's name (the cell only said cpu/cuda)
            out.update(prov)
            flat.append(out)
        return pd.DataFrame(flat)


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
