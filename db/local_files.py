"""The daemon's own SQLite files in the state directory (the spool, the anomaly state):
opened checked, and moved aside when they cannot be read."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

__all__ = ["move_aside", "open_checked"]


def open_checked(
    path: Path, schema: str, synchronous: Literal["FULL", "NORMAL"]
) -> sqlite3.Connection:
    """A WAL connection that passed ``PRAGMA quick_check``, its ``schema`` applied; raises
    sqlite3.DatabaseError for a file that is not a (sound) database."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        _check(conn)
        conn.executescript(schema)
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def move_aside(path: Path) -> Path:
    """Rename the file (and its WAL and shared-memory files) to ``NAME.corrupt-<UTC time>``
    so that a new one can start; the new name."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(Path(f"{target}{suffix}"))
    return target


def _check(conn: sqlite3.Connection) -> None:
    verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    if verdict != "ok":
        raise sqlite3.DatabaseError(f"quick_check: {verdict}")
