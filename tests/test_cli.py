"""The `corral run` command: JSON contract, human summary, exit statuses, signals."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import corral, leftovers, running_execution_pid, serving

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello.py"
JSON_KEYS = ["ok", "output", "logs", "executor", "usage", "error", "isolation"]


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
    """A wrong command line exits 2 with a message saying what is wrong, and no traceback;
    with --json, stdout is exactly one object with an invalid_input error."""
    done = corral(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    done = corral(*args, "--json")
    assert done.returncode == 2 and message in done.stderr
    document = json.loads(done.stdout)
    assert list(document) == JSON_KEYS
    assert (document["ok"], document["output"]) == (False, None)
    assert document["error"]["type"] == "invalid_input"
    assert message.removeprefix("corral run: ") in document["error"]["message"]


@pytest.mark.parametrize(
    "args",
    [
        ["workflow", "run", "/no/such/workflow.json"],
        ["catalog", "validate", "--dir", "/no/such/folder"],
        ["registry", "--bogus"],
    ],
)
def test_other_commands_print_one_json_object_on_exit_2(args):
    """Every command's --json prints one object on exit 2: ok false, an invalid_input error."""
    done = corral(*args, "--json")
    assert done.returncode == 2
    document = json.loads(done.stdout)
    assert document["ok"] is False and document["error"]["type"] == "invalid_input"
    assert document["error"]["message"] in done.stderr


def test_a_bad_env_var_under_json_is_one_object():
    """A bad env var with --json: one JSON object naming the variable, exit 2."""
    done = corral("run", str(EXAMPLE), "--json", env={"SANDBOX_EXECUTOR": "banana"})
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "invalid_input"
    assert error["message"].startswith("SANDBOX_EXECUTOR='banana' is invalid")


def test_params_must_be_an_object():
    """--params that is valid JSON but not an object is invalid_input before anything runs."""
    done = corral("run", str(EXAMPLE), "--params", "[1,2]", "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"] == {
        "type": "invalid_input", "message": "--params must be a JSON object, got [1, 2]",
    }  # fmt: skip


def test_limit_errors_of_limits_name_the_flags():
    """A bad heartbeat flag is answered in flags and env vars, not the Python API's names."""
    done = corral("run", str(EXAMPLE), "--heartbeat-timeout-ms", "10")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "corral run: --heartbeat-timeout-ms 10 is invalid: expected at least twice "
        "--heartbeat-interval-ms (500; also SANDBOX_HEARTBEAT_INTERVAL_MS)"
    )


@pytest.mark.parametrize(
    ("source", "flags", "error_type", "advice"),
    [
        ("def run(params, context):\n    while True:\n        pass\n",
         ["--max-cpu-ms", "100"], "cpu_limit", "raise it with --max-cpu-ms or SANDBOX_MAX_CPU_MS"),
        ("def run(params, context):\n    b = 'x' * (200 << 20)\n    return len(b)\n",
         [], "memory_limit", "raise it with --max-memory-mb or SANDBOX_MAX_MEMORY_MB"),
        ("import time\ndef run(params, context):\n    time.sleep(5)\n",
         ["--timeout-ms", "300"], "timeout", "raise it with --timeout-ms"),
    ],
)  # fmt: skip
def test_limit_errors_say_how_to_raise_the_limit(connector, source, flags, error_type, advice):
    """cpu_limit, memory_limit and timeout name the flag (and env var) that raises them."""
    done = corral("run", connector(source), "--max-memory-mb", "64", *flags, "--json")
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["type"] == error_type
    assert error["message"].endswith(f"({advice})"), error["message"]


def test_the_memory_warning_names_the_flag():
    """Without a memory limit, the one warning names --max-memory-mb, not the Python API."""
    done = corral("run", str(EXAMPLE), env={"SANDBOX_MAX_MEMORY_MB": ""})
    assert done.returncode == 0
    assert done.stderr == (
        "corral: warning: executions have no memory limit; pass --max-memory-mb N "
        "or set SANDBOX_MAX_MEMORY_MB\n"
    )


def test_a_bad_setting_is_the_only_line():
    """A bad CORRAL_EGRESS_ALLOW is one line on stderr: no warning comes before it."""
    done = corral("run", str(EXAMPLE), env={"CORRAL_EGRESS_ALLOW": "bad..domain"})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "CORRAL_EGRESS_ALLOW" in done.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SANDBOX_EXECUTOR": "banana"},
         "corral: SANDBOX_EXECUTOR='banana' is invalid: unknown executor; expected process "
         "(also proc, child_process, processes) or worker (also worker_thread, worker-threads, "
         "thread)"),
        ({"SANDBOX_CGROUP_ROOT": "../../etc"},
         "corral: SANDBOX_CGROUP_ROOT='../../etc' is invalid: '..' would leave the cgroup "
         "hierarchy; expected a cgroup path such as 'corral' or '/system.slice/corral'"),
    ],
)  # fmt: skip
def test_bad_settings_are_said_once(env, message):
    """A bad SANDBOX_EXECUTOR lists the names once; a cgroup root with '..' is refused."""
    done = corral("run", str(EXAMPLE), env=env)
    assert done.returncode == 2
    assert done.stderr == message + "\n"


def test_a_one_argument_entry_point_is_told_its_signature(connector):
    """`def run(params):` is invalid_input saying the entry point takes (params, context)."""
    done = corral("run", connector("def run(params):\n    return 1\n"), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"] == {
        "type": "invalid_input",
        "message": "entry point run(params) must take (params, context): corral calls it as "
        "run(params, context)",
    }


def test_version_and_code_on_stdin():
    """`corral --version` prints the version; `corral run -` reads the code from stdin."""
    done = corral("--version")
    assert done.returncode == 0 and done.stdout.startswith("corral 0.")
    done = subprocess.run(
        [sys.executable, "-m", "corral", "run", "-", "--json", "--max-memory-mb", "64"],
        input="def run(params, context):\n    return {'from': 'stdin'}\n",
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == {"from": "stdin"}


def test_the_isolation_in_force_is_shown():
    """The JSON carries `isolation`, and the human summary ends with it."""
    document = json.loads(corral("run", str(EXAMPLE), "--json").stdout)
    assert document["isolation"] in ("cgroup-v1", "cgroup-v2")
    degraded = corral("run", str(EXAMPLE), "--json", env={"CORRAL_CGROUPS": "off"})
    assert json.loads(degraded.stdout)["isolation"].startswith("degraded: ")
    lines = corral("run", str(EXAMPLE)).stdout.splitlines()
    assert lines[0].endswith(f" · {document['isolation']}")


def test_a_log_flood_is_shortened_on_the_terminal(connector):
    """Without --json, a long log shows its first and last lines and a count between."""
    path = connector(
        "def run(params, context):\n"
        "    for i in range(500):\n"
        "        log('line', i)\n"
        "    return 1\n"
    )
    lines = corral("run", path).stdout.splitlines()
    logs = lines[lines.index("logs:") + 1 :]
    assert logs[:2] == ["  info  line 0", "  info  line 1"]
    assert logs[10] == "  ... 480 more lines (500 in all; --json prints every one)"
    assert logs[-1] == "  info  line 499" and len(logs) == 21
    assert len(json.loads(corral("run", path, "--json").stdout)["logs"]) == 500


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


@pytest.mark.parametrize("executor", ["process", "worker"])
def test_an_interrupted_run_keeps_its_logs_and_usage(connector, executor):
    """SIGINT mid-execution reports `aborted` with the lines logged so far and the usage."""
    path = connector(
        "import time\ndef run(params, context):\n    log('started')\n    time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", path, "--json", "--timeout-ms", "60000",
         "--executor", executor, "--heartbeat-interval-ms", "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    running_execution_pid(process.pid)  # a child in its cgroup: it may not have its request yet
    time.sleep(1.5)  # log lines travel with the heartbeat, every 25 ms here
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    document = json.loads(stdout)
    assert document["error"] == {"type": "aborted", "message": "interrupted by SIGINT"}
    assert document["logs"] == [{"level": "info", "message": "started"}]
    assert document["usage"]["wall_ms"] >= 300
    assert leftovers(process.pid) == (set(), set())


def test_selftest_gives_no_memory_warning():
    """`corral selftest` sets its own memory limits, so it does not warn that there is none."""
    done = corral("selftest", "--json", env={"SANDBOX_MAX_MEMORY_MB": ""})
    assert "no memory limit" not in done.stderr, done.stderr


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


# -- corral workflow run: the README's example -------------------------------------------

WORKFLOW = EXAMPLE.parent / "workflow"
TRIAGE_INPUT = '{"title": "Checkout is slow", "body": "p95 doubled"}'


def _stand_in() -> type:
    """The README example's local stand-in for GitHub and Slack (examples/workflow)."""
    spec = importlib.util.spec_from_file_location("run_offline", WORKFLOW / "run_offline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeApis


def test_the_shipped_connections_file_asks_for_its_tokens(tmp_path):
    """The README's workflow command, as written, stops before anything runs (exit 2) and
    says which credential the shipped connections file still lacks."""
    done = corral("workflow", "run", str(WORKFLOW / "triage.json"), "--input", TRIAGE_INPUT,
                  "--connections", f"@{WORKFLOW / 'connections.json'}", "--json",
                  cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout)["error"] == {
        "type": "invalid_input",
        "message": "connections: the github connection needs credentials.token or "
        "credentials.access_token or credentials.api_key (bearer auth)",
    }
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was stored


def test_a_connection_no_node_uses_is_invalid_input(tmp_path):
    """A connection for an app no node uses (a typo) names it and the apps the workflow uses."""
    done = corral("workflow", "run", str(WORKFLOW / "triage.json"), "--input", TRIAGE_INPUT,
                  "--connections", '{"githubb": {"credentials": {"token": "t0k3n"}}}',
                  cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "corral workflow: connections: no node of workflow 'triage' uses the app 'githubb'; "
        "it uses github, slack\n"
    )


def test_the_shipped_connections_file_runs_once_filled_in(tmp_path):
    """The shipped connections file with tokens filled in (and pointed at a local stand-in)
    runs the README's workflow command to success."""
    connections = json.loads((WORKFLOW / "connections.json").read_text())
    with serving(_stand_in()) as server:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        connections["github"].update(baseUrl=base, credentials={"token": "ghp_test_token"})
        connections["slack"].update(baseUrl=f"{base}/api", credentials={"token": "xoxb-test"})
        (tmp_path / "connections.json").write_text(json.dumps(connections))
        done = corral("workflow", "run", str(WORKFLOW / "triage.json"), "--input", TRIAGE_INPUT,
                      "--connections", "@connections.json", "--json", cwd=tmp_path,
                      env={"CORRAL_EGRESS_ALLOW": "127.0.0.1", "SANDBOX_MAX_MEMORY_MB": "64",
                           "CORRAL_STATE_DIR": str(tmp_path / "state")})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded"
    assert run["nodes"]["notify"]["metadata"]["attempts"] == 2  # the stand-in's first 503


def test_a_workflow_file_that_is_not_json_is_named(tmp_path):
    """A workflow file that is not JSON is named by its path, not as FILE."""
    path = tmp_path / "broken.json"
    path.write_text("{")
    done = corral("workflow", "run", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"corral workflow: {path} is not valid JSON: ")


def test_selftest_rows_hold_under_a_small_cpu_limit():
    """A deployment's small SANDBOX_MAX_CPU_MS is what the CPU row proves; it does not stop
    the memory, quota or heartbeat rows before they prove theirs (nor crash the command)."""
    done = corral("selftest", "--json", env={"SANDBOX_MAX_CPU_MS": "50"})
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert {row["check"]: row["status"] for row in report["checks"]} == dict.fromkeys(
        [row["check"] for row in report["checks"]], "enforced"
    ), report
