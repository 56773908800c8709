"""uvicorn's httptools HTTP/1.1 protocol without its two copies of every request body chunk.

uvicorn 0.54 appends each body chunk httptools hands over to a `bytearray` (`cycle.body += body`, one
copy) and gives the app `bytes(cycle.body)` (a second copy). Between two `receive()` calls there is
usually one chunk (uvicorn stops reading above 64 KB until the app asks again), so here the chunks are
kept as they arrived and that one chunk is handed over as it is: an upload's bytes are not copied on
their way to the app (P4: 2 x 5 MB of memmove per uploaded file, under the GIL).

Run the API with `uvicorn --http api.server:HttpToolsProtocol ...`; anything else about uvicorn's
protocol (flow control, keep-alive, limits) is unchanged.
"""

from __future__ import annotations

from uvicorn.protocols.http import httptools_impl


class BodyChunks:
    """Stands in for uvicorn's body `bytearray`: `+=` keeps the chunk, `bytes()` joins them only when
    there are several, `len()` is what is buffered (uvicorn's flow control reads it)."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def __iadd__(self, data: bytes) -> BodyChunks:
        self.chunks.append(data)
        self.size += len(data)
        return self

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        if len(self.chunks) == 1:
            return self.chunks[0]
        return b"".join(self.chunks)


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """`uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` whose request bodies are not copied."""

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        buffered: object = cycle.body
        if not isinstance(buffered, BodyChunks):
            # uvicorn resets the buffer to an empty bytearray after each receive(): take it over.
            pending = BodyChunks()
            if cycle.body:
                pending += bytes(cycle.body)
            cycle.body = pending  # type: ignore[assignment]
        super().on_body(body if type(body) is bytes else bytes(body))
