"""Wiring: the daemon's object graph, built from the config in one place.

Every implementation is chosen here, once, by name: the storage backend by the database
URL, a decoder per source by its format. Nothing downstream asks which one it got.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from agents.anomaly.agent import AnomalyAgent
from agents.anomaly.metrics import AnomalyMetrics
from agents.base import Service
from agents.bus import Bus
from agents.decoding import DecoderContext, Route, Router
from agents.drainer import SpoolDrainer
from agents.enrichment import EnrichmentAgent
from agents.events import (
    AlertsRaised,
    AlertsStored,
    EnrichedMessage,
    RawMessage,
    ReadingsStored,
    RejectedMessage,
    RejectionsStored,
    ValidatedMessage,
)
from agents.formats import DECODERS
from agents.maintenance import MaintenanceAgent
from agents.metrics import PipelineMetrics
from agents.outbound import Outbound
from agents.persistence import PersistenceAgent
from agents.publisher import EventSettings, Publisher
from agents.registry import DeviceRegistry, load_registry_file
from agents.storage import NotDurableError, Storage
from agents.validation import ValidationAgent
from daemon import __version__
from daemon.config import Config
from daemon.http import HealthServer
from daemon.intake import Intake
from daemon.metrics import (
    BudgetCollector,
    Metrics,
    ReadinessCollector,
    SpoolCollector,
    WindowCollector,
)
from db.backends import WriterOptions, backend_for
from db.series_store import SeriesStore
from db.spool import Spool
from db.writer import StorageError

__all__ = [
    "Daemon",
    "build_routes",
    "event_settings",
    "file_registry",
    "prepare_schema",
    "wire",
    "writer_options",
]

# Room in the validation inbox beyond the in-flight window: what paho may deliver in one read.
_READ_SLACK = 1024
# Batches of events waiting for the Publisher (each up to database.batch_size readings).
_EVENT_BATCHES = 64
# At a stop, how long alert changes still in hand may take to be stored (or spooled).
_STOP_STORE_SECONDS = 2.0

log = logging.getLogger("ingestd")


@dataclass(slots=True)
class Daemon:
    """Everything one running ingestd is made of."""

    config: Config
    metrics: Metrics
    bus: Bus
    intake: Intake
    storage: Storage
    registry: DeviceRegistry
    validation: ValidationAgent
    enrichment: EnrichmentAgent
    persistence: PersistenceAgent
    publisher: Publisher
    drainer: SpoolDrainer | None
    http: HealthServer
    anomaly: AnomalyAgent | None = None
    maintenance: MaintenanceAgent | None = None

    @property
    def services(self) -> list[Service]:
        """What the supervisor runs and restarts: the agents and the spool drainer."""
        agents: list[Service] = [self.validation, self.enrichment, self.persistence, self.publisher]
        optional = (self.drainer, self.anomaly, self.maintenance)
        return [*agents, *(service for service in optional if service is not None)]

    async def finish_alerts(self) -> None:
        """At a clean stop, once intake is drained: wait until the detectors, then the
        maintenance agent they feed, have nothing left to do (the caller bounds the wait)."""
        for agent in (self.anomaly, self.maintenance):
            if agent is None:
                continue
            # Idle with a batch in its inbox: the batch is handed over but not yet taken.
            while not (agent.idle.is_set() and agent.inbox.empty()):
                if agent.idle.is_set():
                    await asyncio.sleep(0)
                else:
                    await agent.idle.wait()

    async def close_anomaly(self) -> None:
        """At a stop, once the agents' tasks ended: store the alert changes decided but not
        stored yet (a stop must not lose an opening the saved state already holds), then
        save what the detectors learned."""
        if self.anomaly is None:
            return
        changes = [*(self.maintenance.unsaved() if self.maintenance else []), *self.anomaly.pending]
        self.anomaly.pending = []
        if changes:
            try:
                async with asyncio.timeout(_STOP_STORE_SECONDS):
                    await self.storage.store([], [], changes, in_order=True)
            except (TimeoutError, NotDurableError, StorageError) as exc:
                log.warning(
                    "alert changes not stored at the stop",
                    extra={"changes": len(changes), "error": str(exc)},
                )
        if self.anomaly.store is not None:
            await self.anomaly.save()
            await self.anomaly.store.close()

    def not_ready_reason(self) -> str | None:
        """None when ready: broker connected and readings can be made durable."""
        return self.intake.not_ready_reason() or self.storage.not_ready_reason()


def wire(
    config: Config, registry: CollectorRegistry, readiness: Callable[[], str | None]
) -> Daemon:
    """The whole graph for ``config``, metrics on ``registry``; nothing started yet.

    ``readiness`` answers ``/readyz`` and ``ingestd_ready`` (the supervisor's view, which
    adds shutting down to ``Daemon.not_ready_reason``).
    """
    metrics = Metrics(registry, __version__)
    pipeline, bus = metrics.pipeline, Bus(metrics.pipeline)
    size, limit = config.daemon.inbox_size, config.ingest.max_payload_bytes
    raw_inbox = bus.inbox("validation", config.mqtt.max_inflight + _READ_SLACK, RawMessage)
    intake = Intake(config, raw_inbox, metrics.intake)
    storage = _storage(config, metrics)
    devices = DeviceRegistry()
    store_inbox = bus.inbox("persistence", size, EnrichedMessage, RejectedMessage)
    persistence = PersistenceAgent(
        bus, pipeline, store_inbox, storage, intake.settle, config.database.batch_size,
        max_payload_bytes=limit, batches_in_flight=config.database.batches_in_flight,
    )  # fmt: skip
    # Its events are whole batches: a few dozen of them bound what waits for the broker.
    publish_inbox = bus.inbox(
        "publisher", _EVENT_BATCHES, ReadingsStored, RejectionsStored, AlertsStored
    )
    routes = build_routes(config, intake.host_outbound, pipeline)
    daemon = Daemon(
        config=config,
        metrics=metrics,
        bus=bus,
        intake=intake,
        storage=storage,
        registry=devices,
        validation=ValidationAgent(bus, pipeline, raw_inbox, routes, limit, intake.budget),
        enrichment=EnrichmentAgent(
            bus, pipeline, bus.inbox("enrichment", size, ValidatedMessage), devices
        ),
        persistence=persistence,
        publisher=Publisher(
            bus, pipeline, publish_inbox, intake.main, event_settings(config), intake.budget.release
        ),
        drainer=_drainer(config, storage, bus, pipeline),
        http=HealthServer(config.metrics.host, config.metrics.port, registry, readiness),
    )
    _wire_anomaly(daemon, AnomalyMetrics(registry))
    _register_collectors(daemon, readiness)
    return daemon


def _wire_anomaly(daemon: Daemon, counts: AnomalyMetrics) -> None:
    """The AnomalyAgent (fed by stored readings through an inbox that skips, never waits)
    and the MaintenanceAgent that stores its alerts; neither when anomaly.enabled is off."""
    config, bus, pipeline = daemon.config, daemon.bus, daemon.metrics.pipeline
    if not config.anomaly.enabled:
        return
    settings = config.anomaly.settings()
    inbox = bus.inbox("anomaly", config.anomaly.queue_batches, ReadingsStored)
    daemon.anomaly = AnomalyAgent(
        bus, pipeline, inbox, settings, counts, daemon.registry,
        SeriesStore(config.state_dir / "anomaly.db"), daemon.storage.writer.open_alerts,
    )  # fmt: skip
    inbox.overflow = daemon.anomaly.overflow
    daemon.maintenance = MaintenanceAgent(
        bus, pipeline, bus.inbox("maintenance", _EVENT_BATCHES, AlertsRaised),
        daemon.storage, settings, counts,
    )  # fmt: skip


def _drainer(
    config: Config, storage: Storage, bus: Bus, metrics: PipelineMetrics
) -> SpoolDrainer | None:
    """The spool's drainer, when there is a spool (PostgreSQL)."""
    if storage.spool is None:
        return None
    return SpoolDrainer(storage.spool, storage, bus, metrics, batch_size=config.database.batch_size)


def _storage(config: Config, metrics: Metrics) -> Storage:
    backend = backend_for(config.database_url)
    writer = backend.writer(writer_options(config))
    # Store and forward is for a database across a network; the embedded SQLite file is
    # as local as a spool would be.
    spool = Spool(config.spool_path, config.spool.max_bytes) if backend.spooled else None
    return Storage(writer, spool, metrics.pipeline)


def writer_options(config: Config) -> WriterOptions:
    return WriterOptions(
        config.database_url,
        command_timeout=config.database.command_timeout_seconds,
        connect_timeout=config.database.connect_timeout_seconds,
        # One connection per batch in flight, one for the spool drainer and the devices table.
        connections=config.database.batches_in_flight + 1,
    )


def _register_collectors(daemon: Daemon, readiness: Callable[[], str | None]) -> None:
    registry = daemon.metrics.registry
    registry.register(WindowCollector([source.tracker for source in daemon.intake.sources]))
    registry.register(BudgetCollector(daemon.intake.budget))
    registry.register(SpoolCollector(daemon.storage.spool))
    registry.register(ReadinessCollector(readiness))
    for service in daemon.services:
        daemon.metrics.pipeline.track_agent(service.name)


def build_routes(
    config: Config, outbound: Outbound, metrics: PipelineMetrics, previous: Router | None = None
) -> Router:
    """One route per source, each with the decoder its format names (a reload keeps the
    decoders it had: a Sparkplug host's state lives in it)."""
    context = DecoderContext(
        outbound=outbound,
        state_dir=config.state_dir,
        metrics=metrics,
        prefix=config.publish.prefix,
        rebirth_cooldown_seconds=config.sparkplug.rebirth_cooldown_seconds,
    )
    # One decoder per format, shared by its sources: the Sparkplug host's state (birth
    # cache, seq, online gauges) is one per daemon, whichever filters feed it.
    decoders = {r.format: r.decoder for r in previous.routes} if previous else {}
    for source in config.ingest.sources:
        if source.format not in decoders:
            decoders[source.format] = DECODERS[source.format](context)
    return Router(
        [
            Route(source.topic, source.parsed_template, decoders[source.format], source.format)
            for source in config.ingest.sources
        ]
    )


def event_settings(config: Config) -> EventSettings:
    """The Publisher's settings, at start and on every reload."""
    publish = config.publish
    return EventSettings(
        prefix=publish.prefix,
        processed=publish.processed,
        processed_qos=publish.processed_qos,
        failed_qos=publish.failed_qos,
        alerts_qos=publish.alerts_qos,
        max_payload_bytes=config.ingest.max_payload_bytes,
    )


def file_registry(config: Config) -> DeviceRegistry:
    """The registry file, read (empty when none is configured); raises RegistryError."""
    path = config.ingest.registry_file
    return DeviceRegistry() if path is None else DeviceRegistry(load_registry_file(path))


def prepare_schema(config: Config) -> str | None:
    """Migrate the embedded SQLite file; check a PostgreSQL schema. Returns a problem or None."""
    return backend_for(config.database_url).prepare(writer_options(config))
