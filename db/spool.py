"""The local store-and-forward spool: batches the database could not take, kept on disk.

A SQLite file in the state directory (WAL, ``synchronous=FULL``): once ``put`` returns, the
batch survives a crash or a power cut, so its messages may be acknowledged. It is bounded
by ``max_bytes``; a full spool (or a full disk) raises ``SpoolFull`` and the caller stops
acknowledging. A file that cannot be read is moved aside and a new one started.
"""

from __future__ import annotations

import base64
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from db.local_files import move_aside, open_checked
from db.rows import AlertChange, ReadingRow, RejectionRow
from db.thread import DedicatedThread
from edge.errors import IngestdError

__all__ = ["Spool", "SpoolError", "SpoolFull", "SpoolStats", "SpooledBatch", "read_stats"]

log = logging.getLogger("ingestd.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    readings INTEGER NOT NULL,
    rejections INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine AS SELECT * FROM batches WHERE 0
"""
_STATS = (
    "SELECT coalesce(sum(readings), 0), coalesce(sum(rejections), 0),"
    " coalesce(sum(bytes), 0), count(*), min(created_at) FROM batches"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SpoolError(IngestdError):
    """The spool cannot take a batch right now."""


class SpoolFull(SpoolError):
    """No room: ``max_bytes`` reached, or the disk is full."""


@dataclass(slots=True)
class SpooledBatch:
    """One batch as it was spooled, in the writers' row shapes."""

    ids: list[int]
    readings: list[ReadingRow]
    rejections: list[RejectionRow]
    alerts: list[AlertChange] = field(default_factory=list)


@dataclass(slots=True)
class SpoolStats:
    readings: int = 0
    rejections: int = 0
    bytes: int = 0
    batches: int = 0
    oldest_created_at: float | None = None

    def oldest_age(self, now: float | None = None) -> float:
        if self.oldest_created_at is None:
            return 0.0
        return max(0.0, (now or time.time()) - self.oldest_created_at)


class Spool:
    """Size-bounded, crash-safe FIFO of batches on local disk."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.stats = SpoolStats()
        self.corrupt_files = 0
        self._thread = DedicatedThread("ingestd-spool")
        self._conn: sqlite3.Connection | None = None

    def stats_age(self) -> float:
        """Seconds since the oldest waiting batch was spooled (0 when empty)."""
        return self.stats.oldest_age()

    async def open(self) -> None:
        await self._thread.call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = _connect(self.path)
        except sqlite3.DatabaseError as exc:
            self._move_aside(exc)
            self._conn = _connect(self.path)
        self._load_stats()

    def _move_aside(self, exc: Exception) -> None:
        target = move_aside(self.path)
        self.corrupt_files += 1
        log.error(
            "spool file unreadable, moved aside", extra={"file": str(target), "error": str(exc)}
        )

    def _load_stats(self) -> None:
        assert self._conn is not None
        self.stats = SpoolStats(*self._conn.execute(_STATS).fetchone())

    async def put(
        self,
        readings: list[ReadingRow],
        rejections: list[RejectionRow],
        alerts: Sequence[AlertChange] = (),
    ) -> None:
        """Store a batch durably; raises ``SpoolFull`` when there is no room for it."""
        body = _encode(readings, rejections, alerts)
        await self._thread.call(self._put, body, len(readings), len(rejections))

    def _put(self, body: bytes, readings: int, rejections: int) -> None:
        # Checked here, on the spool's one thread: batches written at once cannot both
        # pass the check and overshoot the bound together.
        if self.stats.bytes + len(body) > self.max_bytes:
            raise SpoolFull(f"spool holds {self.stats.bytes} bytes, the limit is {self.max_bytes}")
        if self._conn is None:
            self._open()
        assert self._conn is not None
        now = time.time()
        try:  # one autocommitted statement: atomic and, with synchronous=FULL, durable
            self._conn.execute(
                "INSERT INTO batches (created_at, readings, rejections, bytes, body)"
                " VALUES (?, ?, ?, ?, ?)",
                (now, readings, rejections, len(body), body),
            )
        except sqlite3.OperationalError as exc:  # "database or disk is full", I/O errors
            raise SpoolFull(f"cannot write the spool: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            self._conn = None
            self._move_aside(exc)
            raise SpoolError(f"spool file was unreadable and was replaced: {exc}") from exc
        stats = self.stats
        stats.readings += readings
        stats.rejections += rejections
        stats.bytes += len(body)
        stats.batches += 1
        if stats.oldest_created_at is None:
            stats.oldest_created_at = now

    async def oldest(self, max_readings: int = 1000) -> SpooledBatch | None:
        """The oldest batches, merged up to ``max_readings`` (at least one); None when empty.

        Batches spooled during an outage are small (whatever arrived during one write), so
        replaying several per transaction is what makes the drain fast; the bound keeps a
        replay's transaction and memory the size of a live batch.
        """
        return await self._thread.call(self._oldest, max_readings)

    def _oldest(self, max_readings: int) -> SpooledBatch | None:
        if self._conn is None:
            self._open()
        assert self._conn is not None
        try:
            ids = self._first_ids(self._conn, max_readings)
            marks = ", ".join("?" * len(ids))
            rows = self._conn.execute(
                f"SELECT id, body FROM batches WHERE id IN ({marks}) ORDER BY id", ids
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            self._conn = None
            self._move_aside(exc)
            self._open()
            return None
        merged = SpooledBatch([], [], [])
        for batch_id, body in rows:
            try:
                reading_rows, rejection_rows, alert_changes = _decode(body)
            except (ValueError, KeyError, TypeError) as exc:
                self._quarantine(batch_id, exc)
                continue
            merged.ids.append(batch_id)
            merged.readings += reading_rows
            merged.rejections += rejection_rows
            merged.alerts += alert_changes
        if merged.ids:
            return merged
        return self._oldest(max_readings) if rows else None

    @staticmethod
    def _first_ids(conn: sqlite3.Connection, max_readings: int) -> list[int]:
        """Ids of the oldest batches holding at most ``max_readings`` together (one at least);
        the bodies are read only for these. A batch without readings (dead letters or alert
        changes only) weighs one, as a rejection weighs one in a live batch."""
        ids: list[int] = []
        total = 0
        for batch_id, readings in conn.execute(
            "SELECT id, max(readings, 1) FROM batches ORDER BY id LIMIT 1000"
        ):
            if ids and total + readings > max_readings:
                break
            ids.append(batch_id)
            total += readings
        return ids

    def _quarantine(self, batch_id: int, exc: Exception) -> None:
        # One unreadable record must not block everything behind it; it is kept aside.
        assert self._conn is not None
        log.error(
            "unreadable spooled batch quarantined", extra={"batch": batch_id, "error": str(exc)}
        )
        self._conn.execute("INSERT INTO quarantine SELECT * FROM batches WHERE id = ?", (batch_id,))
        self._delete([batch_id])
        self.corrupt_files += 1

    async def delete(self, ids: list[int]) -> None:
        """Forget replayed batches; raises ``SpoolFull`` when even that cannot be written."""
        await self._thread.call(self._delete, ids)

    def _delete(self, ids: list[int]) -> None:
        assert self._conn is not None
        marks = ", ".join("?" * len(ids))
        try:
            removed = self._conn.execute(
                f"DELETE FROM batches WHERE id IN ({marks}) RETURNING readings, rejections, bytes",
                ids,
            ).fetchall()
            head = self._conn.execute(
                "SELECT created_at FROM batches ORDER BY id LIMIT 1"
            ).fetchone()
        except sqlite3.OperationalError as exc:  # a delete writes the WAL too: a full disk
            raise SpoolFull(f"cannot update the spool: {exc}") from exc
        stats = self.stats
        for readings, rejections, size in removed:
            stats.readings -= readings
            stats.rejections -= rejections
            stats.bytes -= size
            stats.batches -= 1
        stats.oldest_created_at = head[0] if head else None

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._thread.call(close)
        self._thread.close()


def read_stats(path: Path) -> SpoolStats:
    """What waits in a spool file, read without opening it for writing (``ingestd spool stats``)."""
    if not path.exists():
        return SpoolStats()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute(_STATS).fetchone()
    except sqlite3.OperationalError:  # no table yet
        return SpoolStats()
    finally:
        conn.close()
    return SpoolStats(*row)


def _connect(path: Path) -> sqlite3.Connection:
    return open_checked(path, _SCHEMA, "FULL")


# Rows hold datetimes and bytes: stored as epoch microseconds and base64 in JSON. Alert
# changes ("a") are written only when a batch has some: a body without them reads as none.


def _us(ts: object) -> int:
    assert isinstance(ts, datetime)
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


def _encode(
    readings: list[ReadingRow], rejections: list[RejectionRow], alerts: Sequence[AlertChange]
) -> bytes:
    document: dict[str, list[list[object]]] = {
        "r": [
            [*row[:2], _us(row.ts), *row[3:12], _us(row.received_at), *row[13:]] for row in readings
        ],
        "j": [
            [_us(row.received_at), row.topic, base64.b64encode(row.payload).decode(), *row[3:]]
            for row in rejections
        ],
    }
    if alerts:
        document["a"] = [[*change[:4], _us(change.ts), *change[5:]] for change in alerts]
    return orjson.dumps(document)


def _decode(body: bytes) -> tuple[list[ReadingRow], list[RejectionRow], list[AlertChange]]:
    document = orjson.loads(body)
    # Records spooled before value_text existed have 14 fields: value_text is then None.
    readings = [
        ReadingRow._make(
            [*r[:2], _ts(r[2]), *r[3:12], _ts(r[12]), r[13], r[14] if len(r) > 14 else None]
        )
        for r in document["r"]
    ]
    rejections = [
        RejectionRow._make([_ts(j[0]), j[1], base64.b64decode(j[2]), *j[3:9], bool(j[9])])
        for j in document["j"]
    ]
    # Positional with defaults: a change spooled before a field was added gets its default.
    alerts = [AlertChange(*[*a[:4], _ts(a[4]), *a[5:]]) for a in document.get("a", ())]
    return readings, rejections, alerts
