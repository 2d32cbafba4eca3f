"""The site's half of a secure-aggregation round (stages of ``fedtune.secagg.protocol``).

Secrets live between stages in the ClientApp's ``Context.state`` (a Flower
ConfigRecord of bytes) and are never logged.  The site's delta is checked for
NaN/Inf *before* masking: after masking nobody could tell.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.data import Record
from fedtune.federation import protocol
from fedtune.federation.client import SiteSettings, budget_refusal, local_update, refusal
from fedtune.privacy.ledger import PrivacyLedger
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


def handle(msg: Message, context: Context, site: SiteSettings, cfg: FedtuneConfig, records: list[Record]) -> Message:
    stage = msg.content[protocol.SECAGG]
    rc = protocol.RoundConfig.from_record(msg.content[protocol.ROUND_CONFIG])  # type: ignore[arg-type]
    ledger = PrivacyLedger(site.ledger_path, accountant=site.accountant)
    name = str(stage["stage"])
    if name == protocol.STAGE_ADVERTISE:
        reason = budget_refusal(rc, site, ledger)
        if reason is not None:
            return refusal(msg, reason, ledger.epsilon(site.name, site.delta))
        secrets_, (enc_pk, mask_pk) = secagg.advertise_keys(int(stage["index"]))
        _save(context, secrets_, rc.round)
        return _ok(msg, {protocol.SECAGG: ConfigRecord({"enc_pk": enc_pk, "mask_pk": mask_pk})})

    secrets_ = _load(context, rc.round)
    if name == protocol.STAGE_SHARE:
        keys = msg.content[protocol.KEYS]
        neighbours = {int(k.split(".")[0]): (bytes(keys[k]), bytes(keys[k.replace(".enc", ".mask")]))
                      for k in keys.keys() if k.endswith(".enc")}
        shares = secagg.share_keys(secrets_, neighbours, int(stage["threshold"]), rc.round)
        _save(context, secrets_, rc.round)
        return _ok(msg, {protocol.SHARES: ConfigRecord({str(j): ct for j, ct in shares.items()})})

    if name == protocol.STAGE_MASK:
        reason = budget_refusal(rc, site, ledger)
        if reason is not None:
            return refusal(msg, reason, ledger.epsilon(site.name, site.delta))
        received = {int(j): bytes(ct) for j, ct in msg.content[protocol.SHARES].items()}
        global_state = adapters.from_array_record(msg.content[protocol.GLOBAL_ADAPTER])  # type: ignore[arg-type]
        delta, weight, metrics = local_update(rc, global_state, site, cfg, records, ledger)
        names = sorted(delta)
        flat = adapters.flatten(delta, names)
        if not np.all(np.isfinite(flat)):
            raise RuntimeError(f"{site.name}: refusing to mask a delta with NaN/Inf entries")
        quant = Quantizer(bits=int(stage["bits"]), clip_range=float(stage["clip_range"]),
                          max_weight=int(stage["max_weight"]), num_sites=int(stage["num_sites"]))
        masked = secagg.mask_input(secrets_, quant.encode(flat, int(weight)), received, rc.round, quant.bits)
        _save(context, secrets_, rc.round)
        # Per-site loss and ε stay on the site: under secure aggregation the server sees sums only.
        return _ok(msg, {protocol.UPDATE: ArrayRecord(array_dict={"masked": Array(masked)}),
                         protocol.METRICS: MetricRecord({"train_seconds": metrics["train_seconds"]})})

    if name == protocol.STAGE_UNMASK:
        sets = msg.content[protocol.SECAGG]
        survivors = set(map(int, sets["survivors"])) - {0}
        dropped = set(map(int, sets["dropped"])) - {0}
        seed_shares, key_shares = secagg.unmask(secrets_, survivors, dropped, rc.round)
        context.state.config_records.pop(STATE_KEY, None)  # the round's secrets are no longer needed
        return _ok(msg, {"seed_shares": ConfigRecord({str(j): s for j, s in seed_shares.items()}),
                         "key_shares": ConfigRecord({str(j): s for j, s in key_shares.items()})})
    raise secagg.ProtocolViolation(f"unknown secure-aggregation stage '{name}'")
