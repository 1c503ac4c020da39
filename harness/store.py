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
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

FINAL_STATUSES = frozenset({"ok", "oom", "diverged"})
# "pruned": stopped early by a tuner; not final, so a plain rerun of the same config trains it
# "wrong": the model's fast kernels failed their check against its reference (not timed); not
# final, so a rerun after a fix checks and measures it
STATUSES = FINAL_STATUSES | {"error", "interrupted", "running", "pruned", "wrong"}

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
    if text.startswith("postgresql://"):
        return "postgresql+" + _postgres_driver() + text.removeprefix("postgresql")
    if "://" in text:
        return text
    path = Path(text)
    if path.exists() and path.is_dir():
        raise ValueError(f"--store {text!r} is a directory; give a file path or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _create_tables(engine: sa.Engine, attempts: int = 5) -> None:
    """create_all, tolerating another worker creating the same tables at the same moment."""
    for attempt in range(attempts):
        try:
            _metadata.create_all(engine)
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _postgres_driver() -> str:
    """SQLAlchemy's dialect+driver for a plain postgresql:// URL: psycopg2 if installed, else
    psycopg (3) — the `postgres` extra installs psycopg[binary]."""
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return driver
    raise ValueError("--store postgresql://...: no PostgreSQL driver installed; "
                     "pip install 'psycopg[binary]'")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA busy_timeout=30000")  # concurrent writers wait instead of failing
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    def __init__(self, store: str | Path) -> None:
        self.url = store_url(store)
        try:
            self.engine = sa.create_engine(self.url, future=True)
            if self.engine.dialect.name == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            _create_tables(self.engine)
        except (sa.exc.ArgumentError, sa.exc.OperationalError, sa.exc.NoSuchModuleError) as exc:
            # a bad URL or an unreachable database is a user error: one line, no traceback
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise ValueError(f"--store {str(store)!r}: cannot open the database ({reason})"
                             ) from None

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
            "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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

    def claim(self, record: CellRecord, lease_s: float = 6 * 3600) -> bool:
        """Mark a cell ``running`` for this worker unless it is final or another live worker
        runs it. True when this worker should run the cell.

        Several workers (processes or machines) sharing one store call this before a cell; the
        unique key plus a compare-and-set update make exactly one of them win. A ``running`` row
        whose worker is gone is taken over: same host and its pid no longer exists, or (another
        host) its row is older than ``lease_s``.
        """
        owner = worker_id()
        values = {
            "cell_key": record.cell_key, "kind": record.kind, "model": record.model,
            "status": "running", "message": f"running on {owner}",
            "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cell": json.dumps(record.cell, sort_keys=True, default=str),
            "result": "{}", "provenance": json.dumps(record.provenance, sort_keys=True,
                                                     default=str),
        }
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(cells_table.c.status, cells_table.c.message, cells_table.c.updated_at)
                .where(cells_table.c.cell_key == record.cell_key)
            ).first()
        if row is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(cells_table.insert().values(**values))
                return True
            except sa.exc.IntegrityError:  # another worker inserted it first
                return False
        status, message, updated_at = row
        if status in FINAL_STATUSES:
            return False
        if status == "running" and _owner_alive(message, updated_at, lease_s):
            return False
        with self.engine.begin() as conn:  # compare-and-set: only one worker takes it over
            taken = conn.execute(
                cells_table.update()
                .where(cells_table.c.cell_key == record.cell_key)
                .where(cells_table.c.status == status)
                .where(cells_table.c.updated_at == updated_at)
                .where(cells_table.c.message == message)
                .values(**{k: v for k, v in values.items() if k != "cell_key"})
            ).rowcount
        return taken == 1

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


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(message: str, updated_at: str, lease_s: float) -> bool:
    """Is the worker named in a ``running on host:pid`` message still there?"""
    owner = message.removeprefix("running on ").strip()
    host, _, pid_text = owner.rpartition(":")
    if host == socket.gethostname() and pid_text.isdigit():
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        started = dt.datetime.fromisoformat(updated_at)
    except ValueError:
        return False
    age = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return age < lease_s
