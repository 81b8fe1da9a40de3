"""Resident memory of the zygote and of an idle worker, against a bare interpreter.

    python bench/memory.py [--json]

Found from the host with psutil: every sandbox process carries its host's
pid in its command line. The tree under the host is: the zygote's keeper
(the process the host starts; it maps the zygote's user namespace and cleans
up after it), the zygote (its one child), and the zygote's children: spares
waiting for a request, and workers, each in a cgroup of its own.

RSS counts every page a process maps, also those it shares copy-on-write
with the zygote; PSS charges a shared page to each sharer in part, USS counts
only the process's own pages. The targets are stated in RSS; PSS says what
one more process really costs. `bench/run.py` uses `sandbox_memory`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import psutil

TARGET_RSS_MB = 40.0  # the zygote's and an idle worker's, each


@dataclass(frozen=True)
class Footprint:
    """Memory of one process, in MB."""

    pid: int
    rss_mb: float
    pss_mb: float
    uss_mb: float


def footprint(process: psutil.Process) -> Footprint:
    """RSS, PSS and USS of `process`."""
    info = process.memory_full_info()
    return Footprint(process.pid, info.rss / 2**20, info.pss / 2**20, info.uss / 2**20)


def sandbox_processes(host_pid: int | None = None) -> list[psutil.Process]:
    """The zygotes' keepers, zygotes, spares and workers of host `host_pid` (this one by
    default), orphans too."""
    marker = re.compile(rf'"host_pid": {host_pid or os.getpid()}[,}}]')
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "corral.sandbox._zygote" in cmdline and marker.search(cmdline):
            found.append(process)
    return found


def _in_execution_cgroup(process: psutil.Process, host_pid: int) -> bool:
    """Whether `process` has joined one of the host's cgroups (a worker; a spare has not)."""
    pattern = re.compile(rf"/{host_pid}-[^/]*$")
    try:
        with open(f"/proc/{process.pid}/cgroup") as lines:
            return any(pattern.search(line.strip()) for line in lines)
    except OSError:
        return False


@dataclass(frozen=True)
class SandboxMemory:
    """The sandbox processes of one host, by role."""

    keepers: list[Footprint]
    zygotes: list[Footprint]
    workers: list[Footprint]
    spares: list[Footprint]


def sandbox_memory(host_pid: int | None = None) -> SandboxMemory:
    """Memory of every sandbox process of host `host_pid` (this one by default), by role.

    Call it while nothing executes: a worker is then idle, and a process-backend child
    in flight cannot pass for one.
    """
    host_pid = host_pid or os.getpid()
    processes = sandbox_processes(host_pid)
    pids = {process.pid for process in processes}
    roles = ("keepers", "zygotes", "workers", "spares")
    by_role: dict[str, list[Footprint]] = {role: [] for role in roles}
    for process in processes:
        try:
            parent = process.ppid()
            grandparent = psutil.Process(parent).ppid() if parent in pids else None
            if parent == host_pid:
                role = "keepers"
            elif grandparent == host_pid:
                role = "zygotes"
            elif _in_execution_cgroup(process, host_pid):
                role = "workers"
            else:
                role = "spares"
            by_role[role].append(footprint(process))
        except psutil.NoSuchProcess:  # a spare retired while we looked
            continue
    return SandboxMemory(**by_role)


def bare_interpreter() -> Footprint:
    """Memory of an idle `python -I -S`: what any process that runs Python costs at least."""
    with subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", "import sys; sys.stdout.write('ready\\n'); "
         "sys.stdout.flush(); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    ) as child:  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        child.stdout.readline()
        try:
            return footprint(psutil.Process(child.pid))
        finally:
            child.stdin.close()


async def _warm_sandboxes_memory() -> tuple[SandboxMemory, Footprint]:
    from latency import warm_sandboxes  # bench/ is this script's directory

    async with warm_sandboxes():
        await asyncio.sleep(0.2)  # the spares the last executions asked for are forked and waiting
        return sandbox_memory(), bare_interpreter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    memory, bare = asyncio.run(_warm_sandboxes_memory())
    worst = {
        "zygote": max(memory.zygotes, key=lambda f: f.rss_mb),
        "idle worker": max(memory.workers, key=lambda f: f.rss_mb),
    }
    met = all(f.rss_mb <= TARGET_RSS_MB for f in worst.values())
    if args.json:
        print(
            json.dumps(
                {
                    "bare interpreter": asdict(bare),
                    **{name: asdict(f) for name, f in worst.items()},
                    "all": asdict(memory),
                },
                indent=2,
            )
        )
        return 0 if met else 1
    print(f"{'process':<18}{'RSS MB':>9}{'PSS MB':>9}{'USS MB':>9}")
    rows = [("bare interpreter", bare), *worst.items(),
            *(("zygote keeper", f) for f in memory.keepers[:1]),
            *(("spare", f) for f in memory.spares[:1])]  # fmt: skip
    for name, f in rows:
        print(f"{name:<18}{f.rss_mb:>9.1f}{f.pss_mb:>9.1f}{f.uss_mb:>9.1f}")
    for name, f in worst.items():
        verdict = "met " if f.rss_mb <= TARGET_RSS_MB else "MISSED"
        print(f"{verdict} {name} RSS <= {TARGET_RSS_MB:.0f} MB ({f.rss_mb:.1f} MB)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
