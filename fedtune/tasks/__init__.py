"""What is learnt from a site's records: one :class:`Task` per kind, and the registry.

A task owns everything that depends on what a record *is*: which record formats it
reads and how a JSON object becomes a record, how a record becomes model inputs with the
tokenizer, the loss of one record, the held-out metrics, the Hugging Face model class and
peft's ``task_type``.  The rest of fedtune (data loading, DP-SGD, the site's and the
server's round code, the experiments) asks ``get_task(cfg.model.task)`` and never
branches on the task's name.

Adding a task is one module here and one entry in :data:`REGISTRY` (and its name in
``fedtune.config.TASKS``, which a test keeps equal to the registry: the config schema is
a leaf and cannot import this package).

The privacy unit is one record, so :meth:`Task.per_record_loss` must return one value per
record that depends on that record alone: DP-SGD clips each record's gradient of it.  A
record may encode into several sequences (a preference pair: prompt with the chosen and
with the rejected answer); the task's batch then holds them all and its loss combines
them per record, e.g. with one forward pass per sequence set (Opacus' per-sample hooks
accumulate over several forward passes of the same batch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Optional, Protocol, Sequence, TypeVar

import torch
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedtune.config import DEFAULT_DPO_BETA, DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.records import Record, RecordSchema
from fedtune.errors import ConfigError
from fedtune.evaluate import EvalResult


class TaskBatch(Protocol):
    """What DP-SGD needs of a task's batch: its number of records, and a copy on a device."""

    def __len__(self) -> int: ...

    def to(self, device: torch.device) -> "TaskBatch": ...


@dataclass(frozen=True)
class LossSettings:
    """The settings of a task's loss that the server dictates in each round config (``train.dpo_beta``).

    They travel per round, like the learning rate, so a site trains with exactly what the
    server accounted and evaluated with, and validates them as strictly as every other
    round-config field.  A task reads those its loss has (:meth:`Task.with_loss`).
    """

    dpo_beta: float = DEFAULT_DPO_BETA

    @classmethod
    def of(cls, cfg: FedtuneConfig) -> "LossSettings":
        return cls(dpo_beta=float(cfg.train.dpo_beta))


@dataclass(frozen=True)
class TrainingDefaults:
    """A task's local optimiser where the config leaves it null (README, "Defaults that learn")."""

    optimizer: str
    learning_rate: float
    # A newly initialised head's step size; None: learning_rate (a task without a new head).
    head_learning_rate: Optional[float] = None


ExampleT = TypeVar("ExampleT")
BatchT = TypeVar("BatchT", bound=TaskBatch)


class Task(ABC, Generic[ExampleT, BatchT]):
    """One kind of learning from records; stateless, so one instance serves every caller."""

    # The value of model.task that selects this task.
    name: ClassVar[str]
    # The data.format values whose records this task reads; the first is its default.
    record_formats: ClassVar[tuple[str, ...]]
    # peft's task_type: it decides which head (if any) peft trains and saves with the adapter.
    peft_task_type: ClassVar[str]
    # The optimiser and step sizes a run of this task uses unless train.* sets them.
    training_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(optimizer="adam", learning_rate=0.01)
    # Whether the loss compares the policy with a frozen reference policy (DPO): then a run that
    # starts from a trained adapter sends it to the sites as the reference (see with_reference).
    uses_reference: ClassVar[bool] = False

    def with_loss(self, settings: LossSettings) -> "Task[ExampleT, BatchT]":
        """This task with the round's loss settings (DPO's β); a task whose loss has none is itself."""
        return self

    # --- configuration -------------------------------------------------------------------
    @abstractmethod
    def check_config(self, model: ModelConfig, data: DataConfig) -> None:
        """Raise ConfigError unless the model and data settings suit this task (formats, classes)."""

    def configure(self, cfg: FedtuneConfig) -> None:
        """Make ``cfg`` a run of this task (``--task`` of the experiments): its name, format, sizes."""
        cfg.model.task = self.name
        if cfg.data.format not in self.record_formats:
            cfg.data.format = self.record_formats[0]

    # --- records -------------------------------------------------------------------------
    @abstractmethod
    def parse_record(self, obj: dict[str, Any], schema: RecordSchema, where: str) -> Record:
        """One JSON object of a data file as a record; DataError names ``where`` and never quotes the record."""

    @abstractmethod
    def demo_records(self, data: DataConfig) -> list[Record]:
        """The built-in demo corpus in this task's form (``data.path`` is null)."""

    def site_data_problem(self, records: Sequence[Record], model: ModelConfig,
                          declared_classes: Optional[int]) -> Optional[str]:
        """Why this site's records cannot take part in the run, or None.

        ``declared_classes`` is the site's own class count (a deployed site's site.yaml).
        The answer may depend on the site's settings and record count, never on the content
        of one record, because the refusal it causes is sent to the server.
        """
        return None

    def check_encodable(self, records: Sequence[Record], tokenizer: Callable[[], PreTrainedTokenizerBase],
                        max_length: int) -> None:
        """Raise DataError, naming the line, for a record this task cannot encode in ``max_length`` tokens.

        Run where the data is loaded, before any work (a simulation's ``check_data``), so a
        record that cannot be encoded never fails a round after its charge.  ``tokenizer``
        loads the run's tokenizer when called; the default (a task that truncates any
        record to fit) never calls it.
        """

    def canary_fields(self, count: int, model: ModelConfig, data: DataConfig, seed: int) -> list[dict[str, Any]]:
        """Fields a privacy-audit canary needs besides its text, one dict per canary (a class, say)."""
        return [{} for _ in range(count)]

    # --- model ---------------------------------------------------------------------------
    @abstractmethod
    def pretrained_model(self, path: Path, model: ModelConfig, tokenizer: PreTrainedTokenizerBase
                         ) -> PreTrainedModel:
        """This task's Hugging Face model class loaded from a local directory, in float32.

        Called under a fixed torch seed (``model.seed``), so a newly initialised head is
        the same at every party.
        """

    @abstractmethod
    def tiny_model(self, config: LlamaConfig, model: ModelConfig) -> PreTrainedModel:
        """The built-in tiny Llama of this task, built from ``config`` under a fixed seed."""

    # --- encoding ------------------------------------------------------------------------
    @abstractmethod
    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> ExampleT:
        """One record as model inputs (the tokenizer's special tokens are placed here, and only here)."""

    def encode_all(self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int
                   ) -> list[ExampleT]:
        return [self.encode(r, tokenizer, max_length) for r in records]

    @abstractmethod
    def collate(self, examples: Sequence[ExampleT], pad_id: int) -> BatchT:
        """A padded batch of encoded records."""

    # --- loss and evaluation -------------------------------------------------------------
    @abstractmethod
    def per_record_loss(self, model: torch.nn.Module, batch: BatchT) -> torch.Tensor:
        """Shape [len(batch)]: each record's own loss, independent of its batch-mates."""

    def with_reference(self, model: torch.nn.Module, examples: Sequence[ExampleT], pad_id: int,
                       batch_size: int) -> list[ExampleT]:
        """``examples`` carrying the reference policy's values, computed by ``model`` as it is now.

        Called with the reference adapter loaded, before the policy's adapter is (only for
        a task that ``uses_reference``): the values are constants of each record's loss,
        computed without gradient on the party that holds the records, and never sent.
        """
        raise NotImplementedError(f"task {self.name} has no reference policy")

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, examples: Sequence[ExampleT], pad_id: int,
                 batch_size: int) -> EvalResult:
        """Held-out metrics of ``model`` on ``examples`` (metrics.jsonl's eval_* columns)."""


from fedtune.tasks.causal_lm import CausalLM  # noqa: E402 - the tasks subclass Task, defined above
from fedtune.tasks.classification import Classification  # noqa: E402
from fedtune.tasks.dpo import DPO  # noqa: E402

REGISTRY: dict[str, Task[Any, Any]] = {task.name: task for task in (CausalLM(), Classification(), DPO())}


def get_task(name: str) -> Task[Any, Any]:
    """The task that ``model.task`` names; ConfigError if there is none."""
    if name not in REGISTRY:
        raise ConfigError("model.task", f"'{name}' is not one of {', '.join(REGISTRY)}",
                          f"Set model.task to one of: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def training_settings(cfg: FedtuneConfig) -> TrainingDefaults:
    """The optimiser and step sizes of ``cfg``'s rounds: its train.* values, else its task's defaults.

    The server resolves them once and sends concrete numbers in every round config, so
    the defaults may change between fedtune versions without two parties disagreeing.
    """
    defaults, t = get_task(cfg.model.task).training_defaults, cfg.train
    learning_rate = t.learning_rate if t.learning_rate is not None else defaults.learning_rate
    head = t.head_learning_rate if t.head_learning_rate is not None else defaults.head_learning_rate
    return TrainingDefaults(optimizer=t.optimizer if t.optimizer is not None else defaults.optimizer,
                            learning_rate=learning_rate,
                            head_learning_rate=head if head is not None else learning_rate)


def resolve_format(cfg: FedtuneConfig) -> None:
    """data.format=auto becomes the run's task's own default format (a classifier's: labelled; DPO's: preference).

    Records are read by the task that owns their format, so ``model.task=dpo`` alone must
    select preference records; for causal_lm, auto stays auto (text or instruction per line).
    """
    if cfg.data.format == "auto":
        cfg.data.format = get_task(cfg.model.task).record_formats[0] if cfg.model.task in REGISTRY else "auto"


def task_for_format(fmt: str) -> Task[Any, Any]:
    """The task that reads records of ``data.format`` ``fmt``; ConfigError if none does."""
    for task in REGISTRY.values():
        if fmt in task.record_formats:
            return task
    formats = ", ".join(record_formats())
    raise ConfigError("data.format", f"'{fmt}' is not one of {formats}", f"Set data.format to one of: {formats}.")


def record_formats() -> tuple[str, ...]:
    """Every data.format some task reads, in registry order."""
    return tuple(f for task in REGISTRY.values() for f in task.record_formats)
