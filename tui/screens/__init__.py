"""Screens of ``fdship-tui``: Jobs (the list), Job (one job's machines), Hosts."""

from tui.screens.base import MonitorScreen
from tui.screens.hosts import HostsScreen
from tui.screens.job import JobScreen
from tui.screens.jobs import JobsScreen

__all__ = ["HostsScreen", "JobScreen", "JobsScreen", "MonitorScreen"]
