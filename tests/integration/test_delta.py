"""Ship only what changed, end to end: targets that hold the previous version.

A real center, a source and two targets.  The first job ships a text file in
full; later jobs ship edited versions to the same destination, and the
targets rebuild them from their old copies plus the changed bytes.  The tests
check the copies byte for byte, the bytes that crossed the network (daemon
counters), and that the center counts only network bytes (a chunk taken from
the old copy is acked with zero bytes and ``local``).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import urllib.request

import pytest

from fdship.localcluster import LocalCluster

MiB = 1024 * 1024
TARGETS = ["d1", "d2"]
DEST = "/srv/models"


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def write_lines(path: str, n: int, seed: int = 1) -> list[int]:
    """~200-byte text lines; returns the offset of each line."""
    rng = random.Random(seed)
    offsets = []
    pos = 0
    with open(path, "wb") as f:
        for i in range(n):
            line = b"%010d\tprice=%08.4f\t%s\n" % (
                i, rng.random() * 100, bytes(rng.choices(b"abcdefghij0123456789", k=170)))
            offsets.append(pos)
            f.write(line)
            pos += len(line)
    return offsets


def edit_prices(path: str, offsets: list[int], lines: list[int], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for n in lines:
            f.seek(offsets[n] + 17)  # after "%010d\tprice="
            f.write(b"%08.4f" % (rng.random() * 100))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("delta"))
    c = LocalCluster(3, base, center_args=["--chunk-size", "1M"],
                     daemon_args={i: ["--heartbeat-interval", "0.5"] for i in range(3)})
    try:
        c.start()
        yield c
    finally:
        c.stop()


def status(c: LocalCluster, i: int) -> dict:
    return c.request("GET", c.daemons[i].url + "/daemon/status")


def network(c: LocalCluster) -> int:
    """Bytes the targets pulled in full plus delta traffic both ways."""
    return sum(status(c, i)["bytes_received"] + status(c, i)["delta"]["bytes_network"]
               for i in (1, 2))


def center_metric(c: LocalCluster, name: str) -> float:
    with urllib.request.urlopen(c.center.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def ship(c: LocalCluster, path: str) -> dict:
    res = c.submit([path], TARGETS, dest=DEST)
    assert res["state"] == "done", res
    for i in (1, 2):
        copy = os.path.join(c.root(i), DEST.lstrip("/"), os.path.basename(path))
        assert sha(copy) == sha(path), f"d{i}: copy differs"
    return res


def test_in_place_edits_and_appends_move_only_the_changed_bytes(cluster):
    c = cluster
    src = os.path.join(c.tmp, "src")
    os.makedirs(src, exist_ok=True)
    path = os.path.join(src, "features.txt")
    offsets = write_lines(path, 60_000)  # ~12 MiB, 12 chunks
    size = os.path.getsize(path)
    n0 = network(c)
    ship(c, path)
    full = network(c) - n0
    assert full >= 2 * size  # the first time: everything

    # 1% of the lines, spread all over the file, edited in place.
    edit_prices(path, offsets, random.Random(3).sample(range(len(offsets)), 600), seed=4)
    n0, served0 = network(c), status(c, 0)["bytes_served"]
    delivered0 = center_metric(c, "fdship_bytes_delivered_total")
    ship(c, path)
    moved = network(c) - n0
    assert 0 < moved < 0.05 * 2 * size, moved  # under 5% of a full transfer
    assert status(c, 0)["bytes_served"] - served0 < 0.05 * size
    # The center's figure is the network bytes the targets reported, not the size.
    delivered = center_metric(c, "fdship_bytes_delivered_total") - delivered0
    assert delivered <= moved and delivered < 0.05 * 2 * size
    patched = sum(status(c, i)["delta"]["chunks_patched"] for i in (1, 2))
    assert patched >= 2 * 11

    # Lines appended: every old chunk is reused as is, acked as local.
    reused0 = center_metric(c, "fdship_chunks_reused_total")
    with open(path, "ab") as f:
        f.write(b"".join(b"%010d\tappended line\n" % i for i in range(30_000)))
    grown = os.path.getsize(path)
    n0 = network(c)
    ship(c, path)
    moved = network(c) - n0
    assert moved < 2 * (grown - size) + 0.05 * 2 * grown
    assert center_metric(c, "fdship_chunks_reused_total") - reused0 >= 2 * (size // MiB)


def test_an_unrelated_old_file_is_replaced_correctly(cluster):
    c = cluster
    src = os.path.join(c.tmp, "src")
    os.makedirs(src, exist_ok=True)
    path = os.path.join(src, "model.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * MiB + 77))
    for i in (1, 2):
        old = os.path.join(c.root(i), DEST.lstrip("/"), "model.bin")
        os.makedirs(os.path.dirname(old), exist_ok=True)
        with open(old, "wb") as f:
            f.write(os.urandom(5 * MiB))  # bigger, and nothing in common
    full0 = [status(c, i)["delta"]["chunks_full"] for i in (1, 2)]
    n0 = network(c)
    ship(c, path)
    assert network(c) - n0 >= 2 * (3 * MiB + 77)  # everything crossed the network
    assert [status(c, i)["delta"]["chunks_full"] for i in (1, 2)] != full0
