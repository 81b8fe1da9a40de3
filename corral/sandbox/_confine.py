"""The operating-system layers under the language layer, each holding on its own.

Child side (standard library and ctypes only; libseccomp is loaded by the
zygote to build the filter, never by a child). The zygote enters what
children inherit, once, at no cost per execution:

- a PID namespace (the zygote is its init: the host's processes are out of
  sight, and every sandbox process dies with the zygote);
- a mount namespace whose root is an empty read-only tmpfs holding only what
  the interpreter needs: the standard library and corral's package
  (read-only), /dev/null, a /proc of the sandbox's own processes, and an
  empty working directory;
- a user namespace in which the zygote is root, mapped to the unprivileged
  host uid CORRAL_SANDBOX_UID (it owns nothing on the host), and with it
  network (loopback only, down), IPC and UTS namespaces.

Each spare, while it waits, drops to the next uid (no capabilities left),
becomes non-dumpable, and installs the system-call filter built by the
zygote (`filter_program`). It joins its execution's cgroup later through
`cgroup.procs` files the host opened and sent it (a write through them is
checked against the opener's credentials), so no cgroup file is in its view
or writable by its uid.

Where the host refuses a layer (not root, user namespaces disabled), the
zygote goes on without it and `corral selftest` reports it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_DUMPABLE = 4
_F_SETOWN, _F_SETSIG, _F_SETOWN_EX = 8, 10, 15
_FIOSETOWN, _SIOCSPGRP = 0x8901, 0x8902
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1

_libc = ctypes.CDLL(None, use_errno=True)
WORKDIR = "/corral-cwd"  # in the filesystem view: the empty working directory of children


class HalfMadeView(RuntimeError):
    """The filesystem view failed after the old root was left: nothing may run there."""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def unshare(flags: int, what: str) -> None:
    """unshare(2), raising OSError naming `what`."""
    _check(_libc.unshare(flags), f"unshare({what})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            None if source is None else source.encode(),
            target.encode(),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            data.encode() or None,
        ),
        f"mount {source or fstype} on {target}",
    )


def interpreter_paths() -> list[str]:
    """The directories the interpreter may still read from: the standard library (and
    where packages live) and corral's own package."""
    paths = sysconfig.get_paths()
    wanted = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    wanted.append(str(Path(__file__).resolve().parents[1]))  # the corral package
    found: list[str] = []
    for path in wanted:
        real = os.path.realpath(path)
        if os.path.isdir(real) and not any(real.startswith(f"{p}/") or real == p for p in found):
            found = [p for p in found if not p.startswith(f"{real}/")] + [real]
    return sorted(found)


def enter_filesystem_view(read_only: Iterable[str]) -> None:
    """Make an empty read-only tmpfs the root, with only these directories bound in.

    Run by the zygote as root, after unshare(CLONE_NEWNS) and inside its PID
    namespace (the /proc it mounts shows only the sandbox's processes). The old
    root is reached through /oldroot while binding, then detached.
    """
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we do reaches the host
    base = "/tmp"  # any directory will do: the tmpfs covers it in our namespace only
    _mount("tmpfs", base, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
    os.mkdir(f"{base}/oldroot")
    pivot_root = syscall_number("pivot_root")  # the C library has no wrapper for it
    _check(_libc.syscall(pivot_root, base.encode(), f"{base}/oldroot".encode()), "pivot_root")
    try:
        _build_view(read_only)
    except OSError as exc:  # half a view is worse than none: the zygote must not go on
        raise HalfMadeView(f"the filesystem view could not be finished: {exc}") from exc


def _build_view(read_only: Iterable[str]) -> None:
    """In the new root, with the old one at /oldroot: bind, mount /proc, detach, seal."""
    os.chdir("/")
    binds = [(path, _MS_RDONLY | _MS_NOSUID | _MS_NODEV) for path in read_only]
    binds.append(("/dev/null", _MS_NOSUID | _MS_NOEXEC))  # a device: no MS_NODEV
    for path, flags in binds:
        if os.path.isdir(f"/oldroot{path}"):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        _mount(f"/oldroot{path}", path, None, _MS_BIND)
        _mount(None, path, None, _MS_REMOUNT | _MS_BIND | flags)
    os.mkdir("/proc")
    _mount(
        "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=invisible,subset=pid"
    )
    _check(_libc.umount2(b"/oldroot", _MNT_DETACH), "umount /oldroot")
    os.rmdir("/oldroot")
    os.mkdir(WORKDIR, 0o555)  # where children work: empty, and nobody may write there
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir("/")


def map_user_namespace(pid: int, host_uid: int) -> None:
    """Map uids and gids 0-1 of `pid`'s new user namespace to host_uid, host_uid + 1.

    Run by the zygote's parent, which is still root in the host's namespace.
    """
    for kind in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{kind}", "w") as mapping:
            mapping.write(f"0 {host_uid} 2\n")


def enter_own_user_namespace(flags: int) -> None:
    """Unprivileged: enter a new user namespace (and `flags`' namespaces) whose only uid
    and gid, 0, are this process's own, so that the namespaces below it are allowed."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER | flags, "user namespace")
    for name, line in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as mapping:
            mapping.write(f"{line}\n")


def become_namespace_root() -> None:
    """In a freshly mapped user namespace: take uid and gid 0 there (the mapped host uid)."""
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


@dataclass
class Confinement:
    """What each child applies to itself once in its cgroup, before connector code runs:
    the uid to drop to (None when the host is not root), the system-call filter, and
    whether to drop every capability without a uid to drop to (an unprivileged host's
    user namespace maps one uid only)."""

    uid: int | None
    program: bytes | None
    seccomp_nr: int
    drop_capabilities: bool = False

    def apply(self) -> None:
        """Drop to the uid for good (every capability goes) and become non-dumpable (the
        process's /proc files and memory are out of reach of other sandbox processes under
        the same uid); then filter system calls on every thread. no_new_privs must be set."""
        if self.uid is not None:
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)
        elif self.drop_capabilities:
            _drop_capabilities()
        _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
        if self.program is not None:
            install_filter(self.program, self.seccomp_nr)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _drop_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (and with them the ambient one).
    Without execve, which the filter refuses, nothing gives them back."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero
    _check(_libc.capset(ctypes.byref(header), data), "capset")


#: System calls connector code never needs, refused with EPERM. The child's own
#: channel exists before the filter: no new socket, no exec, no new process (a clone
#: without CLONE_THREAD), no debugging, no kernel-facing interfaces, no way out of
#: the namespaces, and no signals to anyone.
DENIED_SYSCALLS = (
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # programs and processes
    "execve", "execveat", "fork", "vfork",
    # other processes' memory, signals and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    # namespaces, mounts and privileges
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    "open_by_handle_at", "name_to_handle_at", "mknod", "mknodat",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "capset", "personality",
    # state that outlives the process or reaches other sandbox processes: System V and
    # POSIX IPC, scheduling and priorities, memory placement
    "shmget", "shmat", "shmdt", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr", "setpriority", "ioprio_set",
    "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr",
    "migrate_pages", "move_pages", "get_robust_list", "process_mrelease",
    # kernel interfaces
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "fanotify_init",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
    "modify_ldt", "lookup_dcookie", "vhangup", "uselib", "ustat", "sysfs",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "process_madvise",
)  # fmt: skip


def filter_program() -> bytes:
    """The system-call filter as a BPF program, built once by the zygote with libseccomp.

    Also refused: clone without CLONE_THREAD (a new process), clone3 (ENOSYS, so
    that the C library falls back to clone for threads, where the flags can be
    checked), prctl(PR_SET_DUMPABLE), fcntl and ioctl that make another process
    a descriptor's owner (signals), prlimit on another process, and every system
    call of a foreign architecture (the process is killed).
    """
    import pyseccomp as seccomp

    filt = seccomp.SyscallFilter(seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):
            continue  # not a system call on this architecture
    filt.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    # These arguments are 32-bit to the kernel: compare only those bits, or a value with
    # bit 32 set would pass the filter and still mean the refused command.
    low32 = 0xFFFFFFFF
    filt.add_rule(deny, "prctl", seccomp.Arg(0, seccomp.MASKED_EQ, low32, _PR_SET_DUMPABLE))
    # Signals by other routes: a descriptor's owner (SIGIO, or any signal by F_SETSIG, to
    # another process), and the limits of another process (prlimit with a pid).
    for command in (_F_SETOWN, _F_SETSIG, _F_SETOWN_EX):
        filt.add_rule(deny, "fcntl", seccomp.Arg(1, seccomp.MASKED_EQ, low32, command))
    for request in (_FIOSETOWN, _SIOCSPGRP):
        filt.add_rule(deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, low32, request))
    filt.add_rule(deny, "prlimit64", seccomp.Arg(0, seccomp.NE, 0))
    with os.fdopen(os.memfd_create("corral-seccomp"), "w+b") as program:
        filt.export_bpf(program)
        program.seek(0)
        return program.read()


def syscall_number(name: str) -> int:
    """The number of system call `name` on this architecture (resolved by the zygote)."""
    import pyseccomp as seccomp

    return int(seccomp.resolve_syscall(seccomp.system_arch(), name))


def install_filter(program: bytes, seccomp_nr: int) -> None:
    """Load the filter on every thread of this process (no_new_privs must be set)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _check(
        _libc.syscall(
            seccomp_nr, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(prog)
        ),
        "seccomp(SECCOMP_SET_MODE_FILTER)",
    )
