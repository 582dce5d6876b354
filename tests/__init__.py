"""The test suite; ``tests.harness`` is the servers and daemon helpers the bench shares."""
