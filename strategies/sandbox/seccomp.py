"""The seccomp filter the sandbox loads (bubblewrap's ``--seccomp FD`` takes a compiled BPF program).

Why libseccomp through ctypes: libseccomp is the library systemd, Docker/runc, Podman and
bubblewrap's own users build filters with; it handles the parts that are easy to get wrong by
hand (the architecture check that stops 32-bit or x32 syscalls from bypassing an x86_64 list,
syscall numbers per architecture, argument comparisons). Debian's ``python3-seccomp`` binding
is not installable into a venv and the PyPI bindings are thin, little-used forks; the six C
functions needed here are a stable ABI (``libseccomp.so.2``, present wherever apt is, since apt
itself links it). No new Python dependency.

The filter allows by default and refuses (EPERM, or ENOSYS for clone3) what sandboxed Python
never needs and what widens the kernel's attack surface: tracing and reading other processes'
memory, mounts and namespaces, keyrings, BPF, perf, userfaultfd, io_uring, modules, clocks,
device nodes and FIFOs, ownership and extended attributes, sockets other than AF_UNIX, terminal
injection, and (unless ``allow_fork``) creating processes. The namespaces and the empty
filesystem are the boundary; this list narrows what the kernel exposes inside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

_ACT_ALLOW = 0x7FFF0000
_CMP_NE, _CMP_EQ, _CMP_MASKED_EQ = 1, 4, 7

_AF_UNIX = 1
_CLONE_THREAD = 0x00010000
_CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                   0x00000080)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "unshare", "setns",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "open_by_handle_at", "name_to_handle_at",
    "iopl", "ioperm", "syslog", "vhangup", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname",
    "mknod", "mknodat", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
)
PROCESS_CREATION = ("fork", "vfork")


class SeccompUnavailable(RuntimeError):
    """libseccomp is missing or refused to build the filter."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise SeccompUnavailable(f"libseccomp is not installed ({e})") from e
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


@functools.cache
def compile_filter(allow_fork: bool = False) -> bytes:
    """The BPF program (struct sock_filter[]), as bubblewrap's ``--seccomp`` reads it."""
    lib = _lib()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        def rule(name: str, action: int, *cmps: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a syscall on this architecture (e.g. a newer one): nothing to refuse
                return
            arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")

        for name in DENIED:
            rule(name, _errno(errno.EPERM))
        rule("socket", _errno(errno.EACCES), (0, _CMP_NE, _AF_UNIX, 0))
        rule("ioctl", _errno(errno.EPERM), (1, _CMP_EQ, _TIOCSTI, 0))
        rule("ioctl", _errno(errno.EPERM), (1, _CMP_EQ, _TIOCLINUX, 0))
        # clone3 passes its flags in a struct seccomp cannot read: ENOSYS makes libc fall back to clone.
        rule("clone3", _errno(errno.ENOSYS))
        for flag in _CLONE_NS_FLAGS:
            rule("clone", _errno(errno.EPERM), (0, _CMP_MASKED_EQ, flag, flag))
        if not allow_fork:
            for name in PROCESS_CREATION:
                rule(name, _errno(errno.EPERM))
            rule("clone", _errno(errno.EPERM), (0, _CMP_MASKED_EQ, _CLONE_THREAD, 0))  # threads only
        fd = os.memfd_create("sharpen-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def filter_fd(allow_fork: bool = False) -> int:
    """A fresh memfd holding the filter, positioned at its start, for bubblewrap to read once."""
    fd = os.memfd_create("sharpen-seccomp", os.MFD_CLOEXEC)
    os.write(fd, compile_filter(allow_fork))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
