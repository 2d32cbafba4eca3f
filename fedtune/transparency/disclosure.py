"""The server's strict reading of what a site discloses of its data (fedtune.deploy.manifest).

A site is not trusted by the server either: its disclosure goes into every adapter record
and card, so it is parsed field by field (known keys only, bounded text, counts that are
integers, commitments that are 64 hex digits).  Anything else drops the whole disclosure
with one log line naming the site, never with the offending text.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024
MAX_TEXT = 500
MAX_COHORTS = 1000
MANIFEST_KEYS = ("name", "licence", "provenance", "period", "deidentification")
COHORT_KEYS = {"name", "period", "records", "commitment", "epsilon", "delta", "budget_epsilon"}


class BadDisclosure(ValueError):
    """A disclosure that is not what fedtune.deploy.manifest writes."""


def _text(value: Any, optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or any(ord(c) < 32 for c in value):
        raise BadDisclosure("a text field is not a short printable string")
    return value


def _number(value: Any, optional: bool = True) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadDisclosure("a number field is not a finite number >= 0")
    return float(value)


def _cohort(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or set(entry) - COHORT_KEYS or not {"name", "commitment"} <= set(entry):
        raise BadDisclosure("a cohort entry has unknown or missing keys")
    commitment = entry["commitment"]
    if not (isinstance(commitment, str) and len(commitment) == 64 and all(c in "0123456789abcdef" for c in commitment)):
        raise BadDisclosure("a commitment is not 64 lowercase hex digits")
    records = entry.get("records")
    if records is not None and (isinstance(records, bool) or not isinstance(records, int) or records < 0):
        raise BadDisclosure("a record count is not an integer >= 0")
    return {"name": _text(entry["name"]), "period": _text(entry.get("period"), optional=True), "records": records,
            "commitment": commitment, "epsilon": _number(entry.get("epsilon")), "delta": _number(entry.get("delta")),
            "budget_epsilon": _number(entry.get("budget_epsilon"))}


def parse_disclosure(raw: Any) -> dict[str, Any]:
    """The validated disclosure; raises BadDisclosure."""
    if not isinstance(raw, str) or len(raw.encode("utf-8")) > MAX_BYTES:
        raise BadDisclosure("not a JSON text of at most 64 KiB")
    try:
        body = json.loads(raw, parse_constant=lambda _: None)
    except ValueError:
        raise BadDisclosure("not JSON") from None
    if not isinstance(body, dict) or set(body) - {"manifest", "cohorts"}:
        raise BadDisclosure("unknown top-level keys")
    manifest = body.get("manifest", {})
    if not isinstance(manifest, dict) or set(manifest) - set(MANIFEST_KEYS):
        raise BadDisclosure("unknown manifest keys")
    parsed: dict[str, Any] = {"manifest": {k: _text(manifest[k]) for k in MANIFEST_KEYS if k in manifest}}
    if "cohorts" in body:
        cohorts = body["cohorts"]
        if not isinstance(cohorts, list) or len(cohorts) > MAX_COHORTS:
            raise BadDisclosure("cohorts is not a list of at most 1000 entries")
        parsed["cohorts"] = [_cohort(c) for c in cohorts]
    return parsed


def read_disclosure(site: str, raw: Any) -> dict[str, Any]:
    """A site's disclosure, or {} (logged) when it sent none or a malformed one."""
    if raw is None:
        return {}
    try:
        return parse_disclosure(raw)
    except BadDisclosure as exc:
        log.error("site %s sent a malformed data disclosure (%s); its records will disclose nothing of it", site, exc)
        return {}
