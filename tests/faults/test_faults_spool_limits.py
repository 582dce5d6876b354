"""The spool at its limits: full (its own bound), out of disk, corrupt.

When the spool cannot take more, the daemon must stop acknowledging and let the broker
hold the rest (the in-flight window fills, reads pause), never drop, never crash; once
room returns and the database answers, everything lands exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.faultlib import (
    OUTAGE_ENV,
    Expected,
    OwnPostgres,
    Publisher,
    alive,
    fill_filesystem,
    land_and_count,
    log_records,
    readyz,
    scrape,
    traffic,
    wait_metric,
    wait_spool_drained,
)
from tests.harness.daemon import Daemon
from tests.harness.servers import Mosquitto

pytestmark = [pytest.mark.e2e]

RATE = 500
WINDOW = 50
SPOOL_MAX = 64 * 1024


def _full_lines(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        r
        for r in log_records(daemon)
        if r.get("level") in {"warning", "error", "critical"}
        and "spool" in str(r.get("msg")).lower()
        and "full" in str(r.get("msg")).lower()
    ]


def _acks_withheld(daemon: Daemon, publisher: Publisher, more: int) -> dict[str, float]:
    """The window is full and stays full while ``more`` further messages are published."""
    wait_metric(daemon, "ingestd_inflight_messages", lambda v: v >= WINDOW, 30, "window full")
    acks = scrape(daemon)["ingestd_acks_sent_total"]
    publisher.wait_sent(publisher.sent + more, 30)  # the stream goes on meanwhile
    later = scrape(daemon)
    assert later["ingestd_acks_sent_total"] == acks, "acknowledgements went on without room"
    assert later["ingestd_inflight_messages"] == WINDOW
    assert later["ingestd_intake_paused"] == 1
    return later


@pytest.mark.timeout(150)
def test_spool_full_withholds_acks_and_drops_nothing(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """A 64 KiB spool during a database outage: it fills within seconds; then no more
    acknowledgements (the in-flight window of 50 fills and stays full), /readyz 503,
    ``ingestd_spool_full`` 1, one log line; the broker keeps the rest. After recovery
    everything lands exactly once and the daemon is ready again."""
    url = own_pg.url
    messages = traffic(7_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(
        url,
        INGESTD_SPOOL__MAX_BYTES=str(SPOOL_MAX),
        INGESTD_MQTT__MAX_INFLIGHT=str(WINDOW),
        **OUTAGE_ENV,
    )
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=RATE).start()
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 500, 30)
        own_pg.server.kill()
        wait_metric(daemon, "ingestd_spool_full", lambda v: v == 1, 30, "spool full")
        full = _acks_withheld(daemon, publisher, more=300)
        assert readyz(daemon) == 503
        assert full["ingestd_ready"] == 0
        assert full["ingestd_spool_full"] == 1
        assert 0 < full["ingestd_spool_bytes"] <= SPOOL_MAX
        assert full["ingestd_spool_readings"] > 0
        assert len(_full_lines(daemon)) == 1, "expected exactly one log line for the full spool"
        assert not publisher.done.is_set(), "recovery must come mid-stream"
        own_pg.server.start()
        recovered = time.monotonic()
        drain_seconds = wait_spool_drained(daemon, recovered)
        result = land_and_count(daemon, url, expected, publisher)
    finally:
        publisher.close()
    metrics = scrape(daemon)
    assert metrics["ingestd_spool_full"] == 0
    assert metrics["ingestd_spool_replayed_total"] >= full["ingestd_spool_readings"]
    assert readyz(daemon) == 200
    assert metrics["ingestd_ready"] == 1
    assert len(_full_lines(daemon)) == 1
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
        spooled_when_full=full["ingestd_spool_readings"],
        spool_bytes_when_full=full["ingestd_spool_bytes"],
    )


# Big enough that, once the filler is gone, the spool and its WAL fit (SQLite lets the WAL
# reach ~4 MiB before its automatic checkpoint): a 512 KiB filesystem would be full again
# within a second of a 500 msg/s stream, whatever was deleted.
TMPFS_SIZE = "8m"


@pytest.mark.timeout(150)
def test_disk_full_under_the_spool(
    tmpfs: Callable[[str], Path],
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """The state directory is a small tmpfs. During a database outage a filler file takes
    every free byte, so the spool cannot grow (ENOSPC, far under its own 1 GiB bound): no
    crash, acknowledgements withheld, not ready, and not mistaken for corruption. Deleting
    the filler gives the room back (spooling and acking resume by themselves), then the
    database returns and everything lands exactly once."""
    state = tmpfs(TMPFS_SIZE)
    url = own_pg.url
    messages = traffic(8_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(
        url, state_dir=state, INGESTD_MQTT__MAX_INFLIGHT=str(WINDOW), **OUTAGE_ENV
    )
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=RATE).start()
    filler = state / "filler"
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 500, 30)
        own_pg.server.kill()
        wait_metric(daemon, "ingestd_spool_readings", lambda v: v > 0, 30, "spooling")
        filled = fill_filesystem(filler)
        stuck = _acks_withheld(daemon, publisher, more=300)
        assert alive(daemon)
        assert readyz(daemon) == 503, "readings cannot be made durable: not ready"
        assert stuck["ingestd_spool_full"] == 1
        assert stuck.get("ingestd_spool_corrupt_total", 0) == 0, "disk full is not corruption"

        filler.unlink()  # space returns: spooling (and acking) must resume by itself
        wait_metric(
            daemon,
            "ingestd_acks_sent_total",
            lambda v: v > stuck["ingestd_acks_sent_total"],
            30,
            "acks after space returned",
        )
        assert not publisher.done.is_set(), "recovery must come mid-stream"
        own_pg.server.start()
        recovered = time.monotonic()
        drain_seconds = wait_spool_drained(daemon, recovered)
        result = land_and_count(daemon, url, expected, publisher)
    finally:
        publisher.close()
        filler.unlink(missing_ok=True)
    metrics = scrape(daemon)
    assert metrics.get("ingestd_spool_corrupt_total", 0) == 0
    assert metrics["ingestd_spool_replayed_total"] > 0
    assert metrics["ingestd_spool_full"] == 0
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
        filler_bytes=filled,
        spooled_when_stuck=stuck.get("ingestd_spool_readings"),
    )


@pytest.mark.timeout(150)
def test_database_returns_while_the_disk_is_still_full(
    tmpfs: Callable[[str], Path],
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """The same full disk, but PostgreSQL answers again before any space returns: replaying
    the spool needs to delete from a file on a full filesystem. The daemon must survive it
    without a crash loop or an exit (a drainer that dies after its commit replays the same
    batch again on restart), take live traffic straight to the database, and once the filler
    is gone finish the replay; every reading and rejection exactly once. One message in
    four is bad here, so most spooled batches carry rejections."""
    state = tmpfs(TMPFS_SIZE)
    url = own_pg.url
    messages = traffic(8_000, bad_every=4)  # most spooled batches carry rejections
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(
        url, state_dir=state, INGESTD_MQTT__MAX_INFLIGHT=str(WINDOW), **OUTAGE_ENV
    )
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=RATE).start()
    filler = state / "filler"
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 500, 30)
        own_pg.server.kill()
        wait_metric(daemon, "ingestd_spool_readings", lambda v: v >= 300, 30, "spooling")
        fill_filesystem(filler)
        stuck = _acks_withheld(daemon, publisher, more=200)
        own_pg.server.start()  # the database is back; the disk is still full
        wait_metric(
            daemon,
            "ingestd_acks_sent_total",
            lambda v: v > stuck["ingestd_acks_sent_total"] + 500,
            30,
            "acks with the database back",
        )
        assert alive(daemon)
        assert readyz(daemon) == 200
        filler.unlink()
        freed = time.monotonic()
        drain_seconds = wait_spool_drained(daemon, freed)
        result = land_and_count(daemon, url, expected, publisher)
    finally:
        publisher.close()
        filler.unlink(missing_ok=True)
    metrics = scrape(daemon)
    assert metrics.get('ingestd_agent_restarts_total{agent="drainer"}', 0) == 0, (
        "the drainer crashed"
    )
    assert daemon.starts == 1
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
    )


@pytest.mark.timeout(120)
def test_corrupt_spool_is_moved_aside(
    tmp_path: Path,
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """Garbage in ``spool.db`` at start: moved aside (kept, not deleted) with an error log
    line and ``ingestd_spool_corrupt_total`` 1; the daemon goes on with a new spool that
    works through a short outage."""
    state = tmp_path / "state"
    state.mkdir()
    garbage = b"this is not an SQLite database\n" * 512
    (state / "spool.db").write_bytes(garbage)
    url = own_pg.url
    messages = traffic(4_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url, state_dir=state, **OUTAGE_ENV)
    daemon.start()
    metrics = scrape(daemon)
    assert metrics["ingestd_spool_corrupt_total"] == 1
    kept = [p for p in state.iterdir() if p.name != "spool.db" and p.read_bytes() == garbage]
    assert kept, f"the corrupt file was not kept: {sorted(p.name for p in state.iterdir())}"
    errors = [
        r for r in log_records(daemon) if r.get("level") == "error" and "spool" in str(r).lower()
    ]
    assert errors, "no error log line about the corrupt spool"

    publisher = Publisher(mosquitto.port, messages, rate=RATE).start()
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 500, 30)
        own_pg.server.kill()
        wait_metric(daemon, "ingestd_spool_readings", lambda v: v >= 300, 30, "spooling")
        own_pg.server.start()
        recovered = time.monotonic()
        drain_seconds = wait_spool_drained(daemon, recovered)
        result = land_and_count(daemon, url, expected, publisher)
    finally:
        publisher.close()
    assert scrape(daemon)["ingestd_spool_corrupt_total"] == 1
    assert (state / "spool.db").exists()
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
        moved_aside=[p.name for p in kept],
    )
