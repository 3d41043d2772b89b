"""The JSON client's keep-alive path (``fdship.httpclient``) against real servers.

A real Tornado server counts the TCP connections it accepts: control messages
sent with ``keep_alive=True`` must share one connection where the one-shot
client opens one per request, survive the server hanging up on an idle
connection (and a reused connection that dies before answering), and fail the
way every caller expects: ``BadRequest`` with the server's sentence for a 4xx,
``FdshipError`` for a 5xx, ``Unavailable`` when nobody answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.httpserver
import tornado.web

from fdship.errors import BadRequest, FdshipError, Unavailable
from fdship.httpclient import call, close_keep_alive, keep_alive_pool


class _Echo(tornado.web.RequestHandler):
    def post(self) -> None:
        body = json.loads(self.request.body or b"null")
        if isinstance(body, dict) and body.get("fail"):
            self.set_status(int(body["fail"]))
            self.finish({"error": f"refused: {body['fail']}"})
            return
        self.finish({"echo": body, "auth": self.request.headers.get("Authorization", "")})


class _Chunked(tornado.web.RequestHandler):
    async def get(self) -> None:
        # Writes flushed before finish go out with Transfer-Encoding: chunked.
        self.set_header("Content-Type", "application/json")
        self.write(b'{"parts": [')
        await self.flush()
        self.write(b"1, 2, ")
        await self.flush()
        self.finish(b"3]}")


class _Counting(tornado.httpserver.HTTPServer):
    accepted = 0

    def handle_stream(self, stream: Any, address: Any) -> None:
        type(self).accepted += 1
        super().handle_stream(stream, address)


@contextlib.asynccontextmanager
async def tornado_server(idle: float = 60.0) -> AsyncIterator[tuple[str, type[_Counting]]]:
    counting = type("Counting", (_Counting,), {"accepted": 0})
    app = tornado.web.Application([("/echo", _Echo), ("/chunked", _Chunked)])
    server = counting(app, idle_connection_timeout=idle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    server.add_sockets([sock])
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", counting
    finally:
        close_keep_alive()
        server.stop()
        await server.close_all_connections()


def test_keep_alive_calls_share_one_connection_where_one_shot_calls_do_not() -> None:
    async def main() -> tuple[int, int, list[Any]]:
        async with tornado_server() as (url, srv):
            got = [await call("POST", url + "/echo", {"n": i}, token="t", keep_alive=True)
                   for i in range(5)]
            kept = srv.accepted
            for i in range(3):
                await call("POST", url + "/echo", {"n": i})
            return kept, srv.accepted - kept, got

    kept, one_shot, got = asyncio.run(main())
    assert [g["echo"] for g in got] == [{"n": i} for i in range(5)]
    assert all(g["auth"] == "Bearer t" for g in got)
    assert kept == 1
    assert one_shot == 3


def test_concurrent_calls_open_their_own_connections_and_keep_a_few() -> None:
    async def main() -> tuple[int, int]:
        async with tornado_server() as (url, srv):
            await asyncio.gather(*(call("POST", url + "/echo", {"n": i}, keep_alive=True)
                                   for i in range(6)))
            idle = keep_alive_pool().count()
            await asyncio.gather(*(call("POST", url + "/echo", {"n": i}, keep_alive=True)
                                   for i in range(2)))
            return idle, srv.accepted

    idle, accepted = asyncio.run(main())
    assert idle == 2  # MAX_IDLE_PER_ORIGIN: the rest were closed, not hoarded
    assert accepted == 6  # the second pair reused the two kept


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def main() -> tuple[Any, int]:
        async with tornado_server(idle=0.2) as (url, srv):
            await call("POST", url + "/echo", {"n": 1}, keep_alive=True)
            await asyncio.sleep(0.6)  # the server hangs up on the idle connection
            got = await call("POST", url + "/echo", {"n": 2}, keep_alive=True)
            return got, srv.accepted

    got, accepted = asyncio.run(main())
    assert got["echo"] == {"n": 2}
    assert accepted == 2


@contextlib.asynccontextmanager
async def raw_server(answers: int) -> AsyncIterator[tuple[str, list[int]]]:
    """An HTTP/1.1 server that answers ``answers`` requests per connection, then
    reads the next request and closes without a word (a server dying, or
    hanging up just as a reused connection is written to)."""
    conns: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            for n in range(answers + 1):
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if not line:
                    return
                await reader.readexactly(length)
                if n == answers:
                    return  # closes without answering
                body = b'{"ok": true}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", conns
    finally:
        close_keep_alive()
        server.close()
        await server.wait_closed()


def test_a_reused_connection_that_dies_unanswered_is_retried_once_on_a_new_one() -> None:
    async def main() -> tuple[Any, Any, int]:
        async with raw_server(answers=1) as (url, conns):
            a = await call("POST", url + "/x", {}, keep_alive=True)
            # The kept connection is written to, then closed without an answer.
            b = await call("POST", url + "/x", {}, keep_alive=True)
            return a, b, len(conns)

    a, b, n = asyncio.run(main())
    assert a == b == {"ok": True}
    assert n == 2


def test_a_new_connection_that_dies_unanswered_is_an_error_not_a_retry() -> None:
    async def main() -> tuple[str, int]:
        async with raw_server(answers=0) as (url, conns):
            with pytest.raises(Unavailable) as e:
                await call("POST", url + "/x", {}, keep_alive=True)
            return str(e.value), len(conns)

    msg, n = asyncio.run(main())
    assert "cannot reach" in msg and "closed the connection without answering" in msg
    assert n == 1  # a request that may have been acted on is not sent twice


def test_errors_keep_their_kind_and_the_servers_sentence() -> None:
    async def main() -> None:
        async with tornado_server() as (url, _):
            with pytest.raises(BadRequest) as bad:
                await call("POST", url + "/echo", {"fail": 409}, keep_alive=True)
            assert bad.value.status == 409 and str(bad.value) == "refused: 409"
            with pytest.raises(FdshipError) as err:
                await call("POST", url + "/echo", {"fail": 503}, keep_alive=True)
            assert err.value.status == 503 and not isinstance(err.value, BadRequest)
            # The connection survives an error answer.
            assert (await call("POST", url + "/echo", 7, keep_alive=True))["echo"] == 7
            assert keep_alive_pool().count() == 1
            with pytest.raises(BadRequest) as missing:
                await call("GET", url + "/nowhere", keep_alive=True)
            assert missing.value.status == 404

    asyncio.run(main())


def test_chunked_responses_are_read_whole() -> None:
    async def main() -> Any:
        async with tornado_server() as (url, _):
            return await call("GET", url + "/chunked", keep_alive=True)

    assert asyncio.run(main()) == {"parts": [1, 2, 3]}


def test_nobody_listening_or_nobody_answering_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound, never listening: refused

    async def main() -> tuple[str, str]:
        with pytest.raises(Unavailable) as refused:
            await call("POST", f"http://127.0.0.1:{closed_port}/x", {}, keep_alive=True)

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 16)
            await asyncio.sleep(5)
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(Unavailable) as slow:
                await call("POST", f"http://127.0.0.1:{port}/x", {}, timeout=0.3,
                           keep_alive=True)
        finally:
            server.close()
        return str(refused.value), str(slow.value)

    refused, slow = asyncio.run(main())
    assert refused.startswith(f"cannot reach http://127.0.0.1:{closed_port}/x: ")
    assert "refused" in refused.lower()
    assert "no answer within 0.3 s" in slow
