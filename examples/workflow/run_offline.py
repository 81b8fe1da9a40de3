"""Run examples/workflow/triage.json offline: a small local server on 127.0.0.1 stands in
for GitHub and Slack, and the connections point the shipped connectors at it.

    python3 examples/workflow/run_offline.py

Its first Slack call answers 503, so the run shows a retry. Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent


class FakeApis(http.server.BaseHTTPRequestHandler):
    """POST /repos/{owner}/{repo}/issues (GitHub) and POST /api/chat.postMessage (Slack)."""

    slack_calls = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        status, answer = 404, {"message": "Not Found"}
        if self.path.startswith("/repos/") and self.path.endswith("/issues"):
            owner_repo = self.path.removeprefix("/repos/").removesuffix("/issues")
            status, answer = (
                201,
                {
                    "number": 42,
                    "title": body.get("title"),
                    "html_url": f"https://github.example/{owner_repo}/issues/42",
                },
            )
        elif self.path == "/api/chat.postMessage":
            FakeApis.slack_calls += 1
            if FakeApis.slack_calls == 1:
                status, answer = 503, {"ok": False, "error": "service_unavailable"}
            else:
                status, answer = 200, {"ok": True, "channel": body.get("channel"), "ts": "1.2"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


async def _run(workflow: dict, connections: dict) -> dict:
    from corral import WorkflowRuntime

    async with WorkflowRuntime() as runtime:
        outcome = await runtime.run_workflow(
            workflow,
            input={"title": "Checkout is slow", "body": "p95 doubled since Monday"},
            connections=connections,
        )
        return outcome.to_dict()


def main() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApis)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    os.environ.setdefault("CORRAL_EGRESS_ALLOW", "127.0.0.1")  # the fake APIs are local
    os.environ.setdefault("SANDBOX_MAX_MEMORY_MB", "64")
    # The shipped connections file, pointed at the stand-in, with example tokens filled in.
    connections = json.loads((HERE / "connections.json").read_text())
    connections["github"].update(baseUrl=base, credentials={"token": "ghp_example_token_1234"})
    connections["slack"].update(baseUrl=f"{base}/api", credentials={"token": "xoxb-example"})
    workflow = json.loads((HERE / "triage.json").read_text())
    try:
        with tempfile.TemporaryDirectory(prefix="corral-example-") as state_dir:
            os.environ.setdefault("CORRAL_STATE_DIR", state_dir)
            result = asyncio.run(_run(workflow, connections))
    finally:
        server.shutdown()
        server.server_close()
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
