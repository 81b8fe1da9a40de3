"""The `http` capability, child side: connector code asks the host to make its requests.

Child side (standard library only). A request travels to the host as an HTTP
frame on the execution's channel; the host checks it against the egress
policy, sends it, and answers with an HTTP_REPLY frame (see `_egress`). Only
the thread running connector code reads the channel while it runs, one
request at a time. What connector code can reach from here is public
methods and plain data: the channel stays in closures.
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Callable
from typing import Any

from corral.sandbox import _protocol as proto

MAX_REPLY_BYTES = 128 << 20  # a 10 MiB response as JSON, with room to spare
_POLL_S = 0.05  # between polls the thread may be stopped (a worker's limits)


class HTTPError(Exception):
    """A request that got no response: refused by a cap, timed out, or failed to connect."""


class HTTPStatusError(HTTPError):
    """raise_for_status() on a 4xx or 5xx response; uncaught, the execution ends as
    `http_error` carrying the status."""

    def __init__(self, message: str, status_code: int, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after  # the response's Retry-After header, if it had one


class Response:
    """What the host received: status_code, headers (lower-case names), text, url."""

    def __init__(self, status_code: int, headers: dict[str, str], text: str, url: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.text = text
        self.url = url

    @property
    def ok(self) -> bool:
        """Whether the status is below 400."""
        return self.status_code < 400

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.text)

    def raise_for_status(self) -> Response:
        """Raise HTTPStatusError on a 4xx or 5xx status; the response otherwise."""
        if self.status_code >= 400:
            kind = "client" if self.status_code < 500 else "server"
            raise HTTPStatusError(
                f"{kind} error {self.status_code} from {self.url}",
                self.status_code,
                self.headers.get("retry-after"),
            )
        return self

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"


def _await_reply(sock: socket.socket, request_id: int) -> dict[str, Any]:
    """The host's HTTP_REPLY to `request_id`, each frame read whole in one call once it
    starts arriving (a stop between polls then never leaves half a frame in the channel).
    A reply to another request (one a stopped execution left behind) is dropped."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        if not poller.poll(_POLL_S * 1000):
            continue
        header = sock.recv(proto.HEADER.size, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(header) < proto.HEADER.size:
            raise HTTPError("the host closed the channel")
        size, kind = proto.HEADER.unpack(header)
        if kind != proto.HTTP_REPLY or size > MAX_REPLY_BYTES:
            raise HTTPError("the host sent something other than an HTTP reply")
        data = sock.recv(proto.HEADER.size + size, socket.MSG_WAITALL)  # one call: whole
        if len(data) < proto.HEADER.size + size:  # cut short by a signal: rare
            data += proto.recv_exactly(sock, proto.HEADER.size + size - len(data))
        reply = json.loads(data[proto.HEADER.size :])
        if isinstance(reply, dict) and reply.get("id") == request_id:
            return reply


class Http:
    """Brokered HTTP: request(method, url, ...), and get, post, put, patch, delete, head,
    options(url, ...); options are params, headers, json, data and timeout. A request
    that gets no response raises http.HTTPError; raise_for_status() raises its subclass
    http.HTTPStatusError, which carries status_code."""

    __slots__ = ("_send",)
    HTTPError = HTTPError  # `except http.HTTPError:` catches every failed request
    HTTPStatusError = HTTPStatusError  # ... and this one only raise_for_status()

    def __init__(self, send: Callable[[dict[str, Any]], Response]) -> None:
        self._send = send  # out of connector code's reach: no name with _ resolves there

    def request(self, method: str, url: str, **options: Any) -> Response:
        """Send `method` to `url` through the host; the Response."""
        unknown = set(options) - {"params", "headers", "json", "data", "timeout"}
        if unknown:
            raise TypeError(f"unknown request option(s): {', '.join(sorted(unknown))}")
        return self._send({"method": str(method).upper(), "url": str(url), **options})

    def get(self, url: str, **options: Any) -> Response:
        """Send a GET request."""
        return self.request("GET", url, **options)

    def post(self, url: str, **options: Any) -> Response:
        """Send a POST request."""
        return self.request("POST", url, **options)

    def put(self, url: str, **options: Any) -> Response:
        """Send a PUT request."""
        return self.request("PUT", url, **options)

    def patch(self, url: str, **options: Any) -> Response:
        """Send a PATCH request."""
        return self.request("PATCH", url, **options)

    def delete(self, url: str, **options: Any) -> Response:
        """Send a DELETE request."""
        return self.request("DELETE", url, **options)

    def head(self, url: str, **options: Any) -> Response:
        """Send a HEAD request."""
        return self.request("HEAD", url, **options)

    def options(self, url: str, **options: Any) -> Response:
        """Send an OPTIONS request."""
        return self.request("OPTIONS", url, **options)

    def __repr__(self) -> str:
        return "<http>"


def make_http(
    send: Callable[[bytes], None],
    sock: socket.socket,
    violation: Callable[[str], Exception],
) -> tuple[Http, Callable[[], None]]:
    """The `http` object of one execution, and what closes it once the execution answered
    (its leftovers, a generator's `finally` run later, may send nothing). `violation`
    records a policy refusal (it ends the execution as policy_violation, caught or not)
    and returns the exception to raise."""
    ended = False

    def close() -> None:
        nonlocal ended
        ended = True

    # Ids unique to this execution: a reply left by a stopped one never matches.
    execution = int.from_bytes(os.urandom(4), "big") << 20
    sent = 0

    def request(message: dict[str, Any]) -> Response:
        nonlocal sent
        if ended:
            raise HTTPError("this execution has ended: its http is closed")
        sent += 1
        message["id"] = execution + sent
        try:
            frame = proto.json_frame(proto.HTTP, message)
        except (TypeError, ValueError) as exc:
            raise HTTPError(f"the request cannot be sent: {exc}") from None
        send(frame)
        reply = _await_reply(sock, message["id"])
        if "refused" in reply:
            raise violation(str(reply["refused"]))
        if "invalid" in reply:
            raise ValueError(str(reply["invalid"]))  # the code's own mistake: not retried
        if "error" in reply:
            raise HTTPError(str(reply["error"]))
        return Response(
            int(reply["status"]), dict(reply["headers"]), str(reply["text"]), str(reply["url"])
        )

    return Http(request), close
