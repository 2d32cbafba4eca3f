"""The site's half of a secure-aggregation round (stages of ``fedtune.secagg.protocol``).

Secrets live between stages in the ClientApp's ``Context.state`` (a Flower
ConfigRecord of bytes) and are never logged.  The site's delta is checked for
NaN/Inf *before* masking: after masking nobody could tell.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.data import Record
from fedtune.errors import ConfigError
from fedtune.federation import protocol
from fedtune.federation.client import (
    SiteSettings,
    check_round_message,
    local_update,
    prepare_round,
    read_round_config,
    refusal,
)
from fedtune.privacy.policy import check_aggregation_size
from fedtune.secagg import crypto
from fedtune.secagg import protocol as secagg
from fedtune.secagg.masks import Quantizer

log = logging.getLogger(__name__)

STATE_KEY = "fedtune.secagg"


def _save(context: Context, site: secagg.SiteSecrets, round_number: int) -> None:
    record = ConfigRecord({"round": round_number, "index": site.index, "enc": site.enc.private,
                           "mask": site.mask.private, "seed": site.self_seed})
    for j, (enc_pk, mask_pk) in site.neighbour_keys.items():
        record[f"nk.{j}.enc"], record[f"nk.{j}.mask"] = enc_pk, mask_pk
    for j, ct in site.received.items():
        record[f"rc.{j}"] = ct
    context.state[STATE_KEY] = record


def _load(context: Context, round_number: int) -> secagg.SiteSecrets:
    record = context.state.config_records.get(STATE_KEY)
    if record is None or int(record["round"]) != round_number:
        raise secagg.ProtocolViolation(f"no secure-aggregation state for round {round_number} on this site")
    enc, mask = bytes(record["enc"]), bytes(record["mask"])
    site = secagg.SiteSecrets(index=int(record["index"]), enc=crypto.KeyPair(enc, crypto.public_from_private(enc)),
                              mask=crypto.KeyPair(mask, crypto.public_from_private(mask)),
                              self_seed=bytes(record["seed"]))
    for key in record.keys():
        if key.startswith("nk.") and key.endswith(".enc"):
            j = int(key.split(".")[1])
            site.neighbour_keys[j] = (bytes(record[key]), bytes(record[f"nk.{j}.mask"]))
        elif key.startswith("rc."):
            site.received[int(key[3:])] = bytes(record[key])
    return site


def _ok(msg: Message, records: dict) -> Message:
    records[protocol.STATUS] = ConfigRecord({"status": protocol.STATUS_OK})
    return Message(RecordDict(records), reply_to=msg)


# Bounds on what a stage message may carry; anything else is refused unread.
MAX_SITES = 100_000
KEY_BYTES = 32
MAX_SHARE_BYTES = 4096
STAGE_FIELDS = {
    protocol.STAGE_ADVERTISE: {"stage", "index"},
    protocol.STAGE_SHARE: {"stage", "threshold"},
    protocol.STAGE_MASK: {"stage", "bits", "clip_range", "max_weight", "num_sites"},
    protocol.STAGE_UNMASK: {"stage", "survivors", "dropped"},
}


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


def read_stage(msg: Message) -> tuple[str, ConfigRecord]:
    """The stage name and its record, with exactly the fields that stage has."""
    stage = msg.content.config_records.get(protocol.SECAGG)
    if stage is None or "stage" not in stage or not isinstance(stage["stage"], str):
        raise _bad("no stage name")
    name = stage["stage"]
    if name not in STAGE_FIELDS:
        raise _bad("unknown stage")
    if set(stage.keys()) != STAGE_FIELDS[name]:
        raise _bad(f"the {name} stage carries other fields than {sorted(STAGE_FIELDS[name])}")
    return name, stage


def read_neighbour_keys(msg: Message, own_index: int) -> dict[int, tuple[bytes, bytes]]:
    keys = msg.content.config_records.get(protocol.KEYS)
    if keys is None or len(keys) > 2 * MAX_SITES:
        raise _bad("missing or oversized neighbour keys")
    out: dict[int, tuple[bytes, bytes]] = {}
    for key in keys.keys():
        index, dot, kind = key.partition(".")
        if not dot or kind not in ("enc", "mask"):
            raise _bad("a neighbour key is not named INDEX.enc or INDEX.mask")
        j = _index_of(index)
        enc, mask = keys.get(f"{j}.enc"), keys.get(f"{j}.mask")
        if j == own_index or not all(isinstance(v, bytes) and len(v) == KEY_BYTES for v in (enc, mask)):
            raise _bad("a neighbour's keys are not two 32-byte public keys of another site")
        out[j] = (enc, mask)  # type: ignore[assignment]
    return out


def read_shares(msg: Message, neighbours: dict) -> dict[int, bytes]:
    shares = msg.content.config_records.get(protocol.SHARES)
    if shares is None:
        raise _bad("missing shares")
    out = {}
    for key in shares.keys():
        j, value = _index_of(key), shares[key]
        if j not in neighbours or not isinstance(value, bytes) or len(value) > MAX_SHARE_BYTES:
            raise _bad("a share is not a ciphertext from one of this site's neighbours")
        out[j] = value
    return out


def read_index_set(stage: ConfigRecord, name: str) -> set[int]:
    values = stage[name]
    if not isinstance(values, list) or len(values) > MAX_SITES or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SITES for v in values):
        raise _bad(f"'{name}' is not a list of site indices")
    return set(values) - {0}


def read_quantizer(stage: ConfigRecord) -> Quantizer:
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


def handle(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig, records: list[Record]) -> Message:
    """One secure-aggregation stage; every field is validated before any state or ledger is touched."""
    try:
        name, stage = read_stage(msg)
        if name == protocol.STAGE_ADVERTISE:
            return _advertise(msg, context, site, cfg, stage)
        rc = read_round_config(msg)
        secrets_ = _load(context, rc.round)
        if name == protocol.STAGE_SHARE:
            return _share(msg, context, secrets_, rc, stage)
        if name == protocol.STAGE_MASK:
            return _mask(msg, context, site, cfg, records, secrets_, stage)
        return _unmask(msg, context, secrets_, rc, stage)
    except protocol.Refusal as refused:
        return refusal(msg, refused)
    except (secagg.ProtocolViolation, secagg.RoundAbandoned) as exc:
        return refusal(msg, protocol.Refusal(protocol.FAILED_PROTOCOL, str(exc)))


def _advertise(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig,
               stage: ConfigRecord) -> Message:
    # A site over budget or outside its policy refuses here, before any secret exists.
    rc, _ = check_round_message(msg, site, cfg, secure=True)
    secrets_, (enc_pk, mask_pk) = secagg.advertise_keys(_int_field(stage, "index", 1, MAX_SITES))
    _save(context, secrets_, rc.round)
    return _ok(msg, {protocol.SECAGG: ConfigRecord({"enc_pk": enc_pk, "mask_pk": mask_pk})})


def _share(msg: Message, context: Context, secrets_: secagg.SiteSecrets, rc: protocol.RoundConfig,
           stage: ConfigRecord) -> Message:
    neighbours = read_neighbour_keys(msg, secrets_.index)
    threshold = _int_field(stage, "threshold", 2, MAX_SITES)
    shares = secagg.share_keys(secrets_, neighbours, threshold, rc.round)
    _save(context, secrets_, rc.round)
    return _ok(msg, {protocol.SHARES: ConfigRecord({str(j): ct for j, ct in shares.items()})})


def _mask(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig, records: list[Record],
          secrets_: secagg.SiteSecrets, stage: ConfigRecord) -> Message:
    received = read_shares(msg, secrets_.neighbour_keys)
    quant = read_quantizer(stage)
    check_aggregation_size(quant.num_sites, site.policy)
    prepared = prepare_round(msg, site, cfg, records, secure=True, max_weight=quant.max_weight)
    delta, weight, _metrics = local_update(prepared, site, cfg, records)
    names = sorted(delta)
    flat = adapters.flatten(delta, names)
    if not np.all(np.isfinite(flat)):
        raise RuntimeError(f"{site.name}: refusing to mask a delta with NaN/Inf entries")
    masked = secagg.mask_input(secrets_, quant.encode(flat, int(weight)), received, prepared.rc.round, quant.bits)
    _save(context, secrets_, prepared.rc.round)
    # Per-site loss, ε and training time stay on the site: under secure aggregation the
    # server sees sums only, and a site's training time grows with its record count.
    return _ok(msg, {protocol.UPDATE: ArrayRecord(array_dict={"masked": Array(masked)})})


def _unmask(msg: Message, context: Context, secrets_: secagg.SiteSecrets, rc: protocol.RoundConfig,
            stage: ConfigRecord) -> Message:
    survivors, dropped = read_index_set(stage, "survivors"), read_index_set(stage, "dropped")
    seed_shares, key_shares = secagg.unmask(secrets_, survivors, dropped, rc.round)
    context.state.config_records.pop(STATE_KEY, None)  # the round's secrets are no longer needed
    return _ok(msg, {"seed_shares": ConfigRecord({str(j): s for j, s in seed_shares.items()}),
                     "key_shares": ConfigRecord({str(j): s for j, s in key_shares.items()})})
