"""The benchmark (bench/README.md): run it from the repository root as ``python -m bench.run``."""
