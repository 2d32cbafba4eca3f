"""``fedtune distil``: train a small student (LoRA on it) to imitate a teacher adapter, on public data.

The teacher is a causal-LM adapter on its run's base model; the student is any local
Hugging Face causal LM (``--student DIR``), usually smaller.  Two objectives, chosen by
whether the two tokenizers are the same (same class, vocabulary and special tokens):

* **token-level** (Hinton et al. 2015): at every target position of a record the student's
  next-token distribution is pulled towards the teacher's, KL(p_teacher || p_student) at
  temperature T (scaled by T², so the gradient's size does not depend on T);
* **sequence-level** (Kim & Rush 2016), when the vocabularies differ and logits cannot be
  compared: the teacher greedily continues each record's prompt (a text record's opening
  ``--prompt-chars`` characters), and the student learns those continuations by maximum
  likelihood.

Privacy: distillation reads the teacher's outputs on the distillation data.  On data that
is not private to any site that is post-processing of the teacher, and costs no privacy;
on a site's private data it would release information about that data with no DP
guarantee at all.  So the command takes only data the user declares public (``--public``),
and the record states the declaration with the file's SHA-256 and size.  The output is an
adapter folder like a merge's (:mod:`fedtune.derived`): ``fedtune evaluate OUT`` rebuilds
the student from its ``config.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.config import FedtuneConfig
from fedtune.data import Record, load_jsonl
from fedtune.data.encoding import Batch
from fedtune.derived import check_out_dir, derived_record, source_entry, write_derived_adapter
from fedtune.governance import lora_settings, record_hash
from fedtune.inference import LoadedAdapter, UsageError, check_generative, generate, load_model, locate
from fedtune.models import FingerprintedModel, build_fingerprinted_model, seeded
from fedtune.tasks import get_task
from fedtune.tasks.causal_lm import scored_positions

log = logging.getLogger(__name__)

PUBLIC_STATEMENT = ("Distillation on data the user declared public (not private to any site) is post-processing of "
                    "the teacher's released DP adapter: it costs no privacy, and the teacher's sites keep exactly "
                    "the guarantee listed for the teacher. The declaration is the user's (fedtune distil --public); "
                    "had the data been a site's private data, this adapter would carry no DP guarantee for it.")


@dataclass(frozen=True)
class DistilRequest:
    """What ``fedtune distil`` was asked."""

    teacher: str
    student: str
    data: str
    out: str
    public: bool = False
    steps: int = 50
    batch_size: int = 8
    learning_rate: float = 0.01
    temperature: float = 1.0
    rank: Optional[int] = None
    seed: int = 0
    max_new_tokens: int = 48
    prompt_chars: int = 24
    overrides: Sequence[str] = ()
    overwrite: bool = False


def check_request(request: DistilRequest) -> None:
    """Refuse, before any model is loaded, what cannot be distilled; the message names the argument."""
    if not request.public:
        raise UsageError("--public", "the distillation data is not declared public", "Distil only on data that "
                         "is not private to any site, and say so with --public (the record states it); distilling "
                         "on a site's private data would release it without a DP guarantee, and is not offered.")
    if not Path(request.data).is_file():
        raise UsageError("--data", f"'{request.data}' is not a file", "Give a local JSONL file of public records "
                         "in the teacher run's format.")
    if not (Path(request.student) / "config.json").is_file():
        raise UsageError("--student", f"'{request.student}' is not a Hugging Face model folder (no config.json)",
                         "Give a local causal-LM folder (save_pretrained) to train as the student.")
    for name, value in (("--steps", request.steps), ("--batch-size", request.batch_size),
                        ("--max-new-tokens", request.max_new_tokens), ("--prompt-chars", request.prompt_chars)):
        if value < 1:
            raise UsageError(name, f"{value} < 1", f"Give {name} a positive integer.")
    if not (request.learning_rate > 0 and request.temperature > 0):
        raise UsageError("--learning-rate/--temperature", "must be positive", "Give positive values.")
    if request.rank is not None and request.rank < 1:
        raise UsageError("--rank", f"{request.rank} < 1", "Give a positive LoRA rank, or leave it out.")


def student_config(teacher_cfg: FedtuneConfig, request: DistilRequest) -> FedtuneConfig:
    """The teacher's config with the student as the base model (its family's default LoRA targets)."""
    cfg = copy.deepcopy(teacher_cfg)
    cfg.model.path = str(Path(request.student).resolve())
    cfg.model.gguf_file = None
    cfg.model.lora.target_modules = None
    cfg.model.lora.rank = request.rank or cfg.model.lora.rank
    cfg.model.gradient_checkpointing = False
    cfg.data.path = str(Path(request.data).resolve())
    cfg.data.eval_path = None
    return cfg


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether token ids mean the same in both: then the teacher's logits can teach the student's."""
    return (type(a).__name__ == type(b).__name__ and a.get_vocab() == b.get_vocab()
            and a.all_special_tokens == b.all_special_tokens)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, batch: Batch,
             temperature: float) -> torch.Tensor:
    """T² · mean over the batch's target positions of KL(p_teacher || p_student) at temperature T."""
    vocab = min(teacher_logits.shape[-1], student_logits.shape[-1])  # a model may pad its embedding rows
    teacher = torch.log_softmax(teacher_logits[:, :-1, :vocab].float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits[:, :-1, :vocab].float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    scored = scored_positions(batch).to(kl.dtype)
    return temperature**2 * (kl * scored).sum() / scored.sum().clamp(min=1.0)


def teacher_continuations(teacher: LoadedAdapter, records: Sequence[Record], request: DistilRequest) -> list[Record]:
    """Sequence-level targets: each record's prompt (or text opening) with the teacher's greedy continuation."""
    made = []
    for record in records:
        prompt = record.prompt or record.response[: request.prompt_chars]
        text = generate(teacher, prompt, max_new_tokens=request.max_new_tokens).text
        made.append(Record(prompt=prompt, response=text, group=record.group))
    return made


def _batches(count: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of record indices: passes over the data in fresh random orders."""
    generator = torch.Generator().manual_seed(seed)
    size, order, batches = min(batch_size, count), [], []
    for _ in range(steps):
        if len(order) < size:
            order += torch.randperm(count, generator=generator).tolist()
        batches.append(order[:size])
        del order[:size]
    return batches


def train_student(student: FingerprintedModel, teacher: LoadedAdapter, examples: Sequence[Any],
                  request: DistilRequest, mode: str) -> tuple[float, float]:
    """Adam on the student's LoRA tensors; (first step's loss, mean of the last tenth of the steps')."""
    task = get_task("causal_lm")
    model = student.model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=request.learning_rate)
    losses = []
    model.train()
    for indices in _batches(len(examples), request.batch_size, request.steps, request.seed):
        batch = task.collate([examples[i] for i in indices], student.tokenizer.pad_token_id)
        if mode == "token":
            with torch.no_grad():
                taught = teacher.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = token_kl(taught, logits, batch, request.temperature)
        else:
            loss = task.per_record_loss(model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return losses[0], sum(tail) / len(tail)


def data_manifest(path: str, records: int) -> dict[str, Any]:
    """The distillation data as the record states it: where, its SHA-256, its size, and the declaration."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"path": str(Path(path).resolve()), "sha256": digest, "records": records, "declared_public": True,
            "declared_by": "the user, with fedtune distil --public"}


def _load_teacher(request: DistilRequest) -> tuple[LoadedAdapter, dict[str, Any], list[Record]]:
    run = locate(request.teacher, request.overrides)
    if run.cfg.model.task != "causal_lm":
        raise UsageError("--teacher", f"it is a {run.cfg.model.task} adapter", "Distil causal-LM adapters; a "
                         "student of another task is not offered yet.")
    check_generative(run)
    source = source_entry(run)  # refuses a teacher without a record: the student's record must name it
    d = run.cfg.data
    records = load_jsonl(request.data, fmt=d.format, group_field=d.group_field)
    if not records:
        raise UsageError("--data", f"'{request.data}' holds no records", "Give a JSONL file with public records.")
    return load_model(run), source, records


@dataclass(frozen=True)
class DistilResult:
    out: Path
    record: dict[str, Any]

    @property
    def record_hash(self) -> str:
        return record_hash(self.record)


def distil(request: DistilRequest) -> DistilResult:
    """``fedtune distil``: check, load teacher and student, train the student's LoRA, write OUT atomically."""
    check_request(request)
    out = check_out_dir(request.out, request.overwrite)
    teacher, source, records = _load_teacher(request)
    cfg = student_config(teacher.cfg, request)
    student = build_fingerprinted_model(cfg.model)
    mode = "token" if same_tokenizer(teacher.tokenizer, student.tokenizer) else "sequence"
    targets = records if mode == "token" else teacher_continuations(teacher, records, request)
    examples = get_task("causal_lm").encode_all(targets, student.tokenizer, cfg.data.max_length)
    with seeded(request.seed):
        first, last = train_student(student, teacher, examples, request, mode)
    log.info("distilled (%s-level) over %d steps: loss %.4f -> %.4f", mode, request.steps, first, last)
    method = {"name": "distil", "objective": "token-level KL" if mode == "token" else "sequence-level (teacher "
              "greedy continuations)", "mode": mode, "steps": request.steps, "batch_size": request.batch_size,
              "learning_rate": request.learning_rate, "optimizer": "adam", "seed": request.seed,
              **({"temperature": request.temperature} if mode == "token" else
                 {"max_new_tokens": request.max_new_tokens, "prompt_chars": request.prompt_chars}),
              "first_step_loss": first, "final_loss": last if math.isfinite(last) else None}
    base = {"name_or_path": cfg.model.path, "fingerprint": student.fingerprint, "task": "causal_lm"}
    record = derived_record("distil", base, lora_settings(student.model), [source], method, PUBLIC_STATEMENT,
                            data=data_manifest(request.data, len(records)))
    record = write_derived_adapter(out, student.model, "default", cfg, record)
    return DistilResult(out, record)
