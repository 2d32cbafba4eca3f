"""The site's half of a secure-aggregation round (stages of ``fedtune.secagg.protocol``).

Secrets live between stages in the ClientApp's ``Context.state`` (a Flower
ConfigRecord of bytes) and are never logged.  The site's delta is checked for
NaN/Inf *before* masking: after masking nobody could tell.

Against an active server (:mod:`fedtune.federation.secure_checks`): the site signs its
keys, verifies its neighbours' against the roster, takes t from its own rule, masks only
with at least t neighbours, and reveals shares only for a survivor set that t neighbours
signed.  A failed check aborts the round here: the state is dropped (nothing of it can be
revealed later), the log names the stage and the neighbour index, the server gets the
fixed code ``ABORTED_SECAGG``, and a charge already made stays on the ledger.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.federation import protocol, secure_checks, wire
from fedtune.federation.client import (
    TrainingData,
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
from fedtune.secagg.signing import Identity, keys_statement, survivors_statement

log = logging.getLogger(__name__)

STATE_KEY = "fedtune.secagg"


def _save(context: Context, site: secagg.SiteSecrets, round_number: int) -> None:
    record = ConfigRecord({"round": round_number, "index": site.index, "enc": site.enc.private,
                           "mask": site.mask.private, "seed": site.self_seed, "threshold": site.threshold,
                           "masked": site.masked})
    if site.signed is not None:
        record["signed"] = [0, *sorted(site.signed)]
    for j, (enc_pk, mask_pk) in site.neighbour_keys.items():
        record[f"nk.{j}.enc"], record[f"nk.{j}.mask"] = enc_pk, mask_pk
        record[f"nk.{j}.site"] = site.neighbour_sites[j]
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
                              self_seed=bytes(record["seed"]), threshold=int(record["threshold"]),
                              masked=bool(record["masked"]))
    if "signed" in record:
        site.signed = frozenset(int(i) for i in record["signed"]) - {0}
    for key in record.keys():
        if key.startswith("nk.") and key.endswith(".enc"):
            j = int(key.split(".")[1])
            site.neighbour_keys[j] = (bytes(record[key]), bytes(record[f"nk.{j}.mask"]))
            site.neighbour_sites[j] = str(record[f"nk.{j}.site"])
        elif key.startswith("rc."):
            site.received[int(key[3:])] = bytes(record[key])
    return site


def _ok(msg: Message, reply: RecordDict) -> Message:
    reply[protocol.STATUS] = ConfigRecord({"status": protocol.STATUS_OK})
    return Message(reply, reply_to=msg)


def _identity(site: SiteSettings) -> Identity:
    if site.identity is None:
        raise protocol.Refusal(protocol.REFUSED_RUN_CONFIG, "no valid signed roster of enrolled sites: secure "
                               "aggregation cannot check its neighbours")
    return site.identity


def handle(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig, records: TrainingData) -> Message:
    """One secure-aggregation stage; every field is validated before any state or ledger is touched."""
    try:
        name, _ = wire.read_stage(msg.content)
        identity = _identity(site)
        if name == protocol.STAGE_ADVERTISE:
            return _advertise(msg, context, site, cfg, identity)
        rc = read_round_config(msg)
        secrets_ = _load(context, rc.round)
        if name == protocol.STAGE_SHARE:
            return _share(msg, context, secrets_, rc, site, identity)
        if name == protocol.STAGE_MASK:
            return _mask(msg, context, site, cfg, records, secrets_)
        if name == protocol.STAGE_CONSISTENCY:
            return _consistency(msg, context, secrets_, rc, site, identity)
        return _unmask(msg, context, secrets_, rc, identity)
    except protocol.Refusal as refused:
        return refusal(msg, refused)
    except secagg.RoundAborted as aborted:
        # Nothing of this round's secrets may be used any more: drop them.
        context.state.config_records.pop(STATE_KEY, None)
        log.error("%s: secure-aggregation round %s %s; the round is abandoned here (a charge made stays)",
                  site.name, _round_of(msg), aborted)
        return refusal(msg, protocol.Refusal(protocol.ABORTED_SECAGG, str(aborted)))
    except (secagg.ProtocolViolation, secagg.RoundAbandoned) as exc:
        return refusal(msg, protocol.Refusal(protocol.FAILED_PROTOCOL, str(exc)))


def _round_of(msg: Message) -> str:
    try:
        return str(read_round_config(msg).round)
    except protocol.Refusal:
        return "?"


def _advertise(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig,
               identity: Identity) -> Message:
    # A site over budget or outside its policy refuses here, before any secret exists.
    rc, _, _ = check_round_message(msg, site, cfg, secure=True)
    request = wire.AdvertiseRequest.from_record(msg.content)
    secrets_, (enc_pk, mask_pk) = secagg.advertise_keys(request.index)
    _save(context, secrets_, rc.round)
    signature = identity.sign(keys_statement(identity.federation, rc.round, request.index, identity.site_id,
                                             enc_pk, mask_pk))
    return _ok(msg, wire.AdvertiseReply(enc_pk=enc_pk, mask_pk=mask_pk, signature=signature).to_record())


def _share(msg: Message, context: Context, secrets_: secagg.SiteSecrets, rc: protocol.RoundConfig,
           site: SiteSettings, identity: Identity) -> Message:
    if secrets_.neighbour_keys:
        raise secagg.ProtocolViolation("a second share stage in one round")
    request = wire.ShareRequest.from_record(msg.content, secrets_.index)
    keys, sites = secure_checks.verified_neighbours(identity, rc.round, request, site.policy)
    secrets_.threshold = secagg.site_threshold(len(keys), request.threshold)
    secrets_.neighbour_sites = sites
    shares = secagg.share_keys(secrets_, keys, secrets_.threshold, rc.round)
    _save(context, secrets_, rc.round)
    return _ok(msg, wire.ShareReply(shares=shares).to_record())


def _mask(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig, records: TrainingData,
          secrets_: secagg.SiteSecrets) -> Message:
    if secrets_.masked or not secrets_.neighbour_keys:
        raise secagg.ProtocolViolation("a mask stage out of order (before sharing keys, or a second one)")
    request = wire.MaskRequest.from_record(msg.content, secrets_.neighbour_keys)
    quant = request.quantizer
    check_aggregation_size(quant.num_sites, site.policy)
    # Before anything is charged: a site starved of neighbours would mask with its self-mask alone.
    secure_checks.check_masking_neighbours(secrets_, request.shares, site.policy)
    prepared = prepare_round(msg, site, cfg, records, secure=True, max_weight=quant.max_weight)
    delta, weight, _metrics = local_update(prepared, site, cfg)
    names = sorted(delta)
    flat = adapters.flatten(delta, names)
    if not np.all(np.isfinite(flat)):
        raise RuntimeError(f"{site.name}: refusing to mask a delta with NaN/Inf entries")
    masked = secagg.mask_input(secrets_, quant.encode(flat, int(weight)), request.shares, prepared.rc.round,
                               quant.bits)
    secrets_.masked = True
    _save(context, secrets_, prepared.rc.round)
    # Per-site loss, ε and training time stay on the site: under secure aggregation the
    # server sees sums only, and a site's training time grows with its record count.
    return _ok(msg, wire.MaskReply(masked=masked).to_record())


def _consistency(msg: Message, context: Context, secrets_: secagg.SiteSecrets, rc: protocol.RoundConfig,
                 site: SiteSettings, identity: Identity) -> Message:
    request = wire.ConsistencyRequest.from_record(msg.content)
    secure_checks.check_survivors(secrets_, request.survivors, site.policy)
    secrets_.signed = request.survivors
    _save(context, secrets_, rc.round)
    signature = identity.sign(survivors_statement(identity.federation, rc.round, secrets_.index,
                                                  secrets_.mask.public, request.survivors))
    return _ok(msg, wire.ConsistencyReply(signature=signature).to_record())


def _unmask(msg: Message, context: Context, secrets_: secagg.SiteSecrets, rc: protocol.RoundConfig,
            identity: Identity) -> Message:
    request = wire.UnmaskRequest.from_record(msg.content)
    secure_checks.check_survivor_signatures(identity, secrets_, rc.round, request)
    # The site's own view: of the neighbours that shared with it, those in the signed set
    # survived and the others dropped.  Revealed once: the state goes, so no second request
    # of this round can ask for the other kind of share.
    shared = set(secrets_.received)
    context.state.config_records.pop(STATE_KEY, None)
    seed_shares, key_shares = secagg.unmask(secrets_, shared & request.survivors, shared - request.survivors,
                                            rc.round)
    return _ok(msg, wire.UnmaskReply(seed_shares=seed_shares, key_shares=key_shares).to_record())
