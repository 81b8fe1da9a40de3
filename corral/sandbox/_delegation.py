"""Setting up corral's cgroup v2 subtree the way container runtimes do.

Host side, once per hierarchy. On cgroup v2 a cgroup's children get a
controller only when the cgroup lists it in `cgroup.subtree_control`, which
it may do only for controllers its own parent passed down, and only while it
holds no processes itself (the "no internal processes" rule; the root of the
whole hierarchy is exempt). So, from the top of the hierarchy down to the
root of corral's per-execution cgroups, corral:

- enables `+cpu +memory +pids` in each cgroup's `cgroup.subtree_control`
  where the controller is available and not enabled yet (what the host never
  made available is left alone);
- when its own cgroup holds processes (a systemd service with
  `Delegate=yes`, a container's namespace root), first moves them into a
  leaf, `corral-host`, as runc, crun and systemd do, and then enables the
  controllers for its subtree.

Nothing else outside corral's own subtree is changed. Where a step is not
allowed (not root and nothing delegated, a parent that holds processes), the
error says what to run or configure. Every change made is reported, and
`corral selftest` prints the list.
"""

from __future__ import annotations

import errno
from pathlib import Path

from corral.sandbox._cgroupfs import CgroupUnavailable, read, write

#: The leaf corral moves its own cgroup's processes into, so that the cgroup may pass
#: controllers down. A host whose cgroup is this leaf works from the leaf's parent.
LEAF = "corral-host"
_MOVE_ROUNDS = 10  # a process forked while we move the others is moved in the next round

DELEGATE_FIX = (
    "give corral a cgroup of its own to manage: as a systemd service, add `Delegate=yes` "
    "to its [Service] section; from a shell, start it with `systemd-run --scope -p "
    "Delegate=yes -- corral ...` (as a user: `systemd-run --user --scope -p Delegate=yes "
    "-- corral ...`); or set SANDBOX_CGROUP_ROOT to a cgroup delegated to this user"
)


def prepare(mountpoint: Path, own: Path, root: Path, wanted: tuple[str, ...]) -> list[str]:
    """Make `root` a cgroup whose children get the `wanted` controllers; what was changed.

    `own` is the cgroup this process is in, `root` where corral's per-execution
    cgroups go (usually `own`/corral). Raises CgroupUnavailable saying what to do.
    """
    changes: list[str] = []
    chain = [mountpoint / part for part in reversed(root.relative_to(mountpoint).parents)]
    chain.append(root)
    for cgroup in dict.fromkeys(chain):
        if not cgroup.exists():
            try:
                cgroup.mkdir()
            except OSError as exc:
                raise CgroupUnavailable(
                    f"cannot create the cgroup {cgroup}: {exc.strerror}; {DELEGATE_FIX}"
                ) from None
        _enable(cgroup, wanted, own, changes)
    return changes


def _listed(path: Path) -> set[str]:
    return set(read(path).split())


def _enable(cgroup: Path, wanted: tuple[str, ...], own: Path, changes: list[str]) -> None:
    """Have `cgroup` pass `wanted` down to its children, moving its processes into a leaf
    first when it is corral's own cgroup."""
    missing = [c for c in wanted if c not in _listed(cgroup / "cgroup.subtree_control")]
    if not missing:
        return
    unavailable = [c for c in missing if c not in _listed(cgroup / "cgroup.controllers")]
    if unavailable:
        raise CgroupUnavailable(
            f"the host has not made the {', '.join(unavailable)} controller(s) available to "
            f"{cgroup} (cgroup.controllers): enable them in its parent's "
            "cgroup.subtree_control, or boot without cgroup_disable= for them"
        )
    request = " ".join(f"+{c}" for c in missing)
    for attempt in range(2):
        try:
            write(cgroup / "cgroup.subtree_control", request)
        except OSError as exc:
            if exc.errno == errno.EBUSY and attempt == 0 and _is_within(cgroup, own):
                _move_into_leaf(cgroup, changes)
                continue
            raise CgroupUnavailable(_refusal(cgroup, request, exc)) from None
        changes.append(f"enabled {request} in {cgroup}/cgroup.subtree_control")
        return


def _refusal(cgroup: Path, request: str, exc: OSError) -> str:
    if exc.errno == errno.EBUSY:
        return (
            f"cannot enable {request} in {cgroup}: it holds processes, and cgroup v2 passes "
            f"controllers down only from cgroups without any; {DELEGATE_FIX}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot enable {request} in {cgroup}: {exc.strerror}; {DELEGATE_FIX}"
    return f"cannot enable {request} in {cgroup}: {exc.strerror}"


def _is_within(cgroup: Path, own: Path) -> bool:
    return cgroup == own or own in cgroup.parents


def _move_into_leaf(cgroup: Path, changes: list[str]) -> None:
    """Move every process of `cgroup` into its leaf (corral's own cgroup: this host, and
    whatever shares the cgroup with it, such as the shell or the service that started it)."""
    leaf = cgroup / LEAF
    try:
        leaf.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupUnavailable(
            f"cannot create the leaf {leaf} for the processes of {cgroup}: {exc.strerror}; "
            f"{DELEGATE_FIX}"
        ) from None
    moved = 0
    for _ in range(_MOVE_ROUNDS):
        pids = read(cgroup / "cgroup.procs").split()
        if not pids:
            break
        for pid in pids:
            try:
                write(leaf / "cgroup.procs", pid)
            except ProcessLookupError:
                continue  # it exited
            except OSError as exc:
                raise CgroupUnavailable(
                    f"cannot move process {pid} out of {cgroup} into {leaf}: {exc.strerror}; "
                    f"{DELEGATE_FIX}"
                ) from None
            moved += 1
    changes.append(
        f"moved {moved} process{'es' if moved != 1 else ''} of {cgroup} into its leaf {LEAF} "
        "(on cgroup v2 only leaves hold processes)"
    )


def own_base(own: str) -> str:
    """The cgroup path corral works from: its own, or the parent of the leaf it moved into."""
    head, _, tail = own.rstrip("/").rpartition("/")
    return (head or "/") if tail == LEAF else own
