"""`fedtune merge` on adapters of real tiny federations, one per demo speciality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file

from fedtune import governance
from fedtune.cli import main
from fedtune.inference import load_adapter_model
from fedtune.transparency.digests import tensors_sha256
from derived_runs import adapter, base_model_dir, held_out, speciality_run

TEXT = "Cardiology clinic note. A 64 year old female presents with chest pain"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return (adapter(speciality_run(tmp_path_factory, "cardiology")),
            adapter(speciality_run(tmp_path_factory, "dermatology")))


def _merge(args: list[str]) -> None:
    main(["merge", *args])


def _logits(adapter_dir: Path) -> torch.Tensor:
    loaded = load_adapter_model(adapter_dir)
    ids = torch.tensor([loaded.tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def _deltas(adapter_dir: Path) -> dict[str, np.ndarray]:
    """Each adapted module's update ΔW = (alpha / r) B·A, read from the saved files alone."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {key[: -len(".lora_A.weight")]: scaling * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
            for key in tensors if key.endswith(".lora_A.weight")}


def test_a_linear_merge_of_one_adapter_with_weight_one_is_that_adapter(sources, tmp_path: Path) -> None:
    out = tmp_path / "same"
    _merge([str(sources[0]), "--weights", "1", "--out", str(out)])
    torch.testing.assert_close(_logits(out), _logits(sources[0]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(out), _logits(sources[1]), atol=1e-3)


def test_task_arithmetic_and_cat_merge_the_updates_exactly(sources, tmp_path: Path) -> None:
    """Both are exact: ΔW = 0.3 ΔW_A + 0.7 ΔW_B in every module; linear (factor-wise) is not."""
    expected = {k: 0.3 * a + 0.7 * b for (k, a), b in zip(_deltas(sources[0]).items(), _deltas(sources[1]).values())}
    for method in ("task_arithmetic", "cat", "linear"):
        out = tmp_path / method
        _merge([str(sources[0]), str(sources[1]), "--method", method, "--weights", "0.3", "0.7", "--out", str(out)])
        merged = _deltas(out)
        assert set(merged) == set(expected)
        errors = [float(np.abs(merged[k] - expected[k]).max() / np.abs(expected[k]).max()) for k in expected]
        if method == "linear":
            assert max(errors) > 1e-2  # the cross terms B_A·A_B and B_B·A_A
        else:
            assert max(errors) < 1e-4, (method, max(errors))


def _table(args: list[str], out: Path) -> list[dict[str, Any]]:
    main(["evaluate", *args, "--json", str(out)])
    return json.loads(out.read_text())["adapters"]


def test_merged_loss_lies_between_the_sources_on_each_speciality(sources, tmp_path: Path,
                                                                 tmp_path_factory: pytest.TempPathFactory,
                                                                 capsys) -> None:
    """Each source fits its own speciality best; an equal merge halves each update, so on either
    speciality it is worse than that speciality's own adapter and better than the other one's."""
    merges = {}
    for method in ("linear", "task_arithmetic", "ties_svd"):
        merges[method] = tmp_path / method
        _merge([str(sources[0]), str(sources[1]), "--method", method, "--out", str(merges[method])])
    for own, speciality in enumerate(("cardiology", "dermatology")):
        data = held_out(tmp_path_factory, speciality)
        rows = _table([str(sources[0]), str(sources[1]), *map(str, merges.values()), f"data.path={data}"],
                      tmp_path / f"{speciality}.json")
        losses = [row["metrics"]["loss"] for row in rows]
        assert losses[own] < losses[1 - own] - 0.3  # the sources did specialise
        for method, loss in zip(merges, losses[2:]):
            assert losses[own] < loss < losses[1 - own], (speciality, method, losses)
    printed = capsys.readouterr().out
    assert "merge" in printed and "round 2" in printed and str(merges["ties_svd"]) in printed


def test_the_merged_record_lists_its_parents_sites_and_epsilon(sources, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    _merge([str(sources[0]), str(sources[1]), "--method", "dare_ties_svd", "--density", "0.7", "--out", str(out)])
    record = json.loads((out / governance.RECORD_FILE).read_text())
    parents = [json.loads((s / governance.RECORD_FILE).read_text()) for s in sources]
    assert record["parents"] == [governance.record_hash(p) for p in parents]
    assert record["kind"] == "merge" and record["round"] is None
    assert record["base_model"] == parents[0]["base_model"]
    assert record["method"]["peft_combination_type"] == "dare_ties_svd" and record["method"]["density"] == 0.7
    assert record["privacy"]["post_processing"] is True and "costs no privacy" in record["privacy"]["statement"]
    for source, directory in zip(record["sources"], sources):
        report = json.loads((directory.parents[1] / "privacy_report.json").read_text())
        assert source["sites"] == ["site-00", "site-01"] and source["adapter"] == str(directory)
        assert source["privacy"]["epsilon_by_site"] == {k: v["epsilon"] for k, v in report["sites"].items()}
    assert record["sources"][0]["weights_sha256"] != record["sources"][1]["weights_sha256"]
    assert record["files"]["weights_sha256"] == tensors_sha256(load_file(str(out / "adapter_model.safetensors")))
    card = (out / "ADAPTER_CARD.md").read_text()
    assert "costs no privacy" in card and record["parents"][0][:16] in card and "ε=" in card
    assert f"Record SHA-256: `{governance.record_hash(record)}`" in card


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-round adapters that must not be merged with the speciality runs'."""
    quick = dict(federation__num_rounds=1, train__local_steps=1)
    other_base = base_model_dir(tmp_path_factory, seed=1, name="base-seed1")
    rank_eight = tmp_path_factory.mktemp("cat") / "rank8"  # a merge of merges: cat sums the ranks
    _merge([str(adapter(speciality_run(tmp_path_factory, "cardiology"))),
            str(adapter(speciality_run(tmp_path_factory, "dermatology"))), "--method", "cat", "--out", str(rank_eight)])
    return {"base": adapter(speciality_run(tmp_path_factory, "cardiology", model__path=str(other_base), **quick), 1),
            "targets": adapter(speciality_run(tmp_path_factory, "cardiology", **quick,
                                              model__lora=_lora(target_modules=["q_proj", "v_proj"])), 1),
            "rank": rank_eight}


def _lora(**changes: Any) -> Any:
    from conftest import tiny_config

    lora = tiny_config(Path("unused")).model.lora
    for key, value in changes.items():
        setattr(lora, key, value)
    return lora


REFUSALS = {
    "base": (["--method", "task_arithmetic"], ["another base model", "fingerprint", "one base model"]),
    "targets": (["--method", "task_arithmetic"], ["adapts", "model.lora.target_modules"]),
    "rank": (["--method", "ties"], ["rank 8", "--method task_arithmetic"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_mismatched_adapters_are_refused_naming_the_adapter_and_the_fix(case: str, sources, mismatched,
                                                                        tmp_path: Path, capsys) -> None:
    extra, expected = REFUSALS[case]
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        _merge([str(sources[0]), str(mismatched[case]), *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(mismatched[case]) in err
    assert all(text in err for text in expected), err
    assert "Traceback" not in err and not out.exists()


def test_bad_arguments_are_refused_and_an_existing_out_is_kept(sources, tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [([str(sources[0]), str(sources[1]), "--out", str(out)], ["--out", "already exists", "--overwrite"]),
             ([str(sources[0]), str(sources[1]), "--weights", "1", "--out", str(tmp_path / "x")],
              ["--weights", "one weight per adapter"]),
             ([str(sources[0]), "--method", "ties", "--density", "0", "--out", str(tmp_path / "x")], ["--density"]),
             ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], ["ADAPTER", "not a folder"])]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            _merge(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and all(text in err for text in expected), err
    assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()
    _merge([str(sources[0]), "--weights", "1", "--out", str(out), "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / governance.RECORD_FILE).is_file()


def test_merged_adapter_loads_with_peft_onto_the_base_model(sources, tmp_path: Path,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    _merge([str(sources[0]), str(sources[1]), "--method", "cat", "--out", str(out)])
    base = AutoModelForCausalLM.from_pretrained(base_model_dir(tmp_path_factory))
    model = PeftModel.from_pretrained(base, str(out))
    assert model.peft_config["default"].r == 8  # cat: the sum of the ranks


def test_a_ties_merge_is_peft_add_weighted_adapter_on_the_same_adapters(sources, tmp_path: Path,
                                                                         tmp_path_factory: pytest.TempPathFactory
                                                                         ) -> None:
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ties"
    _merge([str(sources[0]), str(sources[1]), "--method", "ties", "--weights", "0.6", "0.4", "--density", "0.3",
            "--out", str(out)])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir(tmp_path_factory)),
                                      str(sources[0]), adapter_name="a")
    model.load_adapter(str(sources[1]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "m", combination_type="ties", density=0.3)
    expected = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model, adapter_name="m").items()}
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(saved[key], value)
