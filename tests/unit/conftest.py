"""Fixtures of the agents' unit tests: fresh metrics on a fresh registry, and a bus."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from agents.bus import Bus
from agents.metrics import PipelineMetrics


@pytest.fixture
def metrics() -> PipelineMetrics:
    return PipelineMetrics(CollectorRegistry())


@pytest.fixture
def bus(metrics: PipelineMetrics) -> Bus:
    return Bus(metrics)
