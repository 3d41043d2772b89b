"""The pure scheduling core: events in, actions out.

Nothing in this package imports tornado, asyncio, sockets, files or the clock:
time is an argument (``now``) and randomness a seeded generator the scheduler
owns.  That is what lets the center replay its REDO log through the very same
code, and lets ``fdship simulate`` drive thousands of simulated hosts.
"""
