"""Faults on the broker side: mosquitto restarted gracefully, and killed with SIGKILL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.faultlib import (
    AUTOSAVE_MARGIN_SECONDS,
    Expected,
    OwnPostgres,
    Publisher,
    assert_exactly_once,
    counts,
    everything_landed,
    query,
    quiescent,
    rejected_total,
    scrape,
    traffic,
    wait_metric,
)
from tests.harness.daemon import Daemon
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e]


def receiving(daemon: Daemon, received_before: float) -> Callable[[], bool]:
    """Messages delivered again after the reconnect (intake is not just "connected")."""

    def check() -> bool:
        daemon._check_alive()
        return scrape(daemon).get("ingestd_messages_received_total", 0) > received_before + 100

    return check


def reconnected(daemon: Daemon, connects_before: float) -> Callable[[], bool]:
    def check() -> bool:
        daemon._check_alive()
        m = scrape(daemon)
        return (
            m.get('ingestd_mqtt_connected{connection="main"}', 0) == 1
            and m.get('ingestd_mqtt_connects_total{connection="main"}', 0) > connects_before
        )

    return check


@pytest.mark.timeout(150)
def test_broker_restarted_gracefully_mid_stream(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """SIGTERM makes mosquitto save its persistence database (ingestd's queue included), and
    the publisher resends what the broker had not acknowledged: nothing may be missing.
    ingestd must reconnect and resume intake by itself: messages delivered again within
    20 s (a connection that is up but never read would only be noticed by the 30 s
    keepalive, a stall this test refuses)."""
    url = own_pg.url
    messages = traffic(9_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url)
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=600).start()
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 1000, 30)
        connects = scrape(daemon)['ingestd_mqtt_connects_total{connection="main"}']
        assert not publisher.done.is_set(), "the restart must happen mid-stream"
        mosquitto.restart()  # graceful stop (saves), start on the same port
        restarted = time.monotonic()
        wait_until(reconnected(daemon, connects), 30, interval=0.1)
        reconnect_seconds = time.monotonic() - restarted
        received = scrape(daemon)["ingestd_messages_received_total"]
        wait_until(
            receiving(daemon, received),
            20,
            interval=0.1,
            message=lambda: f"connected again but nothing received:\n{daemon.log_text()[-3000:]}",
        )
        publisher.wait_all()
        wait_until(everything_landed(url, expected), 60, interval=0.2)
        wait_until(quiescent(daemon), 30, interval=0.2)
    finally:
        publisher.close()
    result = assert_exactly_once(url, expected, len(messages))
    metrics = scrape(daemon)
    assert metrics['ingestd_mqtt_disconnects_total{cause="lost",connection="main"}'] >= 1
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        reconnect_seconds=round(reconnect_seconds, 2),
        redeliveries_absorbed=metrics.get("ingestd_readings_duplicate_total", 0),
    )


@pytest.mark.timeout(150)
def test_broker_killed_mid_stream_ingestd_loses_nothing_it_received(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """mosquitto killed with SIGKILL, restarted on the same port from its last autosave.

    What the broker itself may lose: it writes its persistence database only every
    ``autosave_interval`` (1 s in the harness), so messages it acknowledged to the publisher
    in the last moments before the kill, and that were still queued for ingestd, can vanish
    with it. That is the broker's loss, not ingestd's, so this test splits the messages by
    the moment the broker acknowledged them to the publisher:

    * acknowledged more than ``AUTOSAVE_MARGIN_SECONDS`` before the kill: they were either
      delivered to and acknowledged by ingestd (so stored, ack-after-commit), or are in the
      saved database and get redelivered: every one must be stored, exactly once;
    * acknowledged by the new broker (the publisher's paho resends what was in flight):
      every one must be stored, exactly once;
    * acknowledged inside the margin: "at risk". Those missing are counted as the broker's
      loss and reported, not asserted.

    And that ingestd lost nothing it received, from its own counters over this one process
    life: every delivered message (redeliveries included) ended as a new row, a duplicate
    of a stored row, or a stored rejection (received == stored + duplicate + rejected), and
    the rows in the table are exactly the rows it counted as new.
    """
    url = own_pg.url
    messages = traffic(9_000)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url)
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=600).start()
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 1000, 30)
        connects = scrape(daemon)['ingestd_mqtt_connects_total{connection="main"}']
        assert not publisher.done.is_set(), "the kill must happen mid-stream"
        old_broker = publisher.connection
        killed = time.monotonic()
        mosquitto.kill()
        mosquitto.start()
        wait_until(reconnected(daemon, connects), 30, interval=0.1)
        reconnect_seconds = time.monotonic() - killed
        received = scrape(daemon)["ingestd_messages_received_total"]
        wait_until(
            receiving(daemon, received),
            20,
            interval=0.1,
            message=lambda: f"connected again but nothing received:\n{daemon.log_text()[-3000:]}",
        )
        publisher.wait_all()

        # Acks are told apart by connection, not by time alone: the publisher's paho thread
        # may read the dead broker's last PUBACKs from its socket buffer well after the kill.
        at_risk = {
            m.index
            for m, acked, on in zip(messages, publisher.acked_at, publisher.acked_on, strict=True)
            if on == old_broker and acked is not None and acked >= killed - AUTOSAVE_MARGIN_SECONDS
        }
        must = [m for m in messages if m.index not in at_risk]

        def must_have_landed() -> bool:
            values = {int(r[0]) for r in query(url, "SELECT value FROM sensor_readings")}
            payloads = {bytes(r[0]) for r in query(url, "SELECT payload FROM rejected_messages")}
            return all(
                (m.index in values) if m.reason is None else (m.payload in payloads) for m in must
            )

        def missing() -> str:
            values = {int(r[0]) for r in query(url, "SELECT value FROM sensor_readings")}
            gone = [m for m in must if m.reason is None and m.index not in values]
            offsets = sorted(
                (round(acked - killed, 2), publisher.acked_on[m.index])
                for m in gone
                if (acked := publisher.acked_at[m.index]) is not None
            )
            return (
                f"{len(gone)} readings missing; their broker acks (s after the kill, connection): "
                f"{offsets[:10]} .. {offsets[-10:]}; daemon: {scrape(daemon)}"
            )

        wait_until(must_have_landed, 60, interval=0.5, message=missing)
        wait_until(quiescent(daemon), 30, interval=0.2)
    finally:
        publisher.close()

    result = counts(url)
    values = [int(r[0]) for r in query(url, "SELECT value FROM sensor_readings")]
    payloads = [bytes(r[0]) for r in query(url, "SELECT payload FROM rejected_messages")]
    assert result.readings == result.distinct_keys == len(set(values)), "duplicate readings"
    assert len(payloads) == len(set(payloads)), "a bad message was rejected twice"
    by_index = {m.index: m for m in messages}
    assert set(values) <= {m.index for m in messages if m.reason is None}
    missing_must = [m.index for m in must if m.reason is None and m.index not in set(values)]
    assert not missing_must, f"lost outside the broker's unsaved window: {missing_must[:20]}"
    bad_payloads = set(payloads)
    reason_of = {m.payload: m.reason for m in messages if m.reason}
    for payload in bad_payloads:
        assert payload in reason_of
    rows_by_reason = {r[0]: int(r[1]) for r in query(
        url, "SELECT reason, count(*) FROM rejected_messages GROUP BY reason"
    )}  # fmt: skip
    expected_by_reason: dict[str, int] = {}
    for payload in bad_payloads:
        reason = reason_of[payload]
        assert reason is not None
        expected_by_reason[reason] = expected_by_reason.get(reason, 0) + 1
    assert rows_by_reason == expected_by_reason

    stored_at_risk = sum(
        1
        for i in at_risk
        if (by_index[i].reason is None and i in set(values))
        or (by_index[i].reason is not None and by_index[i].payload in bad_payloads)
    )
    broker_lost = len(at_risk) - stored_at_risk

    metrics = scrape(daemon)
    received = metrics["ingestd_messages_received_total"]
    new_rows = metrics["ingestd_readings_stored_total"]
    duplicates = metrics["ingestd_readings_duplicate_total"]
    rejected = rejected_total(metrics)
    assert received == new_rows + duplicates + rejected, (
        f"received {received} != stored {new_rows} + duplicate {duplicates} + rejected {rejected}"
    )
    assert result.readings == new_rows, "rows in the table differ from the rows ingestd wrote"
    assert len(messages) - broker_lost == result.readings + result.rejections
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        at_risk=len(at_risk),
        broker_lost=broker_lost,
        reconnect_seconds=round(reconnect_seconds, 2),
        redeliveries_absorbed=duplicates,
    )
