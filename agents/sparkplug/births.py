"""The birth cache: what each edge node's and device's BIRTH said, kept on disk.

A BIRTH names every metric once, with its alias and datatype; data messages after it carry
only aliases. The cache is a SQLite file in the state directory (one row per node or device,
replaced whole in one transaction by its next BIRTH), so data sent by alias still decodes
after ingestd restarts, without waiting for a rebirth.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from google.protobuf.message import DecodeError

from edge.sparkplug_b_pb2 import Payload

__all__ = ["Birth", "BirthCache", "MetricDef"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS births (key TEXT PRIMARY KEY, body BLOB NOT NULL)"


@dataclass(frozen=True, slots=True)
class MetricDef:
    """A metric as its BIRTH defined it."""

    name: str
    datatype: int
    alias: int | None = None


@dataclass(slots=True)
class Birth:
    """One node's or device's metrics by name and by alias (and the node's bdSeq and
    Template definitions)."""

    bdseq: int | None = None
    online: bool = False
    by_name: dict[str, MetricDef] = field(default_factory=dict)
    by_alias: dict[int, MetricDef] = field(default_factory=dict)
    templates: dict[str, Payload.Template] = field(default_factory=dict)

    def add(self, name: str, alias: int | None, datatype: int) -> None:
        definition = MetricDef(name, datatype, alias)
        self.by_name[name] = definition
        if alias is not None:
            self.by_alias[alias] = definition

    def encode(self) -> bytes:
        metrics = [[d.name, d.alias, d.datatype] for d in self.by_name.values()]
        templates = {name: t.SerializeToString().hex() for name, t in self.templates.items()}
        return orjson.dumps(
            {"bdseq": self.bdseq, "online": self.online, "metrics": metrics, "templates": templates}
        )

    @classmethod
    def decode(cls, body: bytes) -> Birth:
        """The birth ``encode`` wrote; ValueError (or KeyError, TypeError, DecodeError) for
        anything else."""
        document = orjson.loads(body)
        if not isinstance(document, dict) or not _optional_int(document["bdseq"]):
            raise ValueError("not a birth")
        birth = cls(bdseq=document["bdseq"], online=document.get("online") is True)
        for name, alias, datatype in document["metrics"]:
            if not (isinstance(name, str) and _optional_int(alias) and _int(datatype)):
                raise ValueError(f"a metric definition of the wrong types: {name!r}")
            birth.add(name, alias, datatype)
        templates = document.get("templates") or {}
        if not isinstance(templates, dict):
            raise TypeError("templates is not an object")
        for name, encoded in templates.items():
            birth.templates[name] = Payload.Template.FromString(bytes.fromhex(encoded))
        return birth


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(value: object) -> bool:
    return value is None or _int(value)


class BirthCache:
    """Births by node id (``group/node``) or device id (``group/node/device``), durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._births: dict[str, Birth] = {}
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        """Read what earlier runs learned; a file that cannot be read starts empty (set
        aside as ``<name>.corrupt``: every node will be asked for a rebirth)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            rows = self._connect()
        except sqlite3.OperationalError:
            raise  # cannot open, locked: nothing says the file is bad
        except sqlite3.DatabaseError:  # not a database, or a damaged one
            for suffix in ("", "-wal", "-shm"):  # a WAL left beside a new file would apply to it
                part = self.path.with_name(self.path.name + suffix)
                if part.exists():
                    part.replace(part.with_name(part.name + ".corrupt"))
            rows = self._connect()
        for key, body in rows:
            try:
                self._births[key] = Birth.decode(body)
            except (ValueError, KeyError, TypeError, DecodeError):
                continue  # an unreadable entry: that node will be asked for a rebirth

    def _connect(self) -> list[tuple[str, bytes]]:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SCHEMA)
            rows = conn.execute("SELECT key, body FROM births").fetchall()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return rows

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def get(self, key: str) -> Birth | None:
        return self._births.get(key)

    def put(self, key: str, birth: Birth) -> None:
        """Replace what is known of ``key``: on disk first, in one statement, then here."""
        if self._conn is not None:
            self._conn.execute(
                "INSERT OR REPLACE INTO births (key, body) VALUES (?, ?)", (key, birth.encode())
            )
        self._births[key] = birth

    def devices_of(self, node_id: str) -> list[str]:
        """The device ids of an edge node known here."""
        prefix = node_id + "/"
        return [key for key in self._births if key.startswith(prefix)]

    def count(self, *, devices: bool, online: bool) -> int:
        """Nodes (ids of two levels) or devices (three), online or not."""
        return sum(
            1
            for key, birth in self._births.items()
            if (key.count("/") == 2) == devices and birth.online == online
        )

    def __len__(self) -> int:
        return len(self._births)
