"""fdship.localcluster's port picking (the local clusters of tests and `fdship demo`)."""

from __future__ import annotations

import socket

import pytest

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


def test_free_ports_never_repeat_and_ignore_the_global_seed() -> None:
    # Two picks made before either process listens must differ; a test that
    # seeds the module-level generator must not make clusters pick alike.
    import random

    random.seed(1)
    a = [free_port() for _ in range(100)]
    random.seed(1)
    b = [free_port() for _ in range(100)]
    assert len(set(a + b)) == 200


def test_a_process_whose_port_was_taken_starts_again_on_a_new_one(tmp_path) -> None:
    # Something else listens on the ports the center and one daemon were given,
    # between the pick and their start: the cluster still comes up, on new ports.
    from fdship.localcluster import LocalCluster

    c = LocalCluster(2, str(tmp_path))
    squat = []
    taken = [c.center.port, c.daemons[1].port]
    for port in taken:
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen()
        squat.append(s)
    try:
        c.start(wait=60)
        assert c.center.port != taken[0] and c.daemons[1].port != taken[1]
        assert c.daemons[0].extra.get("port_retries", 0) == 0
        assert c.center.extra["port_retries"] == 1 and c.daemons[1].extra["port_retries"] == 1
        hosts = c.hosts()
        assert hosts["d1"]["alive"] and str(c.daemons[1].port) in hosts["d1"]["address"]
        # The log keeps the lost race for whoever reads it.
        assert "Address already in use" in c.daemons[1].log()
    finally:
        c.stop()
        for s in squat:
            s.close()


def test_a_process_that_fails_for_another_reason_is_not_restarted(tmp_path) -> None:
    from fdship.localcluster import LocalCluster

    c = LocalCluster(1, str(tmp_path), daemon_args={0: ["--upload-rate", "nonsense"]})
    try:
        with pytest.raises(RuntimeError, match="daemon d0 exited"):
            c.start(wait=30)
        assert c.daemons[0].extra.get("port_retries", 0) == 0
    finally:
        c.stop()
