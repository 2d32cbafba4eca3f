"""The persistent privacy ledger: every charge, written durably before release.

A site records the charge for a round *before* it trains, in its own transaction,
so a crash between charging and releasing can only over-count (the safe side),
never under-count.  SQLite with WAL and ``synchronous=FULL`` makes the commit
survive a killed process or a power cut.  The server keeps the same kind of ledger,
one history per site, computed from the parameters it dictated.

A site whose data is a sequence of cohorts (:mod:`fedtune.privacy.cohorts`) charges one
row per active cohort per round, all in one transaction; a row with no cohort (NULL)
charged the site's whole data and counts toward every cohort.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

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


def _add_column(conn: sqlite3.Connection, name: str) -> None:
    """Migrate a ledger file from before charges named their run or cohort (NULL for old rows).

    A NULL cohort is the safe reading of an old row: it charged the site's whole data, so
    it counts toward every cohort.
    """
    if name not in {row[1] for row in conn.execute("PRAGMA table_info(charges)")}:
        try:
            conn.execute(f"ALTER TABLE charges ADD COLUMN {name} TEXT")
        except sqlite3.OperationalError as exc:  # another process migrated it first
            if "duplicate column" not in str(exc):
                raise


class PrivacyLedger:
    """A SQLite file of charges, keyed by site pseudonym.

    ``run`` names the run each new charge belongs to: a server's ledger can outlive one run
    (a deployment keeps one per federation), and round numbers repeat across runs.
    """

    def __init__(self, path: str | Path, accountant: str = "rdp", run: Optional[str] = None) -> None:
        self.path = Path(path)
        self.accountant = accountant
        self.run = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            _add_column(conn, "run")
            _add_column(conn, "cohort")
            conn.commit()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def charge(self, site: str, charge: Charge, cohorts: Sequence[Optional[str]] = (None,)) -> None:
        """Record ``charge`` durably, once per cohort in ``cohorts``; returns only once it is on disk.

        Only a :class:`Charge` is accepted: it validated itself when built, so no
        negative, zero-step or non-finite row can be written.  ``cohorts``: the cohorts
        this round samples from (``None``: the site's whole data), written in one
        transaction, so a crash leaves all of the round's rows or none.
        """
        if not isinstance(charge, Charge):
            raise TypeError(f"a ledger records Charge objects, not {type(charge).__name__}")
        if not cohorts or not all(c is None or (isinstance(c, str) and c) for c in cohorts):
            raise ValueError("a charge names at least one cohort (None: the whole site), each a non-empty string")
        now = datetime.now(timezone.utc).isoformat()
        with closing(self._connect()) as conn, conn:
            conn.executemany(
                "INSERT INTO charges (site, round, noise_multiplier, sample_rate, steps, accountant, recorded_at,"
                " run, cohort) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(site, charge.round, charge.noise_multiplier, charge.sample_rate, charge.steps, self.accountant,
                  now, self.run, cohort) for cohort in cohorts],
            )
        log.debug("ledger %s: charged site %s for round %d (%d cohort rows)", self.path.name, site, charge.round,
                  len(cohorts))

    def history(self, site: Optional[str]) -> list[Charge]:
        """The charges of ``site`` in the order they were made; ``None``: every row of the file.

        A row that is not a valid charge (the file was edited or corrupted) raises
        InvalidCharge rather than being skipped: skipping it would under-count.
        """
        query = "SELECT round, noise_multiplier, sample_rate, steps FROM charges"
        with closing(self._connect()) as conn:
            if site is None:
                rows = conn.execute(f"{query} ORDER BY id").fetchall()
            else:
                rows = conn.execute(f"{query} WHERE site = ? ORDER BY id", (site,)).fetchall()
        return [Charge(round=r[0], noise_multiplier=r[1], sample_rate=r[2], steps=r[3]) for r in rows]

    def cohort_history(self, cohort: str) -> list[Charge]:
        """Every charge that touched ``cohort``'s records: its own rows and the whole-site (NULL) rows.

        Whatever site name charged them, as for :meth:`history` ``(None)``: renaming a site
        must not reset its cohorts' budgets.
        """
        with closing(self._connect()) as conn:
            rows = conn.execute("SELECT round, noise_multiplier, sample_rate, steps FROM charges"
                                " WHERE cohort = ? OR cohort IS NULL ORDER BY id", (cohort,)).fetchall()
        return [Charge(round=r[0], noise_multiplier=r[1], sample_rate=r[2], steps=r[3]) for r in rows]

    def cohorts(self) -> list[str]:
        """The cohorts charged in this file, oldest first."""
        with closing(self._connect()) as conn:
            rows = conn.execute("SELECT cohort FROM charges WHERE cohort IS NOT NULL GROUP BY cohort"
                                " ORDER BY MIN(id)").fetchall()
        return [r[0] for r in rows]

    def runs(self, site: Optional[str] = None) -> list[Optional[str]]:
        """The runs that charged ``site`` (``None``: any site), oldest first; ``None`` for unnamed charges."""
        where, args = (" WHERE site = ?", (site,)) if site is not None else ("", ())
        with closing(self._connect()) as conn:
            rows = conn.execute(f"SELECT run FROM charges{where} GROUP BY run ORDER BY MIN(id)", args).fetchall()
        return [r[0] for r in rows]

    def epsilon(self, site: Optional[str], delta: float) -> float:
        return epsilon(self.history(site), delta, self.accountant)

    def check(self, site: Optional[str], proposed: Charge, budget: float, delta: float) -> BudgetDecision:
        return check_budget(self.history(site), proposed, budget, delta, self.accountant)
