"""`SqlDatabase`: the one connection the feedback journal and the completion log keep, SQLite or PostgreSQL.

SQLite (a file under `state_dir`) is the embedded single-node default: the router and the trainer open the
same file, which only works while they share a disk. On a cluster every deployment reaches one PostgreSQL
server over the network instead (`journal.kind: postgres`). The stores write their SQL once, in SQLite's
dialect with `?` markers; this class translates the few things PostgreSQL spells differently, and serialises
calls from the threads that share the connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from claas_ray.config import ClaasConfig

Dialect = Literal["sqlite", "postgres"]

_POSTGRES_DDL = (
    ("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY"),
    (" REAL", " DOUBLE PRECISION"),
)


class DuplicateKey(Exception):
    """An insert named a key that is already there (either database's integrity error)."""


class SqlDatabase:
    def __init__(self, dialect: Dialect, connect: Any):
        self.dialect = dialect
        self._connect = connect
        self._db = connect()
        self._lock = threading.RLock()
        self._depth = 0  # transactions open on this thread's call stack (the lock is held throughout)

    @classmethod
    def sqlite(cls, path: str | Path, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> SqlDatabase:
        """A file on this node's disk; `FULL` fsyncs every commit (an acknowledged write survives power loss)."""

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            return db

        return cls("sqlite", connect)

    @classmethod
    def postgres(cls, dsn: str) -> SqlDatabase:
        """A PostgreSQL server (libpq connection string); a commit is durable once it returns (synchronous_commit)."""
        import psycopg

        return cls("postgres", lambda: psycopg.connect(dsn, autocommit=True))

    def _sql(self, sql: str) -> str:
        if self.dialect == "sqlite":
            return sql
        for sqlite_form, postgres_form in _POSTGRES_DDL:
            sql = sql.replace(sqlite_form, postgres_form)
        return sql.replace("?", "%s")

    def _reconnected(self) -> None:
        """PostgreSQL: a connection the server or the network closed is opened again at the next call."""
        if self.dialect == "postgres" and self._db.closed:
            self._db = self._connect()

    def _integrity_error(self) -> type[Exception]:
        if self.dialect == "sqlite":
            return sqlite3.IntegrityError
        import psycopg

        return psycopg.errors.UniqueViolation

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._lock:
            self._reconnected()
            try:
                self._db.execute(self._sql(sql), tuple(params))
            except self._integrity_error() as exc:
                raise DuplicateKey(str(exc)) from exc

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            self._reconnected()
            return [tuple(row) for row in self._db.execute(self._sql(sql), tuple(params)).fetchall()]

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[SqlDatabase]:
        """All the statements inside commit together or not at all (other threads wait); one inside another is
        part of it."""
        with self._lock:
            if self._depth:
                yield self
                return
            self._reconnected()
            self._depth += 1
            try:
                if self.dialect == "sqlite":
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        yield self
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                else:
                    with self._db.transaction():
                        yield self
            except self._integrity_error() as exc:
                raise DuplicateKey(str(exc)) from exc
            finally:
                self._depth -= 1

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.transaction():
            for row in rows:
                self._db.execute(self._sql(sql), tuple(row))

    def columns(self, table: str) -> set[str]:
        """The table's column names (for adding columns to tables older code created)."""
        if self.dialect == "sqlite":
            return {row[1] for row in self.fetchall(f"PRAGMA table_info({table})")}
        return {row[0] for row in self.fetchall(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))}

    def close(self) -> None:
        with self._lock:
            self._db.close()


POSTGRES_DSN_ENV = "CLAAS_RAY_POSTGRES_DSN"


def open_database(config: ClaasConfig, sqlite_file: str, synchronous: Literal["FULL", "NORMAL"]) -> SqlDatabase:
    """The database `journal` names: a SQLite file under `state_dir`, or the PostgreSQL server."""
    if config.journal.kind == "sqlite":
        return SqlDatabase.sqlite(config.state_path() / sqlite_file, synchronous)
    dsn = config.journal.dsn or os.environ.get(POSTGRES_DSN_ENV)
    if not dsn:
        raise ValueError(f"journal.kind: postgres needs journal.dsn or the {POSTGRES_DSN_ENV} environment variable")
    return SqlDatabase.postgres(dsn)
