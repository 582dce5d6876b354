"""The agent bus, its events and the agents that validate, enrich, persist and publish, and
the ones that turn stored readings into alerts and maintenance tasks."""

from agents.base import Agent, Service
from agents.bus import Bus, Inbox, UnroutedEventError
from agents.decoding import Decoder, DecoderContext, Route, Router
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
from agents.reasons import REASONS
from agents.registry import DeviceRegistry, RegistryError, load_registry_file
from agents.storage import NotDurableError, Storage
from agents.validation import ValidationAgent

__all__ = [
    "DECODERS",
    "REASONS",
    "Agent",
    "AlertsRaised",
    "AlertsStored",
    "Bus",
    "Decoder",
    "DecoderContext",
    "DeviceRegistry",
    "EnrichedMessage",
    "EnrichmentAgent",
    "EventSettings",
    "Inbox",
    "MaintenanceAgent",
    "NotDurableError",
    "Outbound",
    "PersistenceAgent",
    "PipelineMetrics",
    "Publisher",
    "RawMessage",
    "ReadingsStored",
    "RegistryError",
    "RejectedMessage",
    "RejectionsStored",
    "Route",
    "Router",
    "Service",
    "SpoolDrainer",
    "Storage",
    "UnroutedEventError",
    "ValidatedMessage",
    "ValidationAgent",
    "load_registry_file",
]
