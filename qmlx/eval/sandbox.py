"""Run untrusted Python (a model's completion and its task's tests) in a separate, limited process.

Never in the qmlx process: each program gets its own interpreter (`python -I`, no site packages of the
user, no environment), a fresh temporary folder as its working and home directory, and limits set in
the child before it starts (`resource`): address space, CPU seconds, file size, open files, no core
dumps, and a process count that stops a fork bomb. Run as root (a CI container), the child first takes
a user id of its own (no account, group `nobody`), so it can write only to its own folder (and
world-writable ones), the process limit applies at all (the kernel does not enforce it for root) and
counts only its processes, and afterwards all of them are killed, even those that left its session
(as an ordinary user, a process that calls setsid() outlives the run until it exits). Networking: on Linux a new,
empty network namespace where the kernel allows one (root, or unprivileged user namespaces); on
macOS `sandbox-exec` denies network and writes outside the folder; everywhere a prelude makes
`socket` refuse to connect. Output goes to files in the folder, capped by the file-size limit, so a
flood kills the program instead of filling memory. A program that outlives its wall-clock timeout is
killed with its whole process group. macOS does not enforce the address-space limit (RLIMIT_AS); there
the memory a program takes is bounded only by the timeout. Every way of not finishing cleanly with exit status 0 counts as
"failed" (the status says which).
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ..errors import UserError

# Loaded before the program: sockets cannot connect or bind (a fallback where the OS gives no isolation).
PRELUDE = """\
import socket as _s
def _refuse(*a, **k):
    raise OSError("network access is disabled in qmlx's sandbox")
for _n in ("connect", "connect_ex", "bind", "sendto"):
    setattr(_s.socket, _n, _refuse)
_s.create_connection = _refuse
del _s, _n, _refuse
"""

NOBODY = 65534
# As root each program runs under a user id of its own from this range (no account needs to exist): its
# process limit counts only its own processes, and afterwards every process with that id is killed, also
# those that left the program's session.
SANDBOX_UIDS = (1 << 20, 1 << 21)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


@dataclass
class Limits:
    timeout: float = 10.0  # wall-clock seconds
    memory: int = 1 << 30  # bytes of address space
    file_size: int = 10 << 20  # bytes per file written (stdout and stderr included)
    processes: int = 16  # processes beyond those the user already runs
    open_files: int = 64


@dataclass
class Outcome:
    status: str  # "passed", "failed" (non-zero exit), "timeout", "killed" (a signal: memory, file size, …)
    seconds: float
    detail: str = ""  # the end of stderr, or what stopped it

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _user_processes(uid: int) -> int:
    """How many processes `uid` runs now (RLIMIT_NPROC counts them all); 0 where unknown."""
    try:
        return sum(1 for p in os.listdir("/proc") if p.isdigit() and os.stat(f"/proc/{p}").st_uid == uid)
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-o", "pid=", "-U", str(uid)], capture_output=True, text=True, timeout=5)
        return len(out.stdout.split())
    except (OSError, subprocess.SubprocessError):
        return 0


def _new_network_namespace(root: bool) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flags = CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET
        libc.unshare(flags)  # failure (no permission) leaves the prelude as the only guard
    except (OSError, AttributeError):
        pass


def _limit(limits: Limits, uid: int | None, nproc: int):
    def apply() -> None:  # in the child, between fork and exec
        _new_network_namespace(uid is not None)
        if uid is not None:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(uid)
        cpu = int(limits.timeout) + 1
        for what, value in (
            (resource.RLIMIT_AS, limits.memory),
            (resource.RLIMIT_DATA, limits.memory),
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_FSIZE, limits.file_size),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, nproc),
        ):
            try:
                resource.setrlimit(what, (value, value))
            except (ValueError, OSError):  # macOS refuses some (RLIMIT_AS); the others still hold
                pass

    return apply


class SandboxError(UserError):
    """The sandbox cannot be set up here (the message says why and what to do)."""


def _world_runnable(path: str) -> bool:
    """Whether a user with no rights of its own can execute `path` (every parent folder searchable)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & 0o005 == 0o005:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def interpreter(root: bool) -> str:
    """The Python that runs programs: this one, or as root one that `nobody` can run (a venv under a
    private home folder is not), since the tests need only the standard library."""
    if not root:
        return sys.executable
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and _world_runnable(candidate):
            return candidate
    raise SandboxError(
        f"running as root, programs run as the user 'nobody', who cannot execute {sys.executable} "
        "(a folder above it is private) and no python3 on PATH is readable by everyone; run qmlx eval as an "
        "ordinary user, or install a system python3"
    )


def _command(folder: str, python: str) -> list[str]:
    cmd = [python, "-I", "-S", os.path.join(folder, "program.py")]
    exe = shutil.which("sandbox-exec") if sys.platform == "darwin" else None
    if exe:  # macOS: no network, writes only below the folder (and the system's temporary folders)
        profile = (
            "(version 1)(allow default)(deny network*)(deny file-write*)"
            f'(allow file-write* (subpath "{os.path.realpath(folder)}") (subpath "/dev"))'
        )
        cmd = [exe, "-p", profile, *cmd]
    return cmd


def run_program(source: str, limits: Limits | None = None) -> Outcome:
    """Run `source` as a Python program under `limits`; its folder is removed afterwards."""
    limits = limits or Limits()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    python = interpreter(root)
    uid = random.randrange(*SANDBOX_UIDS) if root else None
    nproc = limits.processes if root else _user_processes(os.getuid()) + limits.processes
    folder = tempfile.mkdtemp(prefix="qmlx-sandbox-")
    try:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as f:
            f.write(PRELUDE + "\n" + source)
        if uid is not None:
            os.chown(folder, uid, NOBODY)
        out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            if uid is not None:
                os.chown(out_path, uid, NOBODY)
                os.chown(err_path, uid, NOBODY)
            proc = subprocess.Popen(
                _command(folder, python), cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, preexec_fn=_limit(limits, uid, nproc),
            )  # fmt: skip
            try:
                code = proc.wait(timeout=limits.timeout)
                status = "passed" if code == 0 else ("killed" if code < 0 else "failed")
                detail = f"signal {-code}" if code < 0 else ""
            except subprocess.TimeoutExpired:
                status, detail = "timeout", f"still running after {limits.timeout:g} s"
            finally:
                _kill_group(proc)
                if uid is not None:
                    _kill_user(uid)
        seconds = time.perf_counter() - start
        if not detail:
            detail = _tail(err_path)
        return Outcome(status, seconds, detail)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """The program and anything it started in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _kill_user(uid: int) -> None:
    """Every process of the program's own user id: kill(-1) from a helper running as that user."""
    pid = os.fork()
    if pid == 0:  # the helper: nothing but setuid and kill, then _exit
        try:
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _tail(path: str, size: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
