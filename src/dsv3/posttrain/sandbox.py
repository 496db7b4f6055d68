"""Running untrusted Python (a model's code) in a subprocess with limits: the executor of the code reward.

What it does, on Linux:

* a fresh ``python -I -S`` (isolated mode: no environment variables read, no user site, no script directory on
  ``sys.path``; ``-S``: no ``site``, hence only the standard library, not this virtual environment's packages);
* a fresh temporary directory as the working directory, removed afterwards; an environment holding only ``PATH``;
* resource limits (``resource.setrlimit``, soft = hard, so the code cannot raise them): CPU seconds, address
  space, size of written files, open files, no core files, and the number of processes (``RLIMIT_NPROC``: it
  counts all processes and threads of the user, so the default forbids forking at all; it does not bind root);
* a wall-clock timeout after which the whole process group is killed (the child leads its own session);
* network blocked **at the Python level only**: ``socket.socket``, ``socket.create_connection``,
  ``socket.socketpair`` and ``socket.getaddrinfo`` are replaced by a function that raises. Code that imports
  ``_socket`` or uses ``ctypes`` gets around it. This is not an OS sandbox (no namespaces, seccomp, or
  filesystem isolation: the code can read what the user can read); run untrusted code at scale in a container.

The limits are set by a small boot script inside the child, before the code runs, not in ``preexec_fn``: the
subprocess docs warn that ``preexec_fn`` can deadlock in a multi-threaded parent, and the caller is one (torch's
threads, the reward's thread pool). Where the ``resource`` module or a limit does not exist (Windows, some
limits on macOS) it is skipped.

Passing requires exit status 0 *and* the boot script reaching the end of the code: it prints a random marker,
received on stdin, only after the code returned, so ``sys.exit(0)`` or ``os._exit(0)`` before the tests counts
as a failure (an easy reward hack otherwise). The marker is hidden from ordinary code but not from deliberate
introspection of the interpreter: Python-level, like the network block.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_BOOT = r'''
import os, sys

def main():  # locals, not globals: the marker stays out of the code's easy reach
    limits, block_network, path = eval(sys.argv[2]), sys.argv[3] == "1", sys.argv[1]
    marker = sys.stdin.readline().strip().encode()
    sys.stdin.close()
    sys.stdin = open(os.devnull)
    try:
        import resource
    except ImportError:
        resource = None
    for name, value in limits.items():
        limit = getattr(resource, name, None)
        if limit is not None and value is not None:
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass
    if block_network:
        import socket

        def blocked(*args, **kwargs):
            raise PermissionError("network access is disabled in this sandbox")
        for name in ("socket", "create_connection", "create_server", "socketpair", "getaddrinfo"):
            setattr(socket, name, blocked)
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    sys.argv = [path]
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, b"\n" + marker + b"\n")

main()
'''


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits (``None`` = leave the inherited one)."""

    cpu_seconds: int | None = 10
    """RLIMIT_CPU: CPU time, after which the kernel kills the process (SIGXCPU, then SIGKILL)."""
    memory_bytes: int | None = 1 << 30
    """RLIMIT_AS: address space; allocations beyond it raise MemoryError."""
    file_size_bytes: int | None = 16 << 20
    """RLIMIT_FSIZE: largest file the code may write (stdout and stderr are files too)."""
    processes: int | None = 1
    """RLIMIT_NPROC: the user's processes + threads beyond which fork/clone fails (not for root)."""
    open_files: int | None = 64
    """RLIMIT_NOFILE."""

    def rlimits(self) -> dict[str, int | None]:
        return {"RLIMIT_CPU": self.cpu_seconds, "RLIMIT_AS": self.memory_bytes,
                "RLIMIT_FSIZE": self.file_size_bytes, "RLIMIT_NPROC": self.processes,
                "RLIMIT_NOFILE": self.open_files, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    """Exit status (negative: killed by that signal); None if it had to be killed after the timeout."""
    completed: bool
    """Whether the code ran to its end (the boot script's marker was printed)."""
    timed_out: bool
    stdout: str
    """At most ``max_output`` characters of each stream (the head)."""
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.completed and not self.timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's whole process group (its session), or the child alone where there are no groups."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: str, max_chars: int, tail: bytes) -> tuple[str, bool]:
    """The head of a captured stream (the marker line removed) and whether it ends with the marker line."""
    with open(path, "rb") as f:
        head = f.read(max_chars * 4 + len(tail))  # up to 4 bytes per character
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - len(tail), 0))
        ends = f.read() == tail
    if ends and size <= len(head):
        head = head[:size - len(tail)]
    return head.decode("utf-8", errors="replace")[:max_chars], ends


def run_python(code: str, *, timeout: float = 10.0, limits: Limits = Limits(), block_network: bool = True,
               max_output: int = 4096) -> SandboxResult:
    """Run ``code`` as a script in a fresh sandboxed interpreter (see the module docstring) and wait for it.

    ``timeout`` is wall-clock seconds; on expiry the child's process group is killed. Output goes to files (not
    pipes: a flood of output cannot fill the parent's memory; ``Limits.file_size_bytes`` bounds it).
    """
    marker = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-") as root:
        work = os.path.join(root, "work")
        os.mkdir(work)
        script = os.path.join(work, "main.py")
        with open(script, "w") as f:
            f.write(code)
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, script, repr(limits.rlimits()),
                 "1" if block_network else "0"],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                env={"PATH": os.environ.get("PATH", os.defpath)},
                start_new_session=os.name == "posix")
            timed_out = False
            try:
                proc.stdin.write(marker.encode() + b"\n")
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            # Kill the group in any case: a daemonised grandchild must not outlive the run.
            _kill_group(proc)
            proc.wait()
        stdout, completed = _read(out_path, max_output, f"\n{marker}\n".encode())
        stderr, _ = _read(err_path, max_output, b"")
    return SandboxResult(None if timed_out else proc.returncode, completed and not timed_out, timed_out, stdout,
                         stderr, time.monotonic() - start)
