"""The web console (issue 19) in a real browser: Debian's headless Chromium, driven by
Playwright, against a real `corral api` process on 127.0.0.1 (tests/test_api.py starts it)
whose runs call a real HTTP service on 127.0.0.1. Each page is screenshotted into the
test's tmp_path (and into $CORRAL_CONSOLE_SCREENSHOTS when set) and checked with axe-core
(from the npm registry: .ci/run fetches it; $CORRAL_AXE_JS or the cache path below)."""

from __future__ import annotations

import collections
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import send_json, serving
from playwright import sync_api as playwright_sync  # the `test` extra installs it
from test_api import TOKEN, Api, _env, _workflow, running_api

CHROMIUM = "/usr/bin/chromium"  # Debian's package; never a browser Playwright downloads
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
AXE_JS = Path(
    os.environ.get("CORRAL_AXE_JS")
    or Path.home() / ".cache" / "corral-axe" / "package" / "axe.min.js"  # where .ci/run puts it
)
WAIT_MS = 20_000  # the longest a page may take to show what a step expects

CONNECTOR = {
    "id": "svc",
    "name": "Test service",
    "auth": {"type": "bearer"},
    "actions": [
        {"id": "call", "name": "Call a path", "method": "GET", "endpoint": "/{path}",
         "fallback": None, "params": {"type": "object", "required": ["path"],
                                      "properties": {"path": {"type": "string"}}}},
        {"id": "hog", "name": "Hoard memory", "method": "GET", "endpoint": "/hog",
         "fallback": None, "params": {"type": "object"}},
        {"id": "listing", "name": "List things (no handler)", "method": "GET",
         "endpoint": "/things", "params": {"type": "object"}},
    ],
}  # fmt: skip

HANDLERS = """
def call(params, context):
    connection = context["connection"]
    log("calling", params["path"])
    response = http.get(connection["baseUrl"] + "/" + params["path"],
                        headers={"Authorization": "Bearer " + connection["credentials"]["token"]},
                        timeout=60)
    response.raise_for_status()
    return response.json()

def hog(params, context):
    hoard = []
    while True:
        hoard.append("x" * 100_000)
"""

HOG = """def run(params, context):
    hoard = []
    while True:
        hoard.append('x' * 100_000)
"""


class _Service(http.server.BaseHTTPRequestHandler):
    """ok/*: 200. down/*: 500. flaky/*: 500 the first time, then 200. block/NAME: held until
    the gate NAME opens. `<script>` in every answer: the page must show it as text."""

    def do_GET(self) -> None:
        server: Any = self.server
        path = self.path.lstrip("/")
        status = 200
        if path.startswith("block/"):
            server.gate(path).wait(30)
        elif path.startswith("down/"):
            status = 500
        elif path.startswith("flaky/"):
            with server.lock:
                status = 200 if path in server.failed else 500
                server.failed.add(path)
        send_json(self, {"path": path, "html": "<script>window.pwned = 1</script>"}, status)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def service() -> Iterator[Any]:
    """The service the runs call; `.gate(path)` is the event that lets block/… answer."""
    with serving(_Service) as server:
        found: Any = server
        found.lock = threading.Lock()
        found.failed = set()
        gates: dict[str, threading.Event] = collections.defaultdict(threading.Event)

        def gate(path: str) -> threading.Event:
            with found.lock:
                return gates[path]

        found.gate = gate
        try:
            yield found
        finally:
            for event in list(gates.values()):
                event.set()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog with `svc`: `call` has a bespoke handler, `listing` only HTTP metadata."""
    folder = tmp_path_factory.mktemp("catalog") / "svc"
    folder.mkdir()
    (folder / "connector.json").write_text(json.dumps(CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    return folder.parent


@pytest.fixture(scope="module")
def api(catalog: Path, service: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One `corral api` (token, inline worker, GENERIC_EXECUTOR_ENABLED unset: off) for the
    module, with the connection of `svc` stored."""
    # A beat every second (fresh for 3 s): the health page is read at one instant.
    env = _env(catalog, tmp_path_factory.mktemp("state"), CORRAL_WORKER_HEARTBEAT_S="1")
    with running_api(env) as running:
        base = f"http://127.0.0.1:{service.server_address[1]}"
        stored = running.client.put(
            "/api/connections/svc", json={"baseUrl": base, "credentials": {"token": "tok-4242"}}
        )
        assert stored.status_code == 200, stored.text
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from Debian's package, closed after the module."""
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install chromium"
    with playwright_sync.sync_playwright() as driver:
        launched = driver.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own session storage) at a laptop's 1366x768."""
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def _shot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot under tmp_path (copied to $CORRAL_CONSOLE_SCREENSHOTS)."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CORRAL_CONSOLE_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["CORRAL_CONSOLE_SCREENSHOTS"]) / path.name)
    return path


def _sign_in(page: Any, api: Api, where: str = "#/runs") -> None:
    page.goto(f"{api.url}/{where}")
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#view-login").wait_for(state="hidden")


def _finished(api: Api, run_id: str) -> dict[str, Any]:
    run = api.client.get(f"/api/runs/{run_id}", params={"wait_s": 20}).json()
    assert run["status"] in ("succeeded", "failed", "cancelled"), run
    return run


def _node(page: Any, node_id: str) -> Any:
    """The card of node `node_id` on a run's page."""
    return page.locator("article.node").filter(has=page.locator(f"h3:text-is('{node_id}')"))


# -- the tests -----------------------------------------------------------------------------


def test_the_page_loads_without_the_token_and_signs_in_with_it(page, api: Api, tmp_path):
    """The page and its assets answer anyone (they hold no data); the data endpoints do not.
    A wrong token is refused in words; the right one opens the runs, kept for the session."""
    with httpx.Client(base_url=api.url, timeout=10) as anonymous:
        for path, kind in (("/", "text/html"), ("/console/console.js", "text/javascript"),
                           ("/console/console.css", "text/css")):  # fmt: skip
            answer = anonymous.get(path)
            assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert "script-src 'self'" in anonymous.get("/").headers["content-security-policy"]
        assert anonymous.get("/api/runs").status_code == 401
        assert anonymous.get("/console/other.js").status_code == 401
    page.goto(f"{api.url}/")
    token = page.get_by_label("API token")
    token.fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    refused = page.locator("#login-error")
    refused.wait_for()
    assert "refused" in refused.inner_text()
    _shot(page, tmp_path, "login")
    token.fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Runs").wait_for()
    assert page.evaluate("sessionStorage.getItem('corral.token')") == TOKEN
    page.reload()  # the same tab keeps it: no second prompt
    page.get_by_role("heading", name="Runs").wait_for()
    assert page.locator("#view-login").is_hidden()
    assert TOKEN not in page.content()


def test_a_coverage_warning_follows_generic_executor_enabled(
    page, api: Api, catalog: Path, tmp_path
):
    """With GENERIC_EXECUTOR_ENABLED off, `listing` (no handler) warns in words that
    nothing runs it; an API with the flag on shows it covered by the generic executor."""
    _sign_in(page, api, "#/capabilities")
    listing = page.locator("tr[data-operation='svc.listing']")
    warning = listing.locator(".coverage-warning")
    warning.wait_for()
    assert "Warning: no runtime coverage" in warning.inner_text()
    assert "GENERIC_EXECUTOR_ENABLED" in warning.inner_text()
    call = page.locator("tr[data-operation='svc.call']")
    assert "bespoke handler" in call.inner_text() and call.locator(".coverage-warning").count() == 0
    assert "off" in page.locator("#caps-flag").inner_text()
    _shot(page, tmp_path, "capabilities-off")
    env = _env(catalog, tmp_path / "state", GENERIC_EXECUTOR_ENABLED="true")
    with running_api(env) as generic:
        _sign_in(page, generic, "#/capabilities")
        listing = page.locator("tr[data-operation='svc.listing']")
        listing.wait_for()
        assert "generic executor" in listing.inner_text()
        assert listing.locator(".coverage-warning").count() == 0
        assert "on" in page.locator("#caps-flag strong").inner_text()
        _shot(page, tmp_path, "capabilities-on")


def test_a_run_started_from_the_console_finishes_live_on_its_page(
    page, api: Api, service, tmp_path
):
    """Start a run from the runs page: its page shows it running, then succeeded, from the
    event stream, without a reload; hostile output is shown as text."""
    assert api.client.put("/api/workflows/live", json=_workflow("live", "ok/a", "block/live"))
    _sign_in(page, api)
    page.get_by_text("Start a run").click()
    page.get_by_label("Stored workflow").select_option("live")
    page.get_by_role("button", name="Start run").click()
    page.wait_for_url("**/#/run/**")
    facts = page.locator("#run-facts")
    facts.get_by_text("running", exact=True).wait_for()
    _node(page, "n1").get_by_text("running", exact=True).wait_for()
    page.evaluate("window.sameDocument = true")
    service.gate("block/live").set()
    facts.get_by_text("succeeded", exact=True).wait_for()
    assert page.evaluate("window.sameDocument") is True, "the page was reloaded"
    assert page.locator("#run-live").inner_text().startswith("Finished: succeeded")
    events = page.locator("#run-events").inner_text()
    assert "node.started" in events and "run.finished" in events
    first = _node(page, "n0")
    assert "no dependencies" in first.inner_text()
    assert "depends on n0" in _node(page, "n1").inner_text()
    first.get_by_text("Output").click()
    assert "<script>window.pwned = 1</script>" in first.locator("pre.output").inner_text()
    assert page.evaluate("window.pwned") is None
    first.get_by_text("Logs (1 line, redacted)").click()
    assert "calling ok/a" in first.locator("pre.logs").inner_text()
    assert page.get_by_role("button", name="Retry run").is_disabled()
    _shot(page, tmp_path, "run")


def test_a_failed_run_retried_from_the_list_replays_its_finished_node(page, api: Api, tmp_path):
    """A run whose second node fails once is listed failed; retried with its checkbox and
    "Retry selected", it succeeds, its first node shown as replayed."""
    assert api.client.put("/api/workflows/flaky", json=_workflow("flaky", "ok/f", "flaky/f"))
    api.client.post("/api/workflows/flaky/runs", json={"run_id": "flaky-1"})
    assert _finished(api, "flaky-1")["status"] == "failed"
    _sign_in(page, api)
    page.get_by_label("Status").select_option("failed")
    page.get_by_label("Workflow", exact=True).fill("flaky")
    page.get_by_role("button", name="Apply filters").click()
    row = page.locator("#runs-table tbody tr").filter(has_text="flaky-1")
    row.get_by_text("failed", exact=True).wait_for()
    assert row.get_by_text("http_error").count() == 1
    _shot(page, tmp_path, "runs")
    page.get_by_label("Select run flaky-1").check()
    page.get_by_role("button", name="Retry selected").click()
    page.locator("#bulk-result").get_by_text("flaky-1: queued").wait_for()
    page.get_by_label("Status").select_option("")  # (it is no longer failed)
    page.get_by_role("button", name="Apply filters").click()
    row.get_by_role("link", name="flaky-1").click()
    page.locator("#run-facts").get_by_text("succeeded", exact=True).wait_for()
    replayed = _node(page, "n0")
    replayed.get_by_text("yes, replayed from the store").wait_for()
    assert "bespoke" in replayed.inner_text()
    assert _node(page, "n1").locator("[data-fact='Replayed'] dd").inner_text() == "no"
    assert api.client.get("/api/runs/flaky-1").json()["attempts"] == 2
    _shot(page, tmp_path, "run-retried")


def test_runs_page_with_the_cursor_and_cancel_in_bulk(page, api: Api, service, tmp_path):
    """Six runs at five a page: the newest five, then the oldest one, then back. Two runs
    held by the service (or still queued) are ticked and cancelled with "Cancel selected"."""
    assert api.client.put("/api/workflows/paged", json=_workflow("paged", "ok/p"))
    ids = [f"paged-{n}" for n in range(6)]
    for run_id in ids:
        api.client.post("/api/workflows/paged/runs", json={"run_id": run_id})
    for run_id in ids:
        _finished(api, run_id)
    _sign_in(page, api)
    page.get_by_label("Workflow", exact=True).fill("paged")
    page.get_by_label("Per page").select_option("5")
    page.get_by_role("button", name="Apply filters").click()
    links = page.locator("#runs-table tbody a")
    playwright_sync.expect(links).to_have_text(list(reversed(ids))[:5], timeout=WAIT_MS)
    assert page.get_by_role("button", name="Newer runs").is_disabled()
    page.get_by_role("button", name="Older runs").click()
    page.get_by_role("link", name="paged-0").wait_for()
    assert links.all_inner_texts() == ["paged-0"]
    assert page.locator("#page-number").inner_text() == "Page 2"
    assert page.get_by_role("button", name="Older runs").is_disabled()
    page.get_by_role("button", name="Newer runs").click()
    page.get_by_role("link", name="paged-5").wait_for()

    assert api.client.put("/api/workflows/held", json=_workflow("held", "block/held"))
    for n in range(2):
        api.client.post("/api/workflows/held/runs", json={"run_id": f"held-{n}"})
    page.get_by_label("Workflow", exact=True).fill("held")
    page.get_by_role("button", name="Apply filters").click()
    for n in range(2):
        page.get_by_role("link", name=f"held-{n}").wait_for()
        page.get_by_label(f"Select run held-{n}").check()
    page.get_by_role("button", name="Cancel selected").click()
    result = page.locator("#bulk-result")
    result.get_by_text("held-0: cancelled").wait_for()
    assert "held-1: cancelled" in result.inner_text()
    cancelled = page.locator("#runs-table tbody").get_by_text("cancelled", exact=True)
    cancelled.nth(1).wait_for()  # the list, reloaded, shows both cancelled
    assert [_finished(api, f"held-{n}")["status"] for n in range(2)] == ["cancelled"] * 2


def test_the_playground_explains_a_memory_limit_kill(page, api: Api, tmp_path):
    """Code that hoards memory over a 32 MB limit ends as memory_limit, explained in words
    with the limit and the variable to raise."""
    _sign_in(page, api, "#/playground")
    page.get_by_label("Connector code").fill(HOG)
    page.get_by_label("Params (JSON object)").fill("{}")
    page.get_by_label("Memory (MB)").fill("32")
    page.get_by_role("button", name="Run in the sandbox").click()
    outcome = page.locator("#play-outcome")
    explained = outcome.locator(".explain")
    explained.wait_for()
    text = explained.inner_text()
    assert "memory_limit" in text and "memory limit" in text
    assert "SANDBOX_MAX_MEMORY_MB" in text and "Memory (MB)" in text
    assert "failed" in outcome.inner_text() and "Peak memory" in outcome.inner_text()
    assert "null" not in outcome.inner_text()
    _shot(page, tmp_path, "playground")


def test_health_shows_queue_workers_events_and_resets_an_open_breaker(page, api: Api, tmp_path):
    """Two failing runs open their node's breaker: Health lists it open (in words), with the
    failed attempts among the recent events; Reset closes it. The inline worker is fresh."""
    definition = _workflow("down", "down/h")
    definition["nodes"][0]["id"] = "failing"  # its own breaker: no other test's node shares it
    assert api.client.put("/api/workflows/down", json=definition)
    for n in range(2):
        api.client.post("/api/workflows/down/runs", json={"run_id": f"down-{n}"})
        assert _finished(api, f"down-{n}")["status"] == "failed"
    _sign_in(page, api, "#/health")
    page.locator("#health-updated").get_by_text("Updated").wait_for()  # every part shown
    breakers = page.locator("#health-breakers")
    breakers.get_by_text("open", exact=True).wait_for()
    assert "fresh" in page.locator("#health-workers").inner_text()
    assert "waiting" in page.locator("#health-queue").inner_text()
    events = page.locator("#health-events")
    assert "attempt failed" in events.inner_text() and "down-1" in events.inner_text()
    assert "failing" in breakers.inner_text()
    assert "ready" in page.locator("#health-ready").inner_text()
    _shot(page, tmp_path, "health")
    breakers.get_by_role("button", name="Reset breaker").first.click()
    breakers.get_by_text("No breaker is open").wait_for()
    assert api.client.get("/api/breakers").json()["breakers"] == []


def test_no_page_has_a_serious_accessibility_violation(browser, api: Api, tmp_path):
    """axe-core on every page (sign-in, runs, a run, capabilities, health, playground with a
    result): no serious or critical violation. The run's node killed for memory is explained
    with the variable to raise."""
    assert AXE_JS.is_file(), (
        f"axe-core is missing at {AXE_JS}: .ci/run fetches it from the npm registry "
        "(or set CORRAL_AXE_JS to an axe.min.js)"
    )
    source = AXE_JS.read_text()
    definition = _workflow("axe", "ok/x")
    definition["nodes"].append(
        {"id": "hog", "app": "svc", "function": "hog", "params": {}, "dependsOn": ["n0"]}
    )
    assert api.client.put("/api/workflows/axe", json=definition)
    api.client.post("/api/workflows/axe/runs", json={"run_id": "axe-1"})
    _finished(api, "axe-1")
    # The page's own CSP allows only its own script: axe is injected past it, in this context.
    context = browser.new_context(viewport={"width": 1366, "height": 768}, bypass_csp=True)
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    found: dict[str, list[str]] = {}

    def check(name: str) -> None:
        tab.add_script_tag(content=source)
        result = tab.evaluate("async () => await axe.run(document)")
        found[name] = [
            f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']][:3]}"
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        _shot(tab, tmp_path, f"axe-{name}")

    try:
        tab.goto(f"{api.url}/")
        tab.get_by_label("API token").wait_for()
        check("login")
        tab.get_by_label("API token").fill(TOKEN)
        tab.get_by_role("button", name="Sign in").click()
        tab.locator("#runs-table tbody tr").first.wait_for()
        check("runs")
        tab.goto(f"{api.url}/#/run/axe-1")
        tab.locator("#run-live").get_by_text("Finished").wait_for()
        explained = _node(tab, "hog").locator(".explain").inner_text()
        assert "memory_limit" in explained and "SANDBOX_MAX_MEMORY_MB" in explained
        check("run")
        tab.goto(f"{api.url}/#/capabilities")
        tab.locator(".coverage-warning").first.wait_for()
        check("capabilities")
        tab.goto(f"{api.url}/#/health")
        tab.locator("#health-updated").get_by_text("Updated").wait_for()
        check("health")
        tab.goto(f"{api.url}/#/playground")
        tab.get_by_role("button", name="Run in the sandbox").click()
        tab.locator("#play-outcome").get_by_text("succeeded").wait_for()
        check("playground")
    finally:
        context.close()
    assert found and not any(found.values()), found
