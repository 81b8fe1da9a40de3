"""The cgroup filesystem: mounts, this process's cgroups, and reading and writing files.

Host side. Used by `_cgroups` (per-execution cgroups) and `_delegation` (the
cgroup v2 subtree set-up).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class CgroupUnavailable(Exception):
    """cgroups cannot be used on this host; the message says why and what to do."""


@dataclass(frozen=True)
class Mount:
    mountpoint: Path
    root: str  # the path inside the hierarchy the mount shows
    fstype: str
    options: frozenset[str]


def mounts() -> list[Mount]:
    mounts = []
    with open("/proc/self/mountinfo") as lines:
        for line in lines:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            options = frozenset(tail[2].split(",")) | frozenset(fields[5].split(","))
            mounts.append(Mount(Path(fields[4]), fields[3], tail[0], options))
    return mounts


def own_cgroups() -> dict[str, str]:
    """Controller name (or "" for v2) -> this process's cgroup path."""
    own = {}
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    return own


def under(mount: Mount, hierarchy_path: str) -> Path:
    relative = os.path.relpath(hierarchy_path, mount.root) if mount.root != "/" else hierarchy_path
    return mount.mountpoint / relative.lstrip("./").lstrip("/")


def write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)  # not open(): this is on every execution's path
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def keyed(path: Path, key: str) -> int:
    return keyed_in(read(path), key)


def keyed_in(text: str, key: str) -> int:
    """The value of `key` in a file of "key value" lines (0 when absent)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0
