"""What a short-lived caller pays: whole commands against a bare interpreter, in one run.

    python bench/startup.py [--rounds N] [--per-round N] [--json]

Each round runs, one after the other and `per_round` times each, three whole
commands as a user types them (a CI job, a shell loop):

- bare: `python3 -I -c pass`, the floor of any Python command;
- import: `python3 -I -c "import corral"`;
- run: `python3 -I -m corral run examples/hello.py --json`, one execution in the sandbox,
  zygote start and clean-up included.

The wall time of each, start to exit; targets on the medians: import at most 5x
bare, run at most 10x bare. `bench/run.py` uses StartupBench.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_IMPORT_RATIO = 5.0
TARGET_RUN_RATIO = 10.0
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello.py"
COMMANDS = {
    "bare": [sys.executable, "-I", "-c", "pass"],
    "import": [sys.executable, "-I", "-c", "import corral"],
    "run": [sys.executable, "-I", "-m", "corral", "run", str(EXAMPLE), "--json"],
}


def _timed(command: list[str]) -> float:
    """The wall time of `command` in ms, start to exit; it must succeed."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, timeout=60, cwd="/")
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr.decode(errors='replace')[-500:]}")
    return elapsed


class StartupBench:
    """The three commands, interleaved round by round; medians in ms."""

    def __init__(self, per_round: int) -> None:
        self.per_round = per_round
        self.times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        _timed(COMMANDS["run"])  # a first run: files into the page cache, like every later one

    def round(self) -> None:
        """One round: each command `per_round` times, in turn."""
        for _ in range(self.per_round):
            for name, command in COMMANDS.items():
                self.times[name].append(_timed(command))

    def p50(self, name: str) -> float:
        """The median wall time of command `name`, in ms."""
        return statistics.median(self.times[name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    bench = StartupBench(args.per_round)
    for _ in range(args.rounds):
        bench.round()
    bare = bench.p50("bare")
    ratios = {name: bench.p50(name) / bare for name in ("import", "run")}
    met = ratios["import"] <= TARGET_IMPORT_RATIO and ratios["run"] <= TARGET_RUN_RATIO
    if args.json:
        print(json.dumps({"ok": met, "p50_ms": {n: bench.p50(n) for n in COMMANDS},
                          "ratios": ratios}))  # fmt: skip
    else:
        for name, target in (("import", TARGET_IMPORT_RATIO), ("run", TARGET_RUN_RATIO)):
            print(f"{name}: {bench.p50(name):.1f} ms / bare {bare:.1f} ms = "
                  f"{ratios[name]:.2f}x (target <= {target:.0f}x)")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
