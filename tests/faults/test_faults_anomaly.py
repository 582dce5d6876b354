"""Anomaly faults: the daemon killed mid-episode, PostgreSQL away while a spike arrives.

An alert is one row, one task and one ``open`` and one ``closed`` event whatever happens to
the daemon or the database in between. Readings are a minute apart (``tests.harness.plant``):
temp's limit is 100, and an episode closes on the first reading at least ``clear_seconds``
after its last abnormal one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.faultlib import (
    OwnPostgres,
    query,
    scrape,
    wait_metric,
    wait_spool_drained,
)
from tests.harness.daemon import Collector, Daemon, publish_all
from tests.harness.plant import (
    ONE_KIND_PER_TYPE,
    at,
    counters,
    events,
    readings,
    settled,
    warm,
    write_plant,
)
from tests.harness.proxy import TcpProxy
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e]

CLEAR = 10  # minutes: clear_seconds = 600
SPIKE = range(100, 105)  # temp at 130, above its max of 100


def temp(minutes: range, abnormal: range = range(0)) -> list[tuple[str, bytes]]:
    return readings("plc-1", "temp", [(m, 130.0 if m in abnormal else warm(m)) for m in minutes])


def alert_counts(url: str) -> Callable[[], tuple[int, int]]:
    def counts() -> tuple[int, int]:
        row = query(url, "SELECT count(*), count(closed_at) FROM anomaly_alerts")[0]
        return int(row[0]), int(row[1])

    return counts


def alert_rows(url: str) -> list[tuple[Any, ...]]:
    sql = "SELECT sensor_id, kind, ts, closed_at, task_id FROM anomaly_alerts ORDER BY id"
    return [tuple(r) for r in query(url, sql)]


def task_rows(url: str) -> list[tuple[Any, ...]]:
    sql = "SELECT id, subject, kind, status, priority, alert_count FROM maintenance_tasks"
    return [tuple(r) for r in query(url, sql)]


@dataclass
class Watch:
    """The outbound alert and maintenance events, over every life of the daemon."""

    alerts: Collector
    tasks: Collector

    def alert_states(self) -> list[tuple[str, int]]:
        return [(e["state"], e["alert_id"]) for e in events(self.alerts)]

    def task_changes(self) -> list[tuple[str, int]]:
        return [(e["change"], e["task_id"]) for e in events(self.tasks)]

    def assert_unique_ids(self) -> None:
        for collector in (self.alerts, self.tasks):
            ids = Counter(e["event_id"] for e in events(collector))
            assert all(n == 1 for n in ids.values()), f"an event came twice: {ids}"


@pytest.fixture
def watch(mosquitto: Mosquitto) -> Iterator[Watch]:
    found = Watch(
        Collector(mosquitto.port, "ingestd/alerts/#"),
        Collector(mosquitto.port, "ingestd/maintenance/#"),
    )
    yield found
    found.alerts.close()
    found.tasks.close()


def plant_daemon(
    factory: Callable[..., Daemon], url: str, workdir: Path, anomaly: str = ONE_KIND_PER_TYPE
) -> Daemon:
    daemon: Daemon = factory(url)
    daemon.args = ("-c", str(write_plant(workdir, anomaly)))
    daemon.start()
    return daemon


def open_episode(daemon: Daemon, port: int, url: str, watch: Watch) -> None:
    """temp normal for 100 minutes, then abnormal: its alert row, task and open event exist."""
    publish_all(port, temp(range(SPIKE.stop), SPIKE))
    wait_until(lambda: settled(daemon, SPIKE.stop, alert_counts(url)), 30, interval=0.1)
    wait_until(lambda: len(watch.alert_states()) == 1 and len(watch.task_changes()) == 1, 10)
    assert alert_rows(url)[0][:4] == ("temp", "out_of_range", at(SPIKE.start), None)


def kill_and_continue(daemon: Daemon, port: int, abnormal_until: int, until: int) -> None:
    """kill -9 right after more abnormal readings reached the broker (some in flight, some
    not yet received), restart with the same state dir and client id, keep publishing."""
    abnormal = range(SPIKE.stop, abnormal_until + 1)
    publish_all(port, temp(range(SPIKE.stop, SPIKE.stop + 3), abnormal))
    daemon.kill()
    daemon.start()
    publish_all(port, temp(range(SPIKE.stop + 3, until), abnormal))


@pytest.mark.timeout(120)
def test_kill_9_during_an_episode_duplicates_no_alert_task_or_event(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    watch: Watch,
    tmp_path: Path,
) -> None:
    url = own_pg.url
    daemon = plant_daemon(daemon_factory, url, tmp_path / "plant")
    open_episode(daemon, mosquitto.port, url, watch)
    last_abnormal, end = 114, 141
    kill_and_continue(daemon, mosquitto.port, last_abnormal, end)
    wait_until(lambda: query(url, "SELECT count(*) FROM sensor_readings")[0][0] == end, 30)
    wait_until(lambda: alert_counts(url)() == (1, 1), 30, interval=0.1)
    wait_until(lambda: len(watch.alert_states()) >= 2, 10)

    ((task_id, *task),) = task_rows(url)
    assert task == ["pump-7", "out_of_range", "open", "high", 1]
    assert alert_rows(url) == [
        ("temp", "out_of_range", at(SPIKE.start), at(last_abnormal + CLEAR), task_id)
    ]
    alert_id = query(url, "SELECT id FROM anomaly_alerts")[0][0]
    assert watch.alert_states() == [("open", alert_id), ("closed", alert_id)]
    assert watch.task_changes() == [("opened", task_id)]
    watch.assert_unique_ids()
    assert counters(daemon, "ingestd_anomaly_alerts_total")["out_of_range"] == 0  # not reopened
    assert daemon.starts == 2


@pytest.mark.timeout(120)
def test_kill_9_during_an_episode_keeps_the_sensor_types_rules(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    watch: Watch,
    tmp_path: Path,
) -> None:
    """temperature closes after 2 minutes of normal (the base says 10); no snapshot is
    written before the kill (snapshot_seconds = 3600), so the restart resumes the episode
    from the database's open alert."""
    url = own_pg.url
    rules = (
        "snapshot_seconds = 3600\n[anomaly.sensor_types.temperature]\n"
        'kinds = ["out_of_range"]\nclear_seconds = 120\n'
    )
    daemon = plant_daemon(daemon_factory, url, tmp_path / "plant", rules)
    open_episode(daemon, mosquitto.port, url, watch)
    last_abnormal, end = 109, 141
    kill_and_continue(daemon, mosquitto.port, last_abnormal, end)
    wait_until(lambda: query(url, "SELECT count(*) FROM sensor_readings")[0][0] == end, 30)
    wait_until(lambda: alert_counts(url)() == (1, 1), 30, interval=0.1)
    assert alert_rows(url)[0][3] == at(last_abnormal + 2)


@pytest.mark.timeout(150)
def test_postgres_away_the_spike_is_judged_after_replay_and_announced_once(
    mosquitto: Mosquitto,
    own_pg: OwnPostgres,
    daemon_factory: Callable[..., Daemon],
    watch: Watch,
    tmp_path: Path,
) -> None:
    """The link to PostgreSQL resets every connection while normal readings, a spike and
    more normal readings arrive: all of them wait in the spool, and none is judged before
    it is stored (no alert, no event). After the heal the replay stores them, the spike
    opens one alert with one task and one ``open`` event; later readings close it once."""
    url = own_pg.url
    with TcpProxy(own_pg.server.port) as proxy:
        daemon = plant_daemon(daemon_factory, proxy.url_for(own_pg.dbname), tmp_path / "plant")
        publish_all(mosquitto.port, temp(range(50)))
        wait_metric(daemon, "ingestd_anomaly_readings_judged_total", lambda v: v == 50, 30)
        proxy.drop()
        spike = range(100, 103)
        publish_all(mosquitto.port, temp(range(50, 106), spike))
        wait_metric(daemon, "ingestd_spool_readings", lambda v: v == 56, 30, "spooling")
        outage = scrape(daemon)
        assert outage["ingestd_database_up"] == 0
        assert outage["ingestd_anomaly_readings_judged_total"] == 50
        assert sum(counters(daemon, "ingestd_anomaly_alerts_total").values()) == 0
        assert (watch.alerts.count(), watch.tasks.count()) == (0, 0)
        proxy.heal()
        wait_spool_drained(daemon, time.monotonic())
        wait_until(lambda: settled(daemon, 106, alert_counts(url)), 30, interval=0.1)
        assert alert_counts(url)() == (1, 0)
        publish_all(mosquitto.port, temp(range(106, 121)))
        wait_until(
            lambda: settled(daemon, 121, alert_counts(url)) and watch.alerts.count() == 2, 30
        )

    ((task_id, *task),) = task_rows(url)
    assert task == ["pump-7", "out_of_range", "open", "high", 1]
    assert alert_rows(url) == [
        ("temp", "out_of_range", at(spike.start), at(spike[-1] + CLEAR), task_id)
    ]
    alert_id = query(url, "SELECT id FROM anomaly_alerts")[0][0]
    assert watch.alert_states() == [("open", alert_id), ("closed", alert_id)]
    assert watch.task_changes() == [("opened", task_id)]
    watch.assert_unique_ids()
    assert query(url, "SELECT count(*) FROM sensor_readings")[0][0] == 121
    assert scrape(daemon)["ingestd_spool_replayed_total"] == 56
