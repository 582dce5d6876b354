"""``ingestd tasks list|ack ID|close ID``: work the maintenance tasks alerts raised.

The database is the record: a change is committed first, then announced on
``{prefix}/maintenance/{device_id}`` (QoS 1), as the daemon announces the changes it
makes. A broker that cannot be reached leaves the change made and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agents.alert_events import task_event
from daemon.config import Config, ConfigError, load_config, mask_url
from daemon.wiring import writer_options
from db.backends import backend_for
from db.rows import TASK_STATUSES, TaskRow
from db.writer import StorageError, Writer

__all__ = ["add_arguments"]

_CHANGES = {"ack": ("acknowledged", "acknowledged"), "close": ("closed", "closed")}
_PUBLISH_TIMEOUT = 5.0


def add_arguments(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``ingestd tasks`` and its sub-commands."""
    tasks = command("tasks", _tasks, "maintenance tasks raised from alerts")
    sub = tasks.add_subparsers(dest="tasks_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", help="list tasks, newest first")
    listing.add_argument(
        "--status",
        choices=[*TASK_STATUSES, "all"],
        default="all",
        help="only tasks in this status (default: all)",
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in (("ack", "acknowledge a task"), ("close", "close a task")):
        change = sub.add_parser(name, help=text)
        change.add_argument("id", type=int, metavar="ID", help="the task's id (from list)")
    for parser in sub.choices.values():
        parser.add_argument("-c", "--config", type=Path, help="TOML file")


def _tasks(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 1
    try:
        if args.tasks_command == "list":
            return _list(config, args)
        return _change(config, args.tasks_command, args.id)
    except StorageError as exc:
        print(f"ingestd: {mask_url(config.database_url)}: {exc}", file=sys.stderr)
        return 1


def _writer(config: Config) -> Writer:
    return backend_for(config.database_url).writer(writer_options(config))


def _list(config: Config, args: argparse.Namespace) -> int:
    if args.limit < 1:
        print("ingestd: --limit must be at least 1", file=sys.stderr)
        return 1
    status = None if args.status == "all" else args.status

    async def read() -> list[TaskRow]:
        writer = _writer(config)
        try:
            return await writer.tasks(status, args.limit)
        finally:
            await writer.close()

    rows = asyncio.run(read())
    if args.json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row._asdict()).decode() + "\n")
        return 0
    print(f"{'ID':>6}  {'STATUS':<12}  {'PRIORITY':<8}  {'ALERTS':>6}  {'OPENED':<20}  DESCRIPTION")
    for row in rows:
        opened = row.opened_at.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{row.id:>6}  {row.status:<12}  {row.priority:<8}  {row.alert_count:>6}  "
            f"{opened:<20}  {row.description}"
        )
    if not rows:
        print("(no tasks)")
    return 0


def _change(config: Config, command: str, task_id: int) -> int:
    status, change = _CHANGES[command]

    async def apply() -> tuple[TaskRow | None, TaskRow | None]:
        writer = _writer(config)
        try:
            before = await writer.task(task_id)
            after = await writer.set_task_status(task_id, status)
            return before, after
        finally:
            await writer.close()

    before, after = asyncio.run(apply())
    if after is None:
        print(f"ingestd: no task {task_id}", file=sys.stderr)
        return 1
    print(orjson.dumps(after._asdict(), option=orjson.OPT_INDENT_2).decode())
    if before is not None and before.status == after.status:
        print(f"ingestd: task {task_id} was already {after.status}", file=sys.stderr)
        return 0
    topic, body = task_event(after, change, config.publish.prefix)
    problem = _announce(config, topic, body)
    if problem:
        print(
            f"ingestd: task {task_id} is {after.status}, not announced: {problem}", file=sys.stderr
        )
    return 0


def _announce(config: Config, topic: str, body: bytes) -> str | None:
    """Publish one QoS 1 message and wait for the broker's PUBACK; the problem, or None."""
    mqtt = config.mqtt
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ingestd-tasks-{os.getpid()}")
    if mqtt.username:
        secret = mqtt.password.get_secret_value() if mqtt.password else None
        client.username_pw_set(mqtt.username, secret)
    if mqtt.use_tls:
        tls = mqtt.tls
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        context.check_hostname = not tls.insecure
        client.tls_set_context(context)
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=30)
    except OSError as exc:
        return f"broker {mqtt.host}:{mqtt.port}: {exc}"
    client.loop_start()
    try:
        info = client.publish(topic, body, qos=1)
        info.wait_for_publish(timeout=_PUBLISH_TIMEOUT)
        if not info.is_published():
            return f"broker {mqtt.host}:{mqtt.port} did not confirm within {_PUBLISH_TIMEOUT:g} s"
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    finally:
        client.disconnect()
        client.loop_stop()
    return None
