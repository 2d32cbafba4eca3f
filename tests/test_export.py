"""`fedtune export`: the exported folders load in a process that cannot import fedtune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune import governance
from fedtune.cli import main
from fedtune.export import EXPORT_FILE
from fedtune.inference import load_adapter_model
from derived_runs import adapter, speciality_run

TEXT = "Dermatology review. A 30 year old male presents with an itchy rash"

# Run in a fresh interpreter: fedtune cannot be imported there (a finder refuses it), so
# only transformers and peft read the folders.
LOADER = r"""
import importlib.abc, json, sys

class NoFedtune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fedtune" or name.startswith("fedtune."):
            raise ImportError("fedtune is not available in this process")
        return None

sys.meta_path.insert(0, NoFedtune())
import numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

merged_dir, adapter_dir, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(merged_dir)
ids = torch.tensor([tokenizer(sys.argv[4])["input_ids"]])
with torch.no_grad():
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
    base_path = json.load(open(adapter_dir + "/adapter_config.json"))["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter_dir).eval()
    plain = peft_model(input_ids=ids).logits
np.savez(out, merged=merged.numpy(), plain=plain.numpy(), ids=ids.numpy())
assert not any(m == "fedtune" or m.startswith("fedtune.") for m in sys.modules)
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return adapter(speciality_run(tmp_path_factory, "dermatology"))


@pytest.fixture(scope="module")
def exported(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    main(["export", str(source), "--out", str(root / "merged"), "--merge"])
    main(["export", str(source), "--out", str(root / "adapter")])
    return {"merged": root / "merged", "adapter": root / "adapter"}


def test_the_exports_load_without_fedtune_and_give_base_plus_adapter_logits(source: Path, exported, tmp_path: Path
                                                                            ) -> None:
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    done = subprocess.run([sys.executable, str(script), str(exported["merged"]), str(exported["adapter"]),
                           str(tmp_path / "logits.npz"), TEXT], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    outside = np.load(tmp_path / "logits.npz")
    loaded = load_adapter_model(source)
    with torch.no_grad():
        expected = loaded.model(input_ids=torch.from_numpy(outside["ids"])).logits.numpy()
        base = loaded.model.get_base_model()
        with loaded.model.disable_adapter():
            untrained = base(input_ids=torch.from_numpy(outside["ids"])).logits.numpy()
    np.testing.assert_allclose(outside["merged"], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outside["plain"], expected, atol=1e-5, rtol=1e-5)
    assert np.abs(expected - untrained).max() > 1e-2  # the adapter changes the logits: the test can fail


def test_the_exports_carry_the_adapters_record(source: Path, exported) -> None:
    record = json.loads((source / governance.RECORD_FILE).read_text())
    for kind, folder in exported.items():
        assert json.loads((folder / governance.RECORD_FILE).read_text()) == record
        provenance = json.loads((folder / EXPORT_FILE).read_text())
        assert provenance["source_record_hash"] == governance.record_hash(record)
        assert provenance["merged"] is (kind == "merged") and "costs no privacy" in provenance["privacy"]
        if (source / "ADAPTER_CARD.md").is_file():
            assert (folder / "ADAPTER_CARD.md").read_text() == (source / "ADAPTER_CARD.md").read_text()
    assert (exported["merged"] / "model.safetensors").is_file() and (exported["merged"] / "config.json").is_file()
    assert not (exported["merged"] / "adapter_config.json").exists()
    assert (exported["adapter"] / "adapter_model.safetensors").is_file()


def test_export_refuses_an_existing_out_and_a_non_adapter(source: Path, exported, tmp_path: Path, capsys) -> None:
    before = sorted(p.name for p in exported["merged"].iterdir())
    cases = [(["export", str(source), "--out", str(exported["merged"]), "--merge"], ["--out", "--overwrite"]),
             (["export", str(tmp_path), "--out", str(tmp_path / "x")], ["ADAPTER", "holds no peft adapter"]),
             (["export", str(source), str(source), "--out", str(tmp_path / "x")], ["ADAPTER", "fedtune merge"])]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and all(text in err for text in expected), err
    assert sorted(p.name for p in exported["merged"].iterdir()) == before and not (tmp_path / "x").exists()
