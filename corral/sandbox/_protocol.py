"""Framing of the messages between the host, the zygote and sandbox children.

Both sides import this module; it uses the standard library only.

A frame is a 4-byte big-endian payload length, a 1-byte kind and the payload
(JSON text). The zygote sends the host each spare it forks as 8 bytes (its
pid) with the spare's socket attached. The host may first send a waiting
spare a JOIN frame with the `cgroup.procs` files of the cgroup it is to
run in attached (the process backend, so that the slow move into a cgroup
happens while the spare waits); it then sends it one SPAWN frame with the
execution's channel attached and, when the spare joined nothing ahead, the
`cgroup.procs` files. The host opens these files (a write through them is
checked against the opener's credentials: the spare joins its cgroup
without any right to cgroup files of its own). The channel then carries,
in order:

    child -> host   PIDFD      8 bytes: the child's pid; SCM_RIGHTS holds its pidfd
    host  -> child  REQUEST    {"entry_point", "params", "context"}
    child -> host   COMPILED   {"cpu_ms": float, "maxrss": int}: what compiling cost, when the
                               source was not compiled already; sent before any connector code
    child -> host   HEARTBEAT  {"logs": [[level, message], ...], "cpu_ms": float, "maxrss": int}
    child -> host   HTTP       {"id", "method", "url", "headers", "params", "json", "data",
                               "timeout"}: one request at a time, while the code runs
    host  -> child  HTTP_REPLY {"id", "status", "headers", "text", "url"}, or {"id", "refused"}
                               (egress policy: a policy_violation), {"id", "invalid"} (a
                               malformed request), or {"id", "error"} (no response)
    child -> host   RESULT     {"output": ..., "logs": [...], "cpu_ms": float, "maxrss": int}
                 or ERROR      {"type": str, "message": str, "logs": [...], "cpu_ms": ..., ...}

cpu_ms and maxrss are the child's own word: the host uses them only where
it has no cgroup to ask (degraded mode).
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from typing import Any

HEADER = struct.Struct(">IB")
PID = struct.Struct(">Q")

REQUEST = ord("q")
HEARTBEAT = ord("h")
COMPILED = ord("c")
RESULT = ord("r")
ERROR = ord("e")
HTTP = ord("t")  # child -> host: a request for the `http` capability
HTTP_REPLY = ord("u")  # host -> child: its response, refusal or error
SPAWN = ord("s")  # host -> spare: the spec of its one execution (SCM_RIGHTS: the channel)
JOIN = ord("j")  # host -> waiting spare: {"joins": n}; SCM_RIGHTS: the cgroup.procs to join now
SPARES = ord("f")  # host -> zygote: {"count": n, "source": str | None}: fork n spares


def frame(kind: int, payload: bytes) -> bytes:
    """One frame of `kind` around `payload`."""
    return HEADER.pack(len(payload), kind) + payload


def json_frame(kind: int, message: Any) -> bytes:
    """One frame carrying `message` as compact JSON."""
    return frame(kind, json.dumps(message, separators=(",", ":")).encode())


def send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """Send `data` with `fd` attached (SCM_RIGHTS) in one message."""
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv_fd(sock: socket.socket, size: int) -> tuple[bytes, int | None]:
    """Receive up to `size` bytes and the descriptor attached to them, if any."""
    data, fds = recv_fds(sock, size, 1)
    return data, fds[0] if fds else None


def recv_fds(sock: socket.socket, size: int, most: int) -> tuple[bytes, list[int]]:
    """Receive up to `size` bytes and at most `most` descriptors attached to them."""
    data, ancillary, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(4 * most))
    received = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
    for extra in received[most:]:  # never keep descriptors nobody asked for
        os.close(extra)
    return data, list(received[:most])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes from a blocking socket; b"" on EOF before the first byte."""
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            if remaining == size:
                return b""
            raise EOFError(f"connection closed after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_size: int) -> tuple[int, bytes] | None:
    """Read one frame from a blocking socket; None on a clean EOF."""
    header = recv_exactly(sock, HEADER.size)
    if not header:
        return None
    size, kind = HEADER.unpack(header)
    if size > max_size:
        raise ValueError(f"frame of {size} bytes exceeds the {max_size} byte cap")
    return kind, recv_exactly(sock, size)
