"""A site's records grouped in cohorts: which records a round may sample from.

A deployed site declaring ``data.cohorts`` in its site.yaml holds one cohort per file; a
site without cohorts (and every simulated site) holds its whole data as one unnamed
cohort, accounted as before (every ledger row).  See :mod:`fedtune.privacy.cohorts` for
why a round may sample from the active cohorts only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from fedtune.data.records import Record


@dataclass(frozen=True)
class CohortedRecords:
    """The site's records, each with the name of its cohort (None: the site has no cohorts)."""

    records: tuple[Record, ...]
    cohorts: tuple[Optional[str], ...]

    def __post_init__(self) -> None:
        if len(self.records) != len(self.cohorts):
            raise ValueError("one cohort name per record")

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def of(cls, named: Sequence[tuple[str, Sequence[Record]]]) -> "CohortedRecords":
        """From ``[(cohort name, its records), ...]`` in arrival order."""
        records = tuple(r for _, rs in named for r in rs)
        return cls(records, tuple(name for name, rs in named for _ in rs))

    def names(self) -> tuple[str, ...]:
        """The named cohorts, in arrival order (empty for a site without cohorts)."""
        return tuple(dict.fromkeys(c for c in self.cohorts if c is not None))

    def select(self, active: Sequence[Optional[str]]) -> list[Record]:
        """The records of the ``active`` cohorts, in order: the union a round samples from."""
        keep = set(active)
        return [r for r, c in zip(self.records, self.cohorts) if c in keep]

    def count(self, name: str) -> int:
        return sum(1 for c in self.cohorts if c == name)


def cohorted(records: Union[CohortedRecords, Sequence[Record]]) -> CohortedRecords:
    """A plain list of records is one unnamed cohort: the whole site."""
    if isinstance(records, CohortedRecords):
        return records
    return CohortedRecords(tuple(records), (None,) * len(records))
