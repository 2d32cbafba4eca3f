"""The federation's roster of enrolled sites' public keys, signed by the federation CA.

Why the CA signs it: every site already trusts the CA certificate in its kit (``ca.crt``)
and nothing else, and the CA key stays with the operator's enrolment step (``fedtune
init-federation``, ``--add-sites``), never in the running server.  A site reads the
roster from its own kit, so the server cannot swap it during a run; a roster that is not
signed by the site's CA, or that does not list the site under its own key, is refused.
The CA holder can still enrol fake sites; a site's ``policy.min_other_sites`` bounds how
few distinct enrolled sites its update is ever summed with.

File format (``roster.json`` in every kit)::

    {"roster": {"federation": NAME, "version": N, "sites": {SITE_ID: "ecdsa-sha2-nistp384 AAAA..."}},
     "signature": BASE64(ECDSA-SHA384 over LABEL + canonical JSON of "roster")}
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.errors import ConfigError
from fedtune.secagg import signing

ROSTER_FILE = "roster.json"
ROSTER_LABEL = b"fedtune-roster/v1\n"
MAX_ROSTER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Roster:
    federation: str
    version: int
    sites: Mapping[str, ec.EllipticCurvePublicKey]


def _canonical(body: dict) -> bytes:
    return ROSTER_LABEL + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signed_roster(federation: str, version: int, site_keys: Mapping[str, str],
                  ca_key: ec.EllipticCurvePrivateKey) -> str:
    """The roster file's text: ``site_keys`` (id -> OpenSSH public key line) signed by the CA."""
    body = {"federation": federation, "version": int(version), "sites": dict(sorted(site_keys.items()))}
    signature = signing.sign(ca_key, _canonical(body))
    return json.dumps({"roster": body, "signature": base64.b64encode(signature).decode()}, indent=1) + "\n"


def _bad(path: Path, problem: str) -> ConfigError:
    return ConfigError("roster", f"{path}: {problem}",
                       "Copy roster.json from your latest enrolment kit (your operator sends it with the kit).")


def load_roster(path: Path, ca_cert: Path) -> Roster:
    """Read and verify a roster against the CA certificate; ConfigError says what is wrong."""
    if not path.is_file() or path.stat().st_size > MAX_ROSTER_BYTES:
        raise _bad(path, "missing or too large")
    try:
        document = json.loads(path.read_text())
        body, signature = document["roster"], base64.b64decode(document["signature"], validate=True)
        federation, version, listed = body["federation"], body["version"], body["sites"]
    except (ValueError, KeyError, TypeError):
        raise _bad(path, "not a fedtune roster") from None
    if not (isinstance(federation, str) and isinstance(version, int) and isinstance(listed, dict)):
        raise _bad(path, "not a fedtune roster")
    authority = x509.load_pem_x509_certificate(ca_cert.read_bytes()).public_key()
    if not isinstance(authority, ec.EllipticCurvePublicKey) or not signing.verify(authority, _canonical(body),
                                                                                  signature):
        raise _bad(path, "its signature is not the federation CA's (ca.crt)")
    sites = {}
    for site_id, line in listed.items():
        key = serialization.load_ssh_public_key(str(line).encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise _bad(path, f"the key of {site_id} is not an ECDSA key")
        sites[str(site_id)] = key
    return Roster(federation=federation, version=version, sites=sites)


def site_identity(roster_path: Path, ca_cert: Path, site_id: str, private_key_path: Path) -> signing.Identity:
    """The deployed site's signing identity: its auth.key, checked against its own roster entry."""
    roster = load_roster(roster_path, ca_cert)
    key = serialization.load_ssh_private_key(private_key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("auth_private_key", f"{private_key_path} is not an ECDSA key", "Use the key of "
                          "`fedtune client keygen`.")
    own = roster.sites.get(site_id)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if own is None or own.public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise _bad(roster_path, f"it does not list {site_id} under this site's auth key")
    return signing.Identity(federation=roster.federation, site_id=site_id, private_key=key, roster=roster.sites)


class KitIdentity:
    """The deployed site's identity, read from its kit once and again only when the roster file changes.

    ``get`` returns None (and logs why, once per change) when the kit has no valid roster:
    the site then takes plain rounds only if its policy allows them, and refuses every
    secure-aggregation stage.
    """

    def __init__(self, roster_path: Path, ca_cert: Path, site_id: str, private_key_path: Path) -> None:
        self.paths = roster_path, ca_cert, site_id, private_key_path
        self.stamp: object = None
        self.value: signing.Identity | None = None

    def get(self) -> signing.Identity | None:
        import logging

        roster_path = self.paths[0]
        stamp = roster_path.stat().st_mtime_ns if roster_path.exists() else None
        if stamp != self.stamp:
            self.stamp = stamp
            try:
                self.value = site_identity(*self.paths)
            except (ConfigError, OSError, ValueError) as exc:
                logging.getLogger(__name__).error("no signed roster: %s; secure aggregation is refused", exc)
                self.value = None
        return self.value
