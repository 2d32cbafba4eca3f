"""``versions.on_new_cohort``: a version trains only when a site reports a newly arrived cohort."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedtune import governance
from fedtune.apps import RUN_CONFIG_KEY, make_client_app
from fedtune.config import FedtuneConfig, to_dict
from fedtune.deploy.site_config import CohortSource, SiteConfig
from fedtune.errors import ConfigError
from fedtune.federation import lineage, new_cohorts
from fedtune.federation.membership import SiteInfo
from fedtune.federation.server import run_server
from fedtune.privacy.cohorts import cohort_epsilons
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.deploy.site_data import cohort_budgets
from fedtune.simulation import check_config
from fedtune.validation import validate

from conftest import InProcessGrid
from site_attack import write_site

COMMITMENT = "ab" * 32


def _site(name: str, *cohorts: tuple[str, int]) -> SiteInfo:
    disclosure = {"manifest": {}, "cohorts": [{"name": n, "records": r, "commitment": COMMITMENT} for n, r in cohorts]}
    return SiteInfo(100, name, 8.0, 1e-5, per_cohort_budget=True, disclosure=disclosure)


def _previous(seen: Any) -> dict[str, Any]:
    return {"version": "v0001", new_cohorts.SEEN_KEY: seen}


def test_a_version_trains_only_for_an_arrived_cohort_the_last_version_did_not_see() -> None:
    sites = [_site("a", ("jan", 10)), _site("b", ("jan", 5), ("feb", 0))]
    assert new_cohorts.should_train(sites, None) == (True, "the federation's first version")
    seen = {"a": ["jan"], "b": ["jan"]}
    # feb is declared at b but holds no record yet: it has not arrived.
    train, reason = new_cohorts.should_train(sites, _previous(seen))
    assert not train and "no site reported a cohort that v0001 did not see" in reason
    sites[1] = _site("b", ("jan", 5), ("feb", 7))
    assert new_cohorts.should_train(sites, _previous(seen)) == (True, "new cohorts since v0001: b: feb")
    # A site the last version did not hear from brings all of its cohorts; one that discloses none, nothing.
    newcomer = _site("c", ("mar", 3))
    assert new_cohorts.new_cohorts([newcomer], {"a": {"jan"}}) == {"c": ["mar"]}
    silent = SiteInfo(101, "d", 8.0, 1e-5)
    assert new_cohorts.cohorts_seen([silent, sites[0]]) == {"a": ["jan"]}


@pytest.mark.parametrize("garbage", [None, [], "jan", {"a": "jan"}, {"a": [1]}, {"a": None}, 7])
def test_a_last_version_without_a_readable_note_trains_again(garbage: Any) -> None:
    train, reason = new_cohorts.should_train([_site("a", ("jan", 1))], _previous(garbage))
    assert train and "noted no cohorts" in reason


def test_on_new_cohort_is_validated(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.versions.on_new_cohort = True
    with pytest.raises(ConfigError, match="versions.on_new_cohort"):
        validate(tiny_cfg)
    tiny_cfg.versions.enabled = True
    tiny_cfg.federation.sites_per_round = 2
    with pytest.raises(ConfigError, match="federation.sites_per_round"):
        validate(tiny_cfg)
    tiny_cfg.federation.sites_per_round = None
    validate(tiny_cfg)
    with pytest.raises(ConfigError, match="simulated sites disclose none"):
        check_config(tiny_cfg)


class _DeployedSites(InProcessGrid):
    """In-process nodes that are deployed sites: each its own site.yaml, data, ledger and disclosure."""

    def __init__(self, cfg: FedtuneConfig, sites: list[SiteConfig]) -> None:
        apps = {100 + i: make_client_app(deployed=site) for i, site in enumerate(sites)}
        super().__init__(lambda msg, ctx: apps[ctx.node_id](msg, ctx), len(sites))  # type: ignore[arg-type]
        raw = json.dumps(to_dict(cfg))
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                                       run_config={RUN_CONFIG_KEY: raw}) for node in apps}


def _disclosing_sites(home: Path) -> list[SiteConfig]:
    sites = []
    for name in ("hosp-a", "hosp-b", "hosp-c"):
        site = write_site(home / name, site_id=name)
        site.data.cohorts = [CohortSource(name="2026-01", path="data.jsonl", period="2026-01")]
        site.manifest.disclose = ["cohorts"]
        sites.append(site)
    return sites


def _cohort_epsilon(site: SiteConfig, cohort: str) -> float:
    ledger = PrivacyLedger(site.resolve(site.ledger_path), accountant=site.budget.accountant)
    return cohort_epsilons(cohort_budgets(site), ledger, site.budget.accountant)[cohort]


def test_versions_wait_for_a_new_cohort_and_records_state_each_cohorts_epsilon_after_the_round(
        tiny_cfg: FedtuneConfig, tmp_path: Path) -> None:
    root = Path(tiny_cfg.run_dir)
    tiny_cfg.versions.enabled = tiny_cfg.versions.on_new_cohort = True
    tiny_cfg.federation.num_rounds = 1
    tiny_cfg.train.seed = None
    sites = _disclosing_sites(tmp_path / "sites")

    def serve() -> None:
        run_server(_DeployedSites(tiny_cfg, sites), tiny_cfg, root, show_progress=False, pooled_data=False)

    serve()
    first = lineage.read_version(root / lineage.VERSIONS_DIR / "v0001")
    assert first["finished"] and first[new_cohorts.SEEN_KEY] == {s.site_id: ["2026-01"] for s in sites}
    # The record states each cohort's ε after the version's round (the site's ledger now), not before it.
    record = json.loads((root / lineage.VERSIONS_DIR / "v0001" / "adapters" / "round_001" /
                         governance.RECORD_FILE).read_text())
    for site in sites:
        stated = record["disclosures"][site.site_id]["cohorts"][0]["epsilon"]
        assert stated == pytest.approx(_cohort_epsilon(site, "2026-01"), rel=1e-9) and stated > 0

    # Nothing new at any site: no version, no charge, and a summary that is not a failure.
    charges = [len(PrivacyLedger(s.resolve(s.ledger_path)).history(s.site_id)) for s in sites]
    serve()
    assert lineage.list_versions(root) == [1] and not (root / lineage.VERSIONS_DIR / "v0002").exists()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["skipped"] and summary["failed"] is None and "v0001 did not see" in summary["stop_reason"]
    assert [len(PrivacyLedger(s.resolve(s.ledger_path)).history(s.site_id)) for s in sites] == charges

    # hosp-b's February file arrives: the next check trains v0002 from v0001, and it trains February.
    feb = Path(sites[1].base_dir) / "feb.jsonl"
    feb.write_text("".join(json.dumps({"text": f"February ward note {i}."}) + "\n" for i in range(30)))
    sites[1].data.cohorts.append(CohortSource(name="2026-02", path="feb.jsonl", period="2026-02"))
    serve()
    second = lineage.read_version(root / lineage.VERSIONS_DIR / "v0002")
    assert second["finished"] and second["parent_name"] == "v0001" and second["first_round"] == 2
    assert second[new_cohorts.SEEN_KEY]["hosp-b"] == ["2026-01", "2026-02"]
    assert _cohort_epsilon(sites[1], "2026-02") > 0
