"""A deployed site's own records, read and checked against its own site.yaml.

Every check that depends on the data runs here, when the site starts (and again when
the file changes), before any server can ask for a round: δ below 1/records, every label
within the site's declared classes.  A failure stops the site with a message for its
operator; it never becomes a per-round answer, which would tell the server something
about one record (a label out of range) outside ε.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from fedtune.data import Record, load_jsonl
from fedtune.data.cohorts import CohortedRecords
from fedtune.deploy.site_config import CohortSource, SiteConfig
from fedtune.errors import ConfigError
from fedtune.privacy.cohorts import CohortBudget, check_disjoint, record_fingerprint


def site_num_labels(site: SiteConfig) -> Optional[int]:
    """The site's declared class count (from label_names or num_labels), or None."""
    if site.data.label_names is not None:
        return len(site.data.label_names)
    return site.data.num_labels


def cohort_budgets(site: SiteConfig) -> tuple[CohortBudget, ...]:
    """Each declared cohort with its own budget (the site's where the cohort sets none)."""
    return tuple(CohortBudget(c.name, c.epsilon if c.epsilon is not None else site.budget.epsilon,
                              c.delta if c.delta is not None else site.budget.delta) for c in site.data.cohorts)


def data_files(site: SiteConfig) -> list[Path]:
    """The files the site's records come from: its cohorts', or its one data file."""
    return [site.resolve(c.path) for c in site.data.cohorts] or [site.resolve(site.data.path)]


def _read(site: SiteConfig, path: Path) -> list[Record]:
    return load_jsonl(path, fmt=site.data.format, group_field=site.data.group_field,
                      label_field=site.data.label_field, label_names=site.data.label_names)


def load_site_records(site: SiteConfig) -> Union[list[Record], CohortedRecords]:
    """Read the site's data (its one file, or each cohort's) and check it against its budget and classes."""
    if not site.data.cohorts:
        path = site.resolve(site.data.path)
        records = _read(site, path)
        check_site_records(records, site, path)
        return records
    named = [(cohort.name, _read(site, site.resolve(cohort.path))) for cohort in site.data.cohorts]
    for (name, records), cohort, budget in zip(named, site.data.cohorts, cohort_budgets(site)):
        check_site_records(records, site, site.resolve(cohort.path), delta=budget.delta,
                           field_name=_delta_field(site, cohort))
    shared = check_disjoint({name: [record_fingerprint((r.prompt, r.response, r.label)) for r in records]
                             for name, records in named})
    if shared is not None:
        raise ConfigError("data.cohorts", f"cohorts {shared[0]} and {shared[1]} hold the same record",
                          "Keep each record in one cohort only: a record in two cohorts is charged by both.")
    return CohortedRecords.of(named)


def _delta_field(site: SiteConfig, cohort: CohortSource) -> str:
    index = site.data.cohorts.index(cohort)
    return f"data.cohorts[{index}].delta" if cohort.delta is not None else "budget.delta"


def check_site_records(records: list[Record], site: SiteConfig, path: Path, delta: Optional[float] = None,
                       field_name: str = "budget.delta") -> None:
    delta = site.budget.delta if delta is None else delta
    if not records:
        raise ConfigError("data.path" if not site.data.cohorts else "data.cohorts", f"{path} holds no records",
                          "Give a file with at least one record, or remove it.")
    if site.budget.require_privacy and delta >= 1.0 / len(records):
        raise ConfigError(field_name, f"δ={delta:g} is not below 1/records = 1/{len(records)} "
                          f"for {path}", f"Use δ < {1.0 / len(records):.3g}, e.g. 1e-5 or smaller.")
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        return
    classes = site_num_labels(site)
    if classes is None:
        raise ConfigError("data.num_labels", f"{path} holds labelled records but site.yaml declares no classes",
                          "Set data.label_names (names in class order) or data.num_labels in site.yaml.")
    outside = sum(1 for r in labelled if not 0 <= int(r.label) < classes)  # type: ignore[arg-type]
    if outside:
        raise ConfigError("data.num_labels", f"{outside} records of {path} have a label outside 0..{classes - 1}",
                          "Fix those labels, or declare every class in data.label_names / data.num_labels.")
