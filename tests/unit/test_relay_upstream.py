"""The relay's lean upstream client against a real socket server that answers as each test scripts."""
from __future__ import annotations

import asyncio

import pytest

from launcher.relay.upstream import LeanUpstream, Stale


class ScriptedServer:
    """HTTP/1.1 on loopback: each request's path names how it is answered; connections are counted."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                path = head.split(b" ")[1].decode()
                if not await self._answer(path, body, writer):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def _answer(self, path: str, body: bytes, w: asyncio.StreamWriter) -> bool:
        if path == "/plain":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body) + 2, b"[" + body + b"]"))
        elif path == "/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                    b"6;x=y\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
        elif path == "/until-close":
            w.write(b"HTTP/1.0 200 OK\r\n\r\nto the end")
            await w.drain()
            return False
        elif path == "/continue":
            w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/short":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            await w.drain()
            return False
        elif path == "/close-after":
            w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye")
            await w.drain()
            return False
        elif path == "/drop":  # the server had closed this kept-alive connection just as the request came
            return False
        elif path == "/silent":
            await asyncio.sleep(30)
        await w.drain()
        return True

    def drop_idle(self) -> None:
        """Close every connection from the server's side, as a server's keep-alive timeout does."""
        for w in self.writers:
            w.close()

    async def stop(self) -> None:
        self.drop_idle()
        self.server.close()


def run(scenario) -> None:
    async def main() -> None:
        server = ScriptedServer()
        port = await server.start()
        client = LeanUpstream(limit=4, timeout=0.5)
        try:
            await scenario(server, client, port)
        finally:
            await client.close()
            await server.stop()

    asyncio.run(main())


async def call(client: LeanUpstream, port: int, path: str, body: bytes = b"", method: str = "GET", **kw):
    headers = {"Content-Length": str(len(body))}
    if body:
        headers["Content-Type"] = "application/json"
    return await client.request(method, "http", "127.0.0.1", port, path, f"127.0.0.1:{port}", headers, body, **kw)


async def fetch(client: LeanUpstream, port: int, path: str) -> bytes:
    """GET path, its whole body, connection handed back."""
    answer = await call(client, port, path)
    try:
        return await answer.read_all(1000)
    finally:
        answer.release()


def test_answers_with_a_length_reuse_one_kept_alive_connection():
    async def scenario(server, client, port):
        for i in range(3):
            answer = await call(client, port, "/plain", b'{"n": %d}' % i, method="POST")
            assert answer.status == 200 and answer.headers["content-type"] == "application/json"
            assert await answer.read_all(1000) == b'[{"n": %d}]' % i
            answer.release()
        assert server.connections == 1
        assert server.requests[0].startswith(b"POST /plain HTTP/1.1\r\nHost: 127.0.0.1:")
    run(scenario)


def test_chunked_answers_stream_in_blocks_and_keep_the_connection():
    async def scenario(server, client, port):
        answer = await call(client, port, "/chunked")
        assert answer.content_length is None and answer.chunked
        assert [b async for b in answer.blocks(4)] == [b"hell", b"o", b" wor", b"ld"]
        answer.release()
        assert await fetch(client, port, "/plain") == b"[]"
        assert server.connections == 1
    run(scenario)


def test_an_answer_to_the_connections_end_is_read_whole_and_the_connection_not_kept():
    async def scenario(server, client, port):
        assert await fetch(client, port, "/until-close") == b"to the end"
        assert await fetch(client, port, "/close-after") == b"bye"
        assert await fetch(client, port, "/plain") == b"[]"
        assert server.connections == 3
    run(scenario)


def test_informational_answers_are_skipped():
    async def scenario(server, client, port):
        answer = await call(client, port, "/continue")
        assert answer.status == 201 and await answer.read_all(10) == b"ok"
        answer.release()
    run(scenario)


def test_a_body_cut_short_raises_and_a_silent_server_times_out():
    async def scenario(server, client, port):
        short = await call(client, port, "/short")
        with pytest.raises(asyncio.IncompleteReadError):
            await short.read_all(1000)
        short.release()
        with pytest.raises(asyncio.TimeoutError):
            await call(client, port, "/silent")
    run(scenario)


def test_a_kept_alive_connection_the_server_closed_is_not_reused():
    async def scenario(server, client, port):
        assert await fetch(client, port, "/plain") == b"[]"
        server.drop_idle()
        await asyncio.sleep(0.1)  # the close reaches our side while the connection idles
        assert await fetch(client, port, "/plain") == b"[]"
        assert server.connections == 2
    run(scenario)


def test_a_reused_connection_closed_before_any_answer_byte_is_stale_and_a_fresh_one_is_not():
    async def scenario(server, client, port):
        assert await fetch(client, port, "/plain") == b"[]"
        with pytest.raises(Stale):
            await call(client, port, "/drop")  # on the kept-alive connection
        with pytest.raises(asyncio.IncompleteReadError):
            await call(client, port, "/drop", fresh=True)  # a new connection: not "stale", a real failure
        assert server.connections == 2
    run(scenario)


def test_the_pool_bounds_connections_at_once():
    async def scenario(server, client, port):
        held = [await call(client, port, "/plain") for _ in range(4)]
        waiting = asyncio.ensure_future(call(client, port, "/plain"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the fifth waits for a free place
        held[0].release()
        (await asyncio.wait_for(waiting, 5)).release()
        for answer in held[1:]:
            answer.release()
    run(scenario)


def test_https_upstreams_are_verified(tmp_path):
    import ssl

    from helpers.certs import self_signed

    cert, key = self_signed(tmp_path)

    async def main() -> None:
        server = ScriptedServer()
        served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        served.load_cert_chain(cert, key)
        server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=served)
        port = server.server.sockets[0].getsockname()[1]
        trusting = LeanUpstream(tls=ssl.create_default_context(cafile=cert))
        doubting = LeanUpstream()  # the system's CAs only
        try:
            answer = await trusting.request("POST", "https", "127.0.0.1", port, "/plain", f"127.0.0.1:{port}",
                                            {"Content-Length": "2"}, b"{}")
            assert answer.status == 200 and await answer.read_all(100) == b"[{}]"
            answer.release()
            with pytest.raises(ssl.SSLCertVerificationError):
                await doubting.request("GET", "https", "127.0.0.1", port, "/plain", f"127.0.0.1:{port}", {}, b"")
        finally:
            await trusting.close()
            await doubting.close()
            await server.stop()

    asyncio.run(main())
