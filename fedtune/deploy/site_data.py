"""A deployed site's own records, read and checked against its own site.yaml.

Every check that depends on the data runs here, when the site starts (and again when
the file changes), before any server can ask for a round: δ below 1/records, every label
within the site's declared classes.  A failure stops the site with a message for its
operator; it never becomes a per-round answer, which would tell the server something
about one record (a label out of range) outside ε.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fedtune.data import Record, load_jsonl
from fedtune.deploy.site_config import SiteConfig
from fedtune.errors import ConfigError


def site_num_labels(site: SiteConfig) -> Optional[int]:
    """The site's declared class count (from label_names or num_labels), or None."""
    if site.data.label_names is not None:
        return len(site.data.label_names)
    return site.data.num_labels


def load_site_records(site: SiteConfig) -> list[Record]:
    """Read the site's data file and check it against the site's budget and classes."""
    path = site.resolve(site.data.path)
    records = load_jsonl(path, fmt=site.data.format, group_field=site.data.group_field,
                         label_field=site.data.label_field, label_names=site.data.label_names)
    check_site_records(records, site, path)
    return records


def check_site_records(records: list[Record], site: SiteConfig, path: Path) -> None:
    if site.budget.require_privacy and site.budget.delta >= 1.0 / len(records):
        raise ConfigError("budget.delta", f"δ={site.budget.delta:g} is not below 1/records = 1/{len(records)} "
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
