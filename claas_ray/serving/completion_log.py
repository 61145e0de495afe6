"""`CompletionLog`: what the server sampled, by completion id, so feedback can name just the id.

Kept in SQLite on disk (survives restarts), bounded to the newest N records. The record holds the token
ids and sampling log-probs exactly as generated: the trainer then scores the very tokens the user saw,
and the importance ratio has its denominator.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field

from claas_ray.chat import ChatMessage


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


class CompletionLog:
    """A bounded, persistent map completion id -> CompletionRecord."""

    def __init__(self, path: str | Path, max_records: int = 10000):
        self.max_records = max_records
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "completion_id TEXT UNIQUE NOT NULL, record TEXT NOT NULL)"
        )

    def add(self, record: CompletionRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO completions (completion_id, record) VALUES (?, ?)",
                (record.completion_id, record.model_dump_json()),
            )
            self._db.execute(
                "DELETE FROM completions WHERE seq <= (SELECT MAX(seq) FROM completions) - ?", (self.max_records,)
            )

    def get(self, completion_id: str) -> CompletionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM completions WHERE completion_id = ?", (completion_id,)).fetchone()
        return None if row is None else CompletionRecord.model_validate(json.loads(row[0]))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
