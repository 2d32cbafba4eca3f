"""DPO under DP-SGD: one pair is one record (its two answers clipped together), its loss, its input checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedtune.config import FedtuneConfig
from fedtune.data import load_jsonl
from fedtune.data.preferences import PreferenceRecord, split_shared_prefix
from fedtune.data.records import DataError
from fedtune.models import build_lora_model
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer
from fedtune.simulation import check_data
from fedtune.tasks import get_task, resolve_format
from fedtune.tasks.dpo import BETA, dpo_loss, dpo_margins

from conftest import tiny_config

DPO = get_task("dpo")
# Different prompt and answer lengths, so every pair is padded differently in a batch.
PAIRS = [PreferenceRecord("Dose? ", "Amoxicillin 500 mg twice daily.", rejected="Amoxicillin 500mg BD."),
         PreferenceRecord("A long question about the dose of bisoprolol for atrial fibrillation? ", "5 mg.",
                          rejected="5 MG once daily, taken in the morning with water."),
         PreferenceRecord("", "yes", rejected="no, never")]


def _dpo_config(tmp_path: Path, **changes: object) -> FedtuneConfig:
    return tiny_config(tmp_path / "run", model__task="dpo", data__format="preference", **changes)


def _moved_model(cfg: FedtuneConfig):  # type: ignore[no-untyped-def]
    """The tiny LoRA model with a non-zero B, so the policy differs from the reference and A has gradients."""
    torch.manual_seed(0)
    model, tokenizer = build_lora_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, tokenizer


def test_per_pair_gradients_equal_one_pair_backward_passes(tmp_path: Path) -> None:
    model, tokenizer = _moved_model(_dpo_config(tmp_path))
    examples = DPO.encode_all(PAIRS, tokenizer, 128)
    assert len({len(e.chosen.input_ids) for e in examples}) == len({len(e.rejected.input_ids) for e in examples}) == 3
    assert_per_pair_gradients_equal_one_pair_passes(model, tokenizer, examples)


def assert_per_pair_gradients_equal_one_pair_passes(model, tokenizer, examples) -> None:
    """Opacus' per-pair gradients (σ = 0, no clipping) against one backward pass per pair."""
    model.train()
    expected = []
    for example in examples:
        model.zero_grad(set_to_none=True)
        DPO.per_record_loss(model, DPO.collate([example], tokenizer.pad_token_id)).sum().backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    params = DPSGDParams(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=0.5, steps=1, learning_rate=0.1)
    with DPSGDTrainer(DPO, model, params, num_records=len(examples)) as trainer:
        got = trainer.per_record_gradients(DPO.collate(examples, tokenizer.pad_token_id))
    for i, grads in enumerate(expected):
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0
        for name, grad in grads.items():
            assert got[name].shape[0] == len(examples)  # one grad sample per pair, not per answer
            torch.testing.assert_close(got[name][i], grad, atol=2e-6, rtol=1e-4)


def test_each_pair_is_clipped_to_c_as_a_whole(tmp_path: Path) -> None:
    model, tokenizer = _moved_model(_dpo_config(tmp_path))
    examples = DPO.encode_all(PAIRS, tokenizer, 128)
    clip = 1e-4
    params = DPSGDParams(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5, steps=1, learning_rate=0.1)
    with DPSGDTrainer(DPO, model, params, num_records=2) as trainer:
        raw = trainer.per_record_gradients(DPO.collate(examples, tokenizer.pad_token_id))
        norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in raw.values()))
        assert bool((norms > clip).all())
        for example in examples:
            grads, _ = trainer.privatized_gradient(DPO.collate([example], tokenizer.pad_token_id))
            pair = math.sqrt(sum(float(g.square().sum()) for g in grads.values())) * trainer.expected_batch_size
            assert pair == pytest.approx(clip, rel=1e-3) and pair <= clip * (1 + 1e-4)


def test_dpo_loss_of_a_hand_computed_case() -> None:
    # policy gains 1 nat on the chosen answer and loses 1 on the rejected one, relative to the reference.
    margin = dpo_margins(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    assert float(margin) == pytest.approx(BETA * 2.0)
    assert float(dpo_loss(margin)) == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-6)


def answer_logp_by_hand(model: torch.nn.Module, ex) -> float:  # type: ignore[no-untyped-def]
    """An answer's log-probability summed from log-softmax token scores (float64), over its target mask."""
    ids = torch.tensor([ex.input_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    picked = logp.gather(1, ids[0, 1:, None])[:, 0]
    return float((picked * torch.tensor(ex.target_mask[1:])).sum())


def test_dpo_loss_of_the_model_matches_log_softmax_by_hand(tmp_path: Path) -> None:
    """The task's loss of one pair equals the formula over log-softmax token scores, reference = adapter off."""
    model, tokenizer = _moved_model(_dpo_config(tmp_path))
    example = DPO.encode(PAIRS[0], tokenizer, 128)

    def answer_logp(ex) -> float:  # type: ignore[no-untyped-def]
        return answer_logp_by_hand(model, ex)

    with torch.no_grad():
        policy = answer_logp(example.chosen), answer_logp(example.rejected)
        with model.disable_adapter():
            reference = answer_logp(example.chosen), answer_logp(example.rejected)
    margin = BETA * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    assert abs(margin) > 1e-4
    got = DPO.per_record_loss(model, DPO.collate([example], tokenizer.pad_token_id))
    assert float(got[0]) == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-4)


def test_an_untrained_adapter_has_zero_margins(tmp_path: Path) -> None:
    """LoRA's B starts at zero: the policy is the reference, every margin 0, so no pair counts as won."""
    cfg = _dpo_config(tmp_path)
    model, tokenizer = build_lora_model(cfg.model)
    result = DPO.evaluate(model, DPO.encode_all(PAIRS, tokenizer, 128), tokenizer.pad_token_id, 2)
    assert result.accuracy == 0.0 and result.task_metrics["margin"] == 0.0
    assert result.loss == pytest.approx(math.log(2)) and result.task_metrics["chosen_loss"] > 0


def test_the_chosen_answers_loss_is_their_token_weighted_nll_by_hand(tmp_path: Path) -> None:
    """``chosen_loss`` comes from the margins' own pass; it must still be the chosen answers' mean token NLL."""
    model, tokenizer = _moved_model(_dpo_config(tmp_path))
    examples = DPO.encode_all(PAIRS, tokenizer, 128)
    model.eval()
    with torch.no_grad():
        nll = -sum(answer_logp_by_hand(model, e.chosen) for e in examples)
    tokens = sum(sum(e.chosen.target_mask[1:]) for e in examples)
    result = DPO.evaluate(model, examples, tokenizer.pad_token_id, 2)
    assert result.tokens == tokens > 0
    assert result.task_metrics["chosen_loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_the_hh_rlhf_form_splits_at_the_shared_prompt(tmp_path: Path) -> None:
    dialogue = "\n\nHuman: How much paracetamol for a child?\n\nAssistant:"
    prompt, chosen, rejected = split_shared_prefix(dialogue + " Sure, 120 mg.", dialogue + " Sorry, no idea.")
    assert (prompt, chosen, rejected) == (dialogue, " Sure, 120 mg.", " Sorry, no idea.")
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": dialogue + " Sure.", "rejected": dialogue + " No."}) + "\n"
                    + json.dumps({"prompt": "Q? ", "chosen": "A.", "rejected": "B."}) + "\n")
    first, second = load_jsonl(path, fmt="preference")
    assert isinstance(first, PreferenceRecord) and first.prompt == dialogue and first.rejected == " No."
    assert isinstance(second, PreferenceRecord) and (second.prompt, second.response) == ("Q? ", "A.")
    assert second.where == f"{path}:2"


@pytest.mark.parametrize("obj,match", [
    ({"prompt": "Q", "chosen": "", "rejected": "no"}, '"chosen" field is empty'),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "Q", "chosen": "yes"}, 'missing or non-string "rejected"'),
    ({"chosen": "Q: a", "rejected": "Q: a and more"}, "one answer is empty"),
])
def test_a_bad_pair_is_an_error_naming_its_line(tmp_path: Path, obj: dict, match: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(DataError, match=match) as caught:
        load_jsonl(path, fmt="preference")
    assert f"{path}:2" in str(caught.value)


def test_a_prompt_longer_than_max_length_is_refused_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [{"prompt": f"Question {i}? ", "chosen": "Yes, 5 mg.", "rejected": "Yes, 5mg."} for i in range(30)]
    lines[17]["prompt"] = "A question that goes on " * 4
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = _dpo_config(tmp_path, data__path=str(path), data__partition="iid")
    with pytest.raises(DataError, match=f"{path}:18: the prompt is 96 tokens.*data.max_length=64"):
        check_data(cfg)
    assert not Path(str(cfg.run_dir)).exists()  # nothing was written, no site was asked


def test_model_task_dpo_alone_selects_the_demo_pairs(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", model__task="dpo", data__max_length=128)
    resolve_format(cfg)
    assert cfg.data.format == "preference"
    check_data(cfg)  # the demo pairs encode within the tiny config's max_length


@pytest.mark.parametrize("secure", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_private_three_site_dpo_federation_learns_the_preference(tmp_path: Path, secure: bool) -> None:
    """Held-out preference accuracy of the demo pairs rises above the untrained adapter's (0: all ties)."""
    from fedtune.data import load_federated_data
    from fedtune.experiments.engine import run_inprocess

    cfg = tiny_config(tmp_path / "run", model__task="dpo", data__max_length=128, data__demo_records=300,
                      data__partition="iid", federation__num_rounds=1, privacy__noise_multiplier=None)
    cfg.secagg.enabled = secure
    resolve_format(cfg)  # as fedtune simulate and run_inprocess do: model.task=dpo alone picks the demo pairs
    model, tokenizer = build_lora_model(cfg.model)
    held_out = load_federated_data(cfg.data, cfg.federation.num_sites).eval_records()
    assert isinstance(held_out[0], PreferenceRecord)
    untrained = DPO.evaluate(model, DPO.encode_all(held_out, tokenizer, 128), tokenizer.pad_token_id, 32)
    summary = run_inprocess(cfg)
    assert summary.rounds_completed == 1
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["eval_accuracy"] > max(untrained.accuracy or 0.0, 0.6)
    assert row["eval_margin"] > 0 and row["eval_loss"] < untrained.loss
    assert math.isfinite(row["eval_chosen_loss"]) and row["eval_perplexity"] == pytest.approx(
        math.exp(row["eval_chosen_loss"]))
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert all(0 < site["epsilon"] <= 8.0 + 1e-6 for site in report["sites"].values())


@pytest.mark.parametrize("server_task,accepted", [("dpo", True), ("causal_lm", False), ("classification", False),
                                                   (5, False), ("dpo ", False), (None, False)])
def test_a_deployed_site_trains_dpo_only_if_its_own_data_are_pairs(tmp_path: Path, server_task: object,
                                                                    accepted: bool) -> None:
    """The run's model.task comes from the (untrusted) server; the site's own data.format must agree with it."""
    from fedtune.deploy.run_config import site_run_config
    from fedtune.deploy.site_config import SiteConfig, SiteData
    from fedtune.federation.protocol import REFUSED_RUN_CONFIG, Refusal

    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Q ", "chosen": "5 mg.", "rejected": "5mg."}) + "\n")
    site = SiteConfig(base_dir=str(tmp_path), data=SiteData(path="pairs.jsonl", format="preference"))
    raw = json.dumps({"model": {"task": server_task}})
    if accepted:
        assert site_run_config(raw, site).model.task == "dpo"
    else:
        with pytest.raises(Refusal) as refused:
            site_run_config(raw, site)
        assert refused.value.code == REFUSED_RUN_CONFIG


def test_inside_a_round_a_long_prompt_is_cut_not_an_error(tmp_path: Path) -> None:
    """A failure caused by one record's content would reach the server; check_encodable refuses it before."""
    _, tokenizer = build_lora_model(_dpo_config(tmp_path).model)
    example = DPO.encode(PreferenceRecord("x" * 100, "5 mg.", rejected="5mg."), tokenizer, 64)
    assert len(example.chosen.input_ids) <= 64 and sum(example.chosen.target_mask) == len("5 mg.") + 1
    with pytest.raises(DataError, match="a preference pair: the prompt is 100 tokens"):
        DPO.check_encodable([PreferenceRecord("x" * 100, "5 mg.", rejected="5mg.")], lambda: tokenizer, 64)
    with pytest.raises(DataError, match="differ only after data.max_length=64"):
        DPO.check_encodable([PreferenceRecord("x" * 60, "Yes, 5 mg.", rejected="Yes, 5mg.")], lambda: tokenizer, 64)
