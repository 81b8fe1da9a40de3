"""What a short-lived command loads: `import corral` and `corral run` start fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello.py"
#: Imported on first use only: the validation library (settings, catalog schema), the
#: HTTP client (a request through `http`), the process inspector (degraded-mode polling),
#: the runtime's schema checks and Redis client.
HEAVY = ("pydantic", "httpx", "psutil", "jsonschema", "redis")


def _loaded_after(statement: str) -> dict:
    """Which of HEAVY a fresh interpreter holds after `statement`, and what it printed."""
    probe = (
        "import contextlib, io, json, sys\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    {statement}\n"
        f"print(json.dumps({{'loaded': [m for m in {HEAVY!r} if m in sys.modules], "
        "'out': out.getvalue()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_import_corral_loads_nothing_heavy():
    """`import corral` imports none of the heavy dependencies; its names still resolve."""
    assert _loaded_after("import corral")["loaded"] == []
    assert _loaded_after("import corral; corral.NodeSandbox, corral.FLAGS")["loaded"] == []


def test_corral_run_loads_nothing_it_does_not_use():
    """`corral run` of a connector that sends no request imports no validation library and
    no HTTP client."""
    probe = _loaded_after(
        f"from corral.cli import main; main(['run', {str(EXAMPLE)!r}, '--json', "
        "'--max-memory-mb', '64'])"
    )
    assert json.loads(probe["out"])["ok"] is True
    assert probe["loaded"] == []
