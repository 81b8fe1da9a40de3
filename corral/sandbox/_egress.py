"""The host side of the brokered `http` capability: the egress policy and the broker. Host side.

Connector code has no network; its `http.get(...)` reaches `HttpBroker.handle`
as a message, and the broker sends it with httpx under an `EgressPolicy`:

- The host is taken from the URL as httpx parses it (userinfo and fragment
  are not the host). Numeric IPv4 spellings (`2130706433`, `0x7f.1`, `127.1`,
  `017700000001`) mean what `inet_aton` makes of them; IPv4-mapped IPv6
  (`::ffff:127.0.0.1`) is its IPv4 address; the IPv4 address inside NAT64
  (`64:ff9b::/96`) and 6to4 (`2002::/16`) addresses is checked too.
- A name is resolved once; every address it resolves to is checked and the
  request is sent to a checked address (`Host` and TLS SNI keep the name, and
  the certificate is verified for the name). httpx never resolves a name.
- Unspecified, multicast and broadcast addresses are never a destination.
  `CORRAL_EGRESS_DENY` (domains and CIDRs; a CIDR also matches the IPv4
  address inside a NAT64 or 6to4 address) wins over everything else.
- Internal addresses (anything not globally routable: loopback, private,
  link-local, CGNAT, reserved, site-local) pass only when a
  `CORRAL_EGRESS_ALLOW` CIDR contains them or the name is an exact
  `CORRAL_EGRESS_ALLOW` domain. Cloud metadata addresses (169.254.169.254,
  fd00:ec2::254, 100.100.100.200, …) pass only by a CIDR, and metadata names
  (`metadata.google.internal`, …) only by an exact domain entry.
- `*.example.com` matches every name below example.com, not example.com
  itself, and lets only public addresses through: whoever controls a
  subdomain's DNS must not reach the host's network by it.
- With `CORRAL_EGRESS_DEFAULT=deny` only names matched by an ALLOW domain and
  addresses in an ALLOW CIDR pass.

Redirects are followed by the broker, each hop checked again. Environment
proxies, .netrc and cookie persistence are off: a request carries only what
the connector put in it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import json
import math
import re
import socket
import ssl
import urllib.parse
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from corral._exceptions import ConfigError
from corral._lazy import lazy_import
from corral.config import Settings

if TYPE_CHECKING:
    import httpx
else:
    httpx = lazy_import("httpx")  # a command that sends no request never imports it

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_URL_CHARS = 8192  # what common servers accept in a request line
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 << 10  # names and values of one request together
MAX_PARAMS = 1000
MAX_BODY_BYTES = 10 << 20  # API payloads, not uploads
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Set by the broker from the URL and the body, or meaningless through it.
_FORBIDDEN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
     "te", "trailer", "expect", "proxy-authorization", "proxy-connection"}
)  # fmt: skip
#: What a request keeps when a redirect takes it to another origin: nothing that could
#: carry a credential (an API key may travel in any custom header).
_CROSS_ORIGIN_HEADERS = frozenset({"accept", "accept-language", "user-agent", "content-type"})
MAX_CODINGS = 2  # content codings a response may stack (gzip of deflate at most)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")

_INTERNAL_NETWORKS = tuple(
    (ipaddress.ip_network(cidr), kind)
    for kind, cidrs in {
        "loopback": ("127.0.0.0/8", "::1/128"),
        "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "64:ff9b:1::/48"),
        "link-local": ("169.254.0.0/16", "fe80::/10"),
        "CGNAT": ("100.64.0.0/10",),
        "site-local": ("fec0::/10",),
        "reserved": (
            "0.0.0.0/8", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
            "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "2001:db8::/32", "3fff::/20",
        ),
    }.items()
    for cidr in cidrs
)  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NEVER = frozenset({"unspecified", "multicast", "broadcast"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, …
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer: a public address
        "fd00:ec2::254",  # AWS over IPv6
        "fd20:ce::254",  # GCP over IPv6
    )
)
METADATA_NAMES = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
     "instance-data.ec2.internal"}
)  # fmt: skip
_INTERNAL_RULE = (
    "loopback, private, link-local, CGNAT and metadata addresses need CORRAL_EGRESS_ALLOW"
)


class EgressRefused(Exception):
    """The egress policy refuses a destination; the message names the rule."""


class _Failure(Exception):
    """A request that cannot be sent as it is, or that failed: an error reply."""


def _inet_aton(labels: list[str]) -> ipaddress.IPv4Address:
    """Numeric labels (decimal, 0-octal, 0x-hex) as `inet_aton` reads them: the last one fills
    the bytes left, so `127.1` is 127.0.0.1 and `2130706433` is too."""
    values = []
    for label in labels:
        if label.startswith("0x"):
            values.append(int(label[2:] or "0", 16))
        else:
            values.append(int(label, 8 if len(label) > 1 and label[0] == "0" else 10))
    *head, last = values
    if len(values) > 4 or any(v > 255 for v in head) or last >= 1 << 8 * (5 - len(values)):
        raise ValueError("out of range")
    return ipaddress.IPv4Address(sum(v << 24 - 8 * i for i, v in enumerate(head)) + last)


def _normalised(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_host(host: str) -> str | IPAddress:
    """A URL host as an IP address (every spelling normalised) or a lower-case name without
    its trailing dot; ValueError when it is neither."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        return _normalised(ipaddress.IPv6Address(host))
    name = host.removesuffix(".")
    labels = name.split(".")
    if all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        try:
            return _inet_aton(labels)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is not a valid host name")
    return name


def _embedded_v4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64 or 6to4 address leads to."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_kind(address: IPAddress) -> str | None:
    """Why `address` is not a public destination ("loopback", "metadata", …), or None."""
    address = _normalised(address)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(int(address))  # `fe80::1%eth0` is still fe80::1
    embedded = _embedded_v4(address)
    if embedded is not None and (inner := address_kind(embedded)) is not None:
        return f"{inner} via {embedded}"
    if address in METADATA_ADDRESSES:
        return "metadata"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    for network, kind in _INTERNAL_NETWORKS:
        if address in network:
            return kind
    if embedded is not None:  # NAT64 or 6to4 of a public address
        return None
    if address.version == 6 and address not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return None if address.is_global else "reserved"


class _Rules:
    """The domains and CIDRs of one of CORRAL_EGRESS_ALLOW / _DENY."""

    def __init__(self, variable: str, entries: Iterable[str]) -> None:
        self.names: dict[str, str] = {}  # name -> entry
        self.suffixes: list[tuple[str, str]] = []  # (".example.com", entry)
        self.networks: list[tuple[IPNetwork, str]] = []
        for entry in entries:
            try:
                self._add(entry.strip())
            except ValueError:
                raise ConfigError(
                    f"corral: {variable} entry {entry!r} is invalid: expected a domain "
                    "(api.example.com, *.example.com), an IP address or a CIDR"
                ) from None

    def _add(self, entry: str) -> None:
        try:
            self.networks.append((ipaddress.ip_network(entry.strip("[]"), strict=False), entry))
            return
        except ValueError:
            pass
        wildcard = entry.startswith("*.")
        bare = entry.removeprefix("*.")
        if not bare or any(c in bare for c in "/:@?#[]%* \t"):
            raise ValueError("not a bare domain")
        name = parse_host(httpx.URL(f"http://{bare}/").raw_host.decode("ascii"))
        if not isinstance(name, str):
            raise ValueError("an address in a spelling other than dotted quads")
        if wildcard:
            self.suffixes.append(("." + name, entry))
        else:
            self.names[name] = entry

    def match_name(self, name: str) -> tuple[str, bool] | None:
        """The entry matching `name` and whether it names it exactly."""
        if name in self.names:
            return self.names[name], True
        return next(((e, False) for suffix, e in self.suffixes if name.endswith(suffix)), None)

    def match_address(self, address: IPAddress, *, embedded: bool) -> str | None:
        """The CIDR entry containing `address` (or, with `embedded`, its NAT64/6to4 IPv4)."""
        candidates = [address]
        if embedded and (inner := _embedded_v4(address)) is not None:
            candidates.append(inner)
        for network, entry in self.networks:
            if any(candidate in network for candidate in candidates):
                return entry
        return None


class EgressPolicy:
    """Where brokered HTTP may go: CORRAL_EGRESS_ALLOW / _DENY (comma-separated domains like
    `api.example.com`, `*.example.com`, IPs and CIDRs v4/v6) and CORRAL_EGRESS_DEFAULT
    (allow: any public address; deny: only what ALLOW names). The module docstring has the
    rules."""

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        default: Literal["allow", "deny"] = "allow",
    ) -> None:
        if default not in ("allow", "deny"):
            raise ConfigError(f"corral: CORRAL_EGRESS_DEFAULT={default!r} is invalid")
        self._allow = _Rules("CORRAL_EGRESS_ALLOW", allow)
        self._deny = _Rules("CORRAL_EGRESS_DENY", deny)
        self.default = default

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        """The policy a deployment's settings describe."""
        return cls(
            allow=settings.egress_allow, deny=settings.egress_deny, default=settings.egress_default
        )

    def _check_name(self, name: str) -> None:
        """The rules that need no address: the deny list, metadata names, default deny."""
        if (denied := self._deny.match_name(name)) is not None:
            raise EgressRefused(
                f"egress to {name} is refused: it matches CORRAL_EGRESS_DENY entry {denied[0]!r}"
            )
        allowed = self._allow.match_name(name)
        if name in METADATA_NAMES and not (allowed and allowed[1]):
            raise EgressRefused(
                f"egress to {name} (metadata name) is refused: cloud metadata names need an "
                "exact CORRAL_EGRESS_ALLOW entry"
            )
        if self.default == "deny" and allowed is None and not self._allow.networks:
            raise EgressRefused(
                f"egress to {name} is refused: it is not in CORRAL_EGRESS_ALLOW and "
                "CORRAL_EGRESS_DEFAULT is deny"
            )

    def check_address(self, host: str, address: IPAddress) -> None:
        """Raise EgressRefused unless a connection to `address`, reached as `host` (the URL's
        host: a name or an address), is allowed."""
        try:
            target = parse_host(host)
        except ValueError as exc:
            raise EgressRefused(f"egress to {host!r} is refused: {exc}") from None
        name = target if isinstance(target, str) else None
        if name is not None:
            self._check_name(name)
        address = _normalised(address)
        kind = address_kind(address)
        base = kind.split()[0] if kind else None
        shown = f"{name} ({address})" if name else str(address)
        shown_kind = f"{name} ({address}, {kind})" if name else f"{address} ({kind})"
        if base in _NEVER:
            raise EgressRefused(
                f"egress to {shown_kind} is refused: unspecified, "
                "multicast and broadcast addresses are never a destination"
            )
        if (denied := self._deny.match_address(address, embedded=True)) is not None:
            raise EgressRefused(
                f"egress to {shown} is refused: it matches CORRAL_EGRESS_DENY entry {denied!r}"
            )
        if self._allow.match_address(address, embedded=False) is not None:
            return
        allowed = self._allow.match_name(name) if name else None
        if base == "metadata":
            raise EgressRefused(
                f"egress to {shown_kind} is refused: cloud metadata "
                "addresses pass only by a CORRAL_EGRESS_ALLOW CIDR entry that contains them"
            )
        if kind is not None and not (allowed and allowed[1]):
            hint = (
                f" (entry {allowed[0]!r} lets only public addresses through; name the domain "
                "exactly or allow the CIDR)"
                if allowed
                else ""
            )
            raise EgressRefused(f"egress to {shown_kind} is refused: {_INTERNAL_RULE}{hint}")
        if self.default == "deny" and allowed is None:
            raise EgressRefused(
                f"egress to {shown} is refused: it is "
                "not in CORRAL_EGRESS_ALLOW and CORRAL_EGRESS_DEFAULT is deny"
            )

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses `host` resolves to, once, each of them checked: EgressRefused if any is
        refused, OSError (socket.gaierror) if the name does not resolve."""
        try:
            target = parse_host(host)
        except ValueError as exc:
            raise EgressRefused(f"egress to {host!r} is refused: {exc}") from None
        if not isinstance(target, str):
            self.check_address(host, target)
            return [target]
        self._check_name(target)  # before the lookup: a denied name is not even resolved
        infos = await asyncio.get_running_loop().getaddrinfo(
            target, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = list(
            dict.fromkeys(
                _normalised(ipaddress.ip_address(info[4][0]))
                for info in infos
                if info[0] in (socket.AF_INET, socket.AF_INET6)
            )
        )
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{target} has no IP address")
        for address in addresses:
            self.check_address(target, address)
        return addresses


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying context per process (certifi, or SSL_CERT_FILE / SSL_CERT_DIR)."""
    return httpx.create_ssl_context()


class _ResponseTooLarge(Exception):
    pass


class _Inflater:
    """gzip or deflate decoding that stops at a cap: a small compressed chunk cannot expand
    into more memory than the cap allows."""

    def __init__(self, coding: str) -> None:
        self._raw_fallback = coding == "deflate"  # deflate is sent with or without zlib header
        wbits = zlib.MAX_WBITS if coding == "deflate" else zlib.MAX_WBITS | 16
        self._z = zlib.decompressobj(wbits)

    def decode(self, data: bytes, room: int) -> bytes:
        try:
            out = self._z.decompress(data, room + 1)
        except zlib.error:
            if not self._raw_fallback:
                raise
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._z.decompress(data, room + 1)
        self._raw_fallback = False
        if len(out) > room:
            raise _ResponseTooLarge
        return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float)


def _fields(value: Any, what: str) -> dict[str, Any]:
    """Query parameters or form fields: {str: scalar or list of scalars}."""
    if not isinstance(value, dict) or len(value) > MAX_PARAMS:
        raise _Failure(f"{what} must be an object of at most {MAX_PARAMS} fields")
    for key, item in value.items():
        items = item if isinstance(item, list) else [item]
        if not isinstance(key, str) or len(items) > MAX_PARAMS or not all(map(_scalar, items)):
            raise _Failure(f"{what} must map names to strings, numbers or lists of them")
    return value


def _checked_url(raw: Any) -> tuple[httpx.URL, str | IPAddress]:
    """An absolute http(s) URL with its host parsed (a numeric host written canonically)."""
    if not isinstance(raw, str | httpx.URL) or len(str(raw)) > MAX_URL_CHARS:
        raise _Failure(f"the url must be a string of at most {MAX_URL_CHARS} characters")
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as exc:
        url = _legacy_numeric(str(raw))  # 0177.0.0.1: valid to inet_aton, not to httpx
        if url is None:
            raise _Failure(f"invalid url {str(raw)[:200]!r}: {exc}") from None
    if url.scheme not in _DEFAULT_PORTS:
        raise _Failure(f"only http and https URLs are allowed, not {str(raw)[:200]!r}")
    try:
        host = parse_host(url.raw_host.decode("ascii"))
        if not isinstance(host, str):
            url = url.copy_with(host=str(host))
    except (httpx.InvalidURL, ValueError) as exc:
        raise _Failure(f"invalid url {str(raw)[:200]!r}: {exc}") from None
    if url.port is not None and not 0 < url.port < 65536:
        raise _Failure(f"invalid port in url {str(raw)[:200]!r}")
    return url, host


def _legacy_numeric(raw: str) -> httpx.URL | None:
    """`raw` with a numeric IPv4 host httpx refuses (octal, zero-padded) written as the
    address inet_aton reads it; None when the host is not such a spelling."""
    try:
        parts = urllib.parse.urlsplit(raw)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        host, colon, port = hostport.partition(":")
        address = parse_host(host)
        if not isinstance(address, ipaddress.IPv4Address):
            return None
        netloc = f"{userinfo}{at}{address}{colon}{port}"
        return httpx.URL(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    except (ValueError, httpx.InvalidURL):
        return None


@dataclass
class _Request:
    method: str
    url: httpx.URL
    host: str | IPAddress
    headers: list[tuple[str, bytes]]
    body: bytes | None
    timeout: float


def _parse(message: dict[str, Any], max_timeout: float) -> _Request:
    """A message from the sandbox as a request, every part of it checked."""
    method = message.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise _Failure(f"method must be one of {', '.join(sorted(METHODS))}")
    url, host = _checked_url(message.get("url"))
    if (params := message.get("params")) is not None:
        url = url.copy_merge_params(_fields(params, "params"))
        if len(str(url)) > MAX_URL_CHARS:
            raise _Failure(f"the url with its params passes {MAX_URL_CHARS} characters")
    raw_headers = message.get("headers") or {}
    if not isinstance(raw_headers, dict) or len(raw_headers) > MAX_HEADERS:
        raise _Failure(f"headers must be an object of at most {MAX_HEADERS} names")
    headers: list[tuple[str, bytes]] = []
    size = 0
    for name, value in raw_headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise _Failure(f"invalid header name {str(name)[:100]!r}")
        if name.lower() in _FORBIDDEN_HEADERS:
            raise _Failure(f"the {name} header is set by the host, not by the connector")
        if not isinstance(value, str) or _BAD_VALUE_CHARS.search(value):
            raise _Failure(f"the {name} header must be a string without control characters")
        headers.append((name, value.encode()))
        size += len(name) + len(headers[-1][1])
    if size > MAX_HEADER_BYTES:
        raise _Failure(f"the headers pass {MAX_HEADER_BYTES} bytes")
    body, content_type = _body(message)
    if content_type and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", content_type.encode()))
    timeout = message.get("timeout")
    if timeout is None:
        timeout = max_timeout
    elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise _Failure("timeout must be a positive number of seconds")
    if not math.isfinite(timeout):
        timeout = max_timeout
    return _Request(method.upper(), url, host, headers, body, min(float(timeout), max_timeout))


def _body(message: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """The encoded body and its content type, from `json` (when present) or `data`."""
    data = message.get("data")
    if "json" in message:
        if data is not None:
            raise _Failure("a request has json or data, not both")
        try:
            text = json.dumps(message["json"], ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _Failure(f"json is not JSON-serialisable: {exc}") from None
        body, content_type = text.encode(), "application/json"
    elif isinstance(data, str):
        body, content_type = data.encode(), None
    elif data is not None:
        form = str(httpx.QueryParams(_fields(data, "data")))
        body, content_type = form.encode(), "application/x-www-form-urlencoded"
    else:
        return None, None
    if len(body) > MAX_BODY_BYTES:
        raise _Failure(f"the body passes {MAX_BODY_BYTES} bytes")
    return body, content_type


def _origin(url: httpx.URL) -> tuple[str, bytes, int | None]:
    return url.scheme, url.raw_host, url.port


class HttpBroker:
    """One execution's brokered HTTP: the policy, a request counter, caps."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        timeout_s: float,
        max_response_bytes: int,
        max_requests: int,
        max_redirects: int,
    ) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.max_requests = max_requests
        self.max_redirects = max_redirects
        self.requests = 0
        self._clients: dict[str, httpx.AsyncClient] = {}  # by TLS name: see _client
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpBroker:
        """A broker with the policy and caps of a deployment's settings."""
        return cls(
            EgressPolicy.from_settings(settings),
            timeout_s=settings.http_timeout_s,
            max_response_bytes=settings.http_max_response_bytes,
            max_requests=settings.http_max_requests,
            max_redirects=settings.http_max_redirects,
        )

    async def handle(self, message: Any) -> dict[str, Any]:
        """The reply to one request message from the sandbox; never raises.

        `{"id", "status", "headers", "text", "url"}`, or `{"id", "refused"}` (the policy),
        `{"id", "invalid"}` (the request itself is wrong: the code's error, not retried)
        or `{"id", "error"}` (no response: time-out, connection, caps).
        """
        request_id = message.get("id") if isinstance(message, dict) else None
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            request_id = None
        self.requests += 1
        try:
            reply = await self._answer(message, request_id is not None)
        except Exception as exc:  # whatever httpx raises that the cases below do not name
            reply = {"error": f"the request failed: {type(exc).__name__}: {exc}"[:500]}
        return {"id": request_id, **reply}

    async def _answer(self, message: Any, has_id: bool) -> dict[str, Any]:
        """The reply's fields: the response, or why there is none. The one place where what
        goes wrong (httpx's errors included) becomes a reply."""
        if self.requests > self.max_requests:
            return {
                "refused": f"more than {self.max_requests} HTTP requests in one execution "
                "(CORRAL_HTTP_MAX_REQUESTS)"
            }
        what, timeout = "the request", self.timeout_s
        try:
            if self._closed:
                raise _Failure("the execution's HTTP broker is closed")
            try:
                if not isinstance(message, dict):
                    raise _Failure("an HTTP request must be a JSON object")
                if not has_id:
                    raise _Failure("an HTTP request needs an integer id")
                request = _parse(message, self.timeout_s)
            except _Failure as exc:
                return {"invalid": str(exc)}
            shown = request.url.copy_with(username=None, password=None, fragment=None)
            what, timeout = f"{request.method} {shown}", request.timeout
            async with asyncio.timeout(timeout):
                return await self._fetch(request)
        except EgressRefused as exc:
            return {"refused": str(exc)}
        except _Failure as exc:
            return {"error": str(exc)}
        except (TimeoutError, httpx.TimeoutException):
            return {"error": f"{what} timed out after {timeout:g} s"}
        except _ResponseTooLarge:
            return {
                "error": f"the response passed the {self.max_response_bytes} byte cap "
                "(CORRAL_HTTP_MAX_RESPONSE_BYTES)"
            }
        except UnicodeError as exc:  # a lone surrogate in the URL, a header or the body
            return {"error": f"{what} holds text that is not valid Unicode: {exc.reason}"}
        except (httpx.HTTPError, OSError, zlib.error) as exc:
            return {"error": f"{what} failed: {exc or type(exc).__name__}"}

    async def _fetch(self, request: _Request) -> dict[str, Any]:
        """Send `request`, following redirects under the policy; the reply's fields."""
        method, url, host, headers, body = (
            request.method, request.url, request.host, request.headers, request.body
        )  # fmt: skip
        for hop in range(self.max_redirects + 1):
            response = await self._send(method, url, host, headers, body, request.timeout)
            try:
                location = response.headers.get("location")
                if (
                    response.status_code not in _REDIRECTS
                    or location is None
                    or not self.max_redirects  # 0: redirects are answered, not followed
                ):
                    text = await self._read(response)
                    return {
                        "status": response.status_code,
                        "headers": dict(response.headers.items()),
                        "text": text,
                        "url": str(url.copy_with(username=None, password=None, fragment=None)),
                    }
            finally:
                await response.aclose()
            if hop == self.max_redirects:
                break
            try:
                next_url, host = _checked_url(url.join(location))
            except (_Failure, httpx.InvalidURL) as exc:  # a Location httpx cannot join
                raise _Failure(
                    f"the redirect to {location[:200]!r} is not followed: {exc}"
                ) from None
            if response.status_code in (301, 302, 303):
                body = None
                method = "HEAD" if method == "HEAD" else "GET"
                headers = [(n, v) for n, v in headers if n.lower() != "content-type"]
            if _origin(next_url) != _origin(url):
                headers = [(n, v) for n, v in headers if n.lower() in _CROSS_ORIGIN_HEADERS]
            url = next_url
        raise _Failure(
            f"more than {self.max_redirects} redirects (CORRAL_HTTP_MAX_REDIRECTS) from "
            f"{request.url}"
        )

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        host: str | IPAddress,
        headers: list[tuple[str, bytes]],
        body: bytes | None,
        timeout: float,
    ) -> httpx.Response:
        """One hop: resolve and check the host, connect to a checked address, stream back."""
        try:
            addresses = await self.policy.resolve(str(host), url.port or _DEFAULT_PORTS[url.scheme])
        except socket.gaierror as exc:
            raise _Failure(f"could not resolve {host}: {exc.strerror or exc}") from None
        tls_name = host if url.scheme == "https" and isinstance(host, str) else None
        hop_headers = [*headers, ("Host", url.netloc)]
        if url.userinfo and not any(n.lower() == "authorization" for n, _ in headers):
            credentials = f"{url.username}:{url.password}".encode()
            hop_headers.append(("Authorization", b"Basic " + base64.b64encode(credentials)))
        client = self._client(tls_name)
        failure: httpx.ConnectError | None = None
        for address in addresses:  # the next checked address when one refuses the connection
            target = url.copy_with(host=str(address), username=None, password=None, fragment=None)
            outgoing = client.build_request(
                method,
                target,
                headers=hop_headers,
                content=body,
                timeout=httpx.Timeout(timeout),
                extensions={"sni_hostname": tls_name} if tls_name else None,
            )
            try:
                return await client.send(outgoing, stream=True)
            except httpx.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def _client(self, tls_name: str | None) -> httpx.AsyncClient:
        """The client for connections verified for `tls_name`.

        httpcore pools connections by scheme, address and port; one client per TLS name
        keeps a connection verified for one name from carrying a request for another.
        """
        key = tls_name or ""
        client = self._clients.get(key)
        if client is None:
            from http.cookiejar import CookieJar, DefaultCookiePolicy  # with httpx: on first use

            client = self._clients[key] = httpx.AsyncClient(
                verify=_ssl_context(),
                trust_env=False,  # no proxies or .netrc credentials from the host's environment
                follow_redirects=False,
                cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # keeps none
                headers={"Accept-Encoding": "gzip, deflate"},  # what _read decodes under a cap
            )
        return client

    async def _read(self, response: httpx.Response) -> str:
        """The body as text (httpx's charset rules), stopped at the response cap."""
        header = response.headers.get("content-encoding", "")
        codings = [c.strip().lower() for c in header.split(",")]
        if len(codings) > MAX_CODINGS:
            raise _Failure(f"the response stacks {len(codings)} content codings")
        inflaters = [_Inflater(c) for c in reversed(codings) if c in ("gzip", "x-gzip", "deflate")]
        if len(inflaters) != len([c for c in codings if c and c != "identity"]):
            inflaters = []  # a coding it cannot decode: passed on as it came, like httpx does
        cap = self.max_response_bytes
        chunks: list[bytes] = []
        raw = size = 0
        async for chunk in response.aiter_raw():
            raw += len(chunk)
            if raw > cap:
                raise _ResponseTooLarge
            for inflater in inflaters:
                chunk = inflater.decode(chunk, cap - size)
            size += len(chunk)
            chunks.append(chunk)
        content = b"".join(chunks)
        try:
            return content.decode(response.encoding or "utf-8", "replace")
        except LookupError:  # a charset naming a codec that is not a text encoding
            return content.decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Close the connections; later requests get an error reply."""
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
