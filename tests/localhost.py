"""A whole deployment on one machine, started exactly as users start it.

For the deployment tests and ``benchmarks/deploy.py``: each party is the real command
(``fedtune server``, ``fedtune client``) in its own process group on 127.0.0.1, and is
stopped or killed by its process id.  A test harness, so it lives under tests/ and not in
the library: nothing here is used by a real federation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from fedtune.deploy.processes import flower_env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fedtune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


@dataclass
class LocalFederation:
    root: Path
    site_ids: list[str]
    demo_records: int = 1200
    port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    server: Optional[subprocess.Popen] = None
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)
    runtime_ports: dict[str, int] = field(default_factory=dict)

    def init(self) -> None:
        """Enrol the sites as a real federation does: each site makes its own key pair, the operator gets auth.pub.

        On one machine a site's own folder and the kit the operator writes for it are the
        same folder, so the kit's site.yaml finds the site's auth.key beside it.
        """
        keygens = [subprocess.Popen(fedtune_command("client", "keygen", "--out", str(self.kit(site_id))),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=flower_env())
                   for site_id in self.site_ids]
        for site_id, process in zip(self.site_ids, keygens):
            output, _ = process.communicate(timeout=120)
            if process.returncode != 0:
                raise RuntimeError(f"`fedtune client keygen` failed for {site_id}: {output.decode(errors='replace')}")
        sites = [f"--site={site_id}={self.kit(site_id) / 'auth.pub'}" for site_id in self.site_ids]
        result = subprocess.run(fedtune_command("init-federation", str(self.root), *sites,
                                                "--port", str(self.port), "--control-port", str(self.control_port),
                                                "--demo-data", str(self.demo_records)),
                                capture_output=True, text=True, env=flower_env(), timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"init-federation failed: {result.stdout}{result.stderr}")
        for site_id in self.site_ids:
            self.runtime_ports[site_id] = free_port()

    def kit(self, site_id: str) -> Path:
        return self.root / "sites" / site_id

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        path = self.log_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=flower_env(),
                                    start_new_session=True)

    def start_server(self, *overrides: str, wait_for_enrolment: bool = True) -> subprocess.Popen:
        """Start ``fedtune server``; by default return once the sites' keys are enrolled."""
        before = self.tail("server", 100000).count("flwr run")
        self.server = self._start("server", fedtune_command("server", "--federation", str(self.root), *overrides))
        if wait_for_enrolment:
            self.wait_until(lambda: self.tail("server", 100000).count("flwr run") > before, 120,
                            "the SuperLink to start and enrol the sites")
        return self.server

    def start_site(self, site_id: str, *overrides: str) -> subprocess.Popen:
        process = self._start(site_id, fedtune_command(
            "client", "--site-config", str(self.kit(site_id) / "site.yaml"),
            f"runtime_port={self.runtime_ports[site_id]}", *overrides))
        self.sites[site_id] = process
        return process

    def kill(self, process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal the party's whole process group (its SuperLink/SuperNode children too)."""
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in [*self.sites.values(), *([self.server] if self.server else [])]:
            if process.poll() is None:
                self.kill(process, signal.SIGTERM)
            # Children left behind by a SIGKILL of their leader share its process group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.server is not None and self.server.poll() is not None and not predicate():
                raise RuntimeError(f"the server exited ({self.server.returncode}) while waiting for {what}.\n"
                                   + self.tail("server"))
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}.\n" + self.tail("server"))

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
