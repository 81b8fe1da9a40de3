"""Fixtures shared by the suite: the sandbox per backend, and the leak check after every test."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.sandbox._cgroups import CgroupUnavailable, default_roots

pytest_plugins = ["pytester"]

#: The backends the conformance suite runs on: every test that takes `sandbox` runs on both.
BACKENDS = ["process", "worker"]
LEAK_PATIENCE_S = 5.0  # killed children and their cgroups are gone well within this


def _sandbox_processes(host_pid: int | None = None) -> set[int]:
    """The zygote and sandbox children of host `host_pid` (this process by default), orphans too.

    They carry their host's pid in their command line, so other corral users on
    the machine do not count.
    """
    marker = re.compile(rf'"host_pid": {host_pid or os.getpid()}[,}}]')
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "corral.sandbox._zygote" in cmdline and marker.search(cmdline):
            found.add(process.pid)
    return found


def _corral_cgroups(host_pid: int | None = None, root: str | None = None) -> set[Path]:
    """The execution cgroups of host `host_pid` (this process by default) under `root`."""
    try:
        _, roots = default_roots(root)
    except CgroupUnavailable:
        return set()
    prefix = f"{host_pid or os.getpid()}-"
    found = set()
    for root in roots.values():
        with contextlib.suppress(FileNotFoundError):  # removed while we look: nothing there
            found.update(p for p in root.iterdir() if p.name.startswith(prefix) and p.is_dir())
    return found


def leftovers(host_pid: int | None = None) -> tuple[set[int], set[Path]]:
    """Sandbox processes and cgroups of a host that are still there after a grace period."""
    deadline = time.monotonic() + LEAK_PATIENCE_S
    while True:
        processes, cgroups = _sandbox_processes(host_pid), _corral_cgroups(host_pid)
        if not (processes or cgroups) or time.monotonic() > deadline:
            return processes, cgroups
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test leaves no sandbox process and no cgroup behind."""
    yield
    processes, cgroups = leftovers()
    assert not processes, f"sandbox processes left behind: {sorted(processes)}"
    assert not cgroups, f"cgroups left behind: {sorted(map(str, cgroups))}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)


@pytest.fixture
def sandbox(backend: str) -> Iterator[NodeSandbox]:
    """A NodeSandbox on the backend under test, 64 MB by default, closed after the test."""
    with NodeSandbox(
        executor=backend, limits=Limits(max_memory_mb=64), settings=load_settings()
    ) as box:
        yield box


@pytest.fixture(params=BACKENDS)
def plain(request: pytest.FixtureRequest) -> Iterator[NodeSandbox]:
    """A sandbox running connector code as plain Python (the language layer switched off by
    the test-only switch): only the OS layers stand."""
    with NodeSandbox(
        executor=request.param,
        limits=Limits(max_memory_mb=64),
        settings=load_settings(),
        _unsafe_layers_off={"language"},
    ) as sandbox:
        yield sandbox


@contextlib.contextmanager
def running(
    server: http.server.HTTPServer, poll_interval: float = 0.5
) -> Iterator[http.server.HTTPServer]:
    """`server` serving in a thread, shut down, closed and joined on the way out."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def send_json(handler: http.server.BaseHTTPRequestHandler, payload: Any, status: int = 200) -> None:
    """Answer a test server's request with `payload` as JSON; a client that has gone
    meanwhile (a killed worker) is no error."""
    body = json.dumps(payload).encode()
    with contextlib.suppress(OSError):
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


@contextlib.contextmanager
def serving(
    handler: type[http.server.BaseHTTPRequestHandler], address: str = "127.0.0.1"
) -> Iterator[http.server.ThreadingHTTPServer]:
    """A real HTTP server with `handler` on `address` (a loopback one), in a thread."""
    with running(http.server.ThreadingHTTPServer((address, 0), handler)) as server:
        yield server  # type: ignore[misc]


def corral(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `corral` command in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No corral env var from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("SANDBOX_", "CORRAL_", "WORKER_SANDBOX", "GENERIC_EXECUTOR")):
            monkeypatch.delenv(name)
    return monkeypatch


def cgroup_pids(cgroup: Path) -> list[int]:
    """The processes in `cgroup`; none when it is gone (cgroup v2 answers ENODEV, not
    ENOENT, while a removed cgroup's directory is still being torn down)."""
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return []
        raise


def running_execution_pid(
    host_pid: int | None = None, timeout: float = 10.0, root: str | None = None
) -> int:
    """The pid of a sandbox child of host `host_pid` inside its execution cgroup, once running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cgroup in _corral_cgroups(host_pid, root):
            if pids := cgroup_pids(cgroup):
                return pids[0]
        time.sleep(0.02)
    raise AssertionError(f"no sandbox execution started within {timeout} s")


# -- a real Redis, for the store and the runtime ------------------------------------------

REDIS_ARGS = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
SERVER_PIDS: set[int] = set()  # the session's redis-server, the one child allowed to stay


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[Any]) -> None:
    """Terminate a child and reap it, killing it if it does not go."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server without persistence, stopped and reaped at the end."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    workdir = tmp_path_factory.mktemp("redis")
    for _attempt in range(3):  # the free port may be taken before the server binds it
        port = free_port()
        with open(workdir / "redis.log", "wb") as log:
            process = subprocess.Popen(
                [server, *REDIS_ARGS, "--port", str(port), "--dir", str(workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        SERVER_PIDS.add(process.pid)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            client = redis.Redis.from_url(url)
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    break
                time.sleep(0.02)
            client.close()
            if process.poll() is None:
                yield url
                return
        finally:
            stop(process)
            SERVER_PIDS.discard(process.pid)
    pytest.fail(f"redis-server did not start: {(workdir / 'redis.log').read_text()[-2000:]}")


@contextlib.contextmanager
def private_redis(workdir: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of the test's own with an append-only file, so a restart keeps data."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--dir", str(workdir)]  # fmt: skip
    with open(workdir / "redis.log", "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while not _pings(client) and time.monotonic() < deadline:
            time.sleep(0.02)
        client.close()
        yield process
    finally:
        stop(process)


def _pings(client: redis.Redis) -> bool:
    with contextlib.suppress(redis.RedisError):
        return bool(client.ping())
    return False
