"""The federation's keys: a private CA, the SuperLink's TLS certificate, site auth keys.

Why our own few lines rather than asking operators for ``openssl`` recipes: Flower needs
three different formats (PEM X.509 for TLS, OpenSSH EC keys for SuperNode
authentication) and a wrong SAN or curve only shows up as an opaque TLS or HTTP 412
error at connect time.  Everything is generated with ``cryptography``; every private key
is written owner-only (0600) and atomically, and nothing secret is ever printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# P-384 for the CA and TLS keys; Flower's node auth accepts NIST EC curves only.
_CURVE = ec.SECP384R1
_NODE_AUTH_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
CERT_DAYS = 825
# Files 0600 and directories 0700 for whatever is created under it (umask 077).
PRIVATE_UMASK = 0o077
# The names ``fedtune client keygen`` writes, and site.yaml's default ``auth_private_key``.
SITE_PRIVATE_KEY = "auth.key"
SITE_PUBLIC_KEY = "auth.pub"


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key, world-readable (0644), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@contextmanager
def private_umask() -> Iterator[None]:
    """Create everything inside owner-only: files 0600, directories 0700.

    The server's state (the SuperLink's database of plain-mode updates, the run's outputs,
    the federation ledger) is written by several libraries that create files with the
    process umask, so the umask is the one place that covers them all.  Restored on exit.
    """
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def restrict_tree(root: Path) -> None:
    """Make an existing tree owner-only: directories 0700, files 0600, certificates left readable.

    For state created before fedtune wrote it owner-only (or copied in with a looser mode).
    """
    if not root.is_dir():
        return
    root.chmod(0o700)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            Path(directory, name).chmod(0o700)
        for name in files:
            path = Path(directory, name)
            if not name.endswith(".crt") and not path.is_symlink():
                path.chmod(0o600)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> "CertificateAuthority":
        key = ec.generate_private_key(_CURVE())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} fedtune CA")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA384()))
        return cls(key, cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> "CertificateAuthority":
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key, cert)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return _private_pem(self.key)

    def issue_server_cert(self, hosts: Iterable[str]) -> tuple[bytes, bytes]:
        """A TLS server certificate for the SuperLink, valid for ``hosts`` (names or IPs).

        Returns ``(cert_pem, key_pem)``.  gRPC/httpx check the SAN, not the CN, so every
        address sites dial must be listed.
        """
        hosts = list(dict.fromkeys(hosts))
        if not hosts:
            raise ValueError("at least one host name or IP address is needed for the SuperLink certificate")
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        key = ec.generate_private_key(_CURVE())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA384()))
        return cert.public_bytes(serialization.Encoding.PEM), _private_pem(key)


def node_auth_keypair() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair in the OpenSSH formats Flower reads.

    P-256 (128-bit security), not the CA's P-384: the same key signs the site's
    secure-aggregation keys and survivor sets, and each site verifies about k + t of its
    neighbours' signatures per round, which P-256 does about seven times faster.  Keys
    made earlier on P-384 or P-521 keep working.  Returns ``(private_openssh, public_openssh)``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_site_keypair(directory: Path) -> tuple[Path, Path, str]:
    """A site's own authentication key pair: ``auth.key`` (0600) and ``auth.pub`` in ``directory``.

    Made by the site, so that nobody else (the operator included) ever holds the key the
    SuperLink authenticates it by.  Never overwrites a key: the key *is* the site's
    enrolled identity.  Returns ``(private_path, public_path, fingerprint)``.
    """
    private_path, public_path = directory / SITE_PRIVATE_KEY, directory / SITE_PUBLIC_KEY
    if private_path.exists():
        raise FileExistsError(private_path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private, public = node_auth_keypair()
    write_secret(private_path, private)
    write_public(public_path, public)
    return private_path, public_path, public_key_fingerprint(public)


def check_node_public_key(data: bytes) -> bytes:
    """The one-line OpenSSH EC public key in ``data``, or ValueError saying what is wrong.

    What a site sends the operator is checked before it is enrolled: a private key sent by
    mistake must be refused (and noticed), and Flower's node authentication reads NIST EC
    keys only.
    """
    if b"PRIVATE KEY" in data:
        raise ValueError("this is a PRIVATE key: the site must keep it and send only its auth.pub "
                         "(and should now make a new pair, since this one has left the site)")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NODE_AUTH_CURVES):
        raise ValueError("not an ECDSA key on a NIST curve (P-256/384/521), the only keys Flower's node "
                         "authentication accepts")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def public_key_fingerprint(public_openssh: bytes) -> str:
    """SHA-256 fingerprint of an OpenSSH public key, the site's stable public identity."""
    import base64
    import hashlib

    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
