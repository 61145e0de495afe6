"""`FeedbackJournal`: the write-ahead log of feedback, in SQLite on disk or in PostgreSQL (`SqlDatabase`).

The router appends an item (synchronously, fsync'd) before answering 202; the trainer moves it through
queued -> training -> applied | rejected. A restart replays everything not yet final. Exactly-once
comes from the adapter store: every published version names the feedback ids it applied, so an item
caught in `training` by a crash is recovered as applied if a version already names it, else re-queued.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from claas_ray.protocol.claas import FeedbackSource
from claas_ray.sql_database import SqlDatabase
from claas_ray.training.example import TrainingExample

Status = Literal["queued", "training", "applied", "rejected"]
FINAL: tuple[Status, ...] = ("applied", "rejected")


class FeedbackEntry(BaseModel):
    """One journal row: the training example plus where it is in its life."""

    id: str
    adapter_id: str
    status: Status
    example: TrainingExample
    completion_id: str | None = None
    source: FeedbackSource | None = None  # None: journals written before sources were recorded
    version: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None
    created_at: float
    updated_at: float
    attempts: int = 0  # steps started on it: a trainer that dies on an item every time must not loop


class FeedbackJournal:
    """Durable, ordered feedback items, shared by the router and the trainer (processes, or nodes with PostgreSQL)."""

    def __init__(self, database: SqlDatabase | str | Path):
        # A path: SQLite, fsync'd on every commit (an acknowledged append survives power loss).
        self._db = database if isinstance(database, SqlDatabase) else SqlDatabase.sqlite(database, "FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS feedback ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, adapter_id TEXT NOT NULL,"
            " status TEXT NOT NULL, example TEXT NOT NULL, completion_id TEXT, version INTEGER,"
            " metrics TEXT NOT NULL DEFAULT '{}', reason TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS feedback_status ON feedback (status, adapter_id, seq)")
        columns = self._db.columns("feedback")
        if "attempts" not in columns:  # journals written before attempts were counted
            self._db.execute("ALTER TABLE feedback ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        if "source" not in columns:  # ... and before sources were recorded
            self._db.execute("ALTER TABLE feedback ADD COLUMN source TEXT")

    @staticmethod
    def _entry(row: tuple) -> FeedbackEntry:
        return FeedbackEntry(
            id=row[0], adapter_id=row[1], status=row[2], example=TrainingExample.model_validate_json(row[3]),
            completion_id=row[4], version=row[5], metrics=json.loads(row[6]), reason=row[7],
            created_at=row[8], updated_at=row[9], attempts=row[10], source=row[11],
        )

    _COLUMNS = ("id, adapter_id, status, example, completion_id, version, metrics, reason, created_at, updated_at, "
                "attempts, source")

    def append(self, entries: list[tuple[str, str, TrainingExample, str | None, FeedbackSource]]) -> None:
        """Record (id, adapter id, example, completion id, source) items as queued, all or none; an id already in
        the journal raises `DuplicateKey` and records none."""
        now = time.time()
        self._db.executemany(
            "INSERT INTO feedback (id, adapter_id, status, example, completion_id, source, created_at, updated_at)"
            " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
            [(fid, aid, ex.model_dump_json(), cid, source, now, now) for fid, aid, ex, cid, source in entries],
        )

    def get(self, feedback_id: str) -> FeedbackEntry | None:
        row = self._db.fetchone(f"SELECT {self._COLUMNS} FROM feedback WHERE id = ?", (feedback_id,))
        return None if row is None else self._entry(row)

    def get_many(self, feedback_ids: list[str]) -> list[FeedbackEntry]:
        return [entry for entry in (self.get(fid) for fid in feedback_ids) if entry is not None]

    def next_batch(self, max_items: int) -> list[FeedbackEntry]:
        """Queued items of the adapter whose oldest item waits longest, in order (one step's batch).

        A step has one set of settings: the batch ends before the first item that asks for other ones. On
        PostgreSQL the rows are locked only inside a transaction: `claim` is the way to take a batch.
        """
        locking = " FOR UPDATE SKIP LOCKED" if self._db.dialect == "postgres" else ""
        first = self._db.fetchone(f"SELECT adapter_id FROM feedback WHERE status = 'queued' ORDER BY seq LIMIT 1{locking}")
        if first is None:
            return []
        rows = self._db.fetchall(
            f"SELECT {self._COLUMNS} FROM feedback WHERE status = 'queued' AND adapter_id = ? ORDER BY seq LIMIT ?"
            f"{locking}",
            (first[0], max_items),
        )
        entries = [self._entry(row) for row in rows]
        settings = entries[0].example.training_settings
        return list(itertools.takewhile(lambda entry: entry.example.training_settings == settings, entries))

    def claim(self, max_items: int) -> list[FeedbackEntry]:
        """The next batch, marked `training` (one attempt more) in the same transaction: two trainers claiming at
        once (a restarted one beside one that is not yet gone) never get the same item. PostgreSQL skips rows
        another transaction holds (`FOR UPDATE SKIP LOCKED`); SQLite lets one writer in at a time."""
        with self._db.transaction():
            batch = self.next_batch(max_items)
            self.mark([entry.id for entry in batch], "training")
        return [entry.model_copy(update={"status": "training", "attempts": entry.attempts + 1}) for entry in batch]

    def with_status(self, status: Status) -> list[FeedbackEntry]:
        rows = self._db.fetchall(f"SELECT {self._COLUMNS} FROM feedback WHERE status = ? ORDER BY seq", (status,))
        return [self._entry(row) for row in rows]

    def count_pending(self, adapter_id: str | None = None) -> int:
        """Items not yet final, of one adapter or of all."""
        query = "SELECT COUNT(*) FROM feedback WHERE status IN ('queued', 'training')"
        if adapter_id is None:
            row = self._db.fetchone(query)
        else:
            row = self._db.fetchone(f"{query} AND adapter_id = ?", (adapter_id,))
        return int(row[0])

    def recent_step_seconds(self, window: int = 20) -> float | None:
        """Mean train + broadcast time of the latest applied items: how long one more step will take."""
        rows = self._db.fetchall(
            "SELECT metrics FROM feedback WHERE status = 'applied' ORDER BY seq DESC LIMIT ?", (window,)
        )
        seconds = [m.get("train_s", 0.0) + m.get("broadcast_s", 0.0) for m in (json.loads(row[0]) for row in rows)]
        seconds = [value for value in seconds if value > 0]
        return sum(seconds) / len(seconds) if seconds else None

    def recent(self, limit: int = 50) -> list[FeedbackEntry]:
        """The newest items first (the dashboard's feed)."""
        rows = self._db.fetchall(f"SELECT {self._COLUMNS} FROM feedback ORDER BY seq DESC LIMIT ?", (limit,))
        return [self._entry(row) for row in rows]

    def mark(
        self,
        feedback_ids: list[str],
        status: Status,
        *,
        version: int | None = None,
        metrics: dict[str, float] | None = None,
        reason: str | None = None,
    ) -> None:
        now = time.time()
        self._db.executemany(
            "UPDATE feedback SET status = ?, version = COALESCE(?, version), metrics = ?, reason = ?, updated_at = ?,"
            " attempts = attempts + ? WHERE id = ?",
            [(status, version, json.dumps(metrics or {}), reason, now, int(status == "training"), fid)
             for fid in feedback_ids],
        )

    def close(self) -> None:
        self._db.close()
