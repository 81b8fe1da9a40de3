"""A tour of the service: start `corral stack` on the embedded default, store two
connections and a workflow, start a run, follow it live, and find it in /metrics.

    python3 examples/service_tour.py [--port 8080] [--exit]

The workflow is examples/workflow/triage.json (GitHub, then Slack); a stand-in for both
APIs runs on 127.0.0.1 (examples/workflow/run_offline.py's), so nothing leaves the machine,
and the stack is started with CORRAL_EGRESS_ALLOW=127.0.0.1 so that its sandbox may call
it. Its first Slack call answers 503: the run shows a retry. Unless --exit is given, the
stack keeps running afterwards, with the web console at its address, until Ctrl-C.
The state (runs, the stored workflow, the encrypted credentials) lives in a temporary
CORRAL_STATE_DIR, removed at the end, unless CORRAL_STATE_DIR is set.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "workflow"))
from run_offline import FakeApis  # noqa: E402  (the stand-in for GitHub and Slack)

READY = re.compile(r"corral stack: ready: api (http://[^\s,]+)")
STACK_START_S = 120


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def stand_in() -> Iterator[str]:
    """The stand-in APIs on 127.0.0.1; their base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApis)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def stack(port: int, state_dir: str, log: Path) -> Iterator[str]:
    """`corral stack` as a child, its log in `log`; the API's URL once it says ready."""
    env = {
        **os.environ,
        "CORRAL_STATE_DIR": state_dir,
        "CORRAL_API_PORT": str(port),
        "CORRAL_EGRESS_ALLOW": "127.0.0.1",  # the stand-in APIs
        "SANDBOX_MAX_MEMORY_MB": os.environ.get("SANDBOX_MAX_MEMORY_MB", "64"),
    }
    with open(log, "w+", encoding="utf-8") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "corral", "stack"], env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + STACK_START_S
            while not (found := READY.search(log.read_text(encoding="utf-8"))):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"corral stack did not start; its log:\n{log.read_text()}")
                time.sleep(0.1)
            yield found.group(1)
        finally:
            process.send_signal(signal.SIGTERM)  # the stack stops its children, then itself
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def follow(client: httpx.Client, run_id: str) -> None:
    """Print the run's events as they come (server-sent events)."""
    with client.stream("GET", f"/api/runs/{run_id}/events", timeout=120) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                detail = {k: v for k, v in event.items() if k in ("node", "status", "attempt")}
                say(f"  {event.get('event', '?'):<22} {json.dumps(detail)}")


def tour(url: str, apis: str) -> bool:
    """Store, run, follow, measure; whether the run succeeded."""
    token = os.environ.get("CORRAL_API_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        connections = json.loads((HERE / "workflow" / "connections.json").read_text())
        connections["github"].update(baseUrl=apis, credentials={"token": "ghp_example_1234"})
        connections["slack"].update(baseUrl=f"{apis}/api", credentials={"token": "xoxb-ex"})
        for app, connection in connections.items():
            client.put(f"/api/connections/{app}", json=connection).raise_for_status()
        say(f"stored connections: {', '.join(connections)} (credentials encrypted at rest)")
        workflow = json.loads((HERE / "workflow" / "triage.json").read_text())
        client.put(f"/api/workflows/{workflow['id']}", json=workflow).raise_for_status()
        say(f"stored workflow: {workflow['id']} ({len(workflow['nodes'])} nodes)")
        started = client.post(
            f"/api/workflows/{workflow['id']}/runs",
            json={"input": {"title": "Checkout is slow", "body": "p95 doubled since Monday"}},
        )
        started.raise_for_status()
        run_id = started.json()["run_id"]
        say(f"started run {run_id}; its events, live:")
        follow(client, run_id)
        run = client.get(f"/api/runs/{run_id}", params={"wait_s": 30}).json()
        say(f"run {run_id}: {run['status']}")
        for node_id, node in run["nodes"].items():
            meta = node.get("metadata") or {}
            say(f"  {node_id:<14} {node['status']:<10} attempts {meta.get('attempts')}, "
                f"executor {meta.get('executor')}, {meta.get('execution_ms')} ms")  # fmt: skip
        metrics = client.get("/metrics").text
        say("in /metrics:")
        shown = ("corral_runs_total{", "corral_sandbox_executions_total{", "corral_node_attempts")
        for line in metrics.splitlines():
            if line.startswith(shown):
                say(f"  {line}")
        return bool(run["status"] == "succeeded")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="the API's port (0: any free one)")
    parser.add_argument("--exit", action="store_true", help="stop the stack after the tour")
    args = parser.parse_args()
    with contextlib.ExitStack() as resources:
        state_dir = os.environ.get("CORRAL_STATE_DIR") or resources.enter_context(
            tempfile.TemporaryDirectory(prefix="corral-tour-")
        )
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        log = Path(state_dir) / "stack.log"
        say(f"starting corral stack (state in {state_dir}, its log in {log}) …")
        apis = resources.enter_context(stand_in())
        url = resources.enter_context(stack(args.port, state_dir, log))
        say(f"corral stack is ready at {url}")
        succeeded = tour(url, apis)
        if not args.exit:
            say(f"\nThe stack runs on: the web console is at {url}/ . Ctrl-C stops it.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        say("stopping corral stack …")
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
