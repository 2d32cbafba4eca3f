"""Trying a finished run's result: rebuild its base model, load one of its adapters, evaluate or generate.

A run directory holds everything needed to use what it trained: its resolved config
(``config.yaml``) and a peft adapter per round (``adapters/round_NNN/``; ``checkpoint/``
is one too).  This module turns an adapter folder into a model without the user writing
code, and evaluates it exactly as the run's server did, so its numbers can be compared
with ``metrics.jsonl``:

* the base model is rebuilt from the run's *own* config (the tiny model's shape and
  seed, the task, LoRA), with overrides on top for what differs on this machine
  (``model.path``, the local copy of the base model) or what the user asks for
  (``data.path``, ``data.max_length``, ``train.eval_batch_size``);
* the adapter is loaded with ``PeftModel.from_pretrained`` under the task's peft
  ``task_type``, which also restores a classifier's trained head;
* evaluation is the task's own (``Task.encode_all`` and ``Task.evaluate``), the very
  functions behind the server's ``eval_*`` columns.

Which records are evaluated: every record of ``data.path`` when the user names it;
otherwise the run's own held-out set, as its server evaluated it (``data.eval_path``, or
in a simulation the held-out split of the pooled data).  The run's ``data.path`` alone is
never evaluated whole, because it holds the records the adapter was trained on.

Errors the user can fix (an argument that is not an adapter folder, no run config above
it, a missing data file, a classification run asked to generate) are :class:`UsageError`
naming the argument and the fix; the CLI (:mod:`fedtune.inference_cli`) prints them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import secrets
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.checkpoint import CONFIG_FILE, LEGACY_CHECKPOINT_FILE, WEIGHTS_FILE, checkpoint_record
from fedtune.config import FedtuneConfig, load_structured, validate_model, validate_task, validate_train
from fedtune.data import Record, load_jsonl
from fedtune.evaluate import EvalResult
from fedtune.governance import RECORD_FILE
from fedtune.models import base_fingerprint, load_base_model, seeded
from fedtune.tasks import get_task

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
ADAPTER_HINT = "Give an adapter folder a run wrote: RUN/adapters/round_NNN (or RUN/checkpoint)."
# peft's task type of the tasks whose model writes text.
GENERATIVE_TASK_TYPE = "CAUSAL_LM"


class UsageError(ValueError):
    """A command-line argument the user can fix; the message names it, the problem and the fix."""

    def __init__(self, argument: str, problem: str, fix: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {problem}. {fix}")


@dataclass(frozen=True)
class AdapterRun:
    """An adapter folder, the run it belongs to and that run's config (with the user's overrides)."""

    adapter_dir: Path
    run_dir: Path
    cfg: FedtuneConfig
    overrides: tuple[str, ...]
    # The adapter's record (adapter_record.json, or the checkpoint's), None if it predates records.
    record: Optional[dict[str, Any]]

    @property
    def round(self) -> Optional[int]:
        # A merged or distilled adapter's record has round null: no federation round made it.
        value = None if self.record is None else self.record.get("round")
        return None if value is None else int(value)


@dataclass
class LoadedAdapter:
    """The run's base model with the adapter loaded by peft, its tokenizer and the config it came from."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    run: AdapterRun

    @property
    def cfg(self) -> FedtuneConfig:
        return self.run.cfg


def check_adapter_dir(adapter: str | Path) -> Path:
    """``adapter`` as an absolute path, if it is a folder peft can load; UsageError naming ADAPTER otherwise."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise UsageError("ADAPTER", f"'{adapter}' is not a folder", ADAPTER_HINT)
    if (path / LEGACY_CHECKPOINT_FILE).is_file() and not (path / WEIGHTS_FILE).is_file():
        raise UsageError("ADAPTER", f"'{adapter}' is a checkpoint from before adapters were peft-keyed, which peft "
                         "cannot load", "Use one of the run's adapters/round_NNN folders instead.")
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UsageError("ADAPTER", f"'{adapter}' holds no peft adapter ({CONFIG_FILE} and {WEIGHTS_FILE})",
                         ADAPTER_HINT)
    return path.resolve()


def find_run_config(adapter_dir: Path) -> Path:
    """The nearest ``config.yaml`` at or above the adapter folder: the resolved config its run wrote."""
    for folder in (adapter_dir, *adapter_dir.parents):
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    raise UsageError("ADAPTER", f"no {RUN_CONFIG} in '{adapter_dir}' or any folder above it, so the run's base "
                     "model cannot be rebuilt", "Point ADAPTER at a folder inside its run directory "
                     "(RUN/adapters/round_NNN), or name the run's config with --config RUN/config.yaml.")


def _check_config(cfg: FedtuneConfig, config_path: Path) -> None:
    """The settings that rebuilding the model and evaluating need (privacy and federation settings do not matter)."""
    # A GGUF base (model.gguf_file) has no config.json beside it; validate_model checks its file.
    hf_folder = cfg.model.path is not None and cfg.model.gguf_file is None
    if hf_folder and not (Path(str(cfg.model.path)) / "config.json").is_file():
        raise UsageError("model.path", f"'{cfg.model.path}' is not a Hugging Face model directory here (no "
                         f"config.json); {config_path} names the base model's path where the run trained",
                         "Give the base model's local copy on this machine: model.path=DIR.")
    validate_task(cfg.model, cfg.data)
    get_task(cfg.model.task).check_config(cfg.model, cfg.data)
    validate_model(cfg.model)
    validate_train(cfg.train)


def adapter_record(adapter_dir: Path) -> Optional[dict[str, Any]]:
    """The adapter's record: ``adapter_record.json`` beside a round's adapter, the metadata of a checkpoint's."""
    path = adapter_dir / RECORD_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return checkpoint_record(adapter_dir)


def locate(adapter: str | Path, overrides: Sequence[str] = (), config: Optional[str | Path] = None) -> AdapterRun:
    """The adapter folder, its run and the run's config with ``overrides`` (``section.field=value``) on top."""
    adapter_dir = check_adapter_dir(adapter)
    if config is not None and not Path(config).is_file():
        raise UsageError("--config", f"'{config}' is not a file", "Name the run's config.yaml.")
    config_path = Path(config).resolve() if config is not None else find_run_config(adapter_dir)
    cfg = load_structured(FedtuneConfig, config_path, overrides=overrides,
                          fix=f"Check the key and its type against {config_path} and configs/.")
    _check_config(cfg, config_path)
    return AdapterRun(adapter_dir, config_path.parent, cfg, tuple(overrides), adapter_record(adapter_dir))


def _warn_if_other_base(run: AdapterRun, fingerprint: str) -> None:
    """An adapter on other base weights means something else; say so (it may be a deliberate try)."""
    expected = ((run.record or {}).get("base_model") or {}).get("fingerprint")
    if expected is not None and expected != fingerprint:
        log.warning("the base model's fingerprint %s... differs from the one the adapter was trained on (%s..., "
                    "in its record): model.path is not the run's base model, so its metrics will differ from "
                    "the run's", fingerprint[:12], expected[:12])


def load_model(run: AdapterRun) -> LoadedAdapter:
    """Rebuild the run's base model and load the adapter onto it with peft (inference mode, CPU, model.dtype)."""
    task_type = get_task(run.cfg.model.task).peft_task_type
    saved_type = json.loads((run.adapter_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("task_type")
    if saved_type != task_type:
        raise UsageError("ADAPTER", f"the adapter is a {saved_type} adapter but model.task={run.cfg.model.task} "
                         f"needs {task_type}", "Use the run's own model.task (drop the model.task override).")
    base, tokenizer = load_base_model(run.cfg.model)
    _warn_if_other_base(run, base_fingerprint(base, tokenizer))
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing; noise on a user's terminal.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(run.adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UsageError("ADAPTER", f"peft cannot load it onto the run's base model ({str(exc).splitlines()[0]})",
                         "Keep the run's own model.* settings; only model.path may point at another copy of "
                         "the same base model.") from None
    model.eval()
    return LoadedAdapter(model, tokenizer, run)


def load_adapter_model(adapter: str | Path, overrides: Sequence[str] = (),
                       config: Optional[str | Path] = None) -> LoadedAdapter:
    """:func:`locate` then :func:`load_model`: the adapter on its run's base model, ready to use."""
    return load_model(locate(adapter, overrides, config))


# --- evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """The records an adapter is evaluated on, and where they come from in words."""

    records: list[Record]
    source: str


def _overridden(run: AdapterRun, key: str) -> bool:
    return any(item.split("=", 1)[0].strip() == key for item in run.overrides)


def _run_evaluated(run_dir: Path) -> bool:
    """Whether the run's server had a held-out set (a deployment without data.eval_path had none)."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text(encoding="utf-8")).get("initial_eval_loss") is not None
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
    # A run still going (or stopped) has no summary yet; its lines say whether it evaluated.
    return not lines or any('"eval_loss"' in line for line in lines)


def _whole_file(run: AdapterRun, key: str, path: str) -> HeldOut:
    if not Path(path).is_file():
        raise UsageError(key, f"'{path}' is not a file", f"Point {key} at a local JSONL file of held-out records "
                         "(the run's format), e.g. data.path=held_out.jsonl.")
    d = run.cfg.data
    records = load_jsonl(path, fmt=d.format, group_field=d.group_field, label_field=d.label_field,
                         label_names=d.label_names)
    return HeldOut(records, f"every record of {path} ({key})")


def evaluation_records(run: AdapterRun) -> HeldOut:
    """``data.path`` when the user names it, else the run's own held-out set (see the module docstring)."""
    d = run.cfg.data
    if _overridden(run, "data.path") and d.path is not None:
        return _whole_file(run, "data.path", d.path)
    if d.eval_path is not None:
        return _whole_file(run, "data.eval_path", d.eval_path)
    if not _run_evaluated(run.run_dir):
        raise UsageError("data.path", "the run's server held out no records (it had no data.eval_path)",
                         "Name the records to evaluate on: data.path=FILE (a JSONL file in the run's format).")
    if d.path is not None and not Path(d.path).is_file():
        raise UsageError("data.path", f"the run's data '{d.path}', whose held-out split is evaluated by default, "
                         "is not a file here", "Name the records to evaluate on: data.path=FILE.")
    from fedtune.data import load_federated_data

    held_out = load_federated_data(d, run.cfg.federation.num_sites).eval_records()
    pooled = d.path if d.path is not None else "the built-in demo corpus"
    return HeldOut(held_out, f"the run's held-out split (data.eval_fraction={d.eval_fraction} of {pooled})")


@dataclass(frozen=True)
class AdapterEvaluation:
    """The adapter's held-out metrics and, if asked for, those of the untrained adapter (round 0)."""

    result: EvalResult
    baseline: Optional[EvalResult]
    records: int
    source: str

    def to_json(self, run: AdapterRun) -> dict[str, Any]:
        def metrics(r: Optional[EvalResult]) -> Optional[dict[str, Any]]:
            return None if r is None else {k: v for k, v in asdict(r).items() if v is not None}

        return {"adapter": str(run.adapter_dir), "round": run.round, "run_dir": str(run.run_dir),
                "task": run.cfg.model.task, "data": self.source, "records": self.records,
                "metrics": metrics(self.result), "baseline": metrics(self.baseline)}


def evaluate_adapter(loaded: LoadedAdapter, held_out: HeldOut, baseline: bool = False) -> AdapterEvaluation:
    """The task's held-out evaluation of the adapter, and with ``baseline`` of the untrained one.

    The untrained adapter is what round 0 evaluated: the base model with a fresh LoRA under
    ``model.seed``.  LoRA starts with B = 0 and a classifier's trained head starts as a copy
    of the base model's head (itself built under ``model.seed``), so that model computes
    exactly what the base model does with the adapter disabled; disabling it avoids
    loading a second copy of a base model that may take gigabytes.
    """
    cfg, tokenizer, model = loaded.cfg, loaded.tokenizer, loaded.model
    task = get_task(cfg.model.task)
    examples = task.encode_all(held_out.records, tokenizer, cfg.data.max_length)
    pad_id, batch_size = tokenizer.pad_token_id, cfg.train.eval_batch_size
    result = task.evaluate(model, examples, pad_id, batch_size)
    untrained = None
    if baseline:
        with model.disable_adapter():
            untrained = task.evaluate(model, examples, pad_id, batch_size)
    return AdapterEvaluation(result, untrained, len(held_out.records), held_out.source)


# --- generation ----------------------------------------------------------------------------


def check_generative(run: AdapterRun) -> None:
    """Refuse, before any model is loaded, a run whose model does not write text (a classifier)."""
    task = get_task(run.cfg.model.task)
    if task.peft_task_type != GENERATIVE_TASK_TYPE:
        raise UsageError("ADAPTER", f"it is a {task.name} adapter (model.task={task.name}), whose model predicts a "
                         "class and writes no text", "Measure it with `fedtune evaluate ADAPTER data.path=FILE`; "
                         "`fedtune generate` takes the adapters of causal-LM runs.")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[list[int], bool]:
    """The prompt's token ids as training laid out a prompt, and whether the chat template made them.

    With a chat template (an instruct model) the prompt is one user turn followed by the
    assistant's generation prompt, the form instruction records are trained in; without
    one, BOS and the prompt, as a record's prompt (or a text's start) is encoded.
    """
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True)
        ids = rendered["input_ids"] if not isinstance(rendered, list) else rendered
        return [int(i) for i in ids], True
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), False


@dataclass(frozen=True)
class Generation:
    """A continuation of the prompt: its text, its token ids, how the prompt was made and how it was drawn."""

    text: str
    token_ids: list[int]
    chat_template: bool
    # The torch seed sampling ran under (None: greedy decoding, which draws nothing).
    seed: Optional[int]


def _generation_config(model: Any, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                       temperature: float) -> Any:
    """The model's own generation settings (its end-of-turn tokens, say) with greedy or sampled decoding."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    config = copy.deepcopy(own) if own is not None else GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.do_sample = temperature > 0
    # Greedy decoding ignores the sampling filters; clearing them keeps transformers quiet about them.
    config.temperature = temperature if temperature > 0 else None
    if temperature <= 0:
        config.top_p = config.top_k = config.min_p = None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def generate(loaded: LoadedAdapter, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: Optional[int] = None) -> Generation:
    """Continue ``prompt`` with the adapted model: greedy when ``temperature`` is 0, else sampled.

    Sampling runs under a torch seed (``seed``, or a fresh one from OS entropy that the
    result reports), so any sampled answer can be drawn again.
    """
    check_generative(loaded.run)
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens", f"{max_new_tokens} < 1", "Ask for at least one token.")
    if temperature < 0:
        raise UsageError("--temperature", f"{temperature} is negative", "Use 0 (greedy) or a positive temperature.")
    ids, templated = prompt_ids(loaded.tokenizer, prompt)
    input_ids = torch.tensor([ids], dtype=torch.long)
    config = _generation_config(loaded.model, loaded.tokenizer, max_new_tokens, temperature)
    drawn = None if temperature <= 0 else (seed if seed is not None else secrets.randbelow(2**63))
    with torch.no_grad(), seeded(drawn) if drawn is not None else contextlib.nullcontext():
        output = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       generation_config=config)
    new = [int(t) for t in output[0, len(ids):]]
    text = loaded.tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text, new, templated, drawn)
