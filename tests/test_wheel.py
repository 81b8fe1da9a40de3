"""A normal install: a wheel built from this tree, installed into a fresh virtualenv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BUILD_TIMEOUT_S = 240


def _run(
    *command: str | Path, cwd: Path, timeout: float = BUILD_TIMEOUT_S, env: dict | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh virtualenv with a wheel of this tree installed (not -e)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "*.egg-info", "build", "dist", ".corral", "__pycache__", ".*_cache"
        ),
    )
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", work / "dist", source, cwd=work)  # fmt: skip
    (wheel,) = (work / "dist").glob("corral-*.whl")
    base_python = getattr(sys, "_base_executable", sys.executable)
    # The system's site-packages give the dependencies without a download; corral itself must
    # come from the wheel, which the venv's own site-packages put first.
    _run(base_python, "-m", "venv", "--system-site-packages", work / "venv", cwd=work)
    bin_dir = work / "venv" / "bin"
    _run(bin_dir / "python", "-m", "pip", "install", "--quiet", "--no-deps", wheel, cwd=work)
    return bin_dir


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
def test_the_wheel_imports_corral_from_its_own_install(installed: Path, tmp_path: Path):
    """The installed wheel, not the source tree, is what the venv imports."""
    done = _run(installed / "python", "-c", "import corral; print(corral.__file__)", cwd=tmp_path)
    assert done.stdout.strip().startswith(str(installed.parent)), done.stdout


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
def test_the_wheel_ships_the_connector_catalog(installed: Path, tmp_path: Path):
    """After a normal install, `corral registry` and `corral catalog validate` see the shipped
    catalog."""
    registry = json.loads(_run(installed / "corral", "registry", "--json", cwd=tmp_path).stdout)
    assert {"github", "slack", "stripe", "http"} <= set(registry)
    validated = json.loads(
        _run(installed / "corral", "catalog", "validate", "--json", cwd=tmp_path).stdout
    )
    assert validated["ok"] is True and validated["apps"] >= 9, validated
    schema = json.loads(_run(installed / "corral", "catalog", "schema", cwd=tmp_path).stdout)
    assert schema["type"] == "object"


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
def test_the_wheel_runs_the_readme_examples(installed: Path, tmp_path: Path):
    """The README's connector and workflow examples run from the installed wheel, outside the
    source tree, and leave nothing in the working folder."""
    hello = _run(installed / "corral", "run", EXAMPLES / "hello.py", "--params",
                 '{"name": "corral"}', "--max-memory-mb", "64", "--json", cwd=tmp_path)  # fmt: skip
    assert json.loads(hello.stdout)["output"]["greeting"] == "hello, corral"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    workflow = _run(installed / "python", EXAMPLES / "workflow" / "run_offline.py", cwd=work,
                    env={"TMPDIR": str(scratch)})  # fmt: skip
    assert json.loads(workflow.stdout)["status"] == "succeeded", workflow.stdout
    assert list(scratch.iterdir()) == [] and list(work.iterdir()) == []


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
def test_the_wheel_ships_the_web_console(installed: Path, tmp_path: Path):
    """The console's page, script and style sheet are package data of the installed wheel,
    and the app built from it serves them at / without a token."""
    probe = (
        "import json, sys\n"
        "from corral.service.console._router import STATIC\n"
        "from fastapi.testclient import TestClient\n"
        "from corral.config import load_settings\n"
        "from corral.service.api import create_app\n"
        "app = create_app(load_settings())\n"
        "client = TestClient(app)\n"  # no lifespan: the page needs none
        "answers = [client.get(p) for p in ('/', '/console/console.js', '/console/console.css')]\n"
        "files = sorted(p.name for p in STATIC.iterdir())\n"
        "print(json.dumps({'static': str(STATIC), 'files': files, 'page': answers[0].text,\n"
        "                  'codes': [a.status_code for a in answers]}))\n"
    )
    env = {"CORRAL_API_TOKEN": "wheel-token-0123456789", "CORRAL_STATE_DIR": str(tmp_path / "s")}
    shown = json.loads(_run(installed / "python", "-c", probe, cwd=tmp_path, env=env).stdout)
    assert shown["static"].startswith(str(installed.parent)), shown["static"]
    assert shown["files"] == ["console.css", "console.js", "index.html"]
    assert shown["codes"] == [200, 200, 200]
    assert '<script src="/console/console.js" defer></script>' in shown["page"]
