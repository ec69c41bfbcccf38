"""The stream's data plane: route messages over a Unix socket from an engine to the prefetch
actor of its node.

A Ray actor call costs its sender and receiver hundreds of microseconds on loopback (measured
by benchmarks/bench_stream.py, p50 ~0.5 ms on a loaded 2-core host), more than the
route-to-prefetch-start goal (p50 200 us); a frame written to a Unix stream socket is read by a
thread that waits on it in tens. Ray stays the control plane: it creates the actor, which
listens (``ChannelServer``) on a socket in a directory only its user can enter, and tells the
engine the path. One engine per socket: a second connection is closed at once. A stream socket
keeps frames in order and loses none; a sender blocks only when the actor is a socket buffer
(hundreds of messages) behind.

Frame: uint32 length, then int64 sent_ns, int64 batch, int32 layer, four uint32 counts (load,
prefetch, evict, prefetch_evict), then the ids as int32, little-endian.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["ChannelClient", "ChannelServer", "RouteMessage", "decode_message", "encode_message"]


@dataclass(frozen=True)
class RouteMessage:
    """One layer's plan as an engine streams it (expert ids: tuples of int, ascending).

    layer: the trace layer (checkpoint MoE layer ``layer``, counted from 0); batch: the engine's
    batch number; load: experts of ``layer`` to page in now; prefetch: experts of layer + 1 to
    page in now; evict / prefetch_evict: experts of ``layer`` / layer + 1 the engine no longer
    keeps (freed once the engine ran the layer); sent_ns: ``time.monotonic_ns()`` at send."""

    layer: int
    batch: int
    load: tuple[int, ...] = ()
    prefetch: tuple[int, ...] = ()
    evict: tuple[int, ...] = ()
    prefetch_evict: tuple[int, ...] = ()
    sent_ns: int = 0


_HEAD = struct.Struct("<qqiIIII")
_LENGTH = struct.Struct("<I")
_MAX_FRAME = 1 << 24  # 16 MiB: four lists of 2**20 int32 ids (ServiceConfig's expert bound)


def encode_message(message: RouteMessage) -> bytes:
    """The frame of one message (length prefix included)."""
    lists = (message.load, message.prefetch, message.evict, message.prefetch_evict)
    ids = np.fromiter((e for ids in lists for e in ids), dtype="<i4", count=sum(map(len, lists)))
    head = _HEAD.pack(message.sent_ns, message.batch, message.layer, *map(len, lists))
    return _LENGTH.pack(len(head) + ids.nbytes) + head + ids.tobytes()


def decode_message(payload: bytes) -> RouteMessage:
    """A frame's payload (no length prefix) back into a message; ValueError when malformed."""
    if len(payload) < _HEAD.size:
        raise ValueError(f"frame: {len(payload)} bytes, shorter than its {_HEAD.size}-byte head")
    sent_ns, batch, layer, *counts = _HEAD.unpack_from(payload)
    if len(payload) != _HEAD.size + 4 * sum(counts):
        raise ValueError(f"frame: {len(payload)} bytes do not hold the {sum(counts)} ids it counts")
    ids = np.frombuffer(payload, dtype="<i4", offset=_HEAD.size).tolist()
    lists, start = [], 0
    for n in counts:
        lists.append(tuple(ids[start : start + n]))
        start += n
    return RouteMessage(layer, batch, *lists, sent_ns=sent_ns)


class ChannelServer:
    """Listens on a fresh socket (``path``, in a 0700 directory) and calls ``on_message`` with
    each message of the one engine that connects, in order, on its own thread;
    ``on_error(text)`` gets a frame that does not decode (the connection is then closed: its
    stream can no longer be cut into frames)."""

    def __init__(
        self,
        on_message: Callable[[RouteMessage], None],
        on_error: Callable[[str], None],
    ):
        self._dir = tempfile.mkdtemp(prefix="moeray-stream-")  # mode 0700
        self.path = os.path.join(self._dir, "stream.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._on_message, self._on_error = on_message, on_error
        self._thread = threading.Thread(target=self._serve, name="moeray-stream", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:  # closed before anyone connected
            return
        # one engine per node: later connections are refused by closing them
        threading.Thread(target=self._refuse_others, daemon=True).start()
        with conn, conn.makefile("rb") as stream:
            while True:
                head = stream.read(_LENGTH.size)
                if len(head) < _LENGTH.size:
                    return  # the engine closed its end
                (length,) = _LENGTH.unpack(head)
                if length > _MAX_FRAME:
                    self._on_error(f"frame: {length} bytes, over the {_MAX_FRAME}-byte bound")
                    return
                payload = stream.read(length)
                try:
                    message = decode_message(payload)
                except ValueError as exc:
                    self._on_error(str(exc))
                    return
                self._on_message(message)

    def _refuse_others(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class ChannelClient:
    """The engine's end: ``send(message)`` writes one frame (blocking only on a full socket
    buffer); ``sent`` counts them."""

    def __init__(self, path: str):
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(path)
        self.sent = 0

    def send(self, message: RouteMessage) -> None:
        self._socket.sendall(encode_message(message))
        self.sent += 1

    def close(self) -> None:
        self._socket.close()
