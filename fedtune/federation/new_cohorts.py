"""``versions.on_new_cohort``: a version trains only when a site reports a cohort the last version did not see.

A site's cohorts reach the server only through the disclosure it chooses
(:mod:`fedtune.deploy.manifest`, ``manifest.disclose`` with ``cohorts``): each cohort's name,
record count and commitment, never a record.  A cohort has *arrived* once it holds a record
(a site may declare next month's file before it exists).  Every finished version notes in
its version.json the arrived cohorts each site reported (``cohorts_seen``).  With
``on_new_cohort`` a server run first describes the sites and trains a version only if some
site now reports an arrived cohort missing from the last version's note; otherwise it
writes no version and exits 0.  With ``versions.every_hours`` as the interval this polls
cheaply (one description per site per check) and trains when data arrives, with no cron
job.  A site that discloses no cohorts never starts a version: the server cannot see its
data arrive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from fedtune.federation.membership import SiteInfo

SEEN_KEY = "cohorts_seen"


def arrived(disclosure: dict[str, Any]) -> list[str]:
    """The names of the cohorts a (validated) disclosure lists with at least one record."""
    return sorted({c["name"] for c in disclosure.get("cohorts", []) if c.get("records") != 0})


def cohorts_seen(sites: list["SiteInfo"]) -> dict[str, list[str]]:
    """What version.json notes: each disclosing site's arrived cohorts."""
    return {s.name: arrived(s.disclosure) for s in sites if "cohorts" in s.disclosure}


def read_seen(info: dict[str, Any]) -> Optional[dict[str, set[str]]]:
    """A version's note, or None when it has none (an older version, or a hand-edited file)."""
    seen = info.get(SEEN_KEY)
    if not isinstance(seen, dict) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in seen.values()):
        return None
    return {str(site): set(names) for site, names in seen.items()}


def new_cohorts(sites: list["SiteInfo"], seen: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each site's arrived cohorts that ``seen`` does not list (a site absent from it: all of its cohorts)."""
    found = {}
    for site, names in cohorts_seen(sites).items():
        fresh = [n for n in names if n not in seen.get(site, set())]
        if fresh:
            found[site] = fresh
    return found


def should_train(sites: list["SiteInfo"], previous: Optional[dict[str, Any]]) -> tuple[bool, str]:
    """Whether this version trains, and the log line that says why.

    ``previous``: the last version's version.json, or None for the federation's first version
    (which always trains).  A last version without a note also trains: fedtune cannot tell
    what it saw, and training once more is the safe reading of "new data may have arrived".
    """
    if previous is None:
        return True, "the federation's first version"
    name = previous.get("version", "the last version")
    seen = read_seen(previous)
    if seen is None:
        return True, f"{name} noted no cohorts, so every cohort counts as new"
    found = new_cohorts(sites, seen)
    if not found:
        return False, f"no site reported a cohort that {name} did not see"
    listed = "; ".join(f"{site}: {', '.join(names)}" for site, names in sorted(found.items()))
    return True, f"new cohorts since {name}: {listed}"
