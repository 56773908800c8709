"""Runtime's SlotTransport: one keep-alive connection per request in flight, reused once its response is
closed (the most recent first), against a real HTTP/1.1 server on loopback."""

from __future__ import annotations

import asyncio

import httpx

from worker.runtime import SlotTransport


async def _serve(connections: list[int], delay: float) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                await asyncio.sleep(delay)
                answer = b"got %d" % len(body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_each_request_in_flight_gets_a_connection_and_closed_ones_are_reused() -> None:
    async def main() -> tuple[list[str], list[str], int, int]:
        connections: list[int] = []
        server = await _serve(connections, delay=0.2)
        port = server.sockets[0].getsockname()[1]
        client = httpx.AsyncClient(transport=SlotTransport())
        url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
        try:
            at_once = await asyncio.gather(
                *(client.post(url, files={"file": ("a.flac", b"x" * i, "audio/flac")}) for i in range(20))
            )
            opened = len(connections)
            one_by_one = [(await client.post(url, content=b"y" * i)) for i in range(10)]
        finally:
            await client.aclose()
            server.close()
        return (
            [r.text for r in at_once],
            [r.text for r in one_by_one],
            opened,
            len(connections),
        )

    at_once, one_by_one, opened, total = asyncio.run(main())
    assert all(t.startswith("got ") for t in at_once)
    assert one_by_one == [f"got {i}" for i in range(10)]
    assert opened == 20  # 20 requests in flight: 20 connections
    assert total == 20  # the 10 after them reused those: none opened


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    """Each slot's liveness check reads the socket it kept at connect (`_SocketKeptStream`), not
    anyio's attribute table: a keep-alive connection the server closed meanwhile is seen as gone."""
    from worker.runtime import _SocketKeptBackend, _SocketKeptStream

    async def main() -> tuple[list[str], int, list[bool]]:
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()  # silently, no `Connection: close`: the client still holds it as idle

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = SlotTransport()
        client = httpx.AsyncClient(transport=transport)
        try:
            texts = []
            for _ in range(3):
                response = await client.get(f"http://127.0.0.1:{port}/")
                texts.append(response.text)
                # The stream the response came on answers the liveness check from its kept socket.
                stream = response.extensions["network_stream"]
                assert isinstance(stream, _SocketKeptStream)
                await asyncio.sleep(0.1)
            kept = [isinstance(slot._pool._network_backend, _SocketKeptBackend) for slot in transport._all]
        finally:
            await client.aclose()
            server.close()
        return texts, len(connections), kept

    texts, opened, kept = asyncio.run(main())
    assert texts == ["ok", "ok", "ok"]
    assert opened == 3  # each closed connection was dropped and a new one opened
    assert kept and all(kept)
