"""The channel between a bridge SuperNode and its region's coordinator, on the region's own host.

A bridge SuperNode (a region as a member of its parent's federation, `nested`) relays its parent's
messages to the region's coordinator: over a Unix socket (`serve_socket` / `forward`, length-prefixed
frames of Flower's protobuf encoding of the RecordDict), or, for every federation in one process
(`engines.run_nested_inprocess`), by a direct call (`serve_inprocess`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

from worldlm.errors import WorldLMError


class Served(Protocol):
    """What the channel needs of a region's coordinator (`nested.RegionCoordinator`)."""

    finished: bool

    def request(self, kind: str, content: RecordDict) -> RecordDict: ...

    def log(self, message: str) -> None: ...


INPROC = "inproc:"  # a bridge address naming a region served in this process (run_nested_inprocess)
_LOCAL: dict[str, Callable[[str, RecordDict], RecordDict]] = {}  # region (address without INPROC) -> its `request`
BRIDGED = {"query.hello": "hello", "train.subtree": "visit", "evaluate.subtree": "evaluate", "query.finish": "finish"}


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("!Q", len(payload)) + payload)


def _recv(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("the other side closed the connection")
            buf += chunk
        return bytes(buf)

    (n,) = struct.unpack("!Q", exactly(8))
    return exactly(int(n))


def _encode(kind: str, content: RecordDict) -> bytes:
    head, body = kind.encode(), bytes(recorddict_to_proto(content).SerializeToString())
    return struct.pack("!H", len(head)) + head + body


def _decode(payload: bytes) -> tuple[str, RecordDict]:
    (n,) = struct.unpack("!H", payload[:2])
    proto = RecordDictProto()
    proto.ParseFromString(payload[2 + n :])
    return payload[2 : 2 + n].decode(), recorddict_from_proto(proto)


def forward(address: str, message_type: str, content: RecordDict, wait: float, ttl: float | None = None) -> RecordDict:
    """The bridge's side: one message to the region's coordinator at `address`, its reply back.

    A socket that is not there yet (the region's coordinator still starting) is waited for up to `wait`
    seconds; a coordinator that fails answers with its one-line error, raised here (the parent's
    coordinator then leaves the region out of the round). No reply within `ttl` (the message's own
    time to live): the bridge gives up, so a hung coordinator never blocks the bridge's next message."""
    kind = BRIDGED.get(message_type)
    if kind is None:
        raise WorldLMError(f"a bridge SuperNode relays {', '.join(BRIDGED)}, not '{message_type}'")
    if address.startswith(INPROC):
        return _LOCAL[address.removeprefix(INPROC)](kind, content)
    wait = min(wait, ttl) if ttl else wait
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(address)
                sock.settimeout(ttl)
                _send(sock, _encode(kind, content))
                status, reply = _decode(_recv(sock))
            break
        except TimeoutError:
            raise WorldLMError(f"the region coordinator at {address} did not answer within {ttl:g} s") from None
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise WorldLMError(
                    f"no region coordinator at {address} after {wait:g} s; is its federation's run started?"
                ) from None
            time.sleep(0.5)
    if status != "ok":
        raise WorldLMError(str(reply.config_records["error"]["message"]))
    return reply


def serve_socket(region: Served, path: Path) -> None:
    """The region's side: answer the bridge's requests, one at a time, until the run is finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a coordinator that died
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        os.chmod(path, 0o600)  # only this host's user (the organisation's own processes)
        server.listen(4)
        try:
            while not region.finished:
                conn, _ = server.accept()
                with conn:
                    kind, content = _decode(_recv(conn))
                    try:
                        reply, status = region.request(kind, content), "ok"
                    except (WorldLMError, ConnectionError) as exc:
                        region.log(str(exc))
                        reply, status = RecordDict({"error": ConfigRecord({"message": str(exc)})}), "error"
                    with contextlib.suppress(OSError):  # the bridge may have given up waiting
                        _send(conn, _encode(status, reply))
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def inprocess_address(name: str) -> str:
    """The bridge address of region `name` served in this process (`serve_inprocess`)."""
    return INPROC + name


@contextlib.contextmanager
def serve_inprocess(name: str, request: Callable[[str, RecordDict], RecordDict]) -> Iterator[None]:
    """Serve region `name`'s `request` at `inprocess_address(name)` while the block runs."""
    _LOCAL[name] = request
    try:
        yield
    finally:
        _LOCAL.pop(name, None)
