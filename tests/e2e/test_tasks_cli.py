"""``ingestd tasks list|ack ID|close ID`` as an operator meets it: against the database a
running daemon filled with tasks, each change announced on ``ingestd/maintenance/{device}``
and seen by the daemon's ``ingestd_maintenance_tasks`` gauge."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.queries import query
from tests.harness.daemon import INGESTD, Collector, Daemon, publish_all
from tests.harness.plant import events, readings, warm, write_plant
from tests.harness.servers import Mosquitto, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# The daemon recounts tasks every 30 s (maintenance.TASK_COUNT_SECONDS), plus slack.
GAUGE_DEADLINE = 45


def tasks_cmd(
    *args: str, database: str, broker: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env = {**clean, "INGESTD_DATABASE__URL": database, "INGESTD_MQTT__URL": broker}
    return subprocess.run(
        [str(INGESTD), "tasks", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip


def gauge(daemon: Daemon, status: str, priority: str = "high") -> float:
    return daemon.metric(f'ingestd_maintenance_tasks{{priority="{priority}",status="{status}"}}')


@pytest.fixture
def two_tasks(
    tmp_path: Path, mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> tuple[Daemon, dict[str, int]]:
    """A running daemon and the ids of two open tasks it raised: pump-7 (plc-1's asset) and
    plc-2 (a device without an asset), both out_of_range."""
    daemon = daemon_factory(migrated_pg)
    daemon.args = ("-c", str(write_plant(tmp_path / "plant")))
    daemon.start()
    for device in ("plc-1", "plc-2"):
        values = [(m, 150.0 if m == 30 else warm(m)) for m in range(35)]
        publish_all(mosquitto.port, readings(device, "temp", values))
    sql = "SELECT subject, id FROM maintenance_tasks"
    wait_until(lambda: len(query(migrated_pg, sql)) == 2, 30)
    wait_until(lambda: gauge(daemon, "open") == 2, 10)
    return daemon, {row["subject"]: row["id"] for row in query(migrated_pg, sql)}


def test_list_shows_the_tasks_as_text_and_json(
    tmp_path: Path, mosquitto: Mosquitto, migrated_pg: str, two_tasks: tuple[Daemon, dict[str, int]]
) -> None:
    _, ids = two_tasks
    text = tasks_cmd("list", database=migrated_pg, broker=mosquitto.url, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    header, *lines = text.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "PRIORITY", "ALERTS", "OPENED", "DESCRIPTION"]
    assert [line.split()[:4] for line in lines] == [
        [str(ids["plc-2"]), "open", "high", "1"],
        [str(ids["pump-7"]), "open", "high", "1"],
    ]  # newest first
    assert "sensor temp of pump-7" in lines[1]
    assert "sensor temp of plc-2" in lines[0]

    listed = tasks_cmd("list", "--json", database=migrated_pg, broker=mosquitto.url, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["subject"], r["kind"], r["status"], r["device_id"]) for r in rows] == [
        (ids["plc-2"], "plc-2", "out_of_range", "open", "plc-2"),
        (ids["pump-7"], "pump-7", "out_of_range", "open", "plc-1"),
    ]
    assert rows[1]["opened_at"].startswith("2026-12-01T00:30:00")

    closed = tasks_cmd("list", "--status", "closed", database=migrated_pg, broker=mosquitto.url,
                       cwd=tmp_path)  # fmt: skip
    assert closed.returncode == 0, closed.stderr
    assert closed.stdout.splitlines()[1:] == ["(no tasks)"]


def run_change(command: str, task_id: int, url: str, broker: str, cwd: Path) -> dict[str, Any]:
    result = tasks_cmd(command, str(task_id), database=url, broker=broker, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "not announced" not in result.stderr
    task: dict[str, Any] = json.loads(result.stdout)
    return task


def test_ack_and_close_change_the_row_announce_it_and_reach_the_gauge(
    tmp_path: Path, mosquitto: Mosquitto, migrated_pg: str, two_tasks: tuple[Daemon, dict[str, int]]
) -> None:
    daemon, ids = two_tasks
    changes = Collector(mosquitto.port, "ingestd/maintenance/#")
    task = ids["pump-7"]
    acked = run_change("ack", task, migrated_pg, mosquitto.url, tmp_path)
    assert (acked["id"], acked["status"]) == (task, "acknowledged")
    assert acked["acknowledged_at"] is not None
    wait_until(lambda: changes.count() == 1, 10)
    status = query(migrated_pg, "SELECT status FROM maintenance_tasks WHERE id = $1", task)
    assert status[0]["status"] == "acknowledged"
    only_open = tasks_cmd("list", "--status", "open", "--json", database=migrated_pg,
                          broker=mosquitto.url, cwd=tmp_path)  # fmt: skip
    assert [json.loads(line)["id"] for line in only_open.stdout.splitlines()] == [ids["plc-2"]]

    closed = run_change("close", task, migrated_pg, mosquitto.url, tmp_path)
    assert (closed["status"], closed["acknowledged_at"]) == ("closed", acked["acknowledged_at"])
    assert closed["closed_at"] is not None
    wait_until(lambda: changes.count() == 2, 10)

    again = tasks_cmd("ack", str(task), database=migrated_pg, broker=mosquitto.url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"task {task} was already closed" in again.stderr
    assert json.loads(again.stdout)["status"] == "closed"

    announced = events(changes)
    assert {m.qos for m in changes.messages} == {1}
    assert changes.topics() == ["ingestd/maintenance/plc-1"] * 2
    assert [(e["change"], e["task_id"], e["status"]) for e in announced] == [
        ("acknowledged", task, "acknowledged"), ("closed", task, "closed"),
    ]  # fmt: skip
    assert announced[0]["event_id"] != announced[1]["event_id"]
    # The running daemon's gauge follows the database within its recount.
    wait_until(
        lambda: (gauge(daemon, "open"), gauge(daemon, "closed")) == (1, 1), GAUGE_DEADLINE,
        interval=0.5,
    )  # fmt: skip
    assert gauge(daemon, "acknowledged") == 0
    assert changes.count() == 2  # the no-op ack announced nothing
    changes.close()


def test_unknown_task_and_unreachable_broker(
    tmp_path: Path, mosquitto: Mosquitto, migrated_pg: str, two_tasks: tuple[Daemon, dict[str, int]]
) -> None:
    _, ids = two_tasks
    missing = tasks_cmd("close", "987654", database=migrated_pg, broker=mosquitto.url, cwd=tmp_path)
    assert missing.returncode == 1
    assert "no task 987654" in missing.stderr
    assert "Traceback" not in missing.stderr

    nobody = f"mqtt://127.0.0.1:{free_port()}"
    task = ids["plc-2"]
    result = tasks_cmd("close", str(task), database=migrated_pg, broker=nobody, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"task {task} is closed, not announced" in result.stderr
    assert "Traceback" not in result.stderr
    status = query(migrated_pg, "SELECT status FROM maintenance_tasks WHERE id = $1", task)
    assert status[0]["status"] == "closed"
