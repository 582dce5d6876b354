"""Anomaly detection on the readings' own time: the streaming detector and its CSV replay.

Only the detector and ``ingestd anomaly replay`` exist so far; docs/anomaly.md lists what
is not built yet (the AnomalyAgent on the live stream, alerts, maintenance tasks).
"""

from agents.anomaly.detector import AnomalyDetector, Verdict
from agents.anomaly.settings import DetectorSettings
from agents.anomaly.state import SnapshotError

__all__ = ["AnomalyDetector", "DetectorSettings", "SnapshotError", "Verdict"]
