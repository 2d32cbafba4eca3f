"""The round-protocol seam, the typed secure-aggregation records, and the one charge rule."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune import adapters
from fedtune.apps import make_client_app
from fedtune.config import FedtuneConfig
from fedtune.federation import protocol, wire
from fedtune.federation.membership import SiteInfo
from fedtune.federation.rounds import RoundContext, RoundOutcome, RoundProtocol
from fedtune.federation.scheduling import round_config
from fedtune.federation.server import default_protocol, run_server
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.secagg.masks import Quantizer

from conftest import InProcessGrid


class ZeroNoise:
    """A wrapper protocol, as site-level DP (distributed noise) will be one: it runs the inner
    protocol and adds noise of scale 0 to the sum, counting each call."""

    def __init__(self, inner: RoundProtocol) -> None:
        self.inner, self.min_sites, self.calls = inner, inner.min_sites, 0
        self.rng = np.random.default_rng(0)

    def run(self, grid: Grid, selected: list[SiteInfo], rc: protocol.RoundConfig, global_state: adapters.State,
            context: RoundContext) -> RoundOutcome:
        self.calls += 1
        out = self.inner.run(grid, selected, rc, global_state, context)
        if out.weighted_sum is not None:
            out.weighted_sum = {n: v + 0.0 * self.rng.standard_normal(v.shape) for n, v in out.weighted_sum.items()}
        out.extra["noise_std"] = 0.0
        return out


@pytest.mark.parametrize("secure", [False, True])
def test_a_wrapper_protocol_plugs_into_run_server(tiny_cfg: FedtuneConfig, secure: bool) -> None:
    tiny_cfg.secagg.enabled = secure
    wrapper = ZeroNoise(default_protocol(tiny_cfg))
    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False, round_protocol=wrapper)
    assert summary.rounds_completed == 2 and wrapper.calls == 2
    rows = [json.loads(line) for line in (Path(tiny_cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["noise_std"] for r in rows] == [0.0, 0.0]  # the wrapper's own metrics reach the line
    assert all(r["participants"] == ["site-00", "site-01", "site-02"] for r in rows)
    assert ("quantization_error_bound" in rows[0]) == secure
    assert (Path(tiny_cfg.run_dir) / "adapters" / "round_002").is_dir()


# ---------------------------------------------------------------- the charge of a round
def test_a_round_is_charged_the_same_on_both_sides(tiny_cfg: FedtuneConfig) -> None:
    rc = round_config(tiny_cfg, 3, "0" * 64)
    assert (rc.charge().round, rc.charge().noise_multiplier, rc.charge().steps) == (3, 1.0, 3)
    tiny_cfg.privacy.enabled = False
    server_side = round_config(tiny_cfg, 3, "0" * 64)
    assert server_side.noise_multiplier == 0.0 and server_side.charge().noise_multiplier == 0.0
    # A site charges a non-private round σ = 0 (ε = ∞), even if the server claims σ > 0.
    claimed = protocol.RoundConfig(**{**server_side.__dict__, "noise_multiplier": 2.0})
    assert claimed.charge().noise_multiplier == 0.0


# ---------------------------------------------------------------- typed stage records
def _quantizer() -> Quantizer:
    return Quantizer(bits=32, clip_range=1.0, max_weight=1000, num_sites=3)


KEY = bytes(range(32))


@pytest.mark.parametrize("message,parse", [
    (wire.AdvertiseRequest(index=2), wire.AdvertiseRequest.from_record),
    (wire.AdvertiseReply(enc_pk=KEY, mask_pk=KEY[::-1], signature=b"sig"), wire.AdvertiseReply.from_record),
    (wire.ShareRequest(threshold=2, neighbour_keys={1: wire.SignedKeys("hosp-a", KEY, KEY, b"s1"),
                                                    3: wire.SignedKeys("hosp-c", KEY, KEY[::-1], b"s3")}),
     lambda c: wire.ShareRequest.from_record(c, own_index=2)),
    (wire.ShareReply(shares={1: b"ct1", 3: b"ct3"}), lambda c: wire.ShareReply.from_record(c, [1, 3])),
    (wire.MaskRequest(quantizer=_quantizer(), shares={1: b"x"}), lambda c: wire.MaskRequest.from_record(c, {1: 0})),
    (wire.ConsistencyRequest(survivors=frozenset({1, 2, 3})), wire.ConsistencyRequest.from_record),
    (wire.ConsistencyReply(signature=b"sig"), wire.ConsistencyReply.from_record),
    (wire.UnmaskRequest(survivors=frozenset({1, 2}), signatures={1: b"a", 2: b"b"}), wire.UnmaskRequest.from_record),
    (wire.UnmaskReply(seed_shares={1: b"s"}, key_shares={3: b"k"}),
     lambda c: wire.UnmaskReply.from_record(c, {1}, {3})),
])
def test_each_stage_record_round_trips(message: object, parse) -> None:
    assert parse(message.to_record()) == message  # type: ignore[attr-defined]


def test_the_masked_reply_round_trips_and_is_validated_like_an_update() -> None:
    vector = np.arange(5, dtype=np.uint32)
    back = wire.MaskReply.from_record(wire.MaskReply(vector).to_record(), length=5, bits=32, max_bytes=1000)
    np.testing.assert_array_equal(back.masked, vector)
    bad = {
        "wrong length": wire.MaskReply(np.arange(4, dtype=np.uint32)).to_record(),
        "wrong dtype": wire.MaskReply(np.arange(5, dtype=np.uint64)).to_record(),
        "extra array": RecordDict({protocol.UPDATE: ArrayRecord(array_dict={"masked": Array(vector),
                                                                           "x": Array(vector)})}),
        "no update": RecordDict(),
    }
    for label, content in bad.items():
        with pytest.raises(adapters.UpdateRejected):
            wire.MaskReply.from_record(content, length=5, bits=32, max_bytes=1000)
    with pytest.raises(adapters.UpdateRejected, match="exceeds the limit"):
        wire.MaskReply.from_record(wire.MaskReply(vector).to_record(), length=5, bits=32, max_bytes=100)


@pytest.mark.parametrize("content,parse", [
    (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "advertise", "index": 2, "extra": 1})}),
     wire.AdvertiseRequest.from_record),
    (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "advertise", "index": True})}),
     wire.AdvertiseRequest.from_record),
    (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "unmask", "survivors": [1]})}),
     wire.AdvertiseRequest.from_record),  # another stage than the one expected
    (RecordDict({protocol.SECAGG: ConfigRecord({"enc_pk": KEY, "mask_pk": KEY[:31]})}),
     wire.AdvertiseReply.from_record),
    (wire.ShareReply(shares={4: b"x"}).to_record(), lambda c: wire.ShareReply.from_record(c, [1, 3])),
    (wire.ShareRequest(2, {2: wire.SignedKeys("hosp-b", KEY, KEY, b"s")}).to_record(),
     lambda c: wire.ShareRequest.from_record(c, own_index=2)),
    (wire.ShareRequest(2, {1: wire.SignedKeys("hosp-a", KEY, KEY, b"")}).to_record(),  # an empty signature
     lambda c: wire.ShareRequest.from_record(c, own_index=2)),
    (wire.ShareRequest(2, {1: wire.SignedKeys("hosp a\n", KEY, KEY, b"s")}).to_record(),  # not a site id
     lambda c: wire.ShareRequest.from_record(c, own_index=2)),
    (wire.ShareRequest(2, {1: wire.SignedKeys("hosp-a", KEY, KEY, b"s" * 161)}).to_record(),  # oversized
     lambda c: wire.ShareRequest.from_record(c, own_index=2)),
    (wire.MaskRequest(Quantizer(bits=9, clip_range=1.0, max_weight=10 ** 6, num_sites=3), {}).to_record(),
     lambda c: wire.MaskRequest.from_record(c, {})),  # a ring that could wrap
    (wire.UnmaskReply(seed_shares={3: b"s"}, key_shares={}).to_record(),  # a share the server did not ask for
     lambda c: wire.UnmaskReply.from_record(c, {1}, {3})),
    (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "consistency", "survivors": [1, True]})}),
     wire.ConsistencyRequest.from_record),
    (RecordDict({protocol.SECAGG: ConfigRecord({"signature": b"s", "extra": 1})}), wire.ConsistencyReply.from_record),
    (wire.UnmaskRequest(survivors=frozenset({1}), signatures={2: b"s"}).to_record(),  # a non-survivor's signature
     wire.UnmaskRequest.from_record),
    (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "unmask", "survivors": [0, 1]})}),  # no signatures
     wire.UnmaskRequest.from_record),
])
def test_malformed_stage_records_are_refused_with_the_fixed_code(content: RecordDict, parse) -> None:
    with pytest.raises(protocol.Refusal) as err:
        parse(content)
    assert err.value.code == protocol.REFUSED_INVALID_MESSAGE


class GarbageKeysApp:
    """Wraps the real ClientApp; one node answers the advertise stage with a malformed key."""

    def __init__(self, app, node: int) -> None:
        self.app, self.node = app, node

    def __call__(self, msg: Message, ctx):
        reply = self.app(msg, ctx)
        stage = msg.content.config_records.get(protocol.SECAGG)
        if msg.metadata.dst_node_id == self.node and stage is not None and stage["stage"] == "advertise":
            reply.content[protocol.SECAGG]["enc_pk"] = b"short"
        return reply


def test_the_server_rejects_a_malformed_reply_and_carries_on(tmp_path: Path, caplog) -> None:
    from conftest import tiny_config

    cfg = tiny_config(tmp_path / "run", federation__num_sites=4, federation__num_rounds=1)
    cfg.secagg.enabled = True
    grid = InProcessGrid(GarbageKeysApp(make_client_app(cfg), 103), 4)
    with caplog.at_level(logging.ERROR, logger="fedtune"):
        summary = run_server(grid, cfg, Path(cfg.run_dir), show_progress=False)
    row = summary.rows[0]
    assert row["failures"] == ["site-03"] and row["participants"] == ["site-00", "site-01", "site-02"]
    assert "rejected the advertise reply of site-03" in caplog.text
    # It never reached the masked-input stage, so nothing was charged for it.
    assert PrivacyLedger(Path(cfg.run_dir) / "server_ledger.sqlite").history("site-03") == []
    assert math.isfinite(row["eval_loss"])
