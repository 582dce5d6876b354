"""What every storage backend offers: idempotent batch writes, a ping, the devices table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from db.rows import ReadingRow, RejectionRow
from edge.errors import IngestdError

__all__ = ["ErrorKind", "RowRejected", "StorageError", "WriteResult", "Writer"]

# Why a database call failed, as the ingestd_database_errors_total{kind} label says it: a
# fixed set, so every series exists from the first scrape.
ErrorKind = Literal["unreachable", "timeout", "failed"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("unreachable", "timeout", "failed")


class StorageError(IngestdError):
    """The database could not take a batch (unreachable, failing, timed out): retry later."""

    def __init__(self, message: str, kind: ErrorKind = "failed") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


class RowRejected(StorageError):
    """The database refused the data itself: retrying the same rows cannot succeed."""


@dataclass(slots=True)
class WriteResult:
    """Which readings of a batch were new rows, and how many rejections were stored."""

    new: list[bool]
    rejections_stored: int


class Writer(Protocol):
    """A storage backend: one idempotent transaction per batch."""

    async def start(self) -> None:
        """Connect; raises ``StorageError`` while the database is away."""

    async def write(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        *,
        replay: bool = False,
    ) -> WriteResult:
        """Store rows in one transaction. ``replay``: they may be stored already."""

    async def ping(self) -> None:
        """Raise ``StorageError`` unless the database answers now."""

    async def load_devices(self) -> list[dict[str, Any]]:
        """Rows of the ``devices`` table (the registry's second source)."""

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Close within ``grace_seconds``, then drop what is left."""
