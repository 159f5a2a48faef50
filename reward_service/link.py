"""The channel between the server and its model process (or the batching loop beside the
model): the typed messages of :mod:`reward_service.messages`, pickled as their kind's tag and
their fields, each prefixed by its length, over a connected socket.

The server's end is an asyncio protocol (:class:`~reward_service.batcher.Batcher`), so the
event loop never blocks on it; the other end (the model process, or a thread of the server when
the model runs in-process) is a blocking :class:`Link`.
"""

from __future__ import annotations

import pickle
import selectors
import socket
import struct
from collections import deque

from reward_service.messages import KINDS, Message

_HEADER = struct.Struct("!Q")
_TAGS = {kind: tag for tag, kind in enumerate(KINDS)}


def frame(message: Message) -> bytes:
    """``message`` as its kind's tag and its fields, pickled, with its length in front."""
    fields = (_TAGS[type(message)], *message.__dict__.values())
    payload = pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def _unframe(payload: memoryview) -> Message:
    tag, *fields = pickle.loads(payload)
    return KINDS[tag](*fields)


class FrameReader:
    """Turns a byte stream back into the messages that :func:`frame` encoded."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def partial(self) -> bool:
        """Whether bytes of an unfinished message are held."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """The messages that ``data`` completes, in order."""
        buffer = self._buffer
        buffer += data
        messages = []
        start = 0
        with memoryview(buffer) as view:
            while len(buffer) - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(view, start)
                end = start + _HEADER.size + size
                if len(buffer) < end:
                    break
                messages.append(_unframe(view[start + _HEADER.size : end]))
                start = end
        del buffer[:start]
        return messages


class Link:
    """The blocking end of a channel: send, poll and receive messages."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._reader = FrameReader()
        self._ready: deque[Message] = deque()
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)

    def send(self, message: Message) -> None:
        """Send ``message``; OSError (BrokenPipeError) once the other end is gone."""
        self._sock.sendall(frame(message))

    def poll(self, timeout: float | None) -> bool:
        """Whether a message (or the end of the stream) can be read, waiting at most
        ``timeout`` seconds for one (None: as long as it takes)."""
        return bool(self._ready) or bool(self._selector.select(timeout))

    def recv(self) -> Message:
        """The next message; EOFError once the other end has closed the channel."""
        while not self._ready:
            try:
                data = self._sock.recv(1 << 16)
            except ConnectionError:
                data = b""
            if not data:
                raise EOFError("the other end closed the link")
            self._ready.extend(self._reader.feed(data))
        return self._ready.popleft()

    def detach(self) -> socket.socket:
        """Hand the socket over to a new owner; nothing may be left unread."""
        if self._ready or self._reader.partial:
            raise RuntimeError("unread messages on a link being handed over")
        self._selector.close()
        return self._sock

    def close(self) -> None:
        self._selector.close()
        self._sock.close()


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
