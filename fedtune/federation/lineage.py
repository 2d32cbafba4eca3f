"""A federation's adapter versions on disk: ``versions/vNNNN/``, each from its parent, and the current one.

With ``versions.enabled`` the run directory is the federation's root.  Each server run
writes one version, a run directory of its own under ``versions/``, holding
``version.json``: its number, its parent (the version that was current when it began),
its first round, and, when it ends, its last round, its held-out loss beside its
parent's (the parent's adapter evaluated on the same held-out set when the version
began) and whether the regression gate (:mod:`fedtune.federation.gate`) promoted it.
``versions/CURRENT`` names the current version; it is replaced atomically, and only by a
promotion.  Round numbers continue across versions, so no two rounds of a federation
share a number (the sites' ledgers and signed secure-aggregation statements name rounds).

A server restarted mid-version finds the latest version unfinished and resumes it from
its own checkpoint; a server started after a finished version begins the next.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from fedtune.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
VERSION_FILE = "version.json"
CURRENT_FILE = "CURRENT"
_NAME = re.compile(r"^v(\d{4,})$")


def version_name(number: int) -> str:
    return f"v{number:04d}"


@dataclass(frozen=True)
class VersionPlan:
    """The version a server run writes: where, from which parent, from which round."""

    root: Path
    number: int
    parent: Optional[int]
    first_round: int

    @property
    def name(self) -> str:
        return version_name(self.number)

    @property
    def dir(self) -> Path:
        return self.root / VERSIONS_DIR / self.name

    @property
    def parent_dir(self) -> Optional[Path]:
        return None if self.parent is None else self.root / VERSIONS_DIR / version_name(self.parent)

    def info(self) -> dict[str, Any]:
        return read_version(self.dir)

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into this version's version.json (atomically)."""
        write_version(self.dir, {**self.info(), **fields})


def read_version(directory: Path) -> dict[str, Any]:
    path = directory / VERSION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_version(directory: Path, info: dict[str, Any]) -> None:
    atomic_write_text(directory / VERSION_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")


def list_versions(root: Path) -> list[int]:
    """The numbers of the versions under ``root`` that have a version.json, oldest first."""
    folder = root / VERSIONS_DIR
    if not folder.is_dir():
        return []
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)) and (p / VERSION_FILE).is_file()]
    return sorted(numbers)


def current_version(root: Path) -> Optional[int]:
    """The promoted version ``versions/CURRENT`` names, or None before the first promotion."""
    path = root / VERSIONS_DIR / CURRENT_FILE
    if not path.is_file():
        return None
    match = _NAME.match(path.read_text().strip())
    if match is None or not (root / VERSIONS_DIR / match.group(0) / VERSION_FILE).is_file():
        raise ValueError(f"{path} does not name a version of {root / VERSIONS_DIR}")
    return int(match.group(1))


def plan_version(root: Path) -> VersionPlan:
    """Resume the latest version if it is unfinished, else begin the next from the current one."""
    numbers = list_versions(root)
    if numbers:
        latest = read_version(root / VERSIONS_DIR / version_name(numbers[-1]))
        if not latest.get("finished"):
            log.info("resuming the unfinished version %s", version_name(numbers[-1]))
            return VersionPlan(root, numbers[-1], latest.get("parent"), int(latest["first_round"]))
    last_round = int(read_version(root / VERSIONS_DIR / version_name(numbers[-1]))["last_round"]) if numbers else 0
    plan = VersionPlan(root, (numbers[-1] + 1) if numbers else 1, current_version(root), last_round + 1)
    plan.dir.mkdir(parents=True, exist_ok=True)
    write_version(plan.dir, {"version": plan.name, "parent": plan.parent,
                             "parent_name": None if plan.parent is None else version_name(plan.parent),
                             "first_round": plan.first_round, "finished": False,
                             "started_at": datetime.now(timezone.utc).isoformat()})
    log.info("version %s begins at round %d from %s", plan.name, plan.first_round,
             version_name(plan.parent) if plan.parent is not None else "the untrained adapter")
    return plan


def previous_info(plan: VersionPlan) -> Optional[dict[str, Any]]:
    """The version.json of the version before ``plan`` (the federation's last run), or None for the first."""
    if plan.number <= 1:
        return None
    return read_version(plan.root / VERSIONS_DIR / version_name(plan.number - 1)) or None


def discard(plan: VersionPlan) -> None:
    """Remove a version that began but trained nothing (no checkpoint, no round), as if it never began.

    A scheduled check that finds no new cohort (:mod:`fedtune.federation.new_cohorts`) would
    otherwise leave one empty version directory per check.
    """
    info = plan.info()
    if info.get("finished") or (plan.dir / "checkpoint").exists() or (plan.dir / "metrics.jsonl").exists():
        raise ValueError(f"{plan.dir} holds a version that trained; it is not discarded")
    shutil.rmtree(plan.dir)
    log.info("version %s discarded: it trained nothing", plan.name)


def promote(root: Path, number: int) -> None:
    """Make version ``number`` the current one (one atomic rename)."""
    atomic_write_text(root / VERSIONS_DIR / CURRENT_FILE, version_name(number) + "\n")


__all__ = ["CURRENT_FILE", "VERSIONS_DIR", "VERSION_FILE", "VersionPlan", "current_version", "discard",
           "list_versions", "plan_version", "previous_info", "promote", "read_version", "version_name", "write_version"]
