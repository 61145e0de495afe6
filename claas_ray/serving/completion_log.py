"""`CompletionLog`: what the server sampled, by completion id, so feedback can name just the id.

Kept in SQLite on disk or in PostgreSQL (`SqlDatabase`; survives restarts), bounded to the newest N records. The record holds the token
ids and sampling log-probs exactly as generated: the trainer then scores the very tokens the user saw,
and the importance ratio has its denominator.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pydantic import BaseModel, Field

from claas_ray.chat import ChatMessage
from claas_ray.sql_database import SqlDatabase


class CompletionRecord(BaseModel):
    completion_id: str
    tenant: str | None = None  # who asked: only they (or an admin) may give feedback on it
    model: str
    adapter_id: str | None = None
    adapter_version: int | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] = Field(default_factory=list)
    response_text: str
    response_token_ids: list[int]
    response_logprobs: list[float]
    created_at: float = Field(default_factory=time.time)


def response_key(adapter_id: str | None, response_text: str) -> str:
    """What text feedback is matched by: the adapter and the answer's text, as CLaaS's clients send it back."""
    return hashlib.sha256(f"{adapter_id or ''}\0{response_text.strip()}".encode()).hexdigest()


class CompletionLog:
    """A bounded, persistent map completion id -> CompletionRecord."""

    def __init__(self, database: SqlDatabase | str | Path, max_records: int = 10000):
        self.max_records = max_records
        # A path: SQLite; a record lost to power loss costs only feedback by that id, so commits are not fsync'd.
        self._db = database if isinstance(database, SqlDatabase) else SqlDatabase.sqlite(database, "NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "completion_id TEXT UNIQUE NOT NULL, record TEXT NOT NULL)"
        )
        if "response_key" not in self._db.columns("completions"):  # logs written before text feedback was matched
            self._db.execute("ALTER TABLE completions ADD COLUMN response_key TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS completions_response ON completions (response_key, seq)")

    def add(self, record: CompletionRecord) -> None:
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO completions (completion_id, record, response_key) VALUES (?, ?, ?) ON CONFLICT "
                "(completion_id) DO UPDATE SET record = excluded.record, response_key = excluded.response_key",
                (record.completion_id, record.model_dump_json(), response_key(record.adapter_id, record.response_text)),
            )
            self._db.execute(
                "DELETE FROM completions WHERE seq <= (SELECT MAX(seq) FROM completions) - ?", (self.max_records,)
            )

    def get(self, completion_id: str) -> CompletionRecord | None:
        row = self._db.fetchone("SELECT record FROM completions WHERE completion_id = ?", (completion_id,))
        return None if row is None else CompletionRecord.model_validate(json.loads(row[0]))

    def find(self, adapter_id: str, response_text: str, limit: int = 20) -> list[CompletionRecord]:
        """The newest completions an adapter answered with exactly this text (surrounding whitespace aside)."""
        rows = self._db.fetchall(
            "SELECT record FROM completions WHERE response_key = ? ORDER BY seq DESC LIMIT ?",
            (response_key(adapter_id, response_text), limit),
        )
        return [CompletionRecord.model_validate(json.loads(row[0])) for row in rows]

    def __len__(self) -> int:
        return int(self._db.fetchone("SELECT COUNT(*) FROM completions")[0])

    def close(self) -> None:
        self._db.close()
