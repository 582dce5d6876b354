"""Database faults: PostgreSQL stopped, the link dropped and half-open, SIGTERM mid-outage.

Each test runs its own PostgreSQL (it stops or kills it) and its own broker, streams a known
set of messages at a steady rate, injects the fault mid-stream, and ends by counting.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.faultlib import (
    OUTAGE_ENV,
    Expected,
    OwnPostgres,
    Publisher,
    counts,
    during,
    land_and_count,
    log_records,
    readyz,
    scrape,
    spool_stats,
    traffic,
    wait_metric,
    wait_spool_drained,
)
from tests.harness.daemon import Daemon
from tests.harness.proxy import TcpProxy
from tests.harness.servers import Mosquitto

pytestmark = [pytest.mark.e2e]

RATE = 300  # messages per second


class Sampler:
    """What the daemon reports while a fault lasts: /readyz codes and /metrics scrapes."""

    def __init__(self, daemon: Daemon, publisher: Publisher) -> None:
        self.daemon = daemon
        self.publisher = publisher
        self.codes: list[int] = []
        self.scrapes: list[dict[str, float]] = []
        self.sent_at_start = publisher.sent
        self.sent_at_end = publisher.sent
        self.lag_at_start = publisher.lag()
        self.started = self.ended = time.monotonic()

    def __call__(self) -> None:
        self.daemon._check_alive()
        self.codes.append(readyz(self.daemon))
        self.scrapes.append(scrape(self.daemon))
        self.sent_at_end = self.publisher.sent
        self.ended = time.monotonic()

    def max(self, key: str) -> float:
        return max((s.get(key, 0.0) for s in self.scrapes if s), default=0.0)

    def min(self, key: str) -> float:
        return min((s.get(key, 0.0) for s in self.scrapes if s), default=0.0)

    def first(self, key: str) -> float:
        return next(s.get(key, 0.0) for s in self.scrapes if s)

    def last(self, key: str) -> float:
        return next(s.get(key, 0.0) for s in reversed(self.scrapes) if s)

    @property
    def unanswered(self) -> int:
        return sum(1 for s in self.scrapes if not s)

    @property
    def published(self) -> int:
        return self.sent_at_end - self.sent_at_start

    def summary(self) -> dict[str, float]:
        return {
            "seconds": round(self.ended - self.started, 1),
            "published": self.published,
            "acked": self.acked,
            "publisher_lag_at_start": round(self.lag_at_start),
            "spool_peak": self.max("ingestd_spool_readings"),
        }

    @property
    def acked(self) -> float:
        return self.last("ingestd_acks_sent_total") - self.first("ingestd_acks_sent_total")


@pytest.mark.timeout(150)
def test_postgres_down_for_15s_mid_stream(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """PostgreSQL stopped with ``-m immediate`` for 15 s while 300 msg/s arrive: intake goes
    on through the spool (acks keep flowing, /readyz stays 200), and once the database is
    back the spool is replayed while live traffic continues; everything lands once."""
    url = own_pg.url
    messages = traffic(7_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url, **OUTAGE_ENV)
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=RATE).start()
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 1000, 30)
        own_pg.server.kill()
        outage = Sampler(daemon, publisher)
        during(15, outage)
        assert not publisher.done.is_set(), (
            f"the outage must end mid-stream: {publisher.errors} {publisher.sent} {publisher.lag()}"
        )
        own_pg.server.start()
        recovered = time.monotonic()
        drain_seconds = wait_spool_drained(daemon, recovered)
        result = land_and_count(daemon, url, expected, publisher)
    finally:
        publisher.close()

    assert outage.unanswered == 0, "the daemon stopped answering /metrics during the outage"
    assert set(outage.codes) == {200}, f"/readyz during the outage: {sorted(set(outage.codes))}"
    assert outage.min("ingestd_database_up") == 0, "the outage was never noticed"
    assert outage.max("ingestd_spool_readings") > 0, "nothing was spooled"
    assert outage.acked >= 0.5 * outage.published, (
        f"acked {outage.acked} of {outage.published} published during the outage"
    )
    metrics = scrape(daemon)
    assert metrics["ingestd_spool_replayed_total"] > 0
    assert metrics["ingestd_spool_readings"] == 0
    assert metrics["ingestd_database_up"] == 1
    assert metrics["ingestd_database_outages_total"] >= 1
    assert readyz(daemon) == 200
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
        outage=outage.summary(),
        replayed=metrics["ingestd_spool_replayed_total"],
    )


@pytest.mark.timeout(150)
def test_database_link_dropped_then_half_open_then_healed(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """The database behind a TCP proxy: 5 s of resets (every connection RST, new ones too),
    then 8 s of black hole (connections accepted and kept, every byte silently discarded,
    nothing ever closed: a half-open link), then heal. With 2 s database timeouts the
    daemon must never hang (/metrics answers throughout), must keep acknowledging through
    the spool in both phases, and must reconnect and replay everything after the heal."""
    url = own_pg.url
    messages = traffic(6_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    with TcpProxy(own_pg.server.port) as proxy:
        daemon = daemon_factory(
            proxy.url_for(own_pg.dbname),
            INGESTD_DATABASE__COMMAND_TIMEOUT_SECONDS="2",
            INGESTD_DATABASE__CONNECT_TIMEOUT_SECONDS="2",
        )
        daemon.start()
        publisher = Publisher(mosquitto.port, messages, rate=RATE).start()
        try:
            wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 1000, 30)
            proxy.drop()
            dropped = Sampler(daemon, publisher)
            during(5, dropped)
            proxy.blackhole()
            blackholed = Sampler(daemon, publisher)
            during(8, blackholed)
            assert not publisher.done.is_set(), "the heal must come mid-stream"
            forwarded_before_heal = proxy.forwarded
            proxy.heal()
            healed = time.monotonic()
            drain_seconds = wait_spool_drained(daemon, healed)
            result = land_and_count(daemon, url, expected, publisher)
        finally:
            publisher.close()
        assert proxy.reset + proxy.refused >= 1, f"the drop phase reset nothing: {proxy!r}"
        assert proxy.blackholed >= 1, f"the daemon never met the black hole: {proxy!r}"
        assert proxy.forwarded > forwarded_before_heal, "no new connection after the heal"

    for phase, sampler in (("drop", dropped), ("blackhole", blackholed)):
        assert sampler.unanswered == 0, f"{phase}: /metrics did not answer (hung event loop?)"
        assert set(sampler.codes) == {200}, f"{phase}: /readyz {sorted(set(sampler.codes))}"
        assert sampler.acked >= 0.25 * sampler.published, (
            f"{phase}: acked {sampler.acked} of {sampler.published} published"
        )
    assert blackholed.max("ingestd_spool_readings") > 0
    assert blackholed.min("ingestd_database_up") == 0
    metrics = scrape(daemon)
    assert metrics["ingestd_spool_replayed_total"] > 0
    assert metrics["ingestd_database_up"] == 1
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
        drop=dropped.summary(),
        blackhole=blackholed.summary(),
        proxy=repr(proxy),
    )


@pytest.mark.timeout(150)
def test_sigterm_during_outage_spools_acks_and_exits_zero(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    fault_report: dict[str, Any],
) -> None:
    """SIGTERM while PostgreSQL is down and messages keep arriving: the daemon flushes what
    it holds to the spool, acknowledges it, and exits 0 within 10 s. Everything it
    acknowledged is durable at that point: the rows committed before the outage plus what
    ``ingestd spool stats`` reports add up to at least its ``acks_sent``. After a restart
    with the database back, the spool is replayed and everything lands exactly once."""
    url = own_pg.url
    messages = traffic(4_000)
    expected = Expected.of(messages)
    fault_report.update(url=url, published=len(messages))
    daemon = daemon_factory(url, **OUTAGE_ENV)
    daemon.start()
    publisher = Publisher(mosquitto.port, messages, rate=RATE).start()
    try:
        wait_metric(daemon, "ingestd_readings_stored_total", lambda v: v >= 500, 30)
        own_pg.server.kill()
        wait_metric(daemon, "ingestd_spool_readings", lambda v: v >= 300, 30, "spooling")
        before = scrape(daemon)
        assert not publisher.done.is_set(), "SIGTERM must come mid-stream"
        daemon.signal(signal.SIGTERM)
        asked = time.monotonic()
        assert daemon.wait(10) == 0
        exit_seconds = time.monotonic() - asked

        stats = spool_stats(daemon)
        records = log_records(daemon)
        stopped = [r for r in records if r.get("msg") == "stopped"]
        assert stopped, "no 'stopped' log line"
        acks_sent = int(stopped[-1]["acks_sent"])
        assert not [r for r in records if "drain timed out" in str(r.get("msg"))], (
            "shutdown left received messages unacknowledged"
        )
        assert stats["readings"] > 0
        assert stats["readings"] >= before["ingestd_spool_readings"]

        own_pg.server.start()
        at_exit = counts(url)
        spooled = int(stats["readings"]) + int(stats.get("rejections", 0))
        assert at_exit.readings + at_exit.rejections + spooled >= acks_sent, (
            f"acked {acks_sent}, but only {at_exit.readings + at_exit.rejections} stored and "
            f"{spooled} spooled"
        )

        daemon.start()
        restarted = time.monotonic()
        drain_seconds = wait_spool_drained(daemon, restarted)
        result = land_and_count(daemon, url, expected, publisher)
    finally:
        publisher.close()
    metrics = scrape(daemon)
    assert metrics["ingestd_spool_replayed_total"] >= stats["readings"]
    after = spool_stats(daemon)
    assert after["readings"] == 0
    assert after.get("rejections", 0) == 0
    fault_report.update(
        published=len(messages),
        stored=result.readings,
        duplicates=result.duplicates,
        rejected=result.rejections,
        drain_seconds=round(drain_seconds, 2),
        exit_seconds=round(exit_seconds, 2),
        spooled_at_exit=stats,
        acks_sent_at_exit=acks_sent,
        stored_at_exit=at_exit.readings + at_exit.rejections,
    )
