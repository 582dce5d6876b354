"""Anomaly detection on the readings' own time: the AnomalyAgent on the live stream, the
per-series judgement (registry limits, frozen values, the adaptive detector, alert
episodes), and the CSV replay of the very same detector."""

from agents.anomaly.agent import AnomalyAgent
from agents.anomaly.detector import AnomalyDetector, Verdict
from agents.anomaly.rules import KINDS, AnomalySettings, SeriesRules
from agents.anomaly.series import Finding, Series
from agents.anomaly.settings import DetectorSettings
from agents.anomaly.state import SnapshotError

__all__ = [
    "KINDS",
    "AnomalyAgent",
    "AnomalyDetector",
    "AnomalySettings",
    "DetectorSettings",
    "Finding",
    "Series",
    "SeriesRules",
    "SnapshotError",
    "Verdict",
]
