"""The persistent privacy ledger: every charge, written durably before release.

A site records the charge for a round *before* it trains, in its own transaction,
so a crash between charging and releasing can only over-count (the safe side),
never under-count.  SQLite with WAL and ``synchronous=FULL`` makes the commit
survive a killed process or a power cut.  The server keeps the same kind of ledger,
one history per site, computed from the parameters it dictated.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from fedtune.privacy.accounting import BudgetDecision, Charge, check_budget, epsilon

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_site ON charges(site);
"""


class PrivacyLedger:
    """A SQLite file of charges, keyed by site pseudonym."""

    def __init__(self, path: str | Path, accountant: str = "rdp") -> None:
        self.path = Path(path)
        self.accountant = accountant
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.commit()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def charge(self, site: str, charge: Charge) -> None:
        """Record ``charge`` durably; returns only once it is on disk."""
        with closing(self._connect()) as conn, conn:
            conn.execute(
                "INSERT INTO charges (site, round, noise_multiplier, sample_rate, steps, accountant, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (site, charge.round, charge.noise_multiplier, charge.sample_rate, charge.steps,
                 self.accountant, datetime.now(timezone.utc).isoformat()),
            )
        log.debug("ledger %s: charged site %s for round %d", self.path.name, site, charge.round)

    def history(self, site: str) -> list[Charge]:
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT round, noise_multiplier, sample_rate, steps FROM charges WHERE site = ? ORDER BY id",
                (site,),
            ).fetchall()
        return [Charge(round=r[0], noise_multiplier=r[1], sample_rate=r[2], steps=r[3]) for r in rows]

    def sites(self) -> list[str]:
        with closing(self._connect()) as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT site FROM charges ORDER BY site")]

    def epsilon(self, site: str, delta: float) -> float:
        return epsilon(self.history(site), delta, self.accountant)

    def check(self, site: str, proposed: Charge, budget: float, delta: float) -> BudgetDecision:
        return check_budget(self.history(site), proposed, budget, delta, self.accountant)
