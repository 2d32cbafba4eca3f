"""One local DP-SGD run over the LoRA parameters of a site's model.

The mechanism, per step (Abadi et al. 2016, with Poisson sampling as analysed by
the RDP/PRV accountants):

1. every record joins the batch independently with probability q (Poisson
   sampling; a batch may be empty and still counts as a step);
2. one gradient per record (Opacus per-sample hooks) of that record's own loss
   (``Task.per_record_loss``, see ``fedtune.tasks``);
3. each per-record gradient is clipped to L2 norm C over all trainable tensors;
4. Gaussian noise N(0, σ²C²) is added to the sum, which is divided by the
   *expected* batch size qN (a public constant), then the base optimiser steps.

Opacus mode: **hooks** (``GradSampleHooks``, attached without wrapping, so the peft
model keeps ``generate`` and its state-dict keys).  Measured with
``benchmarks/dp_step.py`` on this project's 2-core CPU machines (LoRA r=8, batch
16 × 128): hooks cost 0.98–1.1× the non-private step, functorch slightly more, and
ghost clipping ~1.5× with no memory gain, because with LoRA the per-sample gradients
are small (rank × width per layer) and ghost clipping's second backward pass
dominates.  Hooks it is; see benchmarks/RESULTS.md for the figures of the last run.

Two Opacus behaviours need care here and are handled in this file:
* a forward pass on an empty batch crashes the model and leaves hooks dirty: on an
  empty batch we skip the forward pass and hand the optimiser zero-row per-sample
  gradients, so it still adds noise (the step is accounted, as it must be);
* hooks cannot be attached twice: ``DPSGDTrainer`` is a context manager that always
  removes them, so the same model can train round after round.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer

from fedtune.tasks import Task, TaskBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSGDParams:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    learning_rate: float
    optimizer: str = "adam"
    private: bool = True
    # A newly initialised head's step size (peft's modules_to_save); None: learning_rate.
    head_learning_rate: Optional[float] = None


@dataclass
class LocalTrainResult:
    steps: int
    mean_loss: float
    empty_batches: int
    # Records sampled over all steps, and how many of them had a gradient norm above C.
    # Computed from un-noised gradients: the site logs them, and never sends them.
    records: int = 0
    clipped_records: int = 0

    @property
    def clipped_fraction(self) -> float:
        """The share of sampled records whose gradient clipping shortened (NaN without any record)."""
        return self.clipped_records / self.records if self.records else math.nan


def _base_optimizer(model: torch.nn.Module, params: DPSGDParams) -> torch.optim.Optimizer:
    """The local optimiser, with the head's tensors in a group of their own step size.

    Per-group step sizes rescale the already noised gradient, so they are post-processing
    and cost no privacy; the clipping and the noise see one gradient over every tensor.
    """
    head, adapter = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if ".modules_to_save." in name else adapter).append(param)
    head_lr = params.head_learning_rate if params.head_learning_rate is not None else params.learning_rate
    groups = [{"params": group, "lr": lr} for group, lr in ((adapter, params.learning_rate), (head, head_lr))
              if group]
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.learning_rate)
    return torch.optim.Adam(groups, lr=params.learning_rate)


def poisson_batches(num_records: int, sample_rate: float, steps: int,
                    generator: torch.Generator) -> Iterator[list[int]]:
    """Indices of each step's batch: every record joins independently with prob. q."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(num_records, generator=generator) < sample_rate).flatten().tolist()


class DPSGDTrainer:
    """Per-sample-gradient hooks and a DP optimiser over the trainable parameters.

    Use as a context manager: hooks are removed on exit, even after an error.
    """

    def __init__(self, task: Task[Any, Any], model: torch.nn.Module, params: DPSGDParams, num_records: int,
                 noise_seed: Optional[int] = None) -> None:
        self.task = task
        self.model = model
        self.params = params
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters; attach LoRA first")
        self.names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.expected_batch_size = max(1, int(round(params.sample_rate * num_records)))
        self._hooks: Optional[GradSampleHooks] = None
        self.records = 0
        self.clipped_records = 0
        base = _base_optimizer(model, params)
        if params.private:
            # torch's default generator starts from a fixed, public seed; noise drawn
            # from it could be replayed and subtracted.  Seed from OS entropy unless a
            # test pins it.  (Opacus' secure_mode needs torchcsprng, unmaintained.)
            seed = noise_seed if noise_seed is not None else secrets.randbits(63)
            # Opacus draws the noise on the parameters' device with this generator.
            generator = torch.Generator(device=self.trainable[0].device).manual_seed(seed)
            self.optimizer: torch.optim.Optimizer = DPOptimizer(
                base,
                noise_multiplier=params.noise_multiplier,
                max_grad_norm=params.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                loss_reduction="mean",
                generator=generator,
            )
        else:
            self.optimizer = base

    def __enter__(self) -> "DPSGDTrainer":
        if self.params.private:
            self._hooks = GradSampleHooks(self.model, loss_reduction="mean", batch_first=True)
        self.model.train()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            self._hooks.remove_hooks()
            self._hooks = None
        for p in self.trainable:
            for attr in ("grad_sample", "summed_grad", "_current_grad_sample", "activations"):
                if hasattr(p, attr):
                    setattr(p, attr, None)
            p.grad = None

    def _backward(self, batch: Optional[TaskBatch]) -> float:
        if batch is None or len(batch) == 0:
            for p in self.trainable:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            return math.nan
        losses = self.task.per_record_loss(self.model, batch)
        losses.mean().backward()
        if self.params.private:
            zero_non_finite_records(self.trainable)
            self._count_clipped()
        return float(losses.detach().mean())

    def _count_clipped(self) -> None:
        """Tally the records whose per-record gradient norm exceeds C (what Opacus will clip).

        How often clipping bites says whether C suits the model: nearly always means the
        update's direction survives but its size is C's, never means C could be smaller
        and the noise with it.  Opacus' grad samples are each record's own gradient
        (its hooks undo the mean's 1/B), the norms its clipping computes.
        """
        samples = [p.grad_sample for p in self.trainable if isinstance(getattr(p, "grad_sample", None), torch.Tensor)]
        if not samples or samples[0].shape[0] == 0:
            return
        squared = sum((g.reshape(g.shape[0], -1).float() ** 2).sum(dim=1) for g in samples)
        norms = torch.sqrt(squared)
        self.records += int(norms.shape[0])
        self.clipped_records += int((norms > self.params.max_grad_norm).sum())

    def per_record_gradients(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Unclipped per-record gradients [B, ...] of each trainable tensor (no step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(batch)
        grads = {self.names[id(p)]: p.grad_sample.detach().clone() for p in self.trainable}
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def privatized_gradient(self, batch: Optional[TaskBatch]) -> tuple[dict[str, torch.Tensor], float]:
        """Clipped, noised, scaled gradient for ``batch`` (``None``: empty batch), no step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(batch)
        if self.params.private:
            assert isinstance(self.optimizer, DPOptimizer)
            self.optimizer.pre_step()
        grads = {self.names[id(p)]: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for p in self.trainable}
        return grads, loss

    def step(self, batch: Optional[TaskBatch]) -> float:
        """One DP-SGD step; returns the batch's mean record loss (NaN if empty)."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self.params.private and (batch is None or len(batch) == 0):
            return math.nan
        loss = self._backward(batch)
        self.optimizer.step()
        return loss


def zero_non_finite_records(params: list[torch.nn.Parameter]) -> int:
    """Zero every per-record gradient that has a NaN or Inf in any tensor; returns how many.

    Clipping cannot bound a NaN, and the noise would not hide it: one non-finite record
    would make the whole update non-finite and the round fail *because of that record*,
    an un-noised bit to whoever crafted the model state that provoked it.  A zeroed
    record contributes nothing (norm 0 ≤ C), so the release stays a DP release whatever
    the data, and sensitivity is unchanged.
    """
    samples = [p.grad_sample for p in params if isinstance(getattr(p, "grad_sample", None), torch.Tensor)]
    if not samples:
        return 0
    finite = torch.ones(samples[0].shape[0], dtype=torch.bool, device=samples[0].device)
    for grad in samples:
        finite &= torch.isfinite(grad.reshape(grad.shape[0], -1)).all(dim=1)
    bad = int((~finite).sum())
    if bad:
        for grad in samples:
            grad[~finite] = 0.0
    return bad


def train_locally(task: Task[Any, Any], model: torch.nn.Module, examples: Sequence[Any], params: DPSGDParams,
                  pad_id: int, seed: int, noise_seed: Optional[int] = None) -> LocalTrainResult:
    """Run ``params.steps`` DP-SGD steps on a site's examples (encoded by ``task``)."""
    sampler = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses: list[float] = []
    empty = 0
    with DPSGDTrainer(task, model, params, num_records=len(examples), noise_seed=noise_seed) as trainer:
        for indices in poisson_batches(len(examples), params.sample_rate, params.steps, sampler):
            batch = task.collate([examples[i] for i in indices], pad_id) if indices else None
            if batch is not None and device.type != "cpu":
                batch = batch.to(device)
            loss = trainer.step(batch)
            if indices:
                losses.append(loss)
            else:
                empty += 1
    mean_loss = float(sum(losses) / len(losses)) if losses else math.nan
    return LocalTrainResult(steps=params.steps, mean_loss=mean_loss, empty_batches=empty,
                            records=trainer.records, clipped_records=trainer.clipped_records)
