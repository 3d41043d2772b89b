"""The center: the single writer that logs, schedules and answers (see runner.py)."""
