"""Secure aggregation against an active server: the attacks of issue 10, on real deployed sites.

Each attack is played by the test as the server (and, for the split view, as two fake
sites the operator enrolled), with hand-made stage messages to real ClientApps built as
``fedtune client`` builds them.  Each test runs twice: with the site's checks as shipped,
the attack must be detected, the victim's round abandoned, and the server's attempt to
unmask the victim's update from what it collected must fail; with the one check that
stops it switched off, the same attack must read the victim's weight (its record count)
out of its masked vector, which shows the test can fail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import adapters
from fedtune.federation import protocol, secure_checks, wire
from fedtune.secagg import crypto, shamir
from fedtune.secagg import protocol as secagg
from fedtune.secagg.masks import Quantizer, mask_stream
from fedtune.secagg.signing import keys_statement, sign, survivors_statement

from site_attack import HostileServer, enrol_sites, outcome, reason

RECORDS = 40  # each real site's record count: the weight at the end of its masked vector
ROUND = 1


@dataclass
class Fake:
    """A site the operator enrolled and plays itself: it holds all of that site's secrets."""

    site_id: str
    key: ec.EllipticCurvePrivateKey
    secrets: Optional[secagg.SiteSecrets] = None


@dataclass
class Federation:
    """Real sites by index (1..), fake ones by index, and everything the server saw."""

    real: dict[int, HostileServer]
    fakes: dict[int, Fake]
    advertised: dict[int, wire.SignedKeys] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver -> ct
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    enrolled: int = 0

    def quantizer(self) -> Quantizer:
        return Quantizer(bits=32, clip_range=1.0, max_weight=1000, num_sites=self.enrolled)

    def send(self, i: int, content: dict) -> Message:
        server = self.real[i]
        return server.send({**content, protocol.ROUND_CONFIG: server.round_record(ROUND)})

    def advertise(self) -> None:
        for i, server in self.real.items():
            answer = wire.AdvertiseReply.from_record(self.send(i, wire.AdvertiseRequest(index=i).to_record()).content)
            self.advertised[i] = wire.SignedKeys(server.site.site_id, answer.enc_pk, answer.mask_pk, answer.signature)
        for i, fake in self.fakes.items():
            fake.secrets, (enc, mask) = secagg.advertise_keys(i)
            statement = keys_statement("attack-fed", ROUND, i, fake.site_id, enc, mask)
            self.advertised[i] = wire.SignedKeys(fake.site_id, enc, mask, sign(fake.key, statement))

    def share(self, i: int, keys: dict[int, wire.SignedKeys], threshold: int = 2) -> Message:
        reply = self.send(i, wire.ShareRequest(threshold=threshold, neighbour_keys=keys).to_record())
        if outcome(reply) == "ok":
            self.shares[i] = wire.ShareReply.from_record(reply.content, keys).shares
        return reply

    def share_honestly(self) -> None:
        for i in self.real:
            assert outcome(self.share(i, {j: k for j, k in self.advertised.items() if j != i})) == "ok"
        for i, fake in self.fakes.items():
            others = {j: k.keys for j, k in self.advertised.items() if j != i}
            self.shares[i] = secagg.share_keys(fake.secrets, others, len(others) // 2 + 1, ROUND)

    def mask(self, i: int, received: dict[int, bytes]) -> Message:
        content = wire.MaskRequest(quantizer=self.quantizer(), shares=received).to_record()
        content[protocol.GLOBAL_ADAPTER] = adapters.to_array_record(self.real[i].state)
        reply = self.send(i, content)
        if outcome(reply) == "ok":
            self.masked[i] = np.asarray(reply.content[protocol.UPDATE]["masked"].numpy())
        return reply

    def routed(self, i: int) -> dict[int, bytes]:
        return {s: by[i] for s, by in self.shares.items() if i in by}

    def sign_survivors(self, i: int, survivors: frozenset[int]) -> bytes:
        """A survivor signature: asked of a real site, made by the server for a fake one."""
        if i in self.fakes:
            statement = survivors_statement("attack-fed", ROUND, i, self.advertised[i].mask_pk, survivors)
            return sign(self.fakes[i].key, statement)
        reply = self.send(i, wire.ConsistencyRequest(survivors=survivors).to_record())
        assert outcome(reply) == "ok", reason(reply)
        return wire.ConsistencyReply.from_record(reply.content).signature

    def unmask(self, i: int, survivors: frozenset[int], signatures: dict[int, bytes]) -> Message:
        return self.send(i, wire.UnmaskRequest(survivors=survivors, signatures=signatures).to_record())


def federation(tmp_path: Path, real: int, fakes: int = 0, absent: int = 0) -> Federation:
    """``real`` deployed sites, ``fakes`` the operator plays, ``absent`` honest enrolled sites not in the test."""
    ids = [f"hosp-{chr(ord('a') + n)}" for n in range(real + fakes + absent)]
    sites, fake_keys = enrol_sites(tmp_path, ids, real=real, max_local_steps=3)
    return Federation(real={n + 1: HostileServer(site) for n, site in enumerate(sites)},
                      fakes={real + n + 1: Fake(s, fake_keys[s]) for n, s in enumerate(ids[real:real + fakes])},
                      enrolled=len(ids))


def read_weight(masked: np.ndarray, seed: bytes, mask_key: Optional[bytes], peers: dict[int, bytes],
                index: int, pair_keys: Optional[dict[int, bytes]] = None) -> int:
    """What the server reads as the victim's weight after removing the masks it reconstructed.

    ``mask_key`` (the victim's mask private key) and the peers' mask public keys give the
    pairwise masks; or ``pair_keys`` gives them directly (the server made the peers' keys).
    """
    x = masked.astype(np.uint32).copy()
    x -= mask_stream(seed, secagg.SELF_MASK, ROUND, len(x), 32)
    if pair_keys is None:
        pair_keys = {j: crypto.derive_key(mask_key, pk, secagg.PAIR_MASK) for j, pk in peers.items()}  # type: ignore
    for j, key in pair_keys.items():
        stream = mask_stream(key, secagg.PAIR_MASK, ROUND, len(x), 32)
        x = x - stream if j > index else x + stream
    return int(x[-1])


def combine(shares: dict[int, bytes], t: int) -> Optional[bytes]:
    """The secret, if the server has enough shares (with fewer it has nothing)."""
    try:
        return shamir.combine(shares, t) if shares else None
    except ValueError:
        return None


def open_share(ct: bytes, enc_private: bytes, sender_enc_pk: bytes, sender: int, receiver: int) -> bytes:
    """A share the victim encrypted to a neighbour whose encryption key the server holds."""
    key = crypto.derive_key(enc_private, sender_enc_pk, secagg.SHARE_KEY)
    return crypto.decrypt(key, ct, f"fedtune-secagg/{ROUND}/{sender}->{receiver}".encode())[8:]


def disable(monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    """Switch off one of the site's checks, to show the attack works without it."""
    if check == "signatures":
        def unchecked(identity, round_number, request, policy):  # type: ignore[no-untyped-def]
            return ({j: s.keys for j, s in request.neighbour_keys.items()},
                    {j: s.site_id for j, s in request.neighbour_keys.items()})
        monkeypatch.setattr(secure_checks, "verified_neighbours", unchecked)
    elif check == "starved":
        monkeypatch.setattr(secure_checks, "check_masking_neighbours", lambda *a: None)
    elif check == "consistency":
        monkeypatch.setattr(secure_checks, "check_survivor_signatures", lambda *a: None)


def assert_aborted(reply: Message, caplog: pytest.LogCaptureFixture, stage: str, neighbour: Optional[int]) -> None:
    assert outcome(reply) == "refused" and reason(reply) == protocol.ABORTED_SECAGG
    who = f"neighbour {neighbour}" if neighbour is not None else "the server's message"
    assert f"aborted at the {stage} stage: {who}" in caplog.text


# ---------------------------------------------------------------- attack 1: forged keys
@pytest.mark.parametrize("checked", [True, False], ids=["site-checks", "without-signature-check"])
def test_forged_neighbour_keys_are_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture, checked: bool) -> None:
    """The server stands in for every neighbour of the victim with keys it made itself."""
    if not checked:
        disable(monkeypatch, "signatures")
    fed = federation(tmp_path, real=1, absent=3)  # hosp-b, c, d are enrolled, but the server has no key of theirs
    fed.advertise()
    victim = fed.real[1]
    forged = {j: (crypto.generate_keypair(), crypto.generate_keypair()) for j in (2, 3, 4)}
    impostor = ec.generate_private_key(ec.SECP384R1())  # not an enrolled key
    keys = {j: wire.SignedKeys(f"hosp-{'xabcd'[j]}", e.public, m.public,
                               sign(impostor, keys_statement("attack-fed", ROUND, j, f"hosp-{'xabcd'[j]}", e.public,
                                                             m.public)))
            for j, (e, m) in forged.items()}
    with caplog.at_level(logging.ERROR):
        fed.share(1, keys)
        fed.mask(1, {j: b"ciphertext" for j in forged})
    victim_keys = fed.advertised[1]
    # The server opens what the victim encrypted to "its neighbours", and rebuilds the masks.
    opened = {j: open_share(ct, forged[j][0].private, victim_keys.enc_pk, 1, j) for j, ct in fed.shares.get(1, {}).items()}
    seed = combine({j: body[:shamir.SHARE_BYTES] for j, body in opened.items()}, 2)
    pair_keys = {j: crypto.derive_key(forged[j][1].private, victim_keys.mask_pk, secagg.PAIR_MASK) for j in forged}
    if not checked:
        assert seed is not None and read_weight(fed.masked[1], seed, None, {}, 1, pair_keys) == RECORDS
        return
    assert_aborted(victim.replies[-2], caplog, protocol.STAGE_SHARE, 2)
    assert seed is None and 1 not in fed.masked  # no share, no masked vector: nothing to unmask
    assert victim.charges() == 0  # aborted before training: nothing was charged


def test_a_real_signature_for_another_index_or_round_does_not_verify(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    fed = federation(tmp_path, real=3)
    fed.advertise()
    genuine = fed.advertised[2]
    replayed = {3: wire.SignedKeys(genuine.site_id, genuine.enc_pk, genuine.mask_pk, genuine.signature),
                2: fed.advertised[3]}  # site 2's signed keys presented as index 3's
    with caplog.at_level(logging.ERROR):
        assert_aborted(fed.share(1, replayed), caplog, protocol.STAGE_SHARE, 2)
    twice = {1: fed.advertised[1], 3: wire.SignedKeys(fed.advertised[1].site_id, *fed.advertised[1].keys,
                                                      fed.advertised[1].signature)}
    with caplog.at_level(logging.ERROR):
        assert_aborted(fed.share(2, twice), caplog, protocol.STAGE_SHARE, 3)


# ---------------------------------------------------------------- attack 2: starved victim
@pytest.mark.parametrize("checked", [True, False], ids=["site-checks", "without-starvation-check"])
def test_a_victim_told_nobody_shared_keys_refuses_to_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture, checked: bool) -> None:
    if not checked:
        disable(monkeypatch, "starved")
    fed = federation(tmp_path, real=4)
    fed.advertise()
    fed.share_honestly()
    with caplog.at_level(logging.ERROR):
        starved = fed.mask(1, {})  # "nobody shared keys with you"
    for i in (2, 3, 4):
        assert outcome(fed.mask(i, fed.routed(i))) == "ok"
    everyone = frozenset(range(1, 5))
    if checked:
        assert_aborted(starved, caplog, protocol.STAGE_MASK, None)
        assert fed.real[1].charges() == 0  # refused before training
    survivors = frozenset(fed.masked)
    signatures = {i: fed.sign_survivors(i, survivors) for i in sorted(survivors)}
    seed_shares = {}
    for i in sorted(survivors - {1}):
        reply = fed.unmask(i, survivors, {j: s for j, s in signatures.items() if j != i})
        assert outcome(reply) == "ok", reason(reply)
        seed_shares.update({i: bytes(v) for k, v in reply.content[wire.SEED_SHARES].items() if k == "1"})
    seed = combine(seed_shares, 2)
    if not checked:
        assert survivors == everyone and read_weight(fed.masked[1], seed, None, {}, 1, pair_keys={}) == RECORDS
        return
    assert 1 not in fed.masked and not seed_shares and seed is None  # no masked vector, and no share of it


# ---------------------------------------------------------------- attack 3: split view
@pytest.mark.parametrize("checked", [True, False], ids=["site-checks", "without-consistency-check"])
def test_a_split_view_of_the_victims_dropout_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture, checked: bool) -> None:
    """Sites 2, 3 are told the victim dropped, 4, 5 that it survived; 6, 7 are the operator's fake sites.

    k = 6 neighbours each, so every site's own threshold is t = 4: the fakes give the
    server two of each kind of the victim's shares, and each group of honest neighbours
    would give the two more of one kind.
    """
    if not checked:
        disable(monkeypatch, "consistency")
    fed = federation(tmp_path, real=5, fakes=2)
    fed.advertise()
    fed.share_honestly()
    for i in fed.real:
        assert outcome(fed.mask(i, fed.routed(i))) == "ok", reason(fed.real[i].replies[-1])
    view_b = frozenset(range(1, 8))    # the victim survived
    view_a = view_b - {1}              # the victim dropped
    views = {2: view_a, 3: view_a, 1: view_b, 4: view_b, 5: view_b}
    signed = {view: {i: fed.sign_survivors(i, view) for i in (6, 7)} for view in (view_a, view_b)}
    for i, view in views.items():
        signed[view][i] = fed.sign_survivors(i, view)
    seed_shares, key_shares = {}, {}
    victim = fed.advertised[1]
    for fake in (6, 7):  # what the victim encrypted to the fake sites, the server opens
        body = open_share(fed.shares[1][fake], fed.fakes[fake].secrets.enc.private, victim.enc_pk, 1, fake)
        seed_shares[fake], key_shares[fake] = body[:shamir.SHARE_BYTES], body[shamir.SHARE_BYTES:]
    with caplog.at_level(logging.ERROR):
        for i in (2, 3, 4, 5):
            reply = fed.unmask(i, views[i], {j: s for j, s in signed[views[i]].items() if j != i})
            if outcome(reply) == "ok":
                seed_shares.update({i: bytes(v) for k, v in reply.content[wire.SEED_SHARES].items() if k == "1"})
                key_shares.update({i: bytes(v) for k, v in reply.content[wire.KEY_SHARES].items() if k == "1"})
    seed, mask_key = combine(seed_shares, 4), combine(key_shares, 4)
    peers = {j: fed.advertised[j].mask_pk for j in range(2, 8)}
    if not checked:
        assert read_weight(fed.masked[1], seed, mask_key, peers, 1) == RECORDS
        return
    # Group A had only 3 neighbours' signatures on its view (3 or 2, and the fakes): it aborts.
    assert_aborted(fed.real[2].replies[-1], caplog, protocol.STAGE_UNMASK, None)
    assert_aborted(fed.real[3].replies[-1], caplog, protocol.STAGE_UNMASK, None)
    assert len(key_shares) == 2 and mask_key is None or crypto.public_from_private(mask_key) != victim.mask_pk
    # Never both kinds of one site from one holder, and the victim's update stays hidden.
    assert not (set(seed_shares) - {6, 7}) & (set(key_shares) - {6, 7})
    if seed is not None and mask_key is not None:
        assert read_weight(fed.masked[1], seed, mask_key, peers, 1) != RECORDS


def test_a_forged_survivor_signature_aborts_naming_the_neighbour(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    fed = federation(tmp_path, real=4)
    fed.advertise()
    fed.share_honestly()
    for i in fed.real:
        fed.mask(i, fed.routed(i))
    everyone = frozenset(range(1, 5))
    signatures = {i: fed.sign_survivors(i, everyone) for i in (1, 2, 3, 4)}
    signatures[3] = signatures[2]  # site 2's signature passed off as site 3's
    with caplog.at_level(logging.ERROR):
        assert_aborted(fed.unmask(1, everyone, {j: signatures[j] for j in (2, 3, 4)}), caplog,
                       protocol.STAGE_UNMASK, 3)
    # The site's state is gone: a second, honest-looking request reveals nothing.
    again = fed.unmask(1, everyone, {j: fed.sign_survivors(j, everyone) for j in (2, 4)})
    assert outcome(again) == "refused" and wire.SEED_SHARES not in again.content.config_records
    assert fed.real[1].charges() == 1  # it had masked: the charge stays


def test_a_second_survivor_set_in_one_round_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fed = federation(tmp_path, real=4)
    fed.advertise()
    fed.share_honestly()
    for i in fed.real:
        fed.mask(i, fed.routed(i))
    fed.sign_survivors(1, frozenset(range(1, 5)))
    with caplog.at_level(logging.ERROR):
        reply = fed.send(1, wire.ConsistencyRequest(survivors=frozenset({1, 2, 3})).to_record())
    assert_aborted(reply, caplog, protocol.STAGE_CONSISTENCY, None)


def test_the_sites_threshold_is_its_own_majority_whatever_the_server_asks(tmp_path: Path) -> None:
    fed = federation(tmp_path, real=5)
    fed.advertise()
    assert outcome(fed.share(1, {j: fed.advertised[j] for j in (2, 3, 4, 5)}, threshold=2)) == "ok"
    assert fed.real[1].context.state.config_records["fedtune.secagg"]["threshold"] == 3
    # Too few neighbours for the site's policy (min_other_sites = 2): refused, at no cost.
    reply = fed.share(2, {3: fed.advertised[3]})
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_POLICY


# ---------------------------------------------------------------- the new fields, with garbage
_ANY = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(max_size=70), st.binary(max_size=200),
                 st.lists(st.integers(min_value=-3, max_value=8), max_size=5))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fields=st.dictionaries(st.sampled_from(["1.enc", "1.mask", "1.sig", "1.site", "3.sig", "3.site", "x.sig"]),
                              _ANY, max_size=6),
       survivors=_ANY, signatures=st.dictionaries(st.sampled_from(["1", "2", "0", "a", "-1"]), _ANY, max_size=3),
       reply=st.dictionaries(st.sampled_from(["signature", "enc_pk", "mask_pk", "x"]), _ANY, max_size=3))
def test_garbage_in_the_signed_fields_is_refused_with_the_fixed_code(fields: dict, survivors: object,
                                                                      signatures: dict, reply: dict) -> None:
    from flwr.app import ConfigRecord, RecordDict

    candidates = [
        (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "share", "threshold": 2}),
                     protocol.KEYS: ConfigRecord(fields)}), lambda c: wire.ShareRequest.from_record(c, 2)),
        (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "consistency", "survivors": survivors})}),
         wire.ConsistencyRequest.from_record),
        (RecordDict({protocol.SECAGG: ConfigRecord({"stage": "unmask", "survivors": survivors}),
                     protocol.SIGNATURES: ConfigRecord(signatures)}), wire.UnmaskRequest.from_record),
        (RecordDict({protocol.SECAGG: ConfigRecord(reply)}), wire.ConsistencyReply.from_record),
        (RecordDict({protocol.SECAGG: ConfigRecord(reply)}), wire.AdvertiseReply.from_record),
    ]
    for content, parse in candidates:
        try:
            parsed = parse(content)
        except protocol.Refusal as refused:
            assert refused.code == protocol.REFUSED_INVALID_MESSAGE
            continue
        for signature in [getattr(parsed, "signature", b"x")] + list(getattr(parsed, "signatures", {}).values()):
            assert isinstance(signature, bytes) and 0 < len(signature) <= 160
