"""Who is in the federation: discover the sites, wait for them, and notice who came back.

A site is known by the pseudonym it describes itself with, never by its Flower node id
(which changes when a site reconnects).  In a deployment the enrolment map says which
node's key was issued to which site, so a node cannot take another site's name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedtune.federation import exchange, protocol
from fedtune.federation.rounds import RoundOutcome
from fedtune.transparency.disclosure import read_disclosure

log = logging.getLogger(__name__)

# How long a site that missed a round is given to describe itself again.
REDISCOVER_TIMEOUT_S = 10.0
# Pause between two asks for sites that are not (yet) there.
POLL_S = 2.0


@dataclass
class SiteInfo:
    node_id: int
    name: str
    budget_epsilon: float
    delta: float
    refused: bool = False
    # Did not answer the last round (crashed, restarting, network): asked again before the
    # next round instead of being sent a round it cannot take part in.
    missing: bool = False
    # The site accounts each of its data cohorts against its own budget and retires spent ones
    # (fedtune.privacy.cohorts), so the server's whole-site ε does not decide when it stops.
    per_cohort_budget: bool = False
    # What the site chose to disclose of its data (fedtune.transparency.disclosure), for the records.
    disclosure: dict[str, Any] = field(default_factory=dict)


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    """The connected node ids, once ``count`` are connected or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= count or time.monotonic() > deadline:
            return node_ids
        time.sleep(0.5)


def discover_sites(grid: Grid, node_ids: list[int], timeout_s: float,
                   enrolled: Optional[dict[int, str]] = None) -> list[SiteInfo]:
    """Ask every node who it is: its stable site pseudonym and its own budget.

    In a deployment ``enrolled`` maps each enrolled key's node id to the site it was
    issued to; a node claiming another site's name (to spend or hide behind another
    site's budget) is ignored with an error line.  Two nodes claiming one name are too.
    """
    messages = [Message(RecordDict(), dst_node_id=n, message_type=protocol.DESCRIBE) for n in node_ids]
    sites: dict[str, SiteInfo] = {}
    for node, reply in exchange.send_and_receive(grid, messages, timeout_s).items():
        if reply.has_error():
            log.info("node %d did not describe itself: %s", node, reply.error.reason)
            continue
        info = reply.content[protocol.SITE]
        name = str(info["site"])
        if enrolled is not None and enrolled.get(node) != name:
            log.error("node %d claims to be site %r, but its enrolled key was issued to %r; ignoring it", node, name,
                      enrolled.get(node, "no site"))
            continue
        if name in sites:
            log.error("nodes %d and %d both claim to be site %r; ignoring the second", sites[name].node_id, node, name)
            continue
        sites[name] = SiteInfo(node_id=node, name=name, budget_epsilon=float(info["budget_epsilon"]),
                               delta=float(info["delta"]),
                               per_cohort_budget=info.get("per_cohort_budget", False) is True,
                               disclosure=read_disclosure(name, info.get("disclosure")))
    return sorted(sites.values(), key=lambda s: s.name)


def connect_sites(grid: Grid, count: int, timeout_s: float, enrolled: Optional[dict[int, str]]) -> list[SiteInfo]:
    """The sites of this run: wait for ``count`` nodes, then ask until ``count`` sites answered.

    Enrolled nodes are known before they are online (a site still starting, or
    reconnecting after the server restarted), so a node that did not answer the first
    ask is asked again until ``timeout_s`` has passed.
    """
    node_ids = wait_for_nodes(grid, count, timeout_s)
    sites = discover_sites(grid, node_ids, timeout_s=timeout_s, enrolled=enrolled)
    deadline = time.monotonic() + timeout_s
    while len(sites) < count and time.monotonic() < deadline:
        time.sleep(POLL_S)
        known_nodes, known_names = {s.node_id for s in sites}, {s.name for s in sites}
        found = discover_sites(grid, [n for n in grid.get_node_ids() if n not in known_nodes],
                               REDISCOVER_TIMEOUT_S, enrolled)
        sites = sorted(sites + [s for s in found if s.name not in known_names], key=lambda s: s.name)
    log.info("%d sites connected: %s", len(sites), ", ".join(s.name for s in sites))
    return sites


class SiteDirectory:
    """The run's nodes, and the sites among them described so far.

    Without ``federation.sites_per_round`` every site trains every round, so every one is
    described before the first (:func:`connect_sites`).  With it, a federation of thousands
    of simulated sites used to spend minutes asking each to describe itself (a message
    through Ray per site) before the first round, and gave up at ``wait_for_sites_s``; a
    site is now described at its first contact, when a round's sample first draws it, so a
    round costs messages for the sites it asks, and the reports cover the sites that were.
    ``sites`` is the list of described sites, sorted by name, and grows in place.
    """

    def __init__(self, grid: Grid, node_ids: list[int], sites: list[SiteInfo], timeout_s: float,
                 enrolled: Optional[dict[int, str]]) -> None:
        self.grid, self.node_ids, self.sites = grid, node_ids, sites
        self.timeout_s, self.enrolled = timeout_s, enrolled
        self._by_node = {s.node_id: s for s in sites}
        self._names = {s.name for s in sites}

    def describe(self, node_ids: list[int]) -> list[SiteInfo]:
        """The sites of ``node_ids`` (in their order), asking those not yet described; silent ones are left out."""
        unknown = [n for n in node_ids if n not in self._by_node]
        if unknown:
            for site in discover_sites(self.grid, unknown, self.timeout_s, self.enrolled):
                if site.name in self._names:
                    log.error("node %d claims to be site %r, which another node already is; ignoring it",
                              site.node_id, site.name)
                    continue
                self._by_node[site.node_id] = site
                self._names.add(site.name)
                self.sites.append(site)
            self.sites.sort(key=lambda s: s.name)
        return [self._by_node[n] for n in node_ids if n in self._by_node]

    def refresh_disclosures(self, sites: list[SiteInfo]) -> None:
        """Ask the sites that disclose their cohorts to describe themselves again, after a round.

        Their cohorts' ε is the site's own report, computed when it describes itself; asked
        only at the run's start, a version's records would state every cohort's ε before the
        version's rounds.  A site that does not answer, or answers as another site, keeps
        the disclosure it had.  Sites that disclose no cohorts cost no message.
        """
        stale = [s for s in sites if "cohorts" in s.disclosure]
        if not stale:
            return
        fresh = {s.node_id: s for s in discover_sites(self.grid, [s.node_id for s in stale], REDISCOVER_TIMEOUT_S,
                                                       self.enrolled)}
        for site in stale:
            again = fresh.get(site.node_id)
            if again is not None and again.name == site.name and again.disclosure:
                site.disclosure = again.disclosure


def open_directory(grid: Grid, count: int, timeout_s: float, enrolled: Optional[dict[int, str]],
                   describe_all: bool) -> SiteDirectory:
    """The run's directory: every site described now (``describe_all``), or each at first contact."""
    if describe_all:
        sites = connect_sites(grid, count, timeout_s, enrolled)
        return SiteDirectory(grid, [s.node_id for s in sites], sites, timeout_s, enrolled)
    node_ids = wait_for_nodes(grid, count, timeout_s)
    log.info("%d nodes connected; each site describes itself when a round first samples it", len(node_ids))
    return SiteDirectory(grid, node_ids, [], timeout_s, enrolled)


def reachable(grid: Grid, eligible: list[SiteInfo], needed: int, wait_timeout_s: float,
              enrolled: Optional[dict[int, str]]) -> list[SiteInfo]:
    """The eligible sites that can take part now.

    Sites that missed the last round are asked to describe themselves again; those that
    answer are back.  If fewer than ``needed`` remain (secure aggregation needs 3), wait for
    the missing ones up to ``wait_timeout_s`` rather than start a round bound to be abandoned.
    """
    deadline = time.monotonic() + wait_timeout_s
    while True:
        _ask_missing_again(grid, eligible, enrolled)
        ready = [s for s in eligible if not s.missing]
        if len(ready) >= needed or not any(s.missing for s in eligible) or time.monotonic() >= deadline:
            skipped = [s.name for s in eligible if s.missing]
            if skipped:
                log.warning("not scheduling %s this round: unreachable", ", ".join(skipped))
            return ready
        log.info("waiting for %s to come back (%d of %d needed sites reachable)",
                 ", ".join(s.name for s in eligible if s.missing), len(ready), needed)
        time.sleep(POLL_S)


def _ask_missing_again(grid: Grid, sites: list[SiteInfo], enrolled: Optional[dict[int, str]]) -> None:
    missing = [s for s in sites if s.missing]
    if not missing:
        return
    answered = {s.node_id for s in discover_sites(grid, [s.node_id for s in missing], REDISCOVER_TIMEOUT_S,
                                                  enrolled)}
    for site in missing:
        site.missing = site.node_id not in answered
        if not site.missing:
            log.info("%s is back", site.name)


def note_attendance(selected: list[SiteInfo], outcome: RoundOutcome) -> None:
    """A site that refused is not asked again this run; one that failed is asked before the next round."""
    for site in selected:
        if site.name in outcome.refusals:
            site.refused = True
        site.missing = site.name in outcome.failures
