"""Typed records of the secure-aggregation stages, in both directions.

Each stage message (server to site) and each reply (site to server) is a dataclass with
``to_record()``, the Flower records it travels as, and ``from_record()``, its strict
parser.  Both halves of the protocol use the same classes, so the key names and shapes
are written down once.

Everything a site receives is untrusted: the server may put any type, any value or any
extra key in any field.  So ``from_record`` checks the exact key set, every type and
every range, and raises :class:`fedtune.federation.protocol.Refusal` with the fixed
code ``REFUSED_INVALID_MESSAGE`` (the site answers with that code only; the detail
stays in its log).  The server parses the sites' replies with the same strictness: a
malformed reply is logged and that site is treated as having failed the stage.  The
masked vector is checked by :func:`fedtune.adapters.validate_masked_update`, beside the
plain update's validator, and is rejected with the same error type (UpdateRejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedtune import adapters
from fedtune.errors import ConfigError
from fedtune.federation import protocol
from fedtune.secagg import protocol as secagg
from fedtune.secagg.masks import Quantizer, ring_dtype
from fedtune.secagg.signing import MAX_SIGNATURE_BYTES

# Bounds on what a stage message may carry; anything else is refused unread.
MAX_SITES = 100_000
KEY_BYTES = 32
MAX_SHARE_BYTES = 4096
STAGE_FIELDS = {
    protocol.STAGE_ADVERTISE: {"stage", "index"},
    protocol.STAGE_SHARE: {"stage", "threshold"},
    protocol.STAGE_MASK: {"stage", "bits", "clip_range", "max_weight", "num_sites"},
    protocol.STAGE_CONSISTENCY: {"stage", "survivors"},
    protocol.STAGE_UNMASK: {"stage", "survivors"},
}
# Record names of the replies (the requests use protocol.SECAGG, KEYS, SHARES and SIGNATURES).
PUBLIC_KEYS = ("enc_pk", "mask_pk")
SIGNATURE = "signature"
NEIGHBOUR_FIELDS = ("enc", "mask", "sig", "site")
MAX_SITE_ID = 64
MASKED = "masked"
SEED_SHARES = "seed_shares"
KEY_SHARES = "key_shares"
NOT_A_NEIGHBOURS_SHARE = "a share is not a ciphertext from one of this site's neighbours"


def _bad(detail: str) -> protocol.Refusal:
    return protocol.Refusal(protocol.REFUSED_INVALID_MESSAGE, f"secure-aggregation stage: {detail}")


def _int_field(stage: ConfigRecord, name: str, low: int, high: int) -> int:
    value = stage[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"'{name}' is not an integer in [{low}, {high}]")
    return value


def _index_of(key: str) -> int:
    if not key.isdigit() or not 1 <= int(key) <= MAX_SITES:
        raise _bad("a neighbour index is not an integer in [1, 100000]")
    return int(key)


def _config(content: RecordDict, name: str) -> ConfigRecord:
    record = content.config_records.get(name)
    if record is None:
        raise _bad(f"missing record '{name}'")
    return record


def read_stage(content: RecordDict) -> tuple[str, ConfigRecord]:
    """The stage name and its record, with exactly the fields that stage has."""
    stage = content.config_records.get(protocol.SECAGG)
    if stage is None or "stage" not in stage or not isinstance(stage["stage"], str):
        raise _bad("no stage name")
    name = stage["stage"]
    if name not in STAGE_FIELDS:
        raise _bad("unknown stage")
    if set(stage.keys()) != STAGE_FIELDS[name]:
        raise _bad(f"the {name} stage carries other fields than {sorted(STAGE_FIELDS[name])}")
    return name, stage


def _stage_record(content: RecordDict, name: str) -> ConfigRecord:
    found, stage = read_stage(content)
    if found != name:
        raise _bad(f"a {found} stage where {name} was expected")
    return stage


def _stage(name: str, **fields: object) -> ConfigRecord:
    return ConfigRecord({"stage": name, **fields})


def _index_set(stage: ConfigRecord, name: str) -> frozenset[int]:
    values = stage[name]
    if not isinstance(values, list) or len(values) > MAX_SITES or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SITES for v in values):
        raise _bad(f"'{name}' is not a list of site indices")
    return frozenset(values) - {0}


def _indexed_bytes(record: ConfigRecord, allowed: Collection[int], problem: str) -> dict[int, bytes]:
    """{index: bytes} from a record keyed by decimal site indices, each one of ``allowed``."""
    out = {}
    for key in record.keys():
        j, value = _index_of(key), record[key]
        if j not in allowed or not isinstance(value, bytes) or len(value) > MAX_SHARE_BYTES:
            raise _bad(problem)
        out[j] = value
    return out


def _by_index(values: dict[int, bytes]) -> ConfigRecord:
    return ConfigRecord({str(j): v for j, v in sorted(values.items())})


def _signature(value: object) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_SIGNATURE_BYTES:
        raise _bad(f"a signature is not 1..{MAX_SIGNATURE_BYTES} bytes")
    return value


def _site_id(value: object) -> str:
    # A roster key: printable ASCII, short.  Whether it is enrolled is the site's check.
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SITE_ID or not all(33 <= ord(c) < 127 for c in value):
        raise _bad("a neighbour's site id is not 1..64 printable ASCII characters")
    return value


def _survivor_list(survivors: frozenset[int]) -> list[int]:
    # Index 0 is never a site; it keeps the list non-empty for ConfigRecord.
    return [0, *sorted(survivors)]


# ---------------------------------------------------------------- stage 1: advertise keys
@dataclass(frozen=True)
class AdvertiseRequest:
    """Server to site: make this round's key pairs; ``index`` is the site's Shamir x-coordinate."""

    index: int

    def to_record(self) -> RecordDict:
        return RecordDict({protocol.SECAGG: _stage(protocol.STAGE_ADVERTISE, index=self.index)})

    @classmethod
    def from_record(cls, content: RecordDict) -> "AdvertiseRequest":
        stage = _stage_record(content, protocol.STAGE_ADVERTISE)
        return cls(index=_int_field(stage, "index", 1, MAX_SITES))


@dataclass(frozen=True)
class AdvertiseReply:
    """Site to server: its two X25519 public keys (encryption of shares, pairwise masks), signed.

    ``signature``: the site's enrolment key over ``signing.keys_statement`` (federation,
    round, its index, its site id, both keys), which its neighbours check.
    """

    enc_pk: bytes
    mask_pk: bytes
    signature: bytes

    def to_record(self) -> RecordDict:
        return RecordDict({protocol.SECAGG: ConfigRecord({"enc_pk": self.enc_pk, "mask_pk": self.mask_pk,
                                                          SIGNATURE: self.signature})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "AdvertiseReply":
        keys = _config(content, protocol.SECAGG)
        if set(keys.keys()) != {*PUBLIC_KEYS, SIGNATURE} or not all(
                isinstance(keys[k], bytes) and len(keys[k]) == KEY_BYTES for k in PUBLIC_KEYS):
            raise _bad("the advertised keys are not two 32-byte public keys and a signature")
        return cls(enc_pk=keys["enc_pk"], mask_pk=keys["mask_pk"], signature=_signature(keys[SIGNATURE]))

    @property
    def keys(self) -> tuple[bytes, bytes]:
        return self.enc_pk, self.mask_pk


# ---------------------------------------------------------------- stage 2: share keys
@dataclass(frozen=True)
class SignedKeys:
    """A neighbour's advertised keys as relayed by the server: which enrolled site, and its signature."""

    site_id: str
    enc_pk: bytes
    mask_pk: bytes
    signature: bytes

    @property
    def keys(self) -> tuple[bytes, bytes]:
        return self.enc_pk, self.mask_pk


@dataclass(frozen=True)
class ShareRequest:
    """Server to site: the least threshold the server will wait for, and the neighbours' signed keys.

    The site's threshold is its own rule (a majority of its neighbours, at least
    ``threshold``): a server cannot lower it.
    """

    threshold: int
    neighbour_keys: dict[int, SignedKeys]

    def to_record(self) -> RecordDict:
        keys: dict[str, object] = {}
        for j, signed in sorted(self.neighbour_keys.items()):
            keys[f"{j}.enc"], keys[f"{j}.mask"] = signed.enc_pk, signed.mask_pk
            keys[f"{j}.sig"], keys[f"{j}.site"] = signed.signature, signed.site_id
        return RecordDict({protocol.SECAGG: _stage(protocol.STAGE_SHARE, threshold=self.threshold),
                           protocol.KEYS: ConfigRecord(keys)})

    @classmethod
    def from_record(cls, content: RecordDict, own_index: int) -> "ShareRequest":
        stage = _stage_record(content, protocol.STAGE_SHARE)
        neighbour_keys = _neighbour_keys(content, own_index)
        return cls(threshold=_int_field(stage, "threshold", 2, MAX_SITES), neighbour_keys=neighbour_keys)


def _neighbour_keys(content: RecordDict, own_index: int) -> dict[int, SignedKeys]:
    keys = content.config_records.get(protocol.KEYS)
    if keys is None or len(keys) > len(NEIGHBOUR_FIELDS) * MAX_SITES:
        raise _bad("missing or oversized neighbour keys")
    out: dict[int, SignedKeys] = {}
    for key in keys.keys():
        index, dot, kind = key.partition(".")
        if not dot or kind not in NEIGHBOUR_FIELDS:
            raise _bad("a neighbour key is not named INDEX.enc, INDEX.mask, INDEX.sig or INDEX.site")
        j = _index_of(index)
        if j in out:
            continue
        enc, mask = keys.get(f"{j}.enc"), keys.get(f"{j}.mask")
        if j == own_index or not all(isinstance(v, bytes) and len(v) == KEY_BYTES for v in (enc, mask)):
            raise _bad("a neighbour's keys are not two 32-byte public keys of another site")
        out[j] = SignedKeys(site_id=_site_id(keys.get(f"{j}.site")), enc_pk=enc, mask_pk=mask,  # type: ignore[arg-type]
                            signature=_signature(keys.get(f"{j}.sig")))
    return out


@dataclass(frozen=True)
class ShareReply:
    """Site to server: for each neighbour j, the encrypted (self-mask share, mask-key share) for j."""

    shares: dict[int, bytes]

    def to_record(self) -> RecordDict:
        return RecordDict({protocol.SHARES: _by_index(self.shares)})

    @classmethod
    def from_record(cls, content: RecordDict, neighbours: Collection[int]) -> "ShareReply":
        return cls(shares=_indexed_bytes(_config(content, protocol.SHARES), neighbours, NOT_A_NEIGHBOURS_SHARE))


# ---------------------------------------------------------------- stage 3: masked input
@dataclass(frozen=True)
class MaskRequest:
    """Server to site: the quantiser of the round and the ciphertexts addressed to this site.

    The global adapter and the round config travel beside it in the same message.
    """

    quantizer: Quantizer
    shares: dict[int, bytes]

    def to_record(self) -> RecordDict:
        q = self.quantizer
        return RecordDict({protocol.SECAGG: _stage(protocol.STAGE_MASK, bits=q.bits, clip_range=q.clip_range,
                                                   max_weight=q.max_weight, num_sites=q.num_sites),
                           protocol.SHARES: _by_index(self.shares)})

    @classmethod
    def from_record(cls, content: RecordDict, neighbours: Collection[int]) -> "MaskRequest":
        stage = _stage_record(content, protocol.STAGE_MASK)
        shares = content.config_records.get(protocol.SHARES)
        if shares is None:
            raise _bad("missing shares")
        received = _indexed_bytes(shares, neighbours, NOT_A_NEIGHBOURS_SHARE)
        return cls(quantizer=_quantizer(stage), shares=received)


def _quantizer(stage: ConfigRecord) -> Quantizer:
    clip = stage["clip_range"]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise _bad("'clip_range' is not a positive finite number")
    quant = Quantizer(bits=_int_field(stage, "bits", 9, 64), clip_range=float(clip),
                      max_weight=_int_field(stage, "max_weight", 1, 2 ** 62),
                      num_sites=_int_field(stage, "num_sites", secagg.MIN_SITES, MAX_SITES))
    try:
        quant.check()
    except ConfigError as exc:
        raise _bad(f"the quantiser could wrap its ring ({exc.field})") from None
    return quant


@dataclass(frozen=True)
class MaskReply:
    """Site to server: its masked ring vector (quantised n·Δ and n, plus every mask)."""

    masked: np.ndarray

    def to_record(self) -> RecordDict:
        return RecordDict({protocol.UPDATE: ArrayRecord(array_dict={MASKED: Array(self.masked)})})

    @classmethod
    def from_record(cls, content: RecordDict, length: int, bits: int, max_bytes: int) -> "MaskReply":
        """Raises adapters.UpdateRejected, as a plain update that fails its checks does."""
        record = content.array_records.get(protocol.UPDATE)
        return cls(masked=adapters.validate_masked_update(record, MASKED, length, np.dtype(ring_dtype(bits)),
                                                          max_bytes))


# ---------------------------------------------------------------- stage 4: consistency check
@dataclass(frozen=True)
class ConsistencyRequest:
    """Server to site: the set of sites whose masked input it received (the round's survivors)."""

    survivors: frozenset[int]

    def to_record(self) -> RecordDict:
        return RecordDict({protocol.SECAGG: _stage(protocol.STAGE_CONSISTENCY,
                                                   survivors=_survivor_list(self.survivors))})

    @classmethod
    def from_record(cls, content: RecordDict) -> "ConsistencyRequest":
        return cls(survivors=_index_set(_stage_record(content, protocol.STAGE_CONSISTENCY), "survivors"))


@dataclass(frozen=True)
class ConsistencyReply:
    """Site to server: its signature over ``signing.survivors_statement`` of the set it was told."""

    signature: bytes

    def to_record(self) -> RecordDict:
        return RecordDict({protocol.SECAGG: ConfigRecord({SIGNATURE: self.signature})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "ConsistencyReply":
        record = _config(content, protocol.SECAGG)
        if set(record.keys()) != {SIGNATURE}:
            raise _bad("the consistency reply is not one signature")
        return cls(signature=_signature(record[SIGNATURE]))


# ---------------------------------------------------------------- stage 5: unmask
@dataclass(frozen=True)
class UnmaskRequest:
    """Server to site: the survivors again, with the neighbours' signatures over that same set.

    The site works out which neighbours survived and which dropped itself (those that
    shared with it, in or out of ``survivors``): the server names no second list.
    """

    survivors: frozenset[int]
    signatures: dict[int, bytes]

    def to_record(self) -> RecordDict:
        return RecordDict({protocol.SECAGG: _stage(protocol.STAGE_UNMASK, survivors=_survivor_list(self.survivors)),
                           protocol.SIGNATURES: _by_index(self.signatures)})

    @classmethod
    def from_record(cls, content: RecordDict) -> "UnmaskRequest":
        survivors = _index_set(_stage_record(content, protocol.STAGE_UNMASK), "survivors")
        record = _config(content, protocol.SIGNATURES)
        signatures = {j: _signature(sig) for j, sig in _indexed_bytes(record, survivors, "a signature is not one of "
                                                                      "a survivor").items()}
        return cls(survivors=survivors, signatures=signatures)


@dataclass(frozen=True)
class UnmaskReply:
    """Site to server: self-mask shares of surviving neighbours, mask-key shares of dropped ones."""

    seed_shares: dict[int, bytes]
    key_shares: dict[int, bytes]

    def to_record(self) -> RecordDict:
        return RecordDict({SEED_SHARES: _by_index(self.seed_shares), KEY_SHARES: _by_index(self.key_shares)})

    @classmethod
    def from_record(cls, content: RecordDict, survivors: Collection[int], dropped: Collection[int]
                    ) -> "UnmaskReply":
        """Shares only of the holder's surviving / dropped neighbours, each on its own side."""
        return cls(seed_shares=_indexed_bytes(_config(content, SEED_SHARES), survivors,
                                              "a self-mask share is not one of a surviving neighbour"),
                   key_shares=_indexed_bytes(_config(content, KEY_SHARES), dropped,
                                             "a mask-key share is not one of a dropped neighbour"))
