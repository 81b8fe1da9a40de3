"""Runs inside the cgroup v2 VM (as root, started by tests/cgroup2/run): the three cgroup
set-ups, each with corral's selftest on both backends and the limit tests, or a command given.

Each command gets a fresh cgroup tree (every cgroup removed, every controller disabled, then
the set-up made again), so nothing corral changed in one run is there for the next, as when
systemd stops a unit and starts it again. Results go to --results (a directory the host
reads): one log per command, summary.json, and `status` ("0" when every check held), which
the host treats as the proof that the guest got to the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
WORK = Path("/run/corral-ci")  # a tmpfs of our own: everything a command writes goes here
USER = "corral-ci"  # set-up c's unprivileged user, added to the guest's /etc/passwd
SERVICE = CGROUP / "system.slice" / "corral.service"
SYSTEMD_CONTROLLERS = ["cpu", "io", "memory", "pids"]  # the v2 controllers systemd manages
ACCOUNTING = ["memory", "pids"]  # systemd's default accounting, without Delegate=: no cpu
USER_DELEGATED = ["cpu", "memory", "pids"]  # user@.service's Delegate=pids memory cpu
DELEGATED_FILES = ["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"]
SELFTEST_TIMEOUT_S = 300
PYTEST_TIMEOUT_S = 600
#: The set-ups that run every limit test. The others run only the modules whose tests depend
#: on how corral's cgroup subtree was set up (placement, removal, the janitor): past the
#: subtree, an execution takes the same path in b as in a, and the layer must fit CI's time.
FULL_SETUPS = "a"
# The test suite looks into the sandbox's non-dumpable processes from the host, which only
# root may: as set-up c's unprivileged user, corral's selftest is the proof.
SELFTEST_ONLY_SETUPS = "c"
SUBTREE_MODULES = ["tests/test_delegation.py", "tests/test_isolation.py"]
MARGIN_S = 20  # kept back from the budget: resetting the tree and writing the summary

SETUPS = {
    "a": "controllers available at the root, none enabled (no systemd, a container)",
    "b": "a systemd service with Delegate=yes: corral runs in system.slice/corral.service, "
    "its controllers available there but enabled only down to system.slice",
    "c": "a subtree delegated to an unprivileged user (Delegate=yes), corral run as that user",
    "d": "a systemd service without Delegate=: system.slice enables only memory and pids "
    "(optional, not in the default run)",
}


@dataclass
class Outcome:
    """What one command in one set-up did, and whether it held."""

    setup: str
    name: str
    argv: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    problems: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def say(line: str = "") -> None:
    print(line, flush=True)


def banner(text: str) -> None:
    say("")
    say("=" * 78)
    say(text)
    say("=" * 78)


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        return f"<{exc.strerror}>"


def write(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


# -- the cgroup tree -------------------------------------------------------------------------


def cgroups_bottom_up() -> list[Path]:
    """Every cgroup but the root, children before their parents."""
    found = [Path(d) for d, _, _ in os.walk(CGROUP)]
    return sorted((p for p in found if p != CGROUP), key=lambda p: len(p.parts), reverse=True)


def tree() -> list[str]:
    """The cgroup tree, one line per cgroup: enabled controllers, processes and owner."""
    lines = []
    for directory in [CGROUP, *sorted(cgroups_bottom_up())]:
        procs = read(directory / "cgroup.procs").split()
        owner = directory.stat().st_uid
        name = "/" + str(directory.relative_to(CGROUP)).removeprefix(".")
        lines.append(
            f"  {name:<58} subtree_control=[{read(directory / 'cgroup.subtree_control')}]"
            f" procs={len(procs)}" + (f" uid={owner}" if owner else "")
        )
    return lines


def reset() -> list[str]:
    """Back to the tree as booted: kill what is left in any cgroup, remove every cgroup and
    disable every controller at the root. What had to be killed is returned."""
    killed = []
    for directory in cgroups_bottom_up():
        for pid in read(directory / "cgroup.procs").split():
            if pid.isdigit():
                killed.append(f"pid {pid} ({read(Path(f'/proc/{pid}/comm'))}) in {directory}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for directory in cgroups_bottom_up():
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while a killed process is still exiting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    enabled = read(CGROUP / "cgroup.subtree_control").split()
    if enabled:
        write(CGROUP / "cgroup.subtree_control", " ".join(f"-{c}" for c in enabled))
    return killed


def enable(directory: Path, controllers: list[str]) -> None:
    write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))


def user_ids() -> tuple[int, int]:
    """Set-up c's user, added to the guest's /etc/passwd (an overlay: the host's is untouched)."""
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(USER)
        return entry.pw_uid, entry.pw_gid
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    uid = next(n for n in range(1000, 60000) if n not in taken)
    home = WORK / "home"
    with open("/etc/passwd", "a") as passwd:
        passwd.write(f"{USER}:x:{uid}:{uid}:corral CI:{home}:/bin/sh\n")
    with open("/etc/group", "a") as group:
        group.write(f"{USER}:x:{uid}:\n")
    return uid, uid


def prepare(setup: str) -> Path:
    """Make set-up `setup` on a tree as booted; the cgroup its commands start in."""
    if setup == "a":
        return CGROUP
    enable(CGROUP, SYSTEMD_CONTROLLERS)
    if setup in "bd":
        SERVICE.parent.mkdir()
        enable(SERVICE.parent, SYSTEMD_CONTROLLERS if setup == "b" else ACCOUNTING)
        SERVICE.mkdir()
        return SERVICE
    uid, gid = user_ids()
    user_slice = CGROUP / "user.slice"
    delegated = user_slice / f"user-{uid}.slice" / f"user@{uid}.service"
    delegated.mkdir(parents=True)
    enable(user_slice, USER_DELEGATED)
    enable(delegated.parent, USER_DELEGATED)
    os.chown(delegated, uid, gid)
    for name in DELEGATED_FILES:
        os.chown(delegated / name, uid, gid)
    return delegated


# -- running a command in a set-up -----------------------------------------------------------


def reachable_for_everyone(paths: list[Path]) -> None:
    """Give others search permission on the directories above `paths` that lack it (/root
    is 0700), through a guest-only overlay: set-up c's user must reach Python and the code."""
    done: set[Path] = set()
    for path in paths:
        for directory in reversed(path.resolve().parents):
            if directory in done or directory == Path("/") or directory.stat().st_mode & 0o001:
                continue
            inside = [m.split()[1] for m in read(Path("/proc/mounts")).splitlines()
                      if m.split()[1].startswith(f"{directory}/")]  # fmt: skip
            if inside:  # an overlay would hide them
                raise SystemExit(
                    f"guest: cannot open {directory} to others: {inside} are "
                    "mounted below it; keep the checkout and results elsewhere"
                )
            layer = WORK / "overlays" / str(len(done))
            (layer / "upper").mkdir(parents=True)
            (layer / "work").mkdir()
            options = f"lowerdir={directory},upperdir={layer}/upper,workdir={layer}/work"
            subprocess.run(["mount", "-t", "overlay", "-o", options, "overlay", str(directory)],
                           check=True)  # fmt: skip
            directory.chmod(directory.stat().st_mode | 0o001)
            say(f"guest: {directory} made searchable by others (a guest-only overlay)")
            done.add(directory)


def remount_cached(unmounted: Path, results: Path, open_up: list[Path]) -> None:
    """Mount again, read-only and with 9p's cache=loose, the directories `run` exported
    (Python's and the checkouts; `unmounted` lists them as /proc/mounts did before `run`'s
    prelude unmounted them): virtme-ng mounts them uncached, every stat a round trip to the
    host, and one `import corral` then takes 30 s in emulation instead of 10. Nothing changes
    them while the VM runs. First, when `open_up` is given, the directories above those
    paths are opened to others (an overlay would hide mounts below it)."""
    if open_up:
        reachable_for_everyone(open_up)
    options = "ro,version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose"
    targets = []
    for line in read(unmounted).splitlines():
        tag, target = line.split()[:2]
        if Path(target) != results:
            subprocess.run(["mount", "-t", "9p", "-o", options, tag, target], check=True)
            targets.append(target)
    say(f"guest: cached read-only mounts: {', '.join(targets)}")


def environment(name: str, repo: Path, uid: int) -> dict[str, str]:
    """A fresh writable home, state and temporary directory for a command, owned by its user."""
    base = WORK / name
    dirs = {"HOME": base / "home", "TMPDIR": base / "tmp", "CORRAL_STATE_DIR": base / "state"}
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, uid, uid)
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "PYTHONPATH": str(repo),
        "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is read-only here
        "PYTHONUNBUFFERED": "1",  # output shows as it comes, also from pytest
        "LANG": "C.UTF-8",
        "USER": USER if uid else "root",
        "LOGNAME": USER if uid else "root",
        **{name: str(path) for name, path in dirs.items()},
    }


def launcher(cgroup: Path, uid: int) -> list[str]:
    """A shell that moves itself into `cgroup` (as root, as systemd does when it starts a
    unit) and then execs the command, as set-up c's user there: the command is the only
    process in its cgroup, as a service's main process is."""
    argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]
    if uid:
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return argv


def run(outcome: Outcome, cgroup: Path, uid: int, env: dict[str, str], repo: Path,
        log: Path, timeout: float) -> str:  # fmt: skip
    """Run the outcome's command in `cgroup`, echoing its output; its output."""
    shown = " ".join(outcome.argv)
    if len(shown) > 300:  # the limit tests' node ids
        shown = shown[:200] + f" ... ({len(outcome.argv)} arguments)"
    say(f"$ {shown}    [set-up {outcome.setup}: {cgroup}, uid {uid}]")
    output: list[str] = []
    started = time.monotonic()
    with open(log, "w") as file:
        process = subprocess.Popen(
            launcher(cgroup, uid) + outcome.argv, cwd=repo, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip

        def echo() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                file.write(line)
                output.append(line)
                shown = line.rstrip("\n").split("\r")[-1].rstrip()  # progress lines end in \r
                if shown and not line.startswith("{"):  # a selftest's JSON: shown as a table
                    say("  " + shown)

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            outcome.problems.append(f"did not finish within {timeout:.0f} s: killed")
        reader.join(timeout=10)  # a leftover that holds the pipe open is found below
    outcome.seconds = time.monotonic() - started
    outcome.returncode = process.returncode
    return "".join(output)


def user_processes() -> set[int]:
    """Every process but kernel threads (they have no command line)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.add(int(entry))
    return found


def leftovers(before: set[int], patience: float = 5.0) -> list[str]:
    """Processes started since `before` that are still alive after `patience` seconds (a
    janitor may take a moment to finish)."""
    deadline = time.monotonic() + patience
    while True:
        new = user_processes() - before - {os.getpid()}
        if not new or time.monotonic() > deadline:
            return [f"pid {pid} ({read(Path(f'/proc/{pid}/cmdline')).replace(chr(0), ' ')})"
                    for pid in sorted(new)]  # fmt: skip
        time.sleep(0.1)


def check_selftest(outcome: Outcome, output: str) -> None:
    """Every row of the selftest's JSON report must be `enforced`."""
    report = None
    for line in reversed(output.splitlines()):
        with contextlib.suppress(ValueError):
            report = json.loads(line)
            break
    if not isinstance(report, dict):
        outcome.problems.append("selftest printed no JSON report")
        return
    say(f"  {report.get('executor')} backend, isolation: {report.get('isolation')}")
    for row in report.get("checks", []):
        outcome.rows.append(row)
        flag = "" if row["status"] == "enforced" else "   <-- not enforced"
        say(f"  {row['check']:<14} {row['status']:<9} {row['detail']}{flag}")
        if row["status"] != "enforced":
            outcome.problems.append(f"{row['check']}: {row['status']}: {row['detail']}")
    if outcome.returncode != 0:
        outcome.problems.append(f"selftest exited with status {outcome.returncode}")


def limit_tests(repo: Path, listed: Path | None) -> list[str]:
    """pytest's selection: the tests marked `limits` in the test modules that use the marker
    (collecting only those: each module costs seconds to import here), else the node ids of
    `listed` (for a checkout from before the marker)."""
    marked = sorted(
        str(path.relative_to(repo))
        for path in (repo / "tests").glob("test_*.py")
        if "mark.limits" in path.read_text()
    )
    if marked:
        return ["-m", "limits", *marked]
    if listed is None:
        return []
    lines = [line.split("#")[0].strip() for line in listed.read_text().splitlines()]
    return [line for line in lines if line]


def commands(repo: Path, tests: list[str]) -> list[tuple[str, list[str], float]]:
    """The default commands of a set-up: (name, argv, time-out)."""
    python = sys.executable
    # Emulation runs ~15x slower than the hardware, and the host's and the worker's wake-ups
    # are late by as much: the CPU-precision row (a kill within 1.5x of the limit) gets a
    # 1 s limit here instead of its 200 ms default.
    slow_host = ["env", "SANDBOX_MAX_CPU_MS=1000"]
    selftest = [*slow_host, python, "-m", "corral", "selftest", "--json", "--executor"]
    # Only the plugins the tests use: each other one installed costs seconds to import here.
    plugins = ["-p", "pytest_timeout", "-p", "corral.testing", "-p", "no:cacheprovider"]
    pytest = ["env", "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1", python, "-m", "pytest", *plugins]
    pytest += ["-v", "-ra", "--color=no", "--durations=10"]
    return [
        ("selftest process", [*selftest, "process"], SELFTEST_TIMEOUT_S),
        ("selftest worker", [*selftest, "worker"], SELFTEST_TIMEOUT_S),
        ("limit tests", [*pytest, *tests], PYTEST_TIMEOUT_S),
    ]


def run_setup(setup: str, args: argparse.Namespace, tests: list[str]) -> list[Outcome]:
    banner(f"set-up {setup}: {SETUPS[setup]}")
    uid = user_ids()[0] if setup == "c" else 0
    if setup not in FULL_SETUPS and not args.full:
        tests = [t for t in tests if t.startswith("-") or t == "limits"
                 or t.split("::")[0] in SUBTREE_MODULES]  # fmt: skip
    planned = (
        [("command", args.command, float(args.budget))]
        if args.command
        else commands(args.repo, tests)
    )
    if setup in SELFTEST_ONLY_SETUPS and not args.command:
        planned = [command for command in planned if command[0].startswith("selftest")]
    outcomes = []
    for index, (name, argv, cap) in enumerate(planned):
        outcome = Outcome(setup, name, argv)
        outcomes.append(outcome)
        timeout = min(cap, args.deadline - time.monotonic() - MARGIN_S)
        if timeout < MARGIN_S:
            outcome.problems.append("not run: the run's time budget (--budget) is spent")
            say(f"guest: set-up {setup}, {name}: FAILED: {outcome.problems[0]}")
            continue
        killed = reset()
        if killed:
            say(f"guest: killed what the previous command left: {killed}")
        cgroup = prepare(setup)
        env = environment(f"{setup}{index}", args.repo, uid)
        if index == 0:
            probe = Outcome(setup, "probe", ["sh", "-c", "id; cat /proc/self/cgroup"])
            run(probe, cgroup, uid, env, args.repo, args.results / f"{setup}-probe.log", 30)
            say("guest: the cgroup tree this set-up starts with:")
            say("\n".join(tree()))
        log = args.results / f"{setup}-{name.replace(' ', '-')}.log"
        before = user_processes()
        output = run(outcome, cgroup, uid, env, args.repo, log, timeout)
        if name.startswith("selftest"):
            check_selftest(outcome, output)
        elif outcome.returncode != 0:
            outcome.problems.append(f"exited with status {outcome.returncode}")
        outcome.left_behind = leftovers(before)
        if outcome.left_behind:
            outcome.problems.append(f"processes left behind: {outcome.left_behind}")
        say(f"guest: after {name} ({outcome.seconds:.0f} s), the cgroup tree is:")
        say("\n".join(tree()))
        verdict = "ok" if outcome.ok else "FAILED: " + "; ".join(outcome.problems)
        say(f"guest: set-up {setup}, {name}: {verdict}")
    return outcomes


def describe_vm() -> None:
    banner("the VM")
    say(f"kernel: {platform.release()} ({read(Path('/proc/version'))})")
    say(f"cpus: {os.cpu_count()}, {read(Path('/proc/meminfo')).splitlines()[0]}")
    mounts = read(Path("/proc/mounts")).splitlines()
    say("mounted: " + "; ".join(m for m in mounts if " /sys/fs/cgroup " in m or " / " in m))
    say(f"cgroup.controllers: {read(CGROUP / 'cgroup.controllers')}")
    say(f"cgroup.subtree_control: [{read(CGROUP / 'cgroup.subtree_control')}]")
    say(f"/proc/self/cgroup: {read(Path('/proc/self/cgroup'))}")
    say(f"python: {sys.executable} {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, required=True, help="the checkout under test")
    parser.add_argument("--results", type=Path, required=True, help="where results go")
    parser.add_argument("--setups", default="abc", help="which set-ups, e.g. abc or b")
    parser.add_argument("--unmounted", type=Path, required=True, help="exports to mount")
    parser.add_argument("--tests", type=Path, help="file of pytest node ids, one a line")
    parser.add_argument("--full", action="store_true", help="every limit test in every set-up")
    parser.add_argument("--budget", type=int, default=780, help="seconds for all commands")
    parser.add_argument("command", nargs="*", help="run this instead of the default commands")
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.budget
    write(args.results / "started", f"{time.time():.3f} {read(Path('/proc/uptime')).split()[0]}")
    describe_vm()
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        say(f"guest: unknown set-up(s) {sorted(unknown)}: choose from {sorted(SETUPS)}")
        return 2
    tests = limit_tests(args.repo, args.tests)
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "corral-ci", str(WORK)], check=True)
    open_up = [Path(sys.executable), args.repo] if "c" in args.setups else []
    remount_cached(args.unmounted, args.results, open_up)
    outcomes = []
    for setup in args.setups:
        outcomes += run_setup(setup, args, tests)
    reset()
    banner("summary")
    for outcome in outcomes:
        verdict = "ok" if outcome.ok else "FAILED"
        say(f"  set-up {outcome.setup}  {outcome.name:<17} {outcome.seconds:6.0f} s  {verdict}")
        for problem in outcome.problems:
            say(f"      {problem}")
    failed = [o for o in outcomes if not o.ok]
    summary = {"ok": not failed, "outcomes": [o.__dict__ | {"ok": o.ok} for o in outcomes]}
    write(args.results / "summary.json", json.dumps(summary, indent=1, default=str))
    write(args.results / "status", "1" if failed else "0")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
