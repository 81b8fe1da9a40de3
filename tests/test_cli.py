"""The `corral run` command: JSON contract, human summary, exit statuses, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import corral, leftovers, running_execution_pid

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello.py"
JSON_KEYS = ["ok", "output", "logs", "executor", "usage", "error"]


@pytest.fixture
def connector(tmp_path: Path):
    """Write a connector file and return its path."""

    def write(source: str) -> str:
        path = tmp_path / "connector.py"
        path.write_text(source)
        return str(path)

    return write


def test_json_success_is_one_object_with_the_contract_keys():
    """--json prints exactly one JSON object with the keys of DESIGN §5, exit 0."""
    done = corral("run", str(EXAMPLE), "--params", '{"name": "ada"}', "--max-memory-mb", "64",
                  "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert list(document) == JSON_KEYS
    assert document["ok"] is True and document["error"] is None
    assert document["output"]["greeting"] == "hello, ada"
    assert document["logs"] == [{"level": "info", "message": "greeting ada"}]
    assert document["executor"] == "process"
    assert list(document["usage"]) == ["wall_ms", "cpu_ms", "peak_memory_bytes"]


def test_json_failure_carries_the_error_type(connector):
    """A failed execution prints ok=false, output null and the error object; exit 1."""
    path = connector("def run(params, context):\n    while True:\n        pass\n")
    done = corral("run", path, "--max-cpu-ms", "200", "--json")
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)
    assert list(document) == JSON_KEYS
    assert (document["ok"], document["output"]) == (False, None)
    assert document["error"]["type"] == "cpu_limit"
    assert document["usage"]["cpu_ms"] >= 200


def test_human_summary(connector):
    """Without --json the command prints a short summary, the output and the logs."""
    done = corral("run", str(EXAMPLE), "--params", '{"name": "ada"}', "--max-memory-mb", "64")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ok  process · ")
    assert lines[1].startswith('output: {"greeting": "hello, ada"')
    assert lines[2:] == ["logs:", "  info  greeting ada"]


def test_missing_entry_point_is_invalid_input(connector):
    """--entry naming a function the file lacks is invalid_input, exit 1."""
    done = corral("run", str(EXAMPLE), "--entry", "nope", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["type"] == "invalid_input"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/no/such/file.py"], "corral run: cannot read /no/such/file.py"),
        (["run", str(EXAMPLE), "--params", "{bad"], "corral run: --params is not valid JSON"),
        (["run", str(EXAMPLE), "--context", "[1"], "corral run: --context is not valid JSON"),
        (["run", str(EXAMPLE), "--max-memory-mb", "-3"], "expected a positive whole number"),
        (["run", str(EXAMPLE), "--executor", "fork"], "invalid choice: 'fork'"),
        (["run"], "the following arguments are required: FILE"),
    ],
)
def test_bad_command_lines_exit_2_without_traceback(args, message):
    """A wrong command line exits 2 with a message saying what is wrong, and no traceback."""
    done = corral(*args, "--json") if args != ["run"] else corral(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_bad_env_var_exits_2_with_one_line():
    """A bad env var stops the command with one line naming it, exit 2."""
    done = corral("run", str(EXAMPLE), env={"SANDBOX_MAX_MEMORY_MB": "abc"})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("corral: SANDBOX_MAX_MEMORY_MB='abc' is invalid")


def test_secrets_are_redacted(connector):
    """--secret values never reach stdout."""
    path = connector("def run(params, context):\n    log(params['t'])\n    return params['t']\n")
    done = corral("run", path, "--params", '{"t": "s3cr3t-value"}', "--secret", "s3cr3t-value",
                  "--json")  # fmt: skip
    assert "s3cr3t-value" not in done.stdout
    assert json.loads(done.stdout)["output"] == "[redacted]"


def test_sigterm_aborts_and_cleans_up(connector):
    """SIGTERM to `corral run` kills the execution, reports `aborted` and exits 1."""
    path = connector("import time\ndef run(params, context):\n    time.sleep(60)\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", path, "--json", "--timeout-ms", "60000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    running_execution_pid(process.pid)  # the execution is under way
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    document = json.loads(stdout)
    assert document["error"] == {"type": "aborted", "message": "interrupted by SIGTERM"}
    assert leftovers(process.pid) == (set(), set())


def test_help_reads_well():
    """`corral run --help` lists the contract's options."""
    done = corral("run", "--help")
    assert done.returncode == 0
    for option in (
        "--entry",
        "--params",
        "--context",
        "--executor",
        "--timeout-ms",
        "--max-cpu-ms",
        "--cpu-quota-ms",
        "--max-memory-mb",
        "--heartbeat-interval-ms",
        "--heartbeat-timeout-ms",
        "--secret",
        "--json",
    ):
        assert option in done.stdout  # fmt: skip


def test_connector_text_cannot_drive_the_terminal(connector):
    """Control characters and lone surrogates in logs are escaped in the human summary."""
    path = connector(
        "def run(params, context):\n"
        "    log('\\r\\x1b[2Kok  fake \\x1b]0;owned\\x07', '\\ud800')\n"
        "    return 1\n"
    )
    done = corral("run", path)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\r" not in done.stdout
    assert "\\x1b[2Kok  fake" in done.stdout and "\\ud800" in done.stdout
    document = json.loads(corral("run", path, "--json").stdout)
    assert document["logs"][0]["message"].endswith("\\ud800")


@pytest.mark.parametrize("executor", ["process", "worker"])
def test_selftest_proves_every_limit_here(executor):
    """`corral selftest --json` passes on this host: every limit row is enforced."""
    done = corral("selftest", "--executor", executor, "--json",
                  env={"SANDBOX_MAX_MEMORY_MB": "64"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    rows = {row["proves"]: row["status"] for row in report["checks"] if row["proves"]}
    assert rows == {
        "cpu_limit": "enforced", "memory_limit": "enforced", "timeout": "enforced",
        "heartbeat_timeout": "enforced", "output_limit": "enforced",
        "policy_violation": "enforced",
    }  # fmt: skip
    assert report["executor"] == executor


def test_selftest_table_reads_well():
    """Without --json, selftest prints one row per check and a verdict."""
    done = corral("selftest", env={"SANDBOX_MAX_MEMORY_MB": "64"})
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("corral selftest: process backend, ")
    assert any(line.startswith("memory limit") and "enforced" in line for line in lines)
    assert lines[-1] == "ok"


def test_selftest_says_what_is_degraded_and_why():
    """Without cgroups, selftest marks the rows that need them degraded and says what to do."""
    done = corral(
        "selftest", "--json", env={"CORRAL_CGROUPS": "off", "SANDBOX_MAX_MEMORY_MB": "64"}
    )
    report = json.loads(done.stdout)
    rows = {row["check"]: row for row in report["checks"]}
    assert rows["cgroups"]["status"] == "degraded"
    for name in ("cgroups", "cpu quota", "memory limit"):  # each says what to do
        assert rows[name]["status"] == "degraded"
        assert "CORRAL_CGROUPS=off): unset it" in rows[name]["detail"], rows[name]
    assert rows["cpu limit"]["status"] == "enforced"
    assert done.returncode == 0  # degraded still holds; only a failed check fails the run


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`corral registry | head -1`: when the reader closes the pipe, corral stops quietly."""
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "registry"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # before corral writes a line: its first write finds no reader
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert process.returncode == 1
