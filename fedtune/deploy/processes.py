"""Starting and stopping Flower's own processes (SuperLink, SuperNode, ``flwr``).

fedtune wraps these commands but does not hide them: every command line is logged
before it starts, so an operator can copy it, and README.md lists them.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional, Sequence

log = logging.getLogger(__name__)

OBJECT_CONCURRENCY = 8


def flower_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment for Flower's commands: this interpreter's bin/ first on PATH.

    The SuperLink starts ``flower-superexec`` and ``flwr-serverapp`` by name, so they
    must resolve to the same installation as the fedtune that launched them.
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # A message travels as a tree of objects (message, records, arrays, each array cut into
    # 5 MiB chunks), and flwr moves objects two at a time by default.  When each LoRA tensor
    # was its own array a 4 MiB adapter took ~35 sequential TLS round trips per site; packed
    # into one vector a large adapter still spans several chunks.  Eight in flight.
    env.setdefault("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS", str(OBJECT_CONCURRENCY))
    env.setdefault("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES", str(OBJECT_CONCURRENCY))
    env.update(extra or {})
    return env


def tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child when the process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def start(command: Sequence[str], log_path: Optional[Path] = None, env: Optional[dict[str, str]] = None,
          cwd: Optional[Path] = None, new_session: bool = False, umask: int = -1) -> subprocess.Popen:
    """Start ``command`` (logged first), output appended to ``log_path`` or inherited.

    By default the child stays in our process group and is signalled if we die: a
    SIGKILLed ``fedtune client`` must not leave an orphan SuperNode holding its port (and,
    for a server, a SuperLink still accepting sites).  ``umask`` (e.g. 0o077) is the
    child's: what it and its own children create (the SuperLink's database, the
    ServerApp's outputs) gets that mode whatever this process's umask is; -1 inherits ours.
    """
    log.info("starting: %s", shlex.join(command))
    out: Optional[IO[bytes]] = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666 if umask < 0 else 0o666 & ~umask)
        out = os.fdopen(descriptor, "ab")  # noqa: SIM115 - the child keeps it open
    try:
        return subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT if out else None,
                                env=env or flower_env(), cwd=cwd, start_new_session=new_session,
                                preexec_fn=None if new_session or not sys.platform.startswith("linux")
                                else _die_with_parent, umask=umask)
    finally:
        if out is not None:
            out.close()


def stop(process: subprocess.Popen, timeout_s: float = 10.0) -> Optional[int]:
    """SIGTERM, then SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return process.returncode
    process.terminate()
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=timeout_s)


def wait_for_port(host: str, port: int, timeout_s: float, process: Optional[subprocess.Popen] = None,
                  what: str = "service", log_path: Optional[Path] = None) -> None:
    """Block until ``host:port`` accepts TCP connections; fail early if ``process`` died."""
    deadline = time.monotonic() + timeout_s
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before listening on "
                               f"{host}:{port}.{_tail(log_path)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((probe_host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s.{_tail(log_path)}")


def _tail(log_path: Optional[Path], lines: int = 15) -> str:
    if log_path is None or not log_path.exists():
        return ""
    text = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f" Last lines of {log_path}:\n" + "\n".join(text)


def run(command: Sequence[str], env: Optional[dict[str, str]] = None, timeout_s: float = 120.0,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    log.info("running: %s", shlex.join(command))
    return subprocess.run(list(command), env=env or flower_env(), capture_output=True, text=True,
                          timeout=timeout_s, cwd=cwd)
