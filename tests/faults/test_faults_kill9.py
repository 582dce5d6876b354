"""Fault: the daemon killed with SIGKILL, mid-stream and mid-replay of the spool."""

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
    assert_exactly_once,
    counts,
    everything_landed,
    land_and_count,
    metric,
    quiescent,
    scrape,
    traffic,
    wait_metric,
    wait_spool_drained,
)
from tests.harness.daemon import Daemon, publish_all
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e]

KILLS = 5


@pytest.mark.timeout(180)
def test_kill_9_five_times_mid_stream(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """Each life stores some readings, then dies at an arbitrary instant (mid-batch, with
    acks held); the persistent session redelivers whatever was not acknowledged and the
    unique key absorbs what was stored but not yet acknowledged."""
    url = own_pg.url
    messages = traffic(12_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url)
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=600).start()
    duplicates_absorbed = 0.0
    try:
        for kill in range(KILLS):
            # Progress in this life first (the counter restarts with every process).
            wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 300, 30)
            duplicates_absorbed += wait_metric(
                daemon, "ingestd_readings_duplicate_total", lambda v: v >= 0, 5
            )
            assert not publisher.done.is_set(), f"kill {kill + 1} came after the stream ended"
            daemon.kill()
            daemon.start()
        publisher.wait_all()
        started = time.monotonic()
        wait_until(everything_landed(url, expected), 90, interval=0.2)
        wait_until(quiescent(daemon), 30, interval=0.2)
        settle_seconds = time.monotonic() - started
        duplicates_absorbed += scrape(daemon)["ingestd_readings_duplicate_total"]
    finally:
        publisher.close()
    counts = assert_exactly_once(url, expected, len(messages))
    assert daemon.starts == KILLS + 1
    fault_report.update(
        published=len(messages),
        stored=counts.readings,
        duplicates=counts.duplicates,
        rejected=counts.rejections,
        settle_seconds=round(settle_seconds, 2),
        kills=KILLS,
        redeliveries_absorbed=duplicates_absorbed,
    )


@pytest.mark.timeout(180)
def test_kill_9_during_spool_replay(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """A backlog spooled during an outage is being replayed when the daemon dies (five
    times, SIGKILL). A batch whose replay committed but whose spool entry was not deleted
    yet is replayed again by the next life: that must stay harmless for readings (unique
    key) and for rejections alike. One message in four is bad here, so most spooled
    batches carry rejections."""
    url = own_pg.url
    messages = traffic(7_000, bad_every=4)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url, **OUTAGE_ENV)
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=600).start()
    replay_kills = 0
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 300, 30)
        own_pg.server.kill()
        # A backlog large enough that each life is killed before it replayed the rest.
        wait_metric(daemon, "ingestd_spool_readings", lambda v: v >= 4000, 30, "spooling")
        own_pg.server.start()
        for _ in range(5):
            # Kill once this life has replayed something, while a backlog still waits; a
            # life that finished the replay before its kill leaves nothing to interrupt.
            if metric(daemon, "ingestd_spool_readings") == 0:
                break
            wait_until(
                lambda: (
                    metric(daemon, "ingestd_spool_replayed_total") > 0
                    or metric(daemon, "ingestd_spool_readings") == 0
                ),
                60,
                interval=0.1,
                message="replaying: neither replayed nor drained",
            )
            if metric(daemon, "ingestd_spool_readings") > 0:
                replay_kills += 1
            daemon.kill()
            daemon.start()
        recovered = time.monotonic()
        drain_seconds = wait_spool_drained(daemon, recovered)
        result = land_and_count(daemon, url, expected, publisher)
    finally:
        publisher.close()
    assert replay_kills >= 3, "the kills did not interrupt a replay"
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
        kills_during_replay=replay_kills,
    )


@pytest.mark.timeout(120)
def test_batch_replayed_again_after_a_crash_between_commit_and_delete(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """The on-disk state a crash leaves between "replayed batch committed to PostgreSQL" and
    "batch deleted from the spool", made deterministic: a copy of the spool taken before
    the replay is put back after it. The next life replays those batches a second time,
    which must change nothing: the readings are caught by the unique key, and the
    rejections must not be stored twice either."""
    url = own_pg.url
    messages = traffic(400, bad_every=4)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url, **OUTAGE_ENV)
    spool = Path(daemon.env["INGESTD_DAEMON__STATE_DIR"]) / "spool.db"
    daemon.start()
    own_pg.server.kill()
    publish_all(mosquitto.port, [(m.topic, m.payload) for m in messages])
    wait_metric(daemon, "ingestd_acks_sent_total", lambda v: v >= len(messages), 30, "all acked")
    spooled = scrape(daemon)
    assert spooled["ingestd_spool_readings"] == expected.readings
    assert spooled["ingestd_spool_rejections"] == expected.rejected
    assert daemon.stop() == 0
    copies = {p: p.read_bytes() for p in spool.parent.glob("spool.db*")}

    own_pg.server.start()
    daemon.start()
    wait_spool_drained(daemon, time.monotonic())
    wait_until(everything_landed(url, expected), 30, interval=0.2)
    first = counts(url)
    assert daemon.stop() == 0

    for path in spool.parent.glob("spool.db*"):
        path.unlink()
    for path, data in copies.items():
        path.write_bytes(data)  # as if the replay had died before its deletes were durable
    daemon.start()
    wait_spool_drained(daemon, time.monotonic())
    wait_until(quiescent(daemon), 30, interval=0.2)
    result = assert_exactly_once(url, expected, len(messages))
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        rejections_after_first_replay=first.rejections,
    )
