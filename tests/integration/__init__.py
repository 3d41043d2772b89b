"""Integration tests: real centers and daemons as subprocesses on 127.0.0.1."""
