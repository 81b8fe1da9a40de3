"""The host side of brokered `http`: the egress policy and the broker, against real servers.

Real connections go to 127.0.0.1 (and ::1, 127.0.0.2) only. Cases that name a private or
metadata address run the broker in a fresh network namespace (`unshare -n`), where those
addresses are local listeners and nothing can leave the machine: a failing guard shows up
as a connection counted by the listener. Run as a script, this file is that namespace's
side (see `_netns_main`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import gzip
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import running

from corral._exceptions import ConfigError
from corral.config import load_settings
from corral.sandbox._egress import EgressPolicy, EgressRefused, HttpBroker, parse_host

LOOPBACK_RULE = "need CORRAL_EGRESS_ALLOW"

# --- real HTTP servers ------------------------------------------------------------------------


@functools.cache
def _bomb() -> bytes:
    """32 MiB of zeros in about 32 KiB of gzip."""
    return gzip.compress(bytes(32 << 20), compresslevel=9)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        args = dict(urllib.parse.parse_qsl(query))
        seen = {
            "method": self.command,
            "path": self.path,
            "body": body.decode("latin-1"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        self.server.requests.append(seen)
        with contextlib.suppress(OSError):  # the broker may hang up first (caps, time-outs)
            if path == "/redirect":
                self._reply(int(args.get("status", 302)), headers={"Location": args["to"]})
            elif path == "/loop":
                self._reply(302, headers={"Location": "/loop"})
            elif path == "/big":
                self._reply(200, b"a" * int(args["n"]))
            elif path == "/bomb":
                self._reply(200, _bomb(), {"Content-Encoding": "gzip"})
            elif path == "/gzip":
                self._reply(200, gzip.compress(b"small and gzipped"), {"Content-Encoding": "gzip"})
            elif path == "/latin1":
                latin1 = {"Content-Type": "text/plain; charset=latin-1"}
                self._reply(200, "café".encode("latin-1"), latin1)
            elif path == "/cookie":
                self._reply(200, b"set", {"Set-Cookie": "session=abc; Path=/"})
            elif path == "/slow":
                time.sleep(float(args["s"]))
                self._reply(200, b"late")
            elif path == "/drip":  # one byte every 0.1 s: no single read waits long
                self.send_response(200)
                self.send_header("Content-Length", "30")
                self.end_headers()
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                echo = {"Content-Type": "application/json", "X-Echo": "Yes"}
                self._reply(201, json.dumps(seen).encode(), echo)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _route


class _Server(ThreadingHTTPServer):
    """An HTTP server that counts the connections it accepts and keeps the requests it got."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.connections = 0
        self.requests: list[dict[str, Any]] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the broker hanging up on a capped or timed-out response is expected

    def get_request(self) -> tuple[socket.socket, Any]:
        request = super().get_request()
        self.connections += 1
        return request

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str = "/echo") -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}{path}"


@contextlib.contextmanager
def _serving(host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
    with running(_Server((host, port), tls), poll_interval=0.02) as server:
        yield server


@pytest.fixture
def server() -> Iterator[_Server]:
    """An HTTP server on 127.0.0.1."""
    with _serving() as running:
        yield running


@pytest.fixture
def other() -> Iterator[_Server]:
    """A second HTTP server on 127.0.0.1: another origin."""
    with _serving() as running:
        yield running


def _broker(**settings: Any) -> HttpBroker:
    """A broker with these settings; the egress ones default to unset, whatever the env says."""
    egress = {"CORRAL_EGRESS_ALLOW": "", "CORRAL_EGRESS_DENY": "", "CORRAL_EGRESS_DEFAULT": "allow"}
    return HttpBroker.from_settings(load_settings(**{**egress, **settings}))


def _ask(broker: HttpBroker, *messages: Any) -> list[dict[str, Any]]:
    """The broker's replies to `messages`, sent one after the other; the broker is closed."""

    async def scenario() -> list[dict[str, Any]]:
        try:
            return [await broker.handle(message) for message in messages]
        finally:
            await broker.aclose()

    return asyncio.run(scenario())


def _redirect(to: str, port: int = 8080) -> str:
    """The URL of a redirect to `to` from the server on 127.0.0.1:`port`."""
    return f"http://127.0.0.1:{port}/redirect?" + urllib.parse.urlencode({"to": to})


def _get(url: str, **fields: Any) -> dict[str, Any]:
    return {"id": 7, "method": "GET", "url": url, **fields}


# --- the policy, no I/O -----------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1", "2130706433", "0x7f.1", "0x7f000001", "127.1", "0177.0.0.1", "017700000001",
    "0x7f.0x0.0x0.0x1", "0x7f.0.1", "127.0.0.1.", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]", "::ffff:127.0.0.1", "0X7F.1",
]  # fmt: skip


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_127_0_0_1_is_that_address_and_refused(host):
    """Numeric IPv4 tricks and IPv4-mapped IPv6 are normalised to 127.0.0.1, which is refused."""
    address = parse_host(host)
    assert address == ipaddress.IPv4Address("127.0.0.1")
    with pytest.raises(EgressRefused, match=r"egress to 127\.0\.0\.1 \(loopback\) is refused"):
        EgressPolicy().check_address(host, address)


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("[::1]", "loopback"), ("64:ff9b::7f00:1", "loopback via 127.0.0.1"),
        ("2002:7f00:1::", "loopback via 127.0.0.1"), ("fe80::1%eth0", "link-local"),
        ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
        ("fc00::1", "private"), ("fd12:3456::1", "private"), ("100.64.0.1", "CGNAT"),
        ("169.254.1.1", "link-local"), ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"), ("100.100.100.200", "metadata"),
        ("64:ff9b::a9fe:a9fe", "metadata via 169.254.169.254"),
        ("[::ffff:169.254.169.254]", "metadata"), ("[fe80::a9fe:a9fe%lo]", "link-local"),
        ("0.0.0.0", "unspecified"), ("0", "unspecified"), ("[::]", "unspecified"),
        ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"), ("198.18.0.1", "reserved"), ("192.0.0.192", "metadata"),
        ("fec0::1", "site-local"), ("::7f00:1", "reserved"), ("64:ff9b:1::1", "private"),
        ("2001:db8::1", "reserved"), ("0.1.2.3", "reserved"),
    ],
)  # fmt: skip
def test_internal_and_unroutable_addresses_are_refused_by_default(host, kind):
    """Under the default policy every non-public address is refused, its kind named."""
    address = parse_host(host)
    with pytest.raises(EgressRefused, match=rf"\({kind}\) is refused"):
        EgressPolicy().check_address(host, address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                "64:ff9b::808:808", "2002:808:808::"],
)  # fmt: skip
def test_public_addresses_pass_the_default_policy(address):
    """Public addresses, also inside NAT64 and 6to4, pass with no setting."""
    EgressPolicy().check_address(address, ipaddress.ip_address(address))
    EgressPolicy().check_address("api.example.com", ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "host", ["1.2.3.4.5", "08.0.0.1", "256.0.0.1", "1.256.0.1", "0x100000000", "4294967296",
             "1.2.65536", "a..b", "-a.test", "127.0.0.1%20x", "", "a b"],
)  # fmt: skip
def test_hosts_that_are_neither_an_address_nor_a_name_are_rejected(host):
    """An all-numeric host inet_aton would not take, or a bad name, is never resolved."""
    with pytest.raises(ValueError):
        parse_host(host)
    with pytest.raises(EgressRefused):
        asyncio.run(EgressPolicy().resolve(host, 80))


def test_allow_by_cidr_lets_exactly_that_range_through():
    """A CIDR in ALLOW opens its range (IPv4-mapped included), and nothing next to it."""
    policy = EgressPolicy(allow=["127.0.0.0/8", "::1"])
    for host in ("127.0.0.1", "127.9.9.9", "::ffff:127.0.0.5", "0x7f.1", "::1"):
        policy.check_address(host, parse_host(host))
    for host in ("10.0.0.1", "169.254.169.254", "::2", "fe80::1"):
        with pytest.raises(EgressRefused):
            policy.check_address(host, parse_host(host))
    narrow = EgressPolicy(allow=["127.0.0.1/32"])
    with pytest.raises(EgressRefused, match=r"127\.0\.0\.2"):
        narrow.check_address("127.0.0.2", parse_host("127.0.0.2"))


def test_allow_by_domain_exact_and_wildcard():
    """An exact domain lets its private addresses through; `*.x` only public ones, not x."""
    policy = EgressPolicy(allow=["api.internal.test", "*.corp.test"], default="deny")
    private = ipaddress.ip_address("10.1.2.3")
    public = ipaddress.ip_address("8.8.8.8")
    policy.check_address("api.internal.test", private)
    policy.check_address("API.Internal.Test.", private)
    policy.check_address("a.corp.test", public)
    policy.check_address("a.b.corp.test", public)
    with pytest.raises(EgressRefused, match=r"entry '\*\.corp\.test' lets only public"):
        policy.check_address("a.corp.test", private)
    for host in ("corp.test", "evilcorp.test", "other.internal.test", "internal.test"):
        with pytest.raises(EgressRefused, match="not in CORRAL_EGRESS_ALLOW"):
            policy.check_address(host, public)


def test_metadata_passes_only_by_a_cidr_that_contains_it():
    """Metadata names and addresses are not opened by a domain entry, only by its CIDR."""
    metadata = ipaddress.ip_address("169.254.169.254")
    by_name = EgressPolicy(allow=["meta.internal.test", "169.254.0.0/17"])
    with pytest.raises(EgressRefused, match="cloud metadata addresses pass only by"):
        by_name.check_address("meta.internal.test", metadata)
    with pytest.raises(EgressRefused, match="metadata name"):
        EgressPolicy().check_address("metadata.google.internal", ipaddress.ip_address("8.8.8.8"))
    EgressPolicy(allow=["169.254.169.254/32"]).check_address("169.254.169.254", metadata)


def test_unspecified_multicast_and_broadcast_are_never_allowed():
    """Even ALLOW=0.0.0.0/0 and ::/0 do not make 0.0.0.0 (which reaches localhost) a target."""
    policy = EgressPolicy(allow=["0.0.0.0/0", "::/0"])
    policy.check_address("10.0.0.1", parse_host("10.0.0.1"))
    for host in ("0.0.0.0", "0", "::", "224.0.0.251", "ff02::fb", "255.255.255.255"):
        with pytest.raises(EgressRefused, match="never a destination"):
            policy.check_address(host, parse_host(host))


def test_deny_wins_over_allow():
    """DENY refuses what ALLOW names, by domain or CIDR, also inside mapped/NAT64 forms."""
    policy = EgressPolicy(
        allow=["*.evil.test", "a.evil.test", "127.0.0.0/8", "64:ff9b::/96", "10.0.0.0/8"],
        deny=["*.evil.test", "127.0.0.1", "10.0.0.0/8"],
    )
    public = ipaddress.ip_address("8.8.8.8")
    with pytest.raises(EgressRefused, match=r"matches CORRAL_EGRESS_DENY entry '\*\.evil\.test'"):
        policy.check_address("a.evil.test", public)
    with pytest.raises(EgressRefused, match=r"entry '\*\.evil\.test'"):
        asyncio.run(policy.resolve("x.y.evil.test", 443))  # refused before any lookup
    for host in ("127.0.0.1", "::ffff:127.0.0.1", "2130706433", "64:ff9b::a00:1", "10.9.9.9"):
        with pytest.raises(EgressRefused, match="matches CORRAL_EGRESS_DENY"):
            policy.check_address(host, parse_host(host))
    policy.check_address("127.0.0.2", parse_host("127.0.0.2"))
    with pytest.raises(EgressRefused, match=r"DENY entry '10\.0\.0\.0/8'"):
        EgressPolicy(allow=["api.partner.test"], deny=["10.0.0.0/8"]).check_address(
            "api.partner.test", ipaddress.ip_address("10.0.0.1")
        )


def test_default_deny_lets_only_allow_through():
    """With CORRAL_EGRESS_DEFAULT=deny a public address passes only when ALLOW names it."""
    policy = EgressPolicy.from_settings(
        load_settings(
            CORRAL_EGRESS_ALLOW="api.example.com, 93.184.216.0/24",
            CORRAL_EGRESS_DENY="",
            CORRAL_EGRESS_DEFAULT="deny",
        )
    )
    policy.check_address("api.example.com", ipaddress.ip_address("8.8.8.8"))
    policy.check_address("cdn.other.test", ipaddress.ip_address("93.184.216.34"))
    with pytest.raises(EgressRefused, match="CORRAL_EGRESS_DEFAULT is deny"):
        policy.check_address("8.8.4.4", ipaddress.ip_address("8.8.4.4"))
    with pytest.raises(EgressRefused, match="CORRAL_EGRESS_DEFAULT is deny"):
        policy.check_address("www.example.com", ipaddress.ip_address("8.8.8.8"))


@pytest.mark.parametrize(
    "entry", ["http://api.example.com", "example.com:8080", "*", "*.127.0.0.1", "0x7f.1",
              "a..b", "exa mple.com", "10.0.0.0/33", "user@example.com", "*.*.example.com"],
)  # fmt: skip
def test_invalid_rule_entries_fail_at_start_up(entry):
    """An ALLOW/DENY entry that is not a domain, address or CIDR is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="CORRAL_EGRESS_DENY entry"):
        EgressPolicy(deny=[entry])


# --- the broker against real servers on 127.0.0.1 ---------------------------------------------


def test_get_returns_status_headers_text_and_url(server):
    """A GET reaches the allowed server; the reply has its status, lower-case headers, text."""
    (reply,) = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1"),
        _get(server.url("/echo?a=1"), params={"b": [2, 3], "c": "x y"}, headers={"X-Req": "v"}),
    )
    assert reply["id"] == 7
    assert reply["status"] == 201
    assert reply["headers"]["x-echo"] == "Yes"
    assert reply["headers"]["content-type"] == "application/json"
    assert reply["url"] == server.url("/echo?a=1&b=2&b=3&c=x+y")
    seen = json.loads(reply["text"])
    assert seen["path"] == "/echo?a=1&b=2&b=3&c=x+y"
    assert seen["headers"]["host"] == f"127.0.0.1:{server.port}"
    assert seen["headers"]["x-req"] == "v"
    assert server.connections == 1


def test_post_with_json_form_and_text_bodies(server):
    """json= is sent as application/json, a dict data= as a form, a str data= as it is."""
    broker = _broker(CORRAL_EGRESS_ALLOW="127.0.0.0/8")
    replies = _ask(
        broker,
        {"id": 1, "method": "post", "url": server.url(), "json": {"a": [1, "é"]}},
        {"id": 2, "method": "PUT", "url": server.url(), "data": {"k": "v w", "n": 1}},
        {"id": 3, "method": "PATCH", "url": server.url(), "data": "raw",
         "headers": {"Content-Type": "text/plain"}},
        {"id": 4, "method": "POST", "url": server.url(), "json": None},
    )  # fmt: skip
    seen = [json.loads(r["text"]) for r in replies]
    assert [r["id"] for r in replies] == [1, 2, 3, 4]
    assert seen[0]["method"] == "POST"
    assert json.loads(seen[0]["body"].encode("latin-1")) == {"a": [1, "é"]}
    assert seen[0]["headers"]["content-type"] == "application/json"
    assert (seen[1]["method"], seen[1]["body"]) == ("PUT", "k=v+w&n=1")
    assert seen[1]["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert (seen[2]["body"], seen[2]["headers"]["content-type"]) == ("raw", "text/plain")
    assert seen[3]["body"] == "null"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "0x7f.1", "2130706433", "127.1", "017700000001", "[::ffff:127.0.0.1]",
             "localhost", "localhost.", "evil.test@127.0.0.1", "LOCALHOST"],
)  # fmt: skip
def test_loopback_is_refused_without_allow_and_nothing_connects(server, host):
    """Without ALLOW every spelling of the local server is refused before any connection."""
    (reply,) = _ask(_broker(), _get(f"http://{host}:{server.port}/echo"))
    assert LOOPBACK_RULE in reply["refused"]
    assert "status" not in reply
    assert server.connections == 0


@pytest.mark.parametrize(
    "host", ["0x7f.1", "2130706433", "127.1", "[::ffff:7f00:1]", "evil.test@127.0.0.1"]
)
def test_a_numeric_spelling_connects_to_the_address_it_was_checked_as(server, host):
    """The normalised address is what is checked and connected to; the reply names it."""
    (reply,) = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1"), _get(f"http://{host}:{server.port}/echo")
    )
    assert reply["status"] == 201
    assert reply["url"] == server.url()
    assert server.connections == 1


def test_url_credentials_become_basic_auth_and_leave_the_url(server):
    """user:password@ in the URL is sent as Basic auth, never as part of the host."""
    (reply,) = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1"),
        _get(f"http://user:pa%40ss@127.0.0.1:{server.port}/echo#frag@10.0.0.1"),
    )
    seen = json.loads(reply["text"])
    assert seen["headers"]["authorization"] == "Basic " + base64.b64encode(b"user:pa@ss").decode()
    assert reply["url"] == server.url()


def test_redirects_to_loopback_addresses_not_allowed_are_refused(server):
    """Each hop is checked: a redirect from an allowed server to another loopback address
    (::1, 127.0.0.2 in any spelling) is refused and that listener sees no connection."""
    with _serving("::1") as v6, _serving("127.0.0.2") as second:
        port = second.port
        targets = [v6.url(), second.url(), f"http://[::ffff:127.0.0.2]:{port}/echo",
                   f"http://2130706434:{port}/echo", f"http://0x7f.0.0.2:{port}/"]  # fmt: skip
        messages = [_get(_redirect(t, server.port)) for t in targets]
        refused = _ask(_broker(CORRAL_EGRESS_ALLOW="127.0.0.1/32"), *messages)
        assert [("refused" in r, r.get("status")) for r in refused] == [(True, None)] * len(targets)
        assert "egress to ::1 (loopback)" in refused[0]["refused"]
        assert (v6.connections, second.connections) == (0, 0)
        assert server.connections == len(targets)
        # The same redirects with those addresses allowed do reach the listeners.
        allowed = _ask(_broker(CORRAL_EGRESS_ALLOW="127.0.0.1/32,127.0.0.2,::1"), *messages)
        assert [r.get("status") for r in allowed] == [201] * len(targets)
        assert (len(v6.requests), len(second.requests)) == (1, len(targets) - 1)


def test_redirect_methods_bodies_and_relative_locations(server):
    """301/302/303 become GET without body, 307/308 keep both; relative Locations resolve."""
    broker = _broker(CORRAL_EGRESS_ALLOW="127.0.0.1")

    def via(status: int, to: str = "/echo") -> dict[str, Any]:
        url = _redirect(to, server.port) + f"&status={status}"
        return {"id": status, "method": "POST", "url": url, "json": {"x": 1}}

    replies = _ask(broker, via(301), via(302), via(303), via(307), via(308), via(302, "echo?r=1"))
    seen = [json.loads(r["text"]) for r in replies]
    for changed in seen[:3]:
        assert (changed["method"], changed["body"]) == ("GET", "")
        assert "content-type" not in changed["headers"]
    for kept in seen[3:5]:
        assert (kept["method"], kept["body"]) == ("POST", '{"x": 1}')
    assert replies[5]["url"] == server.url("/echo?r=1")


def test_credentials_are_dropped_when_a_redirect_changes_origin(server, other):
    """Authorization, Cookie and any custom header (an API key may travel in one) follow a
    redirect on the same origin; to another origin only a few plain ones do."""
    headers = {"Authorization": "Bearer t0k3n", "Cookie": "s=1", "X-Api-Key": "k3y",
               "Accept": "application/json"}  # fmt: skip
    to_other = _redirect(other.url(), server.port)
    to_self = server.url("/redirect?to=/echo")
    cross, same = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1"),
        _get(to_other, headers=headers),
        _get(to_self, headers=headers),
    )
    crossed = json.loads(cross["text"])["headers"]
    assert crossed["accept"] == "application/json"
    assert not {"authorization", "cookie", "x-api-key"} & set(crossed)
    stayed = json.loads(same["text"])["headers"]
    assert (stayed["authorization"], stayed["cookie"]) == ("Bearer t0k3n", "s=1")
    assert stayed["x-api-key"] == "k3y"


def test_redirect_cap_and_unfollowable_locations(server):
    """More than CORRAL_HTTP_MAX_REDIRECTS hops is an error; 0 answers the redirect itself;
    a redirect to a non-http URL is not followed."""
    capped, file_url = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_MAX_REDIRECTS=3),
        _get(server.url("/loop")),
        _get(server.url("/redirect?to=file:///etc/passwd")),
    )
    assert "more than 3 redirects (CORRAL_HTTP_MAX_REDIRECTS)" in capped["error"]
    assert "is not followed" in file_url["error"]
    assert len(server.requests) == 4 + 1
    (unfollowed,) = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_MAX_REDIRECTS=0),
        _get(server.url("/loop")),
    )
    assert (unfollowed["status"], unfollowed["headers"]["location"]) == (302, "/loop")


def test_response_size_cap(server):
    """A body past CORRAL_HTTP_MAX_RESPONSE_BYTES is an error; one at the cap is returned."""
    broker = _broker(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_MAX_RESPONSE_BYTES=100_000)
    at_cap, over = _ask(
        broker, _get(server.url("/big?n=100000")), _get(server.url("/big?n=100001"))
    )
    assert len(at_cap["text"]) == 100_000
    assert over["error"] == (
        "the response passed the 100000 byte cap (CORRAL_HTTP_MAX_RESPONSE_BYTES)"
    )


def test_a_gzip_bomb_stops_at_the_cap_without_inflating(server):
    """32 MiB of gzipped zeros is refused at a 1 MiB cap and never held in memory."""
    _bomb()
    broker = _broker(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_MAX_RESPONSE_BYTES=1 << 20)
    tracemalloc.start()
    try:
        small, bomb = _ask(broker, _get(server.url("/gzip")), _get(server.url("/bomb")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert small["text"] == "small and gzipped"
    assert "passed the 1048576 byte cap" in bomb["error"]
    assert peak < 8 << 20


def test_text_follows_the_charset(server):
    """`text` is decoded with the response's charset."""
    (reply,) = _ask(_broker(CORRAL_EGRESS_ALLOW="127.0.0.1"), _get(server.url("/latin1")))
    assert reply["text"] == "café"


def test_timeouts_bound_the_whole_request(server):
    """A slow server, and one that drips a byte at a time, end in a time-out error on time;
    CORRAL_HTTP_TIMEOUT_S caps a longer timeout asked for by the connector."""
    broker = _broker(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_TIMEOUT_S=0.5)
    started = time.monotonic()
    slow, drip = _ask(
        broker,
        _get(server.url("/slow?s=3"), timeout=60),
        _get(server.url("/drip"), timeout=30.0),
    )
    elapsed = time.monotonic() - started
    assert "timed out after 0.5 s" in slow["error"]
    assert "timed out after 0.5 s" in drip["error"]
    assert elapsed < 2.5
    started = time.monotonic()
    broker = _broker(CORRAL_EGRESS_ALLOW="127.0.0.1")
    (short,) = _ask(broker, _get(server.url("/slow?s=3"), timeout=0.2))
    assert "timed out after 0.2 s" in short["error"]
    assert time.monotonic() - started < 1.5


def test_request_cap(server):
    """The request past CORRAL_HTTP_MAX_REQUESTS is refused and never sent."""
    replies = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_MAX_REQUESTS=2),
        *[{**_get(server.url()), "id": i} for i in range(3)],
    )
    assert [r.get("status") for r in replies[:2]] == [201, 201]
    assert replies[2] == {
        "id": 2,
        "refused": "more than 2 HTTP requests in one execution (CORRAL_HTTP_MAX_REQUESTS)",
    }
    assert len(server.requests) == 2


def test_cookies_are_not_kept_between_requests(server):
    """A Set-Cookie does not make the broker send that cookie later: requests carry only what
    the connector puts in them."""
    first, second = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1"), _get(server.url("/cookie")), _get(server.url())
    )
    assert first["headers"]["set-cookie"].startswith("session=abc")
    assert "cookie" not in json.loads(second["text"])["headers"]


def _malformed(url: str) -> list[Any]:
    ok = {"id": 5, "method": "GET", "url": url}
    return [
        {**ok, "url": "file:///etc/passwd"}, {**ok, "url": "gopher://127.0.0.1:70/"},
        {**ok, "url": url.replace("http", "ftp")}, {**ok, "url": 12}, {"id": 5, "method": "GET"},
        {**ok, "url": "http:///echo"}, {**ok, "url": url + "?" + "a" * 9000},
        {**ok, "url": "http://127.0.0.1:99999/"}, {**ok, "url": "http://127.0.0.1:0/"},
        {**ok, "url": "http://1.2.3.4.5/"}, {**ok, "url": "http://a..b/"},
        {**ok, "method": "X" * 100_000}, {**ok, "method": "CONNECT"}, {**ok, "method": 1},
        {**ok, "headers": ["a", "b"]}, {**ok, "headers": {"X": 1}},
        {**ok, "headers": {"X-A": "v\r\nX-Injected: 1"}}, {**ok, "headers": {"Bad Name": "v"}},
        {**ok, "headers": {"X\r\nY": "v"}}, {**ok, "headers": {"Host": "evil.test"}},
        {**ok, "headers": {"Transfer-Encoding": "chunked"}},
        {**ok, "headers": {f"X-{i}": "v" for i in range(101)}},
        {**ok, "params": "a=1"}, {**ok, "params": {"a": {"b": 1}}}, {**ok, "params": {1: "a"}},
        {**ok, "json": {}, "data": "x"}, {**ok, "data": ["x"]}, {**ok, "data": {"a": {}}},
        {**ok, "json": float("nan")}, {**ok, "timeout": -1}, {**ok, "timeout": "1"},
        {**ok, "timeout": True}, {**ok, "timeout": float("nan")},
    ]  # fmt: skip


def test_malformed_requests_get_an_error_and_send_nothing(server):
    """Every malformed request from the sandbox is answered as invalid (the code's own
    mistake, not retried), and nothing is sent."""
    messages = _malformed(server.url())
    replies = _ask(
        _broker(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_MAX_REQUESTS=1000), *messages
    )
    bad = [(m, r) for m, r in zip(messages, replies, strict=True) if set(r) != {"id", "invalid"}]
    assert not bad
    assert all(r["id"] == 5 for r in replies)
    assert all("only http and https URLs" in r["invalid"] for r in replies[:3])  # file, gopher, ftp
    assert server.connections == 0


def test_messages_without_an_id_or_not_an_object_get_an_error(server):
    """A reply always comes back, with id None when the message had no usable id."""
    replies = _ask(_broker(), None, [1], "GET", {"id": "1", "url": server.url()}, {"id": True})
    assert all(r["id"] is None and "invalid" in r for r in replies)
    assert server.connections == 0


def test_a_closed_broker_answers_with_an_error(server):
    """After aclose a request is answered with an error, not sent."""
    broker = _broker(CORRAL_EGRESS_ALLOW="127.0.0.1")

    async def scenario() -> dict[str, Any]:
        await broker.aclose()
        return await broker.handle(_get(server.url()))

    assert "closed" in asyncio.run(scenario())["error"]
    assert server.connections == 0


# --- in a network namespace of its own --------------------------------------------------------

NETNS_HOSTS = """\
127.0.0.1 localhost api.corral.test other.corral.test
::1 localhost
10.0.0.1 api.partner.test evil.test
169.254.169.254 meta.partner.test metadata.google.internal
8.8.8.8 rebind.test
10.0.0.1 rebind.test
"""
NETNS_RESOLV = "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n"
NETNS_SETUP = (
    "mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && ip link set lo up"
    " && ip addr add 10.0.0.1/32 dev lo && ip addr add 169.254.169.254/32 dev lo"
    " && ip -6 addr add fd00:ec2::254/128 dev lo nodad && exec {python} {script}"
)
LISTENERS = {
    "local": "127.0.0.1",
    "private": "10.0.0.1",
    "metadata": "169.254.169.254",
    "metadata6": "fd00:ec2::254",
}


#: name: (settings, url, reply key, text in the reply, connections each listener must see)
NETNS_CASES: dict[str, tuple[dict[str, str], str, str, str, dict[str, int]]] = {
    "private address": ({}, "http://10.0.0.1:8080/", "refused", "(private)", {"private": 0}),
    "metadata address": ({}, "http://169.254.169.254:8080/latest/meta-data/", "refused",
                         "(metadata)", {"metadata": 0}),
    "metadata over IPv6": ({}, "http://[fd00:ec2::254]:8080/", "refused", "(metadata)",
                           {"metadata6": 0}),
    "metadata as decimal": ({}, "http://2852039166:8080/", "refused", "(metadata)",
                            {"metadata": 0}),
    "private allowed by CIDR": ({"CORRAL_EGRESS_ALLOW": "10.0.0.0/8"}, "http://10.0.0.1:8080/",
                                "status", "201", {"private": 1}),
    "CIDR does not open metadata": ({"CORRAL_EGRESS_ALLOW": "10.0.0.0/8"},
                                    "http://169.254.169.254:8080/", "refused", "metadata",
                                    {"metadata": 0}),
    "exact domain opens its private address": ({"CORRAL_EGRESS_ALLOW": "api.partner.test"},
                                               "http://api.partner.test:8080/", "text",
                                               '"host": "api.partner.test:8080"',
                                               {"private": 1}),
    "wildcard does not open a private address": ({"CORRAL_EGRESS_ALLOW": "*.partner.test"},
                                                 "http://api.partner.test:8080/", "refused",
                                                 "lets only public", {"private": 0}),
    "domain does not open metadata": ({"CORRAL_EGRESS_ALLOW": "meta.partner.test"},
                                      "http://meta.partner.test:8080/", "refused",
                                      "cloud metadata", {"metadata": 0}),
    "metadata name": ({"CORRAL_EGRESS_ALLOW": "169.254.169.254"},
                      "http://metadata.google.internal:8080/", "refused", "metadata name",
                      {"metadata": 0}),
    "one internal address among public ones": ({}, "http://rebind.test:8080/", "refused",
                                               "rebind.test (10.0.0.1, private)",
                                               {"private": 0}),
    "deny by domain wins": ({"CORRAL_EGRESS_ALLOW": "10.0.0.0/8",
                             "CORRAL_EGRESS_DENY": "api.partner.test"},
                            "http://api.partner.test:8080/", "refused",
                            "CORRAL_EGRESS_DENY entry 'api.partner.test'", {"private": 0}),
    "deny by CIDR wins": ({"CORRAL_EGRESS_ALLOW": "api.partner.test",
                           "CORRAL_EGRESS_DENY": "10.0.0.1/32"},
                          "http://api.partner.test:8080/", "refused",
                          "CORRAL_EGRESS_DENY entry '10.0.0.1/32'", {"private": 0}),
    "default deny refuses before any lookup": ({"CORRAL_EGRESS_DEFAULT": "deny",
                                                "CORRAL_EGRESS_ALLOW": "api.partner.test"},
                                               "http://unlisted.test/", "refused",
                                               "CORRAL_EGRESS_DEFAULT is deny", {}),
    "unknown name is a resolution error": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1"},
                                           "http://127.0.0.1:8080@unlisted.test/", "error",
                                           "could not resolve unlisted.test", {"local": 0}),
    "fragment is not the host": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1"},
                                 "http://evil.test:8080#@127.0.0.1:8080/", "refused",
                                 "evil.test (10.0.0.1, private)", {"local": 0, "private": 0}),
    "redirect to a private address": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1"},
                                      _redirect("http://10.0.0.1:8080/"), "refused",
                                      "(private)", {"local": 1, "private": 0}),
    "redirect to metadata": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1"},
                             _redirect("http://169.254.169.254:8080/"), "refused",
                             "(metadata)", {"local": 1, "metadata": 0}),
    "redirect to a metadata name": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1"},
                                    _redirect("http://metadata.google.internal:8080/"),
                                    "refused", "metadata name", {"local": 1, "metadata": 0}),
    "redirect to localhost, ::1 not allowed": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1/32"},
                                               _redirect("http://localhost:8080/"), "refused",
                                               "localhost (::1, loopback)", {"local": 1}),
    "DNS rebinding": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1"}, "http://rebind.corral.test:8080/",
                      "text", '"host": "rebind.corral.test:8080"', {"local": 1, "private": 0}),
    "localhost, only ::1 allowed": ({"CORRAL_EGRESS_ALLOW": "::1"}, "http://localhost:8080/",
                                    "refused", "localhost (127.0.0.1, loopback)", {"local": 0}),
    "localhost with both addresses allowed": ({"CORRAL_EGRESS_ALLOW": "127.0.0.1,::1"},
                                              "http://localhost:8080/", "text",
                                              '"host": "localhost:8080"', {"local": 1}),
}  # fmt: skip


class _Dns:
    """A DNS server on 127.0.0.1:53 that answers from a script: the n-th A query for a name
    gets the n-th of its addresses (then the last one again); other names do not exist."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.queries: dict[str, int] = {}  # A queries per name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            query, peer = self.sock.recvfrom(512)
            labels, end = [], 12
            while query[end]:
                labels.append(query[end + 1 : end + 1 + query[end]].decode().lower())
                end += query[end] + 1
            name, qtype = ".".join(labels), int.from_bytes(query[end + 1 : end + 3], "big")
            addresses, answer = self.answers.get(name), b""
            if addresses and qtype == 1:
                n = self.queries[name] = self.queries.get(name, 0) + 1
                address = socket.inet_aton(addresses[min(n, len(addresses)) - 1])
                answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x00\x00\x04" + address
            flags = b"\x81\x80" if addresses else b"\x81\x83"  # NXDOMAIN
            counts = b"\x00\x01" + (b"\x00\x01" if answer else b"\x00\x00") + bytes(4)
            self.sock.sendto(query[:2] + flags + counts + query[12 : end + 5] + answer, peer)


def _netns_main() -> None:
    """The namespace side: listeners on the namespace's addresses, then one broker reply per
    case from stdin, with the connections each listener accepted meanwhile."""
    spec = json.load(sys.stdin)
    names: list[str | None] = []  # the SNI names the TLS listener was sent
    dns = _Dns({"rebind.corral.test": ["127.0.0.1", "10.0.0.1"]})
    tls = None
    if spec.get("tls"):
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(spec["tls"]["cert"], spec["tls"]["key"])
        tls.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment]
    results = {}
    with contextlib.ExitStack() as stack:
        servers = {key: stack.enter_context(_serving(ip, 8080)) for key, ip in LISTENERS.items()}
        if tls is not None:
            servers["tls"] = stack.enter_context(_serving("127.0.0.1", 8443, tls))
        for name, (settings, url, *_) in spec["cases"].items():
            before = {key: server.connections for key, server in servers.items()}
            dns.queries.clear()
            (reply,) = _ask(_broker(**settings), _get(url))
            seen = {key: server.connections - before[key] for key, server in servers.items()}
            results[name] = {
                "reply": reply,
                "connections": seen,
                "sni": names[:],
                "dns": dict(dns.queries),
            }
            names.clear()
    json.dump(results, sys.stdout)


def _in_netns(
    tmp_path: Path,
    cases: dict[str, Any],
    env: dict[str, str] | None = None,
    tls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The cases' results from `_netns_main` in a new network and mount namespace."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("needs root, unshare and ip for a private network namespace")
    hosts, resolv = tmp_path / "hosts", tmp_path / "resolv.conf"
    hosts.write_text(NETNS_HOSTS)
    resolv.write_text(NETNS_RESOLV)
    script = Path(__file__)
    setup = NETNS_SETUP.format(hosts=hosts, resolv=resolv, python=sys.executable, script=script)
    done = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", setup],
        input=json.dumps({"cases": cases, "tls": tls}),
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode and "Operation not permitted" in done.stderr:
        pytest.skip(f"no network namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def netns_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _in_netns(tmp_path_factory.mktemp("netns"), NETNS_CASES)


@pytest.mark.parametrize("case", list(NETNS_CASES))
def test_private_and_metadata_destinations_in_a_private_network(netns_results, case):
    """Names and addresses that lead to private or metadata addresses are refused (nothing
    connects), and what ALLOW opens does connect: the listener counts tell which."""
    _settings, _url, key, text, connections = NETNS_CASES[case]
    result = netns_results[case]
    assert key in result["reply"], result["reply"]
    assert text in str(result["reply"][key]), result["reply"]
    for listener, count in connections.items():
        assert result["connections"][listener] == count, (listener, result)
    if key in ("refused", "error"):
        assert sum(result["connections"].values()) == connections.get("local", 0)


def test_a_name_is_resolved_once_and_its_checked_address_connected_to(netns_results):
    """DNS rebinding: the name answers 127.0.0.1 (allowed) to the first lookup and 10.0.0.1 to
    any later one; the request goes to 127.0.0.1 after a single lookup."""
    result = netns_results["DNS rebinding"]
    assert result["dns"] == {"rebind.corral.test": 1}
    assert (result["connections"]["local"], result["connections"]["private"]) == (1, 0)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for api.corral.test it signed: (ca, cert, key) PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = certificate("corral test CA", ca_key, "corral test CA", ca_key, True)
    leaf = certificate("api.corral.test", leaf_key, "corral test CA", ca_key, False)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_https_connects_to_the_checked_address_and_verifies_the_name(tmp_path):
    """https to a name goes to its checked address with SNI and Host set to the name, and the
    certificate is verified for the name (not for the address): another name on the same
    address fails verification."""
    ca, cert, key = _certificates(tmp_path)
    allow = {"CORRAL_EGRESS_ALLOW": "127.0.0.1"}
    cases = {"right name": (allow, "https://api.corral.test:8443/echo"),
             "wrong name": (allow, "https://other.corral.test:8443/echo")}  # fmt: skip
    results = _in_netns(
        tmp_path, cases, env={"SSL_CERT_FILE": str(ca)}, tls={"cert": str(cert), "key": str(key)}
    )
    right, wrong = results["right name"], results["wrong name"]
    assert right["reply"]["status"] == 201, right
    assert json.loads(right["reply"]["text"])["headers"]["host"] == "api.corral.test:8443"
    assert right["sni"] == ["api.corral.test"]
    assert right["reply"]["url"] == "https://api.corral.test:8443/echo"
    assert "certificate" in wrong["reply"]["error"].lower(), wrong
    assert wrong["sni"] == ["other.corral.test"]


if __name__ == "__main__":
    _netns_main()
