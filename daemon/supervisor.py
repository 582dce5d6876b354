"""The supervisor: builds the agents, owns every task, restarts crashed ones, stops in phases.

Shutdown order: stop intake (no new messages), let the pipeline drain so every
message received gets its outcome committed and its PUBACK sent, disconnect cleanly
(the persistent session stays on the broker), then close the database. Whatever is
not done within the timeout stays unacknowledged and is redelivered on the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agents.base import Agent
from agents.bus import Bus
from agents.drainer import SpoolDrainer
from agents.enrichment import EnrichmentAgent
from agents.events import (
    EnrichedMessage,
    RawMessage,
    ReadingsStored,
    RejectedMessage,
    RejectionsStored,
    ValidatedMessage,
)
from agents.persistence import PersistenceAgent
from agents.publisher import Publisher
from agents.registry import DeviceRegistry, RegistryError, load_registry_file
from agents.validation import ValidationAgent
from daemon import __version__, reload
from daemon.config import Config, ConfigError, load_config
from daemon.http import HealthServer
from daemon.logs import setup_logging
from daemon.metrics import Metrics
from daemon.mqtt import MqttSource
from daemon.sdnotify import Notifier, watchdog_interval
from db.postgres import PostgresWriter
from db.spool import Spool
from db.sqlite import SqliteWriter
from db.writer import StorageError, Writer

log = logging.getLogger("ingestd")

RESTART_BUDGET = 5  # crashes of one agent tolerated ...
RESTART_WINDOW = 60.0  # ... within this many seconds, before the daemon gives up (exit 1)


class FatalError(Exception):
    """The daemon cannot go on; systemd's Restart=on-failure takes over."""


def build_writer(config: Config) -> Writer:
    url = config.database_url
    limit = config.ingest.max_payload_bytes
    if url.startswith("sqlite:///"):
        return SqliteWriter(Path(url.removeprefix("sqlite:///")), max_payload_bytes=limit)
    return PostgresWriter(
        url,
        max_payload_bytes=limit,
        command_timeout=config.database.command_timeout_seconds,
        connect_timeout=config.database.connect_timeout_seconds,
        # One connection per batch in flight, one for the spool drainer and the devices table.
        pool_size=config.database.batches_in_flight + 1,
    )


class Supervisor:
    """Owns the whole daemon: ``await Supervisor(config).run()`` until stopped."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        *,
        config_file: Path | None = None,
    ) -> None:
        self.config = config
        self.config_file = config_file  # re-read on SIGHUP
        self.metrics = Metrics(registry or CollectorRegistry())
        self.metrics.info.info({"version": __version__})
        self.bus = Bus(self.metrics)
        window = config.mqtt.max_inflight
        size = config.daemon.inbox_size
        # Room for the whole in-flight window plus what paho may deliver in one read.
        raw_inbox = self.bus.inbox("validation", window + 1024, RawMessage)
        enrich_inbox = self.bus.inbox("enrichment", size, ValidatedMessage)
        store_inbox = self.bus.inbox("persistence", size, EnrichedMessage, RejectedMessage)
        publish_inbox = self.bus.inbox("publisher", size, ReadingsStored, RejectionsStored)

        self.source = MqttSource(config, raw_inbox, self.metrics)
        self.writer = build_writer(config)
        self.registry = DeviceRegistry()
        # Store and forward is for a database across a network; the embedded SQLite file is
        # as local as a spool would be.
        self.spool = (
            Spool(config.spool_path, config.spool.max_bytes)
            if isinstance(self.writer, PostgresWriter)
            else None
        )
        self.persistence = PersistenceAgent(
            self.bus,
            self.metrics,
            store_inbox,
            self.writer,
            self.source.tracker.settle,
            config.database.batch_size,
            spool=self.spool,
            max_payload_bytes=config.ingest.max_payload_bytes,
            batches_in_flight=config.database.batches_in_flight,
        )
        self.validation = ValidationAgent(
            self.bus, self.metrics, raw_inbox, config.ingest.sources,
            config.ingest.max_payload_bytes,
        )  # fmt: skip
        self.enrichment = EnrichmentAgent(self.bus, self.metrics, enrich_inbox, self.registry)
        self.publisher = Publisher(
            self.bus, self.metrics, publish_inbox, self.source.publish_nowait,
            prefix=config.publish.prefix, processed=config.publish.processed,
            processed_qos=config.publish.processed_qos, failed_qos=config.publish.failed_qos,
            max_payload_bytes=config.ingest.max_payload_bytes,
        )  # fmt: skip
        self.agents: list[Agent] = [
            self.validation,
            self.enrichment,
            self.persistence,
            self.publisher,
        ]
        self._device_table = DeviceRegistry()  # rows of the devices table, once loaded
        self._reloads: set[asyncio.Task[None]] = set()
        self.drainer: SpoolDrainer | None = None
        if self.spool is not None:
            assert isinstance(self.writer, PostgresWriter)
            self.drainer = SpoolDrainer(
                self.spool, self.writer, self.persistence, self.bus, self.metrics
            )
            self._export_spool(self.spool)
        self.metrics.ready = lambda: float(self.not_ready_reason() is None)
        self.http = HealthServer(
            config.metrics.host, config.metrics.port, self.metrics.registry, self.not_ready_reason
        )
        self.notifier = Notifier()
        self.stop_requested = asyncio.Event()
        self.started = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._helpers: list[asyncio.Task[None]] = []  # watchdog, device table load
        self._deadline = time.monotonic()

    def _export_spool(self, spool: Spool) -> None:
        self.metrics.spool_bytes = lambda: spool.stats.bytes
        self.metrics.spool_readings = lambda: spool.stats.readings
        self.metrics.spool_rejections = lambda: spool.stats.rejections
        self.metrics.spool_age = spool.stats_age
        self.metrics.spool_corrupt = lambda: spool.corrupt_files

    @property
    def services(self) -> list[Agent | SpoolDrainer]:
        """Everything the supervisor runs and restarts: the agents and the spool drainer."""
        return [*self.agents, *([self.drainer] if self.drainer else [])]

    # -- health ----------------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """None when ready: broker connected and readings can be made durable."""
        if self.stop_requested.is_set():
            return "shutting down"
        if not self.source.connected.is_set():
            return "broker not connected"
        if self.source.subscription_problem:
            return self.source.subscription_problem
        if not self.persistence.database_up:
            if self.spool is None:
                return "database unavailable"
            if self.persistence.spool_full:
                return "database unavailable and the spool is full"
        return None

    def live(self) -> bool:
        """Every task alive and every agent with work making progress."""
        now = time.monotonic()
        timeout = self.config.daemon.stall_timeout_seconds
        if any(task.done() for task in self._tasks.values()):
            return False
        return not any(service.stalled(now, timeout) for service in self.services)

    # -- lifecycle -------------------------------------------------------------------------

    # -- reload (SIGHUP) --------------------------------------------------------------------

    def request_reload(self) -> None:
        if self.stop_requested.is_set():
            log.info("reload ignored: shutting down")
            return
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """Re-read the config: apply what can change live, reconnect where needed, and say
        what waits for a restart. An invalid config changes nothing."""
        try:
            new = load_config(self.config_file)
            registry = self._file_registry(new)
        except (ConfigError, RegistryError) as exc:
            log.error("reload refused, running config kept", extra={"error": str(exc)})  # noqa: TRY400
            return
        changed = reload.changes(self.config, new)
        old, self.config = self.config, new
        setup_logging(new.log.level, new.log.format)
        limit = new.ingest.max_payload_bytes
        self.validation.reconfigure(new.ingest.sources, limit)
        self.persistence.max_payload_bytes = self.writer.max_payload_bytes = limit
        self.publisher.reconfigure(
            prefix=new.publish.prefix, processed=new.publish.processed,
            processed_qos=new.publish.processed_qos, failed_qos=new.publish.failed_qos,
            max_payload_bytes=limit,
        )  # fmt: skip
        # The registry file is read again even when its path did not change (its content
        # may have), and the devices table is merged over it as at start-up.
        registry.merge(self._device_table)
        self.registry = self.enrichment.registry = registry
        self.metrics.registry_devices.set(len(registry))
        pending = {s: keys for s, keys in changed.items() if s in reload.RESTART}
        log.info(
            "config reloaded",
            extra={
                "changed": {s: k for s, k in changed.items() if s not in reload.RESTART},
                "needs_restart": pending or None,
            },
        )
        if pending:
            # Keep reporting what actually runs for those sections.
            self.config = new.model_copy(update={s: getattr(old, s) for s in pending})
        if reload.needs_reconnect(changed):
            await self.source.reconfigure(self.config)

    def _file_registry(self, config: Config) -> DeviceRegistry:
        """The registry file, read again (empty when no file is configured)."""
        path = config.ingest.registry_file
        return DeviceRegistry() if path is None else DeviceRegistry(load_registry_file(path))

    def request_stop(self) -> None:
        if self.stop_requested.is_set():
            log.warning("second stop signal: exiting now")
            raise SystemExit(1)
        log.info("stop requested")
        self.stop_requested.set()

    async def run(self, install_signal_handlers: bool = True) -> None:
        """Run until a stop is requested (SIGTERM/SIGINT or ``request_stop``)."""
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self._start()
            async with asyncio.TaskGroup() as group:
                self._tasks["mqtt"] = group.create_task(self.source.run(), name="mqtt")
                for service in self.services:
                    self._tasks[service.name] = group.create_task(
                        self._supervise(service), name=service.name
                    )
                self._helpers.append(group.create_task(self._watchdog(), name="watchdog"))
                self._helpers.append(group.create_task(self._load_device_table(), name="devices"))
                self.notifier.ready(f"consuming {', '.join(self.config.subscriptions)}")
                self.started.set()
                log.info(
                    "started", extra={"version": __version__, "metrics": self.config.metrics.listen}
                )
                await self.stop_requested.wait()
                await self._shutdown()
        finally:
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self._close()

    async def _start(self) -> None:
        try:
            await self.http.start()
        except OSError as exc:
            raise FatalError(
                f"cannot serve metrics on {self.config.metrics.listen}: {exc}"
            ) from None
        if self.spool is not None:
            await self.spool.open()
            if self.spool.stats.batches:
                log.info("spool holds a backlog", extra={"readings": self.spool.stats.readings})
        try:
            await self.writer.start()
            self.persistence.database_up = True
            self.metrics.database_up.set(1)
        except StorageError as exc:
            log.error(  # noqa: TRY400 - an expected outage, not a bug: no traceback
                "database unreachable at start; writes will retry", extra={"error": str(exc)}
            )
        await self._load_registry()

    async def _load_registry(self) -> None:
        """The registry file: invalid is fatal, at start, before anything is enriched."""
        if self.config.ingest.registry_file is not None:
            try:
                self.registry.add(load_registry_file(self.config.ingest.registry_file))
            except RegistryError as exc:
                raise FatalError(str(exc)) from None
        self.metrics.registry_devices.set(len(self.registry))

    async def _load_device_table(self) -> None:
        """The devices table, in the background: a slow database must not delay start-up."""
        try:
            table = DeviceRegistry(await self.writer.load_devices())  # type: ignore[attr-defined]
        except (StorageError, RegistryError) as exc:
            log.warning("devices table not used", extra={"error": str(exc)})
            return
        self._device_table = table
        self.registry.merge(table)
        self.metrics.registry_devices.set(len(self.registry))

    async def _supervise(self, agent: Agent | SpoolDrainer) -> None:
        crashes: deque[float] = deque()
        alive = self.metrics.agent_alive.labels(agent.name)
        while True:
            alive.set(1)
            try:
                await agent.run()
            except Exception as exc:
                alive.set(0)
                now = time.monotonic()
                crashes.append(now)
                while crashes and now - crashes[0] > RESTART_WINDOW:
                    crashes.popleft()
                log.exception("agent crashed", extra={"agent": agent.name})
                if len(crashes) > RESTART_BUDGET:
                    raise FatalError(
                        f"agent {agent.name} crashed {len(crashes)} times in a minute"
                    ) from exc
                self.metrics.agent_restarts.labels(agent.name).inc()
                # Back off, so that a crash on every attempt does not burn the budget at once.
                await asyncio.sleep(min(5.0, 0.1 * 2 ** len(crashes)))

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            if self.live():
                self.notifier.watchdog()
            else:
                log.error("not live: withholding the watchdog ping")
            await asyncio.sleep(interval)

    async def _shutdown(self) -> None:
        """Stop intake, drain, disconnect; all within ``daemon.shutdown_timeout_seconds``."""
        self._deadline = time.monotonic() + self.config.daemon.shutdown_timeout_seconds
        self.notifier.stopping()
        self.source.stop_intake()
        log.info("draining", extra={"in_flight": self.source.tracker.pending})
        try:
            # Leave room for the disconnect and for closing the database.
            async with asyncio.timeout(max(0.5, self._remaining() - 2.0)):
                await self.source.tracker.wait_drained()
        except TimeoutError:
            log.warning(
                "drain timed out; unacknowledged messages will be redelivered",
                extra={"in_flight": self.source.tracker.pending},
            )
        try:
            async with asyncio.timeout(min(1.0, self._remaining())):
                await self.source.close()
        except TimeoutError:
            log.warning("broker did not confirm the disconnect")
        for task in [*self._tasks.values(), *self._helpers]:
            task.cancel()

    def _remaining(self) -> float:
        return max(0.1, self._deadline - time.monotonic())

    async def _close(self) -> None:
        for task in self._reloads:  # a reload still reconnecting: the daemon is leaving
            task.cancel()
        await asyncio.gather(*self._reloads, return_exceptions=True)
        try:
            await self.writer.close(grace_seconds=min(2.0, self._remaining()))
            if self.spool is not None:
                await self.spool.close()
        finally:
            await self.http.close()
            self.notifier.close()
            log.info(
                "stopped",
                extra={"acks_sent": self.metrics.acks_sent, "stored": self.metrics.stored},
            )


def prepare_schema(config: Config) -> str | None:
    """Migrate the embedded SQLite file; check a PostgreSQL schema. Returns a problem or None."""
    import asyncpg  # noqa: PLC0415

    from db.schema import SchemaError, ensure_current, upgrade  # noqa: PLC0415

    url = config.database_url
    if url.startswith("sqlite:///"):
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

        try:
            upgrade(url)
        except (SQLAlchemyError, OSError) as exc:
            return f"cannot prepare the SQLite database {url}: {exc}"
        return None
    try:
        asyncio.run(ensure_current(url, config.database.connect_timeout_seconds))
    except SchemaError as exc:
        return str(exc)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # An edge host may boot before its uplink: start anyway, writes retry until it answers.
        log.error(  # noqa: TRY400 - an expected outage, not a bug: no traceback
            "database unreachable at start; schema not verified", extra={"error": repr(exc)}
        )
    return None
