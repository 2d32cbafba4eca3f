"""The site's half of a secure-aggregation round (stages of ``fedtune.secagg.protocol``).

Secrets live between stages in the ClientApp's ``Context.state`` (a Flower
ConfigRecord of bytes) and are never logged.  The site's delta is checked for
NaN/Inf *before* masking: after masking nobody could tell.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.data import Record
from fedtune.federation import protocol, wire
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


def _ok(msg: Message, reply: RecordDict) -> Message:
    reply[protocol.STATUS] = ConfigRecord({"status": protocol.STATUS_OK})
    return Message(reply, reply_to=msg)


def handle(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig, records: list[Record]) -> Message:
    """One secure-aggregation stage; every field is validated before any state or ledger is touched."""
    try:
        name, _ = wire.read_stage(msg.content)
        if name == protocol.STAGE_ADVERTISE:
            return _advertise(msg, context, site, cfg)
        rc = read_round_config(msg)
        secrets_ = _load(context, rc.round)
        if name == protocol.STAGE_SHARE:
            return _share(msg, context, secrets_, rc)
        if name == protocol.STAGE_MASK:
            return _mask(msg, context, site, cfg, records, secrets_)
        return _unmask(msg, context, secrets_, rc)
    except protocol.Refusal as refused:
        return refusal(msg, refused)
    except (secagg.ProtocolViolation, secagg.RoundAbandoned) as exc:
        return refusal(msg, protocol.Refusal(protocol.FAILED_PROTOCOL, str(exc)))


def _advertise(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig) -> Message:
    # A site over budget or outside its policy refuses here, before any secret exists.
    rc, _ = check_round_message(msg, site, cfg, secure=True)
    request = wire.AdvertiseRequest.from_record(msg.content)
    secrets_, (enc_pk, mask_pk) = secagg.advertise_keys(request.index)
    _save(context, secrets_, rc.round)
    return _ok(msg, wire.AdvertiseReply(enc_pk=enc_pk, mask_pk=mask_pk).to_record())


def _share(msg: Message, context: Context, secrets_: secagg.SiteSecrets, rc: protocol.RoundConfig) -> Message:
    request = wire.ShareRequest.from_record(msg.content, secrets_.index)
    shares = secagg.share_keys(secrets_, request.neighbour_keys, request.threshold, rc.round)
    _save(context, secrets_, rc.round)
    return _ok(msg, wire.ShareReply(shares=shares).to_record())


def _mask(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig, records: list[Record],
          secrets_: secagg.SiteSecrets) -> Message:
    request = wire.MaskRequest.from_record(msg.content, secrets_.neighbour_keys)
    quant = request.quantizer
    check_aggregation_size(quant.num_sites, site.policy)
    prepared = prepare_round(msg, site, cfg, records, secure=True, max_weight=quant.max_weight)
    delta, weight, _metrics = local_update(prepared, site, cfg, records)
    names = sorted(delta)
    flat = adapters.flatten(delta, names)
    if not np.all(np.isfinite(flat)):
        raise RuntimeError(f"{site.name}: refusing to mask a delta with NaN/Inf entries")
    masked = secagg.mask_input(secrets_, quant.encode(flat, int(weight)), request.shares, prepared.rc.round,
                               quant.bits)
    _save(context, secrets_, prepared.rc.round)
    # Per-site loss, ε and training time stay on the site: under secure aggregation the
    # server sees sums only, and a site's training time grows with its record count.
    return _ok(msg, wire.MaskReply(masked=masked).to_record())


def _unmask(msg: Message, context: Context, secrets_: secagg.SiteSecrets, rc: protocol.RoundConfig) -> Message:
    request = wire.UnmaskRequest.from_record(msg.content)
    seed_shares, key_shares = secagg.unmask(secrets_, set(request.survivors), set(request.dropped), rc.round)
    context.state.config_records.pop(STATE_KEY, None)  # the round's secrets are no longer needed
    return _ok(msg, wire.UnmaskReply(seed_shares=seed_shares, key_shares=key_shares).to_record())
