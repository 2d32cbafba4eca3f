"""Regression tests: each attack a hostile server made on a deployed site, and its fix.

Every test drives the site's real ClientApp (as ``fedtune client`` builds it) with crafted
messages, and checks three things: the attack fails, nothing was charged for a refused
round, and no reply carries the site's planted record.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedtune import adapters
from fedtune.config import to_dict
from fedtune.errors import ConfigError
from fedtune.data import DataError, load_jsonl
from fedtune.deploy.site_config import is_site_id
from fedtune.deploy.site_data import load_site_records
from fedtune.federation import protocol
from fedtune.models import build_fingerprinted_model
from fedtune.privacy.accounting import Charge, InvalidCharge, epsilon
from fedtune.privacy.ledger import PrivacyLedger

from site_attack import DELETE, PLANTED, HostileServer, outcome, reason, write_site


@pytest.fixture
def server(tmp_path: Path) -> HostileServer:
    return HostileServer(write_site(tmp_path / "site"))


def test_an_honest_round_trains_and_is_charged_once(server: HostileServer) -> None:
    reply = server.train()
    assert outcome(reply) == "ok" and server.charges() == 1
    assert adapters.l2_norm(adapters.from_array_record(reply.content[protocol.UPDATE])) > 0
    assert not server.leaked()


# Hole 2: a deployed site obeyed the server's train.seed, so the server could replay its noise.
def test_a_run_config_with_a_seed_is_refused_and_costs_nothing(server: HostileServer) -> None:
    server.cfg.train.seed = 0
    reply = server.train()
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_RUN_CONFIG
    assert server.charges() == 0


def test_a_deployed_sites_noise_is_never_reproducible(server: HostileServer) -> None:
    first = adapters.from_array_record(server.train(1).content[protocol.UPDATE])
    second = adapters.from_array_record(server.train(2).content[protocol.UPDATE])
    assert any(not np.array_equal(first[n], second[n]) for n in first)


# Hole 3: a negative step count reset the budget; NaN/inf σ hung the accountant; bad values were charged.
@pytest.mark.parametrize("field_name,value", [
    ("local_steps", -100000), ("local_steps", 0), ("local_steps", 2.5), ("local_steps", True),
    ("noise_multiplier", math.nan), ("noise_multiplier", math.inf), ("noise_multiplier", -1.0),
    ("noise_multiplier", 0.0), ("noise_multiplier", 1e300), ("noise_multiplier", "1.0"),
    ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("max_grad_norm", math.inf),
    ("learning_rate", math.nan), ("learning_rate", 0.0), ("sample_rate", 0.0), ("sample_rate", 1.5),
    ("head_learning_rate", math.nan), ("head_learning_rate", -0.5), ("head_learning_rate", 1e9),
    ("head_learning_rate", "8"), ("head_learning_rate", DELETE),
    ("dpo_beta", math.nan), ("dpo_beta", -math.inf), ("dpo_beta", 0.0), ("dpo_beta", 1e300), ("dpo_beta", "0.1"),
    ("dpo_beta", False), ("dpo_beta", DELETE),
    ("sample_rate", math.nan), ("round", -3), ("optimizer", "lbfgs"), ("strategy", "median"),
    ("private", 1), ("base_fingerprint", "00"), ("local_steps", DELETE), ("extra_field", 1),
])
def test_every_invalid_round_config_is_refused_before_the_ledger(server: HostileServer, field_name: str,
                                                                 value: object) -> None:
    reply = server.train(**{field_name: value})
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_INVALID_MESSAGE
    assert server.charges() == 0


def test_a_reference_adapter_for_a_task_without_one_is_refused_before_the_ledger(server: HostileServer) -> None:
    """Only DPO has a reference policy (tests/test_dpo_reference.py); to this causal-LM site it is a malformed message."""
    before = server.charges()
    reply = server.send({protocol.GLOBAL_ADAPTER: adapters.to_array_record(server.state),
                         protocol.REFERENCE_ADAPTER: adapters.to_array_record(server.state),
                         protocol.ROUND_CONFIG: server.round_record(1)})
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_INVALID_MESSAGE
    assert server.charges() == before


def test_the_budget_holds_after_a_negative_step_attack(server: HostileServer) -> None:
    server.cfg.train.local_steps = 10
    budget = epsilon([Charge(r, 1.0, 0.2, 10) for r in (1, 2)], server.site.budget.delta) * 1.01
    server.site.budget.epsilon = budget  # exactly two honest rounds fit
    assert outcome(server.train(1, local_steps=-100000)) == "refused"
    accepted = sum(outcome(server.train(round_number)) == "ok" for round_number in range(2, 6))
    ledger = PrivacyLedger(server.site.resolve(server.site.ledger_path))
    spent = ledger.epsilon(None, server.site.budget.delta)
    assert accepted == 2 and 0 < spent <= budget
    assert all(c.steps == 10 for c in ledger.history(None))


def test_no_invalid_charge_can_be_built_written_or_read(tmp_path: Path) -> None:
    for bad in [(1, 1.0, 0.1, -5), (1, 1.0, 0.1, 0), (1, math.nan, 0.1, 5), (1, math.inf, 0.1, 5),
                (1, 1.0, 0.0, 5), (1, 1.0, 2.0, 5), (-1, 1.0, 0.1, 5), (1, 1.0, 0.1, 2.5)]:
        with pytest.raises(InvalidCharge):
            Charge(*bad)  # type: ignore[arg-type]
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    with pytest.raises(TypeError):
        ledger.charge("s", (1, 1.0, 0.1, -5))  # type: ignore[arg-type]
    ledger.charge("s", Charge(1, 1.0, 0.1, 5))
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:  # someone edits the file by hand
        conn.execute("INSERT INTO charges (site, round, noise_multiplier, sample_rate, steps, accountant, recorded_at)"
                     " VALUES ('s', 2, 1.0, 0.1, -100000, 'rdp', 'now')")
    with pytest.raises(InvalidCharge):
        ledger.epsilon("s", 1e-5)  # fails closed: never a smaller ε


# Hole 4: error replies carried the exception text (a record, a label, a path, n_i).
def test_a_crash_in_training_reaches_the_server_as_a_fixed_code(server: HostileServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.federation import client

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"cannot encode record {PLANTED!r}")

    monkeypatch.setattr(client, "train_locally", crash)
    reply = server.train()
    assert outcome(reply) == "error" and reason(reply) == protocol.FAILED_TRAINING
    assert server.charges() == 1  # the charge came first, as it must
    assert not server.leaked()


def test_server_chosen_data_fields_and_paths_are_never_used(server: HostileServer) -> None:
    tree = to_dict(server.cfg)
    tree["data"].update(label_field="text", path="/etc/passwd", format="labelled", canary_path="/etc/shadow")
    tree["model"].update(task="classification", num_labels=2)
    server.run_config_json = json.dumps(tree)
    reply = server.train()
    # A classification run on a text-only site: refused, with a code only; the data fields were ignored.
    assert outcome(reply) in ("refused", "error") and reason(reply) in protocol.CODES
    assert server.charges() == 0 and not server.leaked()
    tree["model"].update(task="causal_lm")
    server.run_config_json = json.dumps(tree)
    assert outcome(server.train()) == "ok"  # the site trained on its own file, not /etc/passwd
    assert not server.leaked()


# Hole 5: ${oc.env:...} in a server-sent field was resolved on the site and read back.
def test_interpolations_in_the_run_config_are_refused_unresolved(server: HostileServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    for where in ("model.path", "data.path", "run_dir", "model.lora.target_modules"):
        tree = to_dict(server.cfg)
        section, _, name = where.rpartition(".")
        node = tree[section.split(".")[0]] if section else tree
        if section.count("."):
            node = node[section.split(".")[1]]
        node[name] = ["${oc.env:HF_TOKEN}"] if name == "target_modules" else "${oc.env:HF_TOKEN}"
        server.run_config_json = json.dumps(tree)
        reply = server.train()
        assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_RUN_CONFIG, where
    assert server.charges() == 0 and not server.leaked("hf_secret_token_value")


# Hole 6: a crafted global adapter could write any parameter, and NaN made the answer a membership bit.
def _adapter_with(server: HostileServer, **tensors: np.ndarray) -> ArrayRecord:
    return adapters.to_array_record({**server.state, **tensors})


def test_crafted_global_adapters_are_refused_before_the_ledger(server: HostileServer) -> None:
    name = sorted(server.state)[0]
    nan = server.state[name].copy()
    nan.flat[0] = np.nan
    huge = server.state[name].copy()
    huge.flat[0] = 1e9
    embedding = "base_model.model.model.embed_tokens.weight"
    crafted = {
        "extra base weight": _adapter_with(server, **{embedding: np.zeros((259, 32), np.float32)}),
        "lm_head zeroed": _adapter_with(server, **{"base_model.model.lm_head.weight": np.zeros((259, 32), np.float32)}),
        "NaN entry": _adapter_with(server, **{name: nan}),
        "huge entry": _adapter_with(server, **{name: huge}),
        "float64": adapters.to_array_record({n: v.astype(np.float64) for n, v in server.state.items()}),
        "missing tensor": adapters.to_array_record({n: v for n, v in server.state.items() if n != name}),
        "wrong shape": _adapter_with(server, **{name: np.zeros((1, 1), np.float32)}),
        "not an ArrayRecord": ConfigRecord({"x": 1}),
    }
    before = build_fingerprinted_model(server.cfg.model).fingerprint
    for label, record in crafted.items():
        reply = server.train(adapter=record)
        assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_INVALID_MESSAGE, label
    assert server.charges() == 0
    from fedtune.models import site_model

    assert site_model(server.cfg.model).fingerprint == before  # no base weight was written


def test_a_non_finite_record_gradient_is_zeroed_not_an_error(tmp_path: Path) -> None:
    """The membership bit: a NaN that only one record's bytes reach must not change the outcome."""
    from fedtune.data.records import Record
    from fedtune.models import lora_parameter_names, set_trainable
    from fedtune.privacy.dpsgd import DPSGDParams, train_locally
    from fedtune.tasks import get_task

    cfg = HostileServer(write_site(tmp_path / "s")).cfg
    outcomes = []
    for holds_byte in (True, False):
        built = build_fingerprinted_model(cfg.model)
        model, tokenizer = built.model, built.tokenizer
        poisoned = tokenizer.convert_tokens_to_ids("~")
        with torch.no_grad():  # what a crafted adapter did before the key-set check existed
            model.base_model.model.model.embed_tokens.weight[poisoned] = math.nan
        texts = [f"plain record {i}" for i in range(20)] + (["a record with a tilde ~ in it"] if holds_byte else [])
        examples = get_task("causal_lm").encode_all([Record("", t) for t in texts], tokenizer, 64)
        set_trainable(model, lora_parameter_names(model))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train_locally(get_task("causal_lm"), model, examples, DPSGDParams(1.0, 1.0, 1.0, 2, 0.01),
                      tokenizer.pad_token_id, seed=1)
        after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        outcomes.append(all(torch.isfinite(after[n]).all() for n in after)
                        and any(not torch.equal(before[n], after[n]) for n in after))
    assert outcomes == [True, True]


# Hole 7: checks that depend on the data ran after the charge, or not at all.
def test_data_checks_run_when_the_site_starts(tmp_path: Path) -> None:
    site = write_site(tmp_path / "a", records=20)
    site.budget.delta = 0.1
    with pytest.raises(ConfigError, match="1/records") as err:
        load_site_records(site)
    assert err.value.field == "budget.delta"
    labelled = write_site(tmp_path / "b")
    (tmp_path / "b" / "data.jsonl").write_text('{"text": "x", "label": 0}\n{"text": "y", "label": 5}\n')
    labelled.data.format, labelled.budget.delta = "labelled", 1e-3
    with pytest.raises(ConfigError, match="declares no classes"):
        load_site_records(labelled)
    labelled.data.num_labels = 2
    with pytest.raises(ConfigError, match="outside 0..1"):
        load_site_records(labelled)


def test_a_site_too_large_for_the_masked_weight_is_refused_before_the_charge(server: HostileServer) -> None:
    """The check the mask stage runs inside prepare_round, before local_update charges."""
    from fedtune.federation import client
    from fedtune.federation.protocol import Refusal

    settings = client.SiteSettings(name="hosp-a", ledger_path=server.site.resolve("ledger.sqlite"),
                                   budget_epsilon=8, delta=1e-5, accountant="rdp", require_privacy=True)
    with pytest.raises(Refusal) as err:
        client.check_site_data(load_site_records(server.site), server.cfg, settings, max_weight=10)
    assert err.value.code == protocol.REFUSED_RUN_CONFIG and server.charges() == 0


# Hole 8: nothing checked that both sides hold the same base weights.
def test_a_different_base_model_is_refused(server: HostileServer) -> None:
    reply = server.train(base_fingerprint="f" * 64)
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_BASE_MODEL
    server.site.policy.expected_base_fingerprint = "e" * 64  # the site pins another model than its copy
    reply = server.train()
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_BASE_MODEL
    assert server.charges() == 0


def test_perturbed_base_weights_change_the_fingerprint(server: HostileServer) -> None:
    from fedtune.models import base_fingerprint, load_base_model

    model, tokenizer = load_base_model(server.cfg.model)
    honest = base_fingerprint(model, tokenizer)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert base_fingerprint(model, tokenizer) != honest == server.built.fingerprint


def test_fingerprint_command_prints_what_the_server_sends(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedtune.deploy.cli import client_main

    home = tmp_path / "kit"
    home.mkdir()
    for name in ("ca.crt", "auth.key", "data.jsonl"):
        (home / name).write_text("x")
    (home / "site.yaml").write_text("site_id: hosp-a\n")
    client_main(["fingerprint", "--site-config", str(home / "site.yaml"), "model.lora.rank=2"])
    printed = capsys.readouterr().out.strip()
    from fedtune.config import FedtuneConfig

    # The LoRA shape is not part of the base model: a default-config server sends this value.
    assert printed == build_fingerprinted_model(FedtuneConfig().model).fingerprint


# Hole 9: the same ledger file under a new site_id started again at ε = 0.
def test_renaming_a_site_does_not_reset_its_budget(server: HostileServer) -> None:
    server.cfg.train.local_steps = 10
    rc_epsilon = epsilon([Charge(1, 1.0, 0.2, 10)], server.site.budget.delta)
    server.site.budget.epsilon = rc_epsilon * 1.2  # one round fits, two do not
    assert outcome(server.train(1)) == "ok"
    server.site.site_id = "hosp-a-renamed"
    renamed = HostileServer(server.site, server.cfg)
    reply = renamed.train(2)
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_BUDGET


# Hole 11: '..', '.' and Unicode homoglyphs were valid site ids.
def test_site_ids_are_ascii_and_never_dot_only() -> None:
    assert is_site_id("hosp-a") and is_site_id("site_01.eu")
    for bad in ("..", ".", "...", "hosp-\u0430", "hosp a", "a/b", "", "x" * 65, "caf\u00e9"):
        assert not is_site_id(bad), bad


# Hole 14: non-UTF-8 data was a bare UnicodeDecodeError.
def test_non_utf8_data_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"notes.jsonl:2: not UTF-8"):
        load_jsonl(path)


# The site's policy: rounds outside it are refused, with a code only, before any charge.
@pytest.mark.parametrize("policy,changes", [
    ({"min_noise_multiplier": 1.5}, {}),
    ({"max_sample_rate": 0.1}, {}),
    ({"max_local_steps": 1}, {}),
    ({"require_secure_aggregation": True}, {}),
    ({}, {"private": False, "noise_multiplier": 0.0}),
])
def test_rounds_outside_the_sites_policy_are_refused(tmp_path: Path, policy: dict, changes: dict) -> None:
    server = HostileServer(write_site(tmp_path / "site", **policy))
    reply = server.train(**changes)
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_POLICY
    assert server.charges() == 0


def test_planted_record_never_leaves_in_any_reply_above(server: HostileServer) -> None:
    """One sweep of the attacks above against one site; the planted text is in no reply."""
    server.train(local_steps=-1)
    server.train(base_fingerprint="0" * 64)
    server.train(adapter=ConfigRecord({"x": 1}))
    server.cfg.train.seed = 3
    server.train()
    server.cfg.train.seed = None
    server.train()
    assert len(server.replies) == 5 and not server.leaked()
    assert PLANTED in (server.site.resolve("data.jsonl")).read_text()  # the check can see it if present
