"""fdship.localcluster's port picking (the local clusters of tests and `fdship demo`)."""

from __future__ import annotations

import socket

from fdship.localcluster import _ephemeral_low, free_port


def test_free_ports_are_bindable_and_outside_the_ephemeral_range() -> None:
    # A port inside the range outgoing connections draw from can be taken by
    # one of them between the pick and the listen; below it, it cannot.
    low = _ephemeral_low()
    ports = [free_port() for _ in range(50)]
    if low > 11024:
        assert all(10000 <= p < low for p in ports), (low, ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # still free: nothing was left bound
