"""The agent bus, its events and the agents that validate, enrich, persist and publish."""

from agents.base import Agent, Service
from agents.bus import Bus, Inbox, UnroutedEventError
from agents.decoding import Decoder, DecoderContext, Route, Router
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
from agents.formats import DECODERS
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
    "Bus",
    "Decoder",
    "DecoderContext",
    "DeviceRegistry",
    "EnrichedMessage",
    "EnrichmentAgent",
    "EventSettings",
    "Inbox",
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
