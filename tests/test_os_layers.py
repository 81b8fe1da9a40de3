"""The OS layers on their own: with the language layer switched off (a test-only switch),
plain Python in a sandbox child still cannot reach the network, start processes, see the
host's environment or descriptors, or outgrow its limits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import BACKENDS

import corral
from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.selftest import loopback_listener


@pytest.fixture(params=BACKENDS)
def plain(request: pytest.FixtureRequest) -> Iterator[NodeSandbox]:
    """A sandbox that runs connector code as plain Python: only the OS layers stand."""
    with NodeSandbox(
        executor=request.param,
        limits=Limits(max_memory_mb=64),
        settings=load_settings(),
        _unsafe_plain_python=True,
    ) as sandbox:
        yield sandbox


def test_the_switch_really_removes_the_language_layer(plain):
    """Plain Python may import os and reach dunders: what follows tests the OS alone."""
    code = (
        "import os\ndef run(params, context):\n"
        "    return [os.getpid() > 0, ().__class__.__name__]\n"
    )
    assert plain.execute_sync(code).output == [True, "tuple"]


def test_no_network_even_to_the_hosts_loopback(plain):
    """A socket to a listener on the host's 127.0.0.1 fails: the child has no network."""
    with loopback_listener() as (port, connected):
        code = (
            "import socket\ndef run(params, context):\n    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    except OSError as exc:\n        return type(exc).__name__\n"
            "    return 'connected'\n"
        )
        outcome = plain.execute_sync(code).output
    assert outcome != "connected" and not connected


def test_no_new_processes(plain):
    """fork() fails: the cgroup admits no process beyond the child's own two threads."""
    code = (
        "import os\ndef run(params, context):\n    try:\n        pid = os.fork()\n"
        "    except OSError as exc:\n        return exc.errno\n"
        "    if pid == 0:\n        os._exit(0)\n    return 'forked'\n"
    )
    assert plain.execute_sync(code).output == 11  # EAGAIN


def test_no_environment_and_no_stray_descriptors(plain):
    """The child's environment is empty and it holds only stdio and its channel."""
    code = (
        "import os\ndef run(params, context):\n"
        "    return [dict(os.environ), sorted(int(fd) for fd in os.listdir('/proc/self/fd'))]\n"
    )
    environment, descriptors = plain.execute_sync(code).output
    assert environment == {}
    assert len(descriptors) <= 5  # 0-2 on /dev/null, the channel, and listdir's own


def test_memory_limit_holds_without_the_language_layer(plain):
    """A 64 MB limit stops plain Python hoarding memory, caught MemoryError or not."""
    code = (
        "def run(params, context):\n    hoard = []\n    try:\n        while True:\n"
        "            hoard.append(bytearray(1 << 20))\n    except MemoryError:\n"
        "        return 'survived'\n"
    )
    with pytest.raises(corral.MemoryLimitExceeded):
        plain.execute_sync(code)


def test_cpu_limit_holds_without_the_language_layer(plain):
    """A CPU limit stops plain Python that catches every exception in its loop."""
    code = (
        "def run(params, context):\n    while True:\n        try:\n            while True:\n"
        "                pass\n        except BaseException:\n            pass\n"
    )
    with pytest.raises(corral.SandboxError) as caught:
        plain.execute_sync(code, limits=Limits(max_cpu_ms=300))
    assert caught.value.type == "cpu_limit"
    assert caught.value.usage.cpu_ms <= 600
