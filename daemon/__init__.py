"""Process lifecycle: the command line, the config, the MQTT connection, wiring, the
supervisor, metrics and health. Its modules are imported where used (``daemon.cli`` is the
entry point), so that ``ingestd check-config`` does not load the whole pipeline."""

__version__ = "0.1.0"
__all__ = ["__version__"]
