from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedtune.config import DataConfig, validate_data
from fedtune.data import DataError, load_federated_data, load_jsonl
from fedtune.data.demo import demo_corpus, speciality_names
from fedtune.data.encoding import collate
from fedtune.data.partition import partition_by_field, partition_dirichlet, partition_iid
from fedtune.data.records import Record
from fedtune.errors import ConfigError
from fedtune.models import build_tokenizer
from fedtune.tasks import get_task


def test_jsonl_text_and_instruction(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"text": "hello", "source": "x"}),
                               json.dumps({"prompt": "Q?", "response": "A.", "source": "y"}), ""]))
    records = load_jsonl(path, group_field="source")
    assert records == [Record("", "hello", "x"), Record("Q?", "A.", "y")]


@pytest.mark.parametrize("line,words", [
    ('["list"]', "expected a JSON object"),
    ('{"text": ""}', 'missing or empty "text"'),
    ('{"prompt": "q"}', '"response"'),
])
def test_malformed_records_name_line_and_fix(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2") as info:
        load_jsonl(path)
    assert words in str(info.value)


def test_instruction_loss_is_on_the_response_only() -> None:
    tok = build_tokenizer()
    ex = get_task("causal_lm").encode(Record("Question: ", "Yes"), tok, max_length=64)
    prompt_len = len("Question: ")
    assert ex.target_mask[:prompt_len] == (0,) * prompt_len
    assert ex.target_mask[prompt_len:] == (1,) * (len("Yes") + 1)  # + end-of-sequence


def test_right_padding_and_masks() -> None:
    tok = build_tokenizer()
    encode = get_task("causal_lm").encode
    batch = collate([encode(Record("", "ab"), tok, 16), encode(Record("", "abcdef"), tok, 16)], tok.pad_token_id)
    assert batch.attention_mask.tolist()[0] == [1, 1, 1, 0, 0, 0, 0]
    assert batch.target_mask.tolist()[0][3:] == [0, 0, 0, 0]
    assert batch.input_ids.tolist()[0][3:] == [tok.pad_token_id] * 4


def test_partitions_are_seeded_and_cover_everything() -> None:
    parts = partition_iid(103, 5, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert parts == partition_iid(103, 5, seed=1) and parts != partition_iid(103, 5, seed=2)
    groups = [r.group for r in demo_corpus(600)]
    non_iid = partition_dirichlet(groups, 5, alpha=0.3, seed=0)
    assert sorted(i for p in non_iid for i in p) == list(range(600))
    shares = [Counter(groups[i] for i in p) for p in non_iid]
    top = [max(c.values()) / sum(c.values()) for c in shares]
    assert max(top) > 0.4  # with α = 0.3 some site is dominated by one speciality (iid: ~1/6)


def test_demo_corpus_is_deterministic_and_varied() -> None:
    a, b = demo_corpus(60, seed=3), demo_corpus(60, seed=3)
    assert a == b and a != demo_corpus(60, seed=4)
    assert {r.group for r in a} == set(speciality_names())
    assert len({r.response for r in a}) == 60


def test_federated_split_keeps_eval_apart() -> None:
    data = load_federated_data(DataConfig(demo_records=200), num_sites=4)
    train = {i for s in data.site_indices for i in s}
    assert not train & set(data.eval_indices)
    assert len(train) + len(data.eval_indices) == 200


def _speeches(path: Path, counts: dict[str, int]) -> Path:
    with path.open("w") as out:
        for speaker, count in counts.items():
            for i in range(count):
                out.write(json.dumps({"text": f"{speaker} says line {i}", "speaker": speaker}) + "\n")
    return path


def test_by_field_makes_one_site_per_group_and_drops_tiny_ones(tmp_path: Path) -> None:
    path = _speeches(tmp_path / "plays.jsonl", {"ROMEO": 30, "JULIET": 25, "NURSE": 12, "PAGE": 1})
    cfg = DataConfig(path=str(path), group_field="speaker", partition="by_field", min_records_per_site=5)
    data = load_federated_data(cfg, num_sites=3)
    speakers = [{r.group for r in data.site_records(site)} for site in range(3)]
    assert speakers == [{"JULIET"}, {"NURSE"}, {"ROMEO"}]  # sorted by name; PAGE has too few records
    held_out = set(data.eval_indices)
    for site in range(3):
        assert not held_out & set(data.site_indices[site])
    # Every training record of a kept group is at its group's site.
    kept = {i for i, r in enumerate(data.records) if r.group != "PAGE" and i not in held_out}
    assert kept == {i for site in data.site_indices for i in site}


def test_by_field_names_the_number_of_sites_the_data_makes(tmp_path: Path) -> None:
    path = _speeches(tmp_path / "plays.jsonl", {"ROMEO": 30, "JULIET": 25, "NURSE": 12})
    cfg = DataConfig(path=str(path), group_field="speaker", partition="by_field")
    with pytest.raises(ConfigError) as err:
        load_federated_data(cfg, num_sites=10)
    assert err.value.field == "federation.num_sites" and "federation.num_sites=3" in str(err.value)
    with pytest.raises(ConfigError, match="data.group_field"):
        validate_data(DataConfig(path=str(path), group_field=None, partition="by_field"), num_sites=3)
    with pytest.raises(ConfigError, match="data.min_records_per_site"):
        validate_data(DataConfig(path=str(path), partition="by_field", min_records_per_site=0), num_sites=3)


def test_by_field_partitions_a_thousand_groups_in_one_pass() -> None:
    groups = [f"role-{i % 1000:04d}" for i in range(20000)]
    sites = partition_by_field(groups, min_records=2)
    assert len(sites) == 1000 and all(len(s) == 20 for s in sites)
    assert sites[7] == [i for i, g in enumerate(groups) if g == "role-0007"]


def test_by_field_refuses_records_without_the_field(tmp_path: Path) -> None:
    path = _speeches(tmp_path / "plays.jsonl", {"ROMEO": 5, "JULIET": 5})
    with path.open("a") as out:
        for i in range(3):  # more than the one record held out, so some are training records
            out.write(json.dumps({"text": f"a line nobody speaks {i}"}) + "\n")
    cfg = DataConfig(path=str(path), group_field="speaker", partition="by_field", eval_fraction=0.05)
    with pytest.raises(ConfigError, match="by_field needs a group label on every record"):
        load_federated_data(cfg, num_sites=2)
