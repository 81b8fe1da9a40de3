"""The connector corpus: real-shaped handlers (tests/corpus/*.py), written the way the public
connectors of Airbyte, Singer taps, n8n nodes and Zapier apps are written, run unchanged on
both backends against one local API server, each with its exact expected output (its case:
tests/corpus/NAME.json).

A control run with the language layer switched off (the test-only switch) proves each
handler and its expectation right as plain Python, so a failure on a backend is the policy's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import re
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS, send_json, serving

from corral import Limits, NodeSandbox, SandboxError
from corral.config import load_settings

CORPUS = Path(__file__).parent / "corpus"
HANDLERS = sorted(path.stem for path in CORPUS.glob("*.py"))

# -- credentials (each passed as a secret too) ------------------------------------------------

STRIPE_KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
GITHUB_TOKEN = "ghp_corpus0123456789abcdef"
BEARER = "tok-corpus-7f3a9c"
STRIPE_WEBHOOK_SECRET = "whsec_corpus_5f2b8e"
GITHUB_WEBHOOK_SECRET = "gh-hook-secret-91ad"
TWILIO_TOKEN = "twilio-auth-12345678"
AWS_ACCESS_KEY = "AKIDCORPUSEXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYCORPUSKEY"
MAILCHIMP_KEY = "mc0123456789abcdef-us21"
JIRA_EMAIL, JIRA_TOKEN = "bot@example.com", "jira-api-token-777"
TRELLO_KEY, TRELLO_TOKEN = "trello-key-4242", "trello-token-8484"
PIPEDRIVE_TOKEN = "pd-token-31337"
PAGERDUTY_KEY = "pd-api-key-5150"
OAUTH = {
    "client_id": "cid",
    "client_secret": "csecret-123",
    "refresh_token": "rt-refresh-1",
    "access_token": "at-stale",
}
FRESH_TOKEN = "at-fresh-2"

# -- the API's data ------------------------------------------------------------------------------

CHARGES = [
    {
        "id": f"ch_{i}",
        "object": "charge",
        "amount": 250 * i,
        "currency": "eur" if i % 3 == 0 else "usd",
    }
    for i in range(1, 8)
]
COMMITS = [
    {
        "sha": f"c0ffee{i}",
        "commit": {
            "author": {"name": ("Ada", "Linus")[i % 2], "date": f"2026-01-0{i}T10:00:00Z"},
            "message": f"change {i}",
        },
    }
    for i in range(5, 0, -1)
]
_NAMES = [
    ("Ada", "Lovelace"),
    ("Grace", "Hopper"),
    ("Alan", "Turing"),
    ("Edsger", "Dijkstra"),
    ("Barbara", "Liskov"),
    ("Ken", "Thompson"),
    ("Margaret", "Hamilton"),
    ("Dennis", None),
]
CONTACTS = [
    {
        "id": str(100 + i),
        "properties": {
            "email": f"user{i}@example.com",
            "firstname": first,
            "lastname": last,
            "lifecyclestage": "customer" if i % 3 == 0 else "lead",
        },
    }
    for i, (first, last) in enumerate(_NAMES, start=1)
]
CARDS = [
    {
        "id": "c1",
        "name": "Write docs",
        "closed": False,
        "dateLastActivity": "2026-02-02T09:15:00.000Z",
    },
    {
        "id": "c2",
        "name": "Fix login",
        "closed": True,
        "dateLastActivity": "2026-02-05T10:00:00.000Z",
    },
    {
        "id": "c3",
        "name": "Ship v2",
        "closed": False,
        "dateLastActivity": "2026-02-06T16:45:00.000Z",
    },
    {
        "id": "c3",
        "name": "Ship v2",
        "closed": False,
        "dateLastActivity": "2026-02-01T08:00:00.000Z",
    },
    {
        "id": "c4",
        "name": "Plan sprint",
        "closed": False,
        "dateLastActivity": "2026-02-04T12:30:00.000Z",
    },
]
STRIPE_EVENT = json.dumps(
    {"id": "evt_1", "type": "invoice.paid", "data": {"object": {"id": "in_1", "amount_due": 1999}}}
)
STRIPE_T = 1768435200  # 2026-01-15T00:00:00Z
GITHUB_PUSH = json.dumps(
    {
        "ref": "refs/heads/main",
        "forced": False,
        "commits": [
            {
                "id": "1a2b3c4d5e6f",
                "message": "Fix the build\n\nThe cache key was wrong.",
                "author": {"username": "ada"},
            },
            {"id": "2b3c4d5e6f7a", "message": "Add tests", "author": {"username": "linus"}},
            {"id": "3c4d5e6f7a8b", "message": "Docs", "author": {"username": "ada"}},
        ],
    }
)
TWILIO_URL = "https://example.com/sms/inbound"
TWILIO_FORM = {
    "From": "+15551234567",
    "To": "+15557654321",
    "Body": "Hello there",
    "MessageSid": "SM123",
}
S3_KEYS = ["logs/2026/01/a.gz", "logs/2026/01/b.gz"]
ORDERS = [
    {"id": 1001 + i, "financial_status": status, "total_price": price}
    for i, (status, price) in enumerate(
        [
            ("paid", "19.99"),
            ("pending", "5.00"),
            ("paid", "100.10"),
            ("refunded", "42.00"),
            ("paid", "0.01"),
        ]
    )
]
_SF = "/services/data/v59.0"
SF_BATCHES = [
    [
        {"Id": "001A", "Name": "Acme", "Industry": "Manufacturing", "AnnualRevenue": 5000000},
        {"Id": "001B", "Name": "Globex", "Industry": "Energy", "AnnualRevenue": None},
        {"Id": "001C", "Name": "Initech", "Industry": "Technology", "AnnualRevenue": 750000},
    ],
    [
        {"Id": "001C", "Name": "Initech", "Industry": "Technology", "AnnualRevenue": 750000},
        {"Id": "001D", "Name": "Umbrella", "Industry": "Pharma", "AnnualRevenue": 5000000},
    ],
]
TICKETS = [
    {
        "id": 1,
        "created_at": "2026-01-05T08:00:00Z",
        "updated_at": "2026-01-05T14:30:00Z",
        "status": "solved",
    },
    {
        "id": 2,
        "created_at": "2026-01-06T09:00:00Z",
        "updated_at": "2026-01-08T09:00:00Z",
        "status": "solved",
    },
    {
        "id": 3,
        "created_at": "2026-01-12T10:00:00Z",
        "updated_at": "2026-01-12T10:20:00Z",
        "status": "open",
    },
    {
        "id": 4,
        "created_at": "2026-01-13T23:00:00Z",
        "updated_at": "2026-01-14T01:40:00Z",
        "status": "solved",
    },
    {
        "id": 5,
        "created_at": "2026-01-20T00:00:00Z",
        "updated_at": "2026-01-21T00:00:00Z",
        "status": "pending",
    },
]
SLACK_MESSAGES = [
    {"user": "U1", "text": "deploy?", "reply_count": 2},
    {"user": "U4", "subtype": "channel_join"},
    {"user": "U2", "text": "ok"},
    {"user": "U1", "text": "shipping"},
    {"user": "U3", "text": "broken", "reply_count": 1},
    {"user": "U1", "text": "fixed"},
    {"user": "U2", "text": "thanks"},
]
SHEET = [
    ["Name", "Amount", "Paid", "Due Date"],
    ["Acme", "1,200.50", "TRUE", "2026-02-01"],
    ["Globex", "300", "FALSE"],
    ["Initech", "", "true", "2026-03-01"],
]
EVENTS = [
    {"id": f"ev{i}", "updated_at": f"2026-01-{day:02d}T00:00:00Z"}
    for i, day in enumerate([1, 2, 3, 4, 6, 5, 7, 8, 9], start=1)
]
INVOICES = [
    {"number": "INV-1", "customer": "Acme", "amount": 250.0, "status": "open"},
    {"number": "INV-2", "customer": "Globex", "amount": 80.0, "status": "open"},
    {"number": "INV-3", "customer": "Acme", "amount": 120.5, "status": "paid"},
    {"number": "INV-4", "customer": "Initech", "amount": 990.0, "status": "open"},
]
MEMBERS = [
    {
        "email_address": email,
        "status": status,
        "id": hashlib.md5(email.lower().encode()).hexdigest(),
    }
    for email, status in [
        ("Ada@Example.com", "subscribed"),
        ("grace@example.com", "unsubscribed"),
        ("alan@example.com", "subscribed"),
        ("edsger@example.com", "cleaned"),
        ("barbara@example.com", "subscribed"),
    ]
]
GQL_ISSUES = [
    {"number": 11, "title": "Crash on start", "labels": ["bug", "p1"]},
    {"number": 12, "title": "Add dark mode", "labels": ["feature"]},
    {"number": 13, "title": "Typo in docs", "labels": ["docs"]},
    {"number": 14, "title": "Slow sync", "labels": ["bug", "perf"]},
    {"number": 15, "title": "Support SSO", "labels": []},
]
SALES_CSV = (
    'customer,region,amount,quantity\n"Acme, Inc.",EMEA,10.50,3\nGlobex,AMER,99.99,1\n'
    'Initech,AMER,0.333,3\n"Acme, Inc.",APAC,5,2\nUmbrella,EMEA,1.25,4\n\n'
)
JIRA = [
    ("To Do", "Medium"),
    ("Done", "High"),
    ("In Progress", "Highest"),
    ("To Do", "Low"),
    ("Done", "Medium"),
    ("To Do", "High"),
    ("In Progress", "Lowest"),
]
PRODUCTS = [
    {"sku": f"sku-{i}", "price": price, "active": active}
    for i, (price, active) in enumerate(
        [
            (1.0, True),
            (2.5, False),
            (3.25, True),
            (10.0, True),
            (0.99, True),
            (4.0, False),
            (7.5, True),
        ],
        start=1,
    )
]
INCIDENTS = [
    {"id": "PINC1", "priority": {"summary": "P3"}, "created_at": "2026-01-10T10:00:00Z"},
    {"id": "PINC2", "priority": {"summary": "P1"}, "created_at": "2026-01-10T12:00:00Z"},
    {"id": "PINC3", "priority": None, "created_at": "2026-01-09T08:00:00Z"},
    {"id": "PINC4", "priority": {"summary": "P1"}, "created_at": "2026-01-10T09:00:00Z"},
    {"id": "PINC5", "priority": {"summary": "P2"}, "created_at": "2026-01-11T00:00:00Z"},
]
USERS = {1: "Ada", 2: "Grace", 3: "Alan"}
DEALS = [
    {"id": i, "status": status, "owner_name": owner, "value": value}
    for i, (status, owner, value) in enumerate(
        [
            ("won", "Ada", 1000),
            ("open", "Ada", 500),
            ("won", "Grace", 250),
            ("lost", "Ada", 300),
            ("won", "Ada", 50),
        ],
        start=1,
    )
]


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_valid(method: str, path: str, query: str, headers: dict[str, str]) -> tuple[bool, str]:
    """Check an AWS SigV4 Authorization header the way the service does; (valid, scope)."""
    match = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
        headers.get("authorization", ""),
    )
    if not match or match[1] != AWS_ACCESS_KEY:
        return False, ""
    date, region, service, signed, signature = match.group(2, 3, 4, 5, 6)
    names = signed.split(";")
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted(urllib.parse.parse_qsl(query, keep_blank_values=True))
    )
    request = "\n".join(
        [
            method,
            path,
            canonical_query,
            "".join(f"{n}:{headers.get(n, '').strip()}\n" for n in names),
            signed,
            headers.get("x-amz-content-sha256", ""),
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            headers.get("x-amz-date", ""),
            scope,
            hashlib.sha256(request.encode()).hexdigest(),
        ]
    )
    key = _sign(
        _sign(_sign(_sign(f"AWS4{AWS_SECRET}".encode(), date), region), service), "aws4_request"
    )
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, signature) and headers.get("x-amz-date", "")[:8] == date
    return ok, scope


class _Api(http.server.BaseHTTPRequestHandler):
    """Answers what the corpus calls; `server.flaky` counts hits per flaky key."""

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        self.raw_query = parts.query
        length = int(self.headers.get("content-length") or 0)
        self.body = self.rfile.read(length).decode() if length else ""
        self.auth = self.headers.get("authorization", "")
        for pattern, route in ROUTES:
            match = re.fullmatch(pattern, parts.path)
            if match:
                route(self, *match.groups())
                return
        send_json(self, {"error": "no route for " + parts.path}, 404)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def base(self) -> str:
        return "http://" + self.headers["host"]

    def page(self, items: list[Any], offset: int, limit: int) -> tuple[list[Any], int]:
        return items[offset : offset + limit], offset + limit

    def unauthorised(self, expected: str) -> bool:
        if self.auth == expected:
            return False
        send_json(self, {"error": "unauthorised"}, 401)
        return True

    # -- routes, each in the style of the API it stands for ---------------------------------

    def stripe_charges(self) -> None:
        if self.unauthorised("Bearer " + STRIPE_KEY):
            return
        after = self.query.get("starting_after")
        start = next(i + 1 for i, c in enumerate(CHARGES) if c["id"] == after) if after else 0
        data, end = self.page(CHARGES, start, int(self.query["limit"]))
        send_json(self, {"object": "list", "data": data, "has_more": end < len(CHARGES)})

    def github_commits(self, repo: str) -> None:
        if repo != "acme/web" or self.unauthorised("token " + GITHUB_TOKEN):
            return send_json(self, {"message": "Not Found"}, 404) if repo != "acme/web" else None
        per_page, page = int(self.query["per_page"]), int(self.query.get("page", 1))
        data, end = self.page(COMMITS, (page - 1) * per_page, per_page)
        url = f"{self.base()}/repos/{repo}/commits?per_page={per_page}&page="
        links = [f'<{url}{page + 1}>; rel="next"'] if end < len(COMMITS) else []
        links.append(f'<{url}{-(-len(COMMITS) // per_page)}>; rel="last"')
        self.send_with_headers(data, {"link": ", ".join(links)})

    def send_with_headers(self, payload: Any, headers: dict[str, str], status: int = 200) -> None:
        body = payload if isinstance(payload, str) else json.dumps(payload)
        self.send_response(status)
        for name, value in {"content-type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def hubspot_contacts(self) -> None:
        if self.unauthorised("Bearer " + BEARER):
            return
        data, end = self.page(CONTACTS, int(self.query.get("after", 0)), int(self.query["limit"]))
        paging = {"next": {"after": str(end)}} if end < len(CONTACTS) else {}
        send_json(self, {"results": data, **({"paging": paging} if paging else {})})

    def trello_cards(self, board: str) -> None:
        if (self.query.get("key"), self.query.get("token")) != (TRELLO_KEY, TRELLO_TOKEN):
            return send_json(self, {"message": "invalid key"}, 401)
        send_json(self, CARDS if board == "b0ard" else [])

    def flaky(self, key: str) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            hits = self.server.flaky[key] = self.server.flaky.get(key, 0) + 1  # type: ignore[attr-defined]
        if hits <= int(self.query["fail"]):
            status = int(self.query["status"])
            return self.send_with_headers({"error": "try later"}, {"retry-after": "0"}, status)
        send_json(self, {"items": ["a", "b"], "attempt": hits})

    def webhook(self, provider: str) -> None:
        if provider == "stripe":
            signed = f"{STRIPE_T}.{STRIPE_EVENT}".encode()
            v1 = hmac.new(STRIPE_WEBHOOK_SECRET.encode(), signed, hashlib.sha256).hexdigest()
            self.send_with_headers(STRIPE_EVENT, {"stripe-signature": f"t={STRIPE_T},v1={v1}"})
        elif provider == "github":
            digest = hmac.new(GITHUB_WEBHOOK_SECRET.encode(), GITHUB_PUSH.encode(), hashlib.sha256)
            self.send_with_headers(
                GITHUB_PUSH,
                {"x-github-event": "push", "x-hub-signature-256": "sha256=" + digest.hexdigest()},
            )
        else:
            signed = TWILIO_URL + "".join(k + TWILIO_FORM[k] for k in sorted(TWILIO_FORM))
            mac = hmac.new(TWILIO_TOKEN.encode(), signed.encode(), hashlib.sha1).digest()
            send_json(
                self,
                {
                    "url": TWILIO_URL,
                    "form": TWILIO_FORM,
                    "headers": {"X-Twilio-Signature": base64.b64encode(mac).decode()},
                },
            )

    def sigv4(self, bucket: str) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        valid, scope = sigv4_valid(self.command, f"/sigv4/{bucket}", self.raw_query, headers)
        if not valid:
            return send_json(self, {"Code": "SignatureDoesNotMatch"}, 403)
        send_json(self, {"valid": True, "scope": scope, "keys": S3_KEYS})

    def shopify_orders(self) -> None:
        if self.headers.get("x-shopify-access-token") != BEARER:
            return send_json(self, {"errors": "Invalid API key"}, 401)
        index = {None: 0, "p2": 1, "p3": 2}[self.query.get("page_info")]
        data, end = self.page(ORDERS, index * 2, 2)
        url = f"{self.base()}/admin/api/2024-01/orders.json?limit=2&page_info="
        links = [f'<{url}p{index}>; rel="previous"'] if index else []
        links += [f'<{url}p{index + 2}>; rel="next"'] if end < len(ORDERS) else []
        self.send_with_headers({"orders": data}, {"link": ", ".join(links)})

    def salesforce_query(self, batch: str | None) -> None:
        if self.unauthorised("Bearer " + BEARER):
            return
        if batch is None and "FROM Account" not in self.query.get("q", ""):
            return send_json(self, [{"errorCode": "MALFORMED_QUERY"}], 400)
        number = int(batch or 1)
        records = [
            {"attributes": {"type": "Account", "url": f"{_SF}/sobjects/Account/{r['Id']}"}, **r}
            for r in SF_BATCHES[number - 1]
        ]
        done = number == len(SF_BATCHES)
        body = {"totalSize": 5, "done": done, "records": records}
        send_json(
            self, body if done else {**body, "nextRecordsUrl": f"{_SF}/query/01gX-{number + 1}"}
        )

    def zendesk_tickets(self) -> None:
        if self.unauthorised("Bearer " + BEARER):
            return
        start = int(self.query["cursor"][3:]) if "cursor" in self.query else 0
        data, end = self.page(TICKETS, start, int(self.query.get("per_page", 2)))
        send_json(
            self,
            {
                "tickets": data,
                "after_cursor": f"cur{min(end, len(TICKETS))}",
                "end_of_stream": end >= len(TICKETS),
            },
        )

    def slack_history(self) -> None:
        if self.auth != "Bearer " + BEARER:
            return send_json(self, {"ok": False, "error": "invalid_auth"})
        cursor = self.query.get("cursor")
        start = int(base64.b64decode(cursor).decode().split(":")[1]) if cursor else 0
        data, end = self.page(SLACK_MESSAGES, start, int(self.query["limit"]))
        more = (
            base64.b64encode(f"offset:{end}".encode()).decode() if end < len(SLACK_MESSAGES) else ""
        )
        send_json(
            self,
            {
                "ok": True,
                "messages": data,
                "has_more": bool(more),
                "response_metadata": {"next_cursor": more},
            },
        )

    def sheets(self, sheet: str, cells: str) -> None:
        if sheet != "SHEET1" or urllib.parse.unquote(cells) != "Sheet1!A1:D10":
            return send_json(self, {"error": {"code": 400}}, 400)
        send_json(self, {"range": "Sheet1!A1:D10", "majorDimension": "ROWS", "values": SHEET})

    def offset(self, name: str) -> None:
        items = {"events": EVENTS, "invoices": INVOICES}[name]
        data, _ = self.page(items, int(self.query["offset"]), int(self.query["limit"]))
        send_json(self, {"items": data, "total": len(items)})

    def mailchimp_members(self, list_id: str) -> None:
        basic = base64.b64encode(f"anystring:{MAILCHIMP_KEY}".encode()).decode()
        if list_id != "L1" or self.unauthorised("Basic " + basic):
            return None if list_id == "L1" else send_json(self, {"status": 404}, 404)
        data, _ = self.page(MEMBERS, int(self.query["offset"]), int(self.query["count"]))
        send_json(self, {"members": data, "total_items": len(MEMBERS)})

    def oauth_token(self) -> None:
        form = dict(urllib.parse.parse_qsl(self.body))
        wanted = {k: OAUTH[k] for k in ("client_id", "client_secret", "refresh_token")}
        if form != {"grant_type": "refresh_token", **wanted}:
            return send_json(self, {"error": "invalid_grant"}, 400)
        send_json(self, {"access_token": FRESH_TOKEN, "expires_in": 3600, "token_type": "bearer"})

    def oauth_me(self) -> None:
        if not self.unauthorised("Bearer " + FRESH_TOKEN):
            send_json(self, {"id": 7, "email": "owner@example.com"})

    def graphql(self) -> None:
        if self.unauthorised("bearer " + GITHUB_TOKEN):
            return
        variables = json.loads(self.body)["variables"]
        if (variables["owner"], variables["name"]) != ("acme", "web"):
            return send_json(self, {"data": None, "errors": [{"message": "not found"}]})
        after = variables.get("after")
        start = int(base64.b64decode(after).decode().split(":")[1]) if after else 0
        nodes, end = self.page(GQL_ISSUES, start, 2)
        edges = [
            {
                "cursor": base64.b64encode(f"cursor:{start + i + 1}".encode()).decode(),
                "node": {
                    "number": n["number"],
                    "title": n["title"],
                    "labels": {"nodes": [{"name": x} for x in n["labels"]]},
                },
            }
            for i, n in enumerate(nodes)
        ]
        info = {"hasNextPage": end < len(GQL_ISSUES), "endCursor": edges[-1]["cursor"]}
        send_json(self, {"data": {"repository": {"issues": {"pageInfo": info, "edges": edges}}}})

    def sales_csv(self) -> None:
        self.send_with_headers(SALES_CSV, {"content-type": "text/csv"})

    def jira_search(self) -> None:
        basic = base64.b64encode(f"{JIRA_EMAIL}:{JIRA_TOKEN}".encode()).decode()
        if self.unauthorised("Basic " + basic):
            return
        issues = [
            {
                "key": f"OPS-{i}",
                "fields": {"summary": f"issue {i}", "status": {"name": s}, "priority": {"name": p}},
            }
            for i, (s, p) in enumerate(JIRA, start=1)
        ]
        start, size = int(self.query["startAt"]), int(self.query["maxResults"])
        data, _ = self.page(issues, start, size)
        send_json(
            self, {"startAt": start, "maxResults": size, "total": len(issues), "issues": data}
        )

    def cursor_products(self) -> None:
        if self.unauthorised("Bearer " + BEARER):
            return
        start = int(self.query.get("cursor", "c0")[1:])
        data, end = self.page(PRODUCTS, start, int(self.query["limit"]))
        send_json(self, {"data": data, "next_cursor": f"c{end}" if end < len(PRODUCTS) else None})

    def echo(self, rest: str) -> None:
        try:
            parsed = json.loads(self.body) if self.body else None
        except ValueError:
            parsed = None
        send_json(
            self,
            {
                "method": self.command,
                "path": "/echo" + rest,
                "query": self.query,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "json": parsed,
                "body": self.body,
            },
        )

    def upload(self) -> None:
        boundary = self.headers.get("content-type", "").partition("boundary=")[2]
        chunks = self.body.split("--" + boundary)
        if not boundary or chunks[-1] != "--\r\n":
            return send_json(self, {"error": "malformed multipart"}, 400)
        parts = []
        for chunk in chunks[1:-1]:
            head, _, content = chunk.removeprefix("\r\n").partition("\r\n\r\n")
            name = re.search(r' name="([^"]*)"', head)
            filename = re.search(r' filename="([^"]*)"', head)
            parts.append(
                {
                    "name": name and name[1],
                    "filename": filename and filename[1],
                    "content": content.removesuffix("\r\n"),
                }
            )
        send_json(self, {"parts": parts})

    def incidents(self) -> None:
        if (
            self.auth != "Token token=" + PAGERDUTY_KEY
            or self.query.get("statuses[]") != "triggered"
        ):
            return send_json(self, {"error": {"code": 2006}}, 401)
        send_json(self, {"incidents": INCIDENTS, "more": False})

    def user(self, user_id: str) -> None:
        if not self.unauthorised("Bearer " + BEARER):
            send_json(self, {"id": int(user_id), "name": USERS[int(user_id)]})

    def deals(self) -> None:
        if self.query.get("api_token") != PIPEDRIVE_TOKEN:
            return send_json(self, {"success": False, "error": "unauthorized"}, 401)
        start, limit = int(self.query["start"]), int(self.query["limit"])
        data, end = self.page(DEALS, start, limit)
        more = end < len(DEALS)
        send_json(
            self,
            {
                "success": True,
                "data": data,
                "additional_data": {
                    "pagination": {
                        "start": start,
                        "limit": limit,
                        "more_items_in_collection": more,
                        **({"next_start": end} if more else {}),
                    }
                },
            },
        )

    def status(self, code: str) -> None:
        send_json(self, {"status": int(code)}, int(code))


ROUTES: list[tuple[str, Callable[..., None]]] = [
    (r"/v1/charges", _Api.stripe_charges),
    (r"/repos/([\w-]+/[\w-]+)/commits", _Api.github_commits),
    (r"/crm/v3/objects/contacts", _Api.hubspot_contacts),
    (r"/1/boards/(\w+)/cards", _Api.trello_cards),
    (r"/flaky/(\w+)", _Api.flaky),
    (r"/webhooks/(stripe|github|twilio)", _Api.webhook),
    (r"/sigv4/([\w-]+)", _Api.sigv4),
    (r"/admin/api/2024-01/orders\.json", _Api.shopify_orders),
    (rf"{_SF}/query(?:/01gX-(\d+))?", _Api.salesforce_query),
    (r"/api/v2/incremental/tickets/cursor\.json", _Api.zendesk_tickets),
    (r"/api/conversations\.history", _Api.slack_history),
    (r"/v4/spreadsheets/(\w+)/values/([^/]+)", _Api.sheets),
    (r"/offset/(events|invoices)", _Api.offset),
    (r"/3\.0/lists/(\w+)/members", _Api.mailchimp_members),
    (r"/oauth/token", _Api.oauth_token),
    (r"/oauth/me", _Api.oauth_me),
    (r"/graphql", _Api.graphql),
    (r"/reports/sales\.csv", _Api.sales_csv),
    (r"/rest/api/3/search", _Api.jira_search),
    (r"/cursor/products", _Api.cursor_products),
    (r"/echo(/.*)?", lambda handler, rest: handler.echo(rest or "")),
    (r"/upload", _Api.upload),
    (r"/incidents", _Api.incidents),
    (r"/users/(\d+)", _Api.user),
    (r"/v1/deals", _Api.deals),
    (r"/status/(\d{3})", _Api.status),
]


# -- the cases and running them -----------------------------------------------------------------


def case(name: str) -> dict[str, Any]:
    """The case of handler `name` (tests/corpus/NAME.json): params, the connection's
    credentials, `fresh_request_id` (params get a request id of their own) and the exact
    expected output."""
    return dict(json.loads((CORPUS / f"{name}.json").read_text()))


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    """The corpus's API on 127.0.0.1, one for the module; its base URL."""
    with serving(_Api) as server:
        server.flaky = {}  # type: ignore[attr-defined]
        server.lock = threading.Lock()  # type: ignore[attr-defined]
        yield f"http://127.0.0.1:{server.server_address[1]}"


def _sandbox(executor: str, *, language: bool = True) -> NodeSandbox:
    """A sandbox whose egress lets 127.0.0.1 through, a pool of one worker for `worker`."""
    settings = load_settings(CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_WORKER_POOL_SIZE="1")
    off = {} if language else {"_unsafe_layers_off": {"language"}}
    return NodeSandbox(executor=executor, limits=Limits(max_memory_mb=64), settings=settings, **off)


def execute(sandbox: NodeSandbox, name: str, base_url: str) -> Any:
    """Run the corpus handler `name` with its case, every credential a secret; its output."""
    spec = case(name)
    params = dict(spec["params"])
    if spec.get("fresh_request_id"):
        params["request_id"] = uuid.uuid4().hex
    credentials = spec["credentials"]
    result = sandbox.execute_sync(
        (CORPUS / f"{name}.py").read_text(),
        params=params,
        context={"connection": {"baseUrl": base_url, "credentials": credentials}},
        timeout_ms=10_000,
        secrets=[value for value in credentials.values() if len(value) >= 4],
    )
    return result.output


def outcome(sandbox: NodeSandbox, name: str, base_url: str) -> dict[str, Any]:
    """The output, or the error's type and message, of one handler."""
    try:
        return {"output": execute(sandbox, name, base_url)}
    except SandboxError as exc:
        return {"error": exc.type, "message": exc.message}


@pytest.mark.timeout(10)
def test_the_corpus_is_complete():
    """At least 30 handlers, each with its case, and no case without a handler."""
    assert len(HANDLERS) >= 30
    assert sorted(path.stem for path in CORPUS.glob("*.json")) == HANDLERS
    for name in HANDLERS:
        assert set(case(name)) <= {"params", "credentials", "fresh_request_id", "expected"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", HANDLERS)
def test_handler_is_right_as_plain_python(name, api):
    """Control: with the language layer off, each handler gives its expected output, so the
    handler and its expectation are right and a failure below is the policy's."""
    with _sandbox("process", language=False) as sandbox:
        assert execute(sandbox, name, api) == case(name)["expected"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", HANDLERS)
def test_handler_runs_unchanged(name, backend, api):
    """Each handler runs unchanged under the policy and gives its exact expected output."""
    with _sandbox(backend) as sandbox:
        assert outcome(sandbox, name, api) == {"output": case(name)["expected"]}


@pytest.mark.timeout(90)
def test_the_corpus_twice_on_one_worker(api):
    """The whole corpus twice in a row on one worker (pool size 1) gives the same outcome
    both times (nothing an execution leaves changes the next), and those are the expected
    outputs."""
    with _sandbox("worker") as sandbox:
        first = {name: outcome(sandbox, name, api) for name in HANDLERS}
        second = {name: outcome(sandbox, name, api) for name in HANDLERS}
    assert second == first
    assert first == {name: {"output": case(name)["expected"]} for name in HANDLERS}
