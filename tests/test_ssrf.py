"""SSRF through the `http` capability, on both backends, with no CORRAL_EGRESS_ALLOW.

Every request here aims at a loopback spelling, with a live listener behind it that
counts connections: a case passes only if the execution ends as policy_violation AND
nothing connected. Cases that must name a private or metadata address run in a child
process inside a network namespace of its own (`unshare -n`), so that a failing guard
sends nothing off the machine.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

import corral
from corral import Limits, NodeSandbox
from corral.config import load_settings


class _Listener:
    """A TCP listener on one loopback address that counts the connections it accepts."""

    def __init__(self, family: socket.AddressFamily, address: str) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, _Listener]]:
    """Listeners on 127.0.0.1, 127.0.0.2 and ::1."""
    made = {
        "v4": _Listener(socket.AF_INET, "127.0.0.1"),
        "v4b": _Listener(socket.AF_INET, "127.0.0.2"),
        "v6": _Listener(socket.AF_INET6, "::1"),
    }
    yield made
    for listener in made.values():
        listener.close()


@pytest.fixture(params=["process", "worker"])
def box(request: pytest.FixtureRequest) -> Iterator[NodeSandbox]:
    """A sandbox with the default egress policy (no CORRAL_EGRESS_ALLOW)."""
    with NodeSandbox(
        executor=request.param, limits=Limits(max_memory_mb=64), settings=load_settings()
    ) as sandbox:
        yield sandbox


#: Spellings of the host's loopback; {p} is the port of the listener named second.
LOOPBACK_URLS = [
    ("dotted", "http://127.0.0.1:{p}/", "v4"),
    ("name", "http://localhost:{p}/", "v4"),
    ("name-trailing-dot", "http://localhost.:{p}/", "v4"),
    ("name-upper", "http://LOCALHOST:{p}/", "v4"),
    ("decimal", "http://2130706433:{p}/", "v4"),
    ("hex", "http://0x7f000001:{p}/", "v4"),
    ("hex-dotted", "http://0x7f.1:{p}/", "v4"),
    ("short", "http://127.1:{p}/", "v4"),
    ("octal-dotted", "http://0177.0.0.1:{p}/", "v4"),
    ("octal", "http://017700000001:{p}/", "v4"),
    ("zero-padded", "http://127.000.000.001:{p}/", "v4"),
    ("other-loopback", "http://127.0.0.2:{p}/", "v4b"),
    ("unspecified", "http://0.0.0.0:{p}/", "v4"),
    ("unspecified-short", "http://0:{p}/", "v4"),
    ("ipv6", "http://[::1]:{p}/", "v6"),
    ("ipv6-long", "http://[0:0:0:0:0:0:0:1]:{p}/", "v6"),
    ("ipv6-unspecified", "http://[::]:{p}/", "v6"),
    ("v4-mapped", "http://[::ffff:127.0.0.1]:{p}/", "v4"),
    ("v4-mapped-hex", "http://[::ffff:7f00:1]:{p}/", "v4"),
    ("v4-mapped-long", "http://[0:0:0:0:0:ffff:127.0.0.1]:{p}/", "v4"),
    ("userinfo", "http://api.example.com@127.0.0.1:{p}/", "v4"),
    ("fragment-userinfo", "http://127.0.0.1:{p}#@api.example.com/", "v4"),
    ("https", "https://127.0.0.1:{p}/", "v4"),
    ("uppercase-scheme", "HTTP://127.0.0.1:{p}/", "v4"),
]


@pytest.mark.parametrize(("url", "target"), [c[1:] for c in LOOPBACK_URLS],
                         ids=[c[0] for c in LOOPBACK_URLS])  # fmt: skip
def test_loopback_spellings_are_refused_and_nothing_connects(box, listeners, url, target):
    """Each spelling of loopback is refused with policy_violation (even when the code
    catches the refusal), and the listener behind it sees no connection."""
    listener = listeners[target]
    before = listener.connections
    code = (
        "def run(params, context):\n    try:\n        http.get(params['url'], timeout=2)\n"
        "    except Exception:\n        pass\n    return 'carried on'\n"
    )
    with pytest.raises(corral.PolicyViolation) as caught:
        box.execute_sync(code, params={"url": url.format(p=listener.port)})
    assert "refused" in caught.value.message
    assert listener.connections == before


def test_redirects_to_loopback_are_refused_at_the_hop(listeners):
    """A server the policy allows redirects to the host's loopback: the hop is refused
    and the loopback listener sees nothing."""
    target = listeners["v4"]

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("location", f"http://127.0.0.1:{target.port}/admin")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    before = target.connections
    try:
        settings = load_settings(CORRAL_EGRESS_ALLOW="127.0.0.2/32")
        with NodeSandbox(limits=Limits(max_memory_mb=64), settings=settings) as sandbox:
            code = "def run(params, context):\n    return http.get(params['url']).text\n"
            url = f"http://127.0.0.2:{server.server_address[1]}/start"
            with pytest.raises(corral.PolicyViolation, match=r"127\.0\.0\.1"):
                sandbox.execute_sync(code, params={"url": url})
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert target.connections == before


#: Private, link-local, CGNAT and metadata destinations: named only inside a network
#: namespace of the test's own, where nothing can leave the machine.
INTERNAL_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://100.100.100.200/latest/meta-data/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://0xa9fea9fe/",
    "http://2852039166/",
    "http://[::ffff:169.254.169.254]/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
]

_IN_NAMESPACE = """
import json, sys
import corral
from corral import Limits, NodeSandbox
from corral.config import load_settings
code = "def run(params, context):\\n    http.get(params['url'], timeout=2)\\n"
outcomes = {}
for executor in ("process", "worker"):
    with NodeSandbox(executor=executor, limits=Limits(max_memory_mb=64),
                     settings=load_settings()) as sandbox:
        for url in json.loads(sys.argv[1]):
            try:
                sandbox.execute_sync(code, params={"url": url})
                outcomes[executor + " " + url] = "ok"
            except corral.SandboxError as error:
                outcomes[executor + " " + url] = error.type + ": " + error.message
print(json.dumps(outcomes))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) from util-linux")
def test_internal_and_metadata_addresses_are_refused(tmp_path):
    """Private, link-local, CGNAT, multicast and metadata addresses (in every spelling)
    are refused with policy_violation on both backends; run in a network namespace of
    its own (loopback only), so a failing guard could reach nothing."""
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", textwrap.dedent(_IN_NAMESPACE),
         json.dumps(INTERNAL_URLS)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    assert len(outcomes) == 2 * len(INTERNAL_URLS)
    wrong = {key: value for key, value in outcomes.items()
             if not value.startswith("policy_violation")}  # fmt: skip
    assert not wrong
