"""The API's run store: one SQLite table of runs (``<home>/api/runs.db``), so a restarted API lists every
run again. A record holds the validated spec, the Ray job id of its latest submission and the last
status the run service saw; ``api.service`` keeps it current.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ACTIVE = ("queued", "running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled", "lost")
# what POST /runs/{id}/resume continues: the job's resume path picks up finished phases and checkpoints
RESUMABLE = ("lost", "failed", "cancelled")
STATUSES = ACTIVE + TERMINAL


@dataclass
class RunRecord:
    id: str
    kind: str
    experiment: str
    spec: dict[str, Any]
    status: str
    submission_id: str
    run_dir: str
    created_at: float
    message: str = ""
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    cancel_requested: bool = False
    parent_run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


_COLUMNS = ("id", "kind", "experiment", "spec", "status", "submission_id", "run_dir", "created_at", "message",
            "started_at", "ended_at", "cancel_requested", "parent_run_id", "experiment_id")


class RunStore:
    """SQLite table of runs (one file, WAL; safe across the API's threads and restarts)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, experiment TEXT NOT NULL,"
                " spec TEXT NOT NULL, status TEXT NOT NULL, submission_id TEXT NOT NULL, run_dir TEXT NOT NULL,"
                " created_at REAL NOT NULL, message TEXT DEFAULT '', started_at REAL, ended_at REAL,"
                " cancel_requested INTEGER DEFAULT 0, parent_run_id TEXT, experiment_id TEXT)")
            self._db.execute("CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at)")

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return RunRecord(**d)

    def _insert_sql(self, rec: RunRecord) -> tuple[str, list]:
        values = {c: getattr(rec, c) for c in _COLUMNS}
        values["spec"] = json.dumps(rec.spec)
        return (f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                [values[c] for c in _COLUMNS])

    def insert(self, rec: RunRecord) -> None:
        with self._lock, self._db:
            self._db.execute(*self._insert_sql(rec))

    def _if_room(self, limit: int, sql: str, args: list) -> bool:
        """Run ``sql`` only while fewer than ``limit`` runs are active: count and write in one IMMEDIATE
        transaction, so concurrent requests (threads here, or another API process on the same file)
        cannot all pass the count."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                active = self._db.execute(f"SELECT COUNT(*) FROM runs WHERE status IN ({', '.join('?' * len(ACTIVE))})",
                                          ACTIVE).fetchone()[0]
                if active >= limit:
                    self._db.rollback()
                    return False
                self._db.execute(sql, args)
                self._db.commit()
                return True
            except BaseException:
                self._db.rollback()
                raise

    def insert_if_room(self, rec: RunRecord, limit: int) -> bool:
        """Insert ``rec`` (an active run) unless ``limit`` runs are active already."""
        return self._if_room(limit, *self._insert_sql(rec))

    def update_if_room(self, run_id: str, limit: int, **values: Any) -> bool:
        """Update a terminal run into an active one unless ``limit`` runs are active already."""
        self._check_columns(values)
        return self._if_room(limit, f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                             [*values.values(), run_id])

    def delete(self, run_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    @staticmethod
    def _check_columns(values: dict[str, Any]) -> None:
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown run columns {sorted(unknown)}")

    def update(self, run_id: str, **values: Any) -> None:
        self._check_columns(values)
        with self._lock, self._db:
            self._db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                             [*values.values(), run_id])

    def get(self, run_id: str) -> Optional[RunRecord]:
        with self._lock:
            row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._record(row) if row else None

    def query(self, kind: Optional[str] = None, status: Optional[str] = None, experiment: Optional[str] = None,
              limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        where, args = [], []
        for col, value in (("kind", kind), ("status", status), ("experiment", experiment)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        sql_where = f" WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM runs{sql_where}", args).fetchone()[0]
            rows = self._db.execute(f"SELECT * FROM runs{sql_where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                                    [*args, limit, offset]).fetchall()
        return [self._record(r) for r in rows], total

    def count_active(self) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM runs WHERE status IN ({', '.join('?' * len(ACTIVE))})",
                                    ACTIVE).fetchone()[0]

    def experiments(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT experiment, kind, COUNT(*) AS runs, MAX(created_at) AS last_created "
                                    "FROM runs GROUP BY experiment, kind ORDER BY experiment, kind").fetchall()
        return [dict(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
