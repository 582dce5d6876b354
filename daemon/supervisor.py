"""The supervisor: runs the wired daemon, owns every task, restarts crashed agents, stops in
phases.

Shutdown order: stop intake (no new messages), let the pipeline drain so every
message received gets its outcome committed and its PUBACK sent, disconnect cleanly
(the persistent session stays on the broker), then close the database. Whatever is
not done within the timeout stays unacknowledged and is redelivered on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agents.base import Service
from agents.registry import DeviceRegistry, RegistryError
from daemon import __version__, reload
from daemon.config import Config
from daemon.sdnotify import Notifier, watchdog_interval
from daemon.wiring import file_registry, wire
from db.writer import StorageError
from edge.errors import IngestdError

__all__ = ["FatalError", "Supervisor"]

log = logging.getLogger("ingestd")

RESTART_BUDGET = 5  # crashes of one agent tolerated ...
RESTART_WINDOW = 60.0  # ... within this many seconds, before the daemon gives up (exit 1)


class FatalError(IngestdError):
    """The daemon cannot go on; systemd's Restart=on-failure takes over."""


class Supervisor:
    """Runs one daemon: ``await Supervisor(config).run()`` until stopped."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        *,
        config_file: Path | None = None,
    ) -> None:
        self.config_file = config_file  # re-read on SIGHUP
        self.daemon = wire(config, registry or CollectorRegistry(), self.not_ready_reason)
        self.metrics = self.daemon.metrics
        self.notifier = Notifier()
        self.stop_requested = asyncio.Event()
        self.started = asyncio.Event()
        self._device_table = DeviceRegistry()  # rows of the devices table, once loaded
        self._reloads: set[asyncio.Task[None]] = set()
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._helpers: list[asyncio.Task[None]] = []  # watchdog, device table load
        self._deadline = time.monotonic()

    @property
    def config(self) -> Config:
        return self.daemon.config

    # -- health ----------------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """None when ready: broker connected and readings can be made durable."""
        if self.stop_requested.is_set():
            return "shutting down"
        return self.daemon.not_ready_reason()

    def live(self) -> bool:
        """Every task alive and every agent with work making progress."""
        now = time.monotonic()
        timeout = self.config.daemon.stall_timeout_seconds
        if any(task.done() for task in self._tasks.values()):
            return False
        return not any(service.stalled(now, timeout) for service in self.daemon.services)

    # -- signals ---------------------------------------------------------------------------

    def request_reload(self) -> None:
        if self.stop_requested.is_set():
            log.info("reload ignored: shutting down")
            return
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """Apply the config file as it is now (see ``daemon.reload``)."""
        await reload.reload(self.daemon, self.config_file, self._device_table)

    def request_stop(self) -> None:
        if self.stop_requested.is_set():
            log.warning("second stop signal: exiting now")
            raise SystemExit(1)
        log.info("stop requested")
        self.stop_requested.set()

    # -- lifecycle -------------------------------------------------------------------------

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
                for source in self.daemon.intake.sources:
                    name = f"mqtt-{source.session.name}"
                    self._tasks[name] = group.create_task(source.run(), name=name)
                for service in self.daemon.services:
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
            await self.daemon.http.start()
        except OSError as exc:
            raise FatalError(
                f"cannot serve metrics on {self.config.metrics.listen}: {exc}"
            ) from None
        await self.daemon.storage.start()
        await self._load_registry()

    async def _load_registry(self) -> None:
        """The registry file: invalid is fatal, at start, before anything is enriched."""
        try:
            self.daemon.registry.merge(file_registry(self.config))
        except RegistryError as exc:
            raise FatalError(str(exc)) from None
        self.metrics.pipeline.registry_devices.set(len(self.daemon.registry))

    async def _load_device_table(self) -> None:
        """The devices table, in the background: a slow database must not delay start-up."""
        try:
            table = DeviceRegistry(await self.daemon.storage.writer.load_devices())
        except (StorageError, RegistryError) as exc:
            log.warning("devices table not used", extra={"error": str(exc)})
            return
        self._device_table = table
        self.daemon.registry.merge(table)
        self.metrics.pipeline.registry_devices.set(len(self.daemon.registry))

    async def _supervise(self, service: Service) -> None:
        crashes: deque[float] = deque()
        alive = self.metrics.pipeline.agent_alive.labels(service.name)
        while True:
            alive.set(1)
            try:
                await service.run()
            except Exception as exc:
                alive.set(0)
                now = time.monotonic()
                crashes.append(now)
                while crashes and now - crashes[0] > RESTART_WINDOW:
                    crashes.popleft()
                log.exception("agent crashed", extra={"agent": service.name})
                if len(crashes) > RESTART_BUDGET:
                    raise FatalError(
                        f"agent {service.name} crashed {len(crashes)} times in a minute"
                    ) from exc
                self.metrics.pipeline.agent_restarts.labels(service.name).inc()
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
        intake = self.daemon.intake
        self._deadline = time.monotonic() + self.config.daemon.shutdown_timeout_seconds
        self.notifier.stopping()
        intake.stop_intake()
        log.info("draining", extra={"in_flight": intake.pending})
        try:
            # Leave room for the disconnect and for closing the database.
            async with asyncio.timeout(max(0.5, self._remaining() - 2.0)):
                await intake.wait_drained()
        except TimeoutError:
            log.warning(
                "drain timed out; unacknowledged messages will be redelivered",
                extra={"in_flight": intake.pending},
            )
        try:
            async with asyncio.timeout(min(1.0, self._remaining())):
                await intake.close()
        except TimeoutError:
            log.warning("broker did not confirm the disconnect")
        with contextlib.suppress(TimeoutError):  # detections are not acknowledged: no wait past it
            async with asyncio.timeout(min(2.0, max(0.0, self._remaining() - 2.5))):
                await self.daemon.finish_alerts()
        for task in [*self._tasks.values(), *self._helpers]:
            task.cancel()

    def _remaining(self) -> float:
        return max(0.1, self._deadline - time.monotonic())

    async def _close(self) -> None:
        for task in self._reloads:  # a reload still reconnecting: the daemon is leaving
            task.cancel()
        await asyncio.gather(*self._reloads, return_exceptions=True)
        try:
            await self.daemon.close_anomaly()
            await self.daemon.storage.close(grace_seconds=min(2.0, self._remaining()))
        finally:
            await self.daemon.http.close()
            self.notifier.close()
            log.info(
                "stopped",
                extra={
                    "acks_sent": self.metrics.intake.acks_sent,
                    "stored": self.metrics.pipeline.stored,
                },
            )
