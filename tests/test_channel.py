"""The host against a hostile child: with the language layer off (a test-only switch),
plain Python forges frames on its channel; the host ends the execution as sandbox_crash
(or the documented type) and keeps its own promises."""

from __future__ import annotations

import asyncio
import socket

import pytest

import corral
from corral import Limits
from corral.config import load_settings

FORGE = """
import json, socket, struct
def frame(kind, message):
    payload = message.encode() if isinstance(message, str) else json.dumps(message).encode()
    return struct.pack('>IB', len(payload), ord(kind)) + payload
def run(params, context):
    channel = socket.socket(fileno=3)
    for kind, message in params['frames']:
        channel.sendall(frame(kind, message))
    if params.get('flood'):
        beat = frame('h', {})
        while True:
            channel.sendall(beat * 256)
    return 'sent'
"""


@pytest.mark.parametrize(
    "frames",
    [
        [["e", {"type": ["not", "a", "string"], "message": "x"}]],
        [["h", '{"maxrss": 1e999, "cpu_ms": 1e999}'], ["r", {"output": 1}]],
        [["h", {"logs": [[1, 2, 3]]}]],
        [["z", {}]],
    ],
    ids=["unhashable-error-type", "overflowing-numbers", "malformed-logs", "unknown-kind"],
)
def test_malformed_frames_end_as_sandbox_crash(plain, frames):
    """Whatever the child forges, the caller gets a SandboxError, never a host exception.

    (A worker that runs plain Python is the attacker's: what it answers for later
    executions is not trusted either, which is why the worker backend is not for mutually
    untrusted tenants. The process backend's next execution is untouched.)"""
    with pytest.raises(corral.SandboxError) as caught:
        plain.execute_sync(FORGE, params={"frames": frames}, timeout_ms=5000)
    assert caught.value.type == "sandbox_crash"
    if plain.executor == "process":
        assert plain.execute_sync("def run(params, context):\n    return 1\n").output == 1


def test_a_frame_flood_is_stopped(plain):
    """Heartbeats sent as fast as the child can: the execution ends instead of tying up the
    host's event loop for its whole time-out."""
    with pytest.raises(corral.SandboxError) as caught:
        plain.execute_sync(FORGE, params={"frames": [], "flood": True}, timeout_ms=10_000)
    assert caught.value.type == "sandbox_crash"
    assert "faster" in caught.value.message
    assert caught.value.usage is not None and caught.value.usage.wall_ms < 5000


def test_only_the_first_compiled_report_counts():
    """The child reports what compiling cost before any connector code runs; a later
    COMPILED frame (forged by the code) cannot make a costly source look cheap, so the
    zygote, which compiles outside every limit, never gets it."""
    from corral.sandbox import _protocol as proto
    from corral.sandbox._supervisor import ExecutionRequest, Supervisor

    limits = Limits.from_settings(load_settings()).resolve()
    request = ExecutionRequest("x = 1\n", "run", {}, {}, 5000, limits)
    supervisor = Supervisor(request, executor="process", isolation="test")
    host, child = socket.socketpair()
    with host, child:
        child.sendall(
            proto.json_frame(proto.COMPILED, {"cpu_ms": 9_000, "maxrss": 1 << 20})
            + proto.json_frame(proto.COMPILED, {"cpu_ms": 1, "maxrss": 1 << 20})
            + proto.json_frame(proto.RESULT, {"output": 1})
        )
        asyncio.run(supervisor.watch(host, b""))
    assert supervisor.outcome is not None and supervisor.compile_cost == (9_000, 1 << 20)
    assert not supervisor.cheap_to_compile
