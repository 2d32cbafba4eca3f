"""DPO from a trained start: that adapter, frozen, is the reference (SFT → DPO), and β is a checked round field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedtune import adapters
from fedtune.config import FedtuneConfig, validate_train
from fedtune.errors import ConfigError
from fedtune.federation import protocol
from fedtune.models import build_lora_model, lora_parameter_names
from fedtune.tasks import LossSettings, get_task
from fedtune.tasks.dpo import PreferenceExample

from conftest import tiny_config
from site_attack import HostileServer, outcome, reason, write_site
from test_dpo import (PAIRS, _dpo_config, _moved_model, answer_logp_by_hand,
                      assert_per_pair_gradients_equal_one_pair_passes)

DPO = get_task("dpo")


def _with_start_as_reference(cfg: FedtuneConfig):  # type: ignore[no-untyped-def]
    """A non-zero adapter (the "SFT" start) and the pairs with their reference values under it."""
    model, tokenizer = _moved_model(cfg)
    examples = DPO.with_reference(model, DPO.encode_all(PAIRS, tokenizer, 128), tokenizer.pad_token_id, 2)
    return model, tokenizer, examples


def _perturb_adapter(model: torch.nn.Module, seed: int) -> None:
    """Move the policy away from its start (the reference), every LoRA tensor a little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def test_at_its_start_the_policy_is_its_reference_so_each_pair_costs_log_2(tmp_path: Path) -> None:
    model, tokenizer, examples = _with_start_as_reference(_dpo_config(tmp_path))
    assert all(isinstance(e, PreferenceExample) and e.reference is not None for e in examples)
    batch = DPO.collate(examples, tokenizer.pad_token_id)
    model.train()
    torch.testing.assert_close(DPO.per_record_loss(model, batch), torch.full((3,), math.log(2)), atol=1e-5, rtol=0)
    # Against the base model (the reference before this change) the same start is not at zero margin.
    base = DPO.per_record_loss(model, DPO.collate(DPO.encode_all(PAIRS, tokenizer, 128), tokenizer.pad_token_id))
    assert float((base - math.log(2)).abs().max()) > 1e-3
    result = DPO.evaluate(model, examples, tokenizer.pad_token_id, 2)
    assert result.accuracy == 0.0 and abs(result.task_metrics["margin"]) < 1e-5


def test_the_loss_against_a_reference_adapter_matches_log_softmax_by_hand(tmp_path: Path) -> None:
    """β·[(π_c − ref_c) − (π_r − ref_r)] with both policies' log-probabilities summed from log-softmax."""
    model, tokenizer = _moved_model(_dpo_config(tmp_path))
    example = DPO.encode(PAIRS[1], tokenizer, 128)

    def answer_logp(ex) -> float:  # type: ignore[no-untyped-def]
        return answer_logp_by_hand(model, ex)

    with torch.no_grad():
        reference = answer_logp(example.chosen), answer_logp(example.rejected)
    (with_reference,) = DPO.with_reference(model, [example], tokenizer.pad_token_id, 1)
    assert with_reference.reference == pytest.approx(reference, abs=1e-4)
    _perturb_adapter(model, seed=1)
    with torch.no_grad():
        policy = answer_logp(example.chosen), answer_logp(example.rejected)
    beta = 0.5
    margin = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    assert abs(margin) > 1e-3
    got = DPO.with_loss(LossSettings(dpo_beta=beta)).per_record_loss(
        model, DPO.collate([with_reference], tokenizer.pad_token_id))
    assert float(got[0]) == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-4)


def test_per_pair_gradients_with_an_adapter_reference_equal_one_pair_backward_passes(tmp_path: Path) -> None:
    """The reference values were computed before the hooks: Opacus sees only the policy's two passes."""
    model, tokenizer, examples = _with_start_as_reference(_dpo_config(tmp_path))
    _perturb_adapter(model, seed=2)
    assert_per_pair_gradients_equal_one_pair_passes(model, tokenizer, examples)


@pytest.mark.parametrize("beta", [math.nan, math.inf, -0.1, 0.0, 11.0, 1e30, True])
def test_a_bad_dpo_beta_is_a_config_error_naming_the_field(tmp_path: Path, beta: object) -> None:
    cfg = tiny_config(tmp_path / "run")
    cfg.train.dpo_beta = beta  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="train.dpo_beta"):
        validate_train(cfg.train)


def test_a_start_adapter_that_is_not_an_adapter_directory_is_a_config_error(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", train__start_adapter=str(tmp_path))
    with pytest.raises(ConfigError, match="train.start_adapter"):
        validate_train(cfg.train)


# ------------------------------------------------------------------ a deployed DPO site, hostile server
@pytest.fixture(scope="module")
def dpo_server(tmp_path_factory: pytest.TempPathFactory) -> HostileServer:
    home = tmp_path_factory.mktemp("dpo-site")
    site = write_site(home, records=2)
    pairs = [{"prompt": f"Dose {i}? ", "chosen": f"{i} mg twice daily.", "rejected": f"{i}mg BD."} for i in range(40)]
    (home / "data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    site.data.format = "preference"
    site.budget.epsilon = 1e6
    server = HostileServer(site)
    server.cfg.model.task, server.cfg.data.format = "dpo", "preference"
    return server


def _reference_record(server: HostileServer, **tensors: np.ndarray) -> object:
    return adapters.to_array_record({**{n: v + 0.01 for n, v in server.state.items()}, **tensors})


def test_an_honest_reference_adapter_trains_and_is_charged_once(dpo_server: HostileServer) -> None:
    before = dpo_server.charges()
    reply = dpo_server.send({protocol.GLOBAL_ADAPTER: adapters.to_array_record(dpo_server.state),
                             protocol.REFERENCE_ADAPTER: _reference_record(dpo_server),
                             protocol.ROUND_CONFIG: dpo_server.round_record(1)})
    assert outcome(reply) == "ok" and dpo_server.charges() == before + 1


def test_crafted_reference_adapters_are_refused_before_the_ledger(dpo_server: HostileServer) -> None:
    name = sorted(dpo_server.state)[0]
    nan, huge = dpo_server.state[name].copy(), dpo_server.state[name].copy()
    nan.flat[0], huge.flat[0] = np.nan, 1e9
    crafted = {
        "extra base weight": _reference_record(
            dpo_server, **{"base_model.model.model.embed_tokens.weight": np.zeros((259, 32), np.float32)}),
        "NaN entry": _reference_record(dpo_server, **{name: nan}),
        "huge entry": _reference_record(dpo_server, **{name: huge}),
        "float64": adapters.to_array_record({n: v.astype(np.float64) for n, v in dpo_server.state.items()}),
        "missing tensor": adapters.to_array_record({n: v for n, v in dpo_server.state.items() if n != name}),
        "wrong shape": _reference_record(dpo_server, **{name: np.zeros((1, 1), np.float32)}),
        "not an ArrayRecord": ConfigRecord({"x": 1}),
    }
    before = dpo_server.charges()
    for label, record in crafted.items():
        reply = dpo_server.send({protocol.GLOBAL_ADAPTER: adapters.to_array_record(dpo_server.state),
                                 protocol.REFERENCE_ADAPTER: record, protocol.ROUND_CONFIG: dpo_server.round_record(2)})
        assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_INVALID_MESSAGE, label
    assert dpo_server.charges() == before


@pytest.mark.parametrize("beta", [math.nan, math.inf, -1.0, 0.0, 1e9, "0.1", True])
def test_a_garbage_beta_in_the_round_config_is_refused_before_the_ledger(dpo_server: HostileServer,
                                                                         beta: object) -> None:
    before = dpo_server.charges()
    reply = dpo_server.train(dpo_beta=beta)
    assert outcome(reply) == "refused" and reason(reply) == protocol.REFUSED_INVALID_MESSAGE
    assert dpo_server.charges() == before


# ------------------------------------------------------------------ SFT, then DPO from its adapter
def test_sft_then_dpo_as_two_versions_uses_the_sft_adapter_as_the_frozen_reference(tmp_path: Path) -> None:
    """v0001 trains SFT on notes; v0002 runs DPO on pairs from it: at its start every margin is 0 (loss log 2)."""
    from fedtune.experiments.engine import run_inprocess
    from fedtune.governance import record_hash
    from fedtune.transparency.verify import verify

    root = tmp_path / "fed"
    sft = tiny_config(root, federation__num_rounds=1, data__max_length=128)
    sft.versions.enabled = True
    assert run_inprocess(sft).rounds_completed == 1
    v1 = root / "versions" / "v0001"
    sft_record = json.loads((v1 / "adapters" / "round_001" / "adapter_record.json").read_text())

    dpo = tiny_config(root, federation__num_rounds=1, model__task="dpo", data__max_length=128,
                      data__demo_records=120, data__partition="iid")
    dpo.versions.enabled = True
    assert run_inprocess(dpo).rounds_completed == 1
    v2 = root / "versions" / "v0002"
    info = json.loads((v2 / "version.json").read_text())
    assert info["parent"] == 1 and info["start_eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    record = json.loads((v2 / "adapters" / "round_002" / "adapter_record.json").read_text())
    assert record["dpo"] == {"beta": 0.1, "reference_policy": {
        "kind": "start adapter", "record_sha256": record_hash(sft_record), "version": "v0001"}}
    card = (v2 / "adapters" / "round_002" / "ADAPTER_CARD.md").read_text()
    assert f"reference policy the start adapter, frozen (record {record_hash(sft_record)}, version v0001)" in card
    assert record["parent"] == record_hash(sft_record) and record["base_model"]["task"] == "dpo"
    row = json.loads((v2 / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(row["eval_margin"]) and row["eval_loss"] != pytest.approx(math.log(2), abs=1e-6)
    checked, problems = verify(root)
    assert checked >= 2 and not problems

    # The same DPO outside the lineage, naming the SFT adapter: it starts there, and that is its reference.
    named = tiny_config(tmp_path / "named", federation__num_rounds=1, model__task="dpo", data__max_length=128,
                        data__demo_records=120, data__partition="iid",
                        train__start_adapter=str(v1 / "adapters" / "round_001"))
    assert run_inprocess(named).rounds_completed == 1
    record = json.loads((tmp_path / "named" / "adapters" / "round_001" / "adapter_record.json").read_text())
    assert record["dpo"]["reference_policy"]["record_sha256"] == record_hash(sft_record) and record["parent"] is None
    assert record["start_adapter"] == {"record_sha256": record_hash(sft_record)}
    assert verify(tmp_path / "named")[1] == []


def test_a_dpo_run_names_its_start_adapter_which_is_its_reference(tmp_path: Path) -> None:
    """train.start_adapter: the server starts there, sends it as the reference, and the record states its hash."""
    from fedtune.checkpoint import peft_key_map, save_adapter_dir, to_peft_keys, adapter_config_json
    from fedtune.federation import reference
    from fedtune.governance import RECORD_FILE, record_hash, record_text

    cfg = _dpo_config(tmp_path)
    model, _ = _moved_model(cfg)
    key_map = peft_key_map(model)
    state = adapters.lora_state(model, lora_parameter_names(model))
    start_record = {"round": 3, "parent": None, "task": "causal_lm"}
    save_adapter_dir(tmp_path / "sft", to_peft_keys(key_map, state), adapter_config_json(model),
                     {RECORD_FILE: record_text(start_record)})
    cfg.train.start_adapter = str(tmp_path / "sft")
    validate_train(cfg.train)
    start = reference.run_start(cfg, None, key_map)
    assert start is not None and start.record == start_record
    sent = reference.reference_state(cfg, start)
    assert sent is not None and all(np.array_equal(sent[n], state[n]) for n in state)
    identity = reference.reference_identity(cfg, start, None)
    assert identity["dpo"]["reference_policy"]["record_sha256"] == record_hash(start_record)
    assert identity["start_adapter"] == {"record_sha256": record_hash(start_record)}
    assert reference.reference_identity(cfg, None, None) == {"dpo": {"beta": 0.1, "reference_policy": {
        "kind": "base model"}}} and reference.reference_state(cfg, None) is None  # a fresh LoRA: the base, not sent
    cfg.model.task = "causal_lm"  # SFT from a start: it starts there, and sends no reference
    assert reference.reference_state(cfg, start) is None and "dpo" not in reference.reference_identity(
        cfg, start, None)
