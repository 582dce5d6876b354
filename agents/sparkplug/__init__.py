"""The Sparkplug B host: a stateful decoder for ``format = "sparkplug"`` sources."""

from agents.sparkplug.host import SparkplugHost

__all__ = ["SparkplugHost"]
