"""What a training method is: the batch, the loss and the metrics; the trainer does the rest.

A method (``--method``; the language-model objective ``sft`` is the default) plugs into the one
training loop of :mod:`rwkvtune.train.trainer`, which owns the optimizer, schedule, gradient
accumulation, DDP, resume, logging and outputs. A method says

* what its data is (:meth:`TrainingMethod.build_datasets`) and what a batch is (:meth:`collate`),
* how many loss units a batch holds (:meth:`count`): the denominator of the step's loss over
  every micro-batch of every process, so accumulation and DDP equal one big batch,
* how one micro-batch's loss is computed and back-propagated (:meth:`forward_backward`), returning
  its :class:`MetricSums` (the method's own subclass: what each logged value is a mean over), which
  the trainer adds up over micro-batches, processes and steps, then asks for the logged rows,
* how to evaluate (:meth:`evaluate`),
* what it must keep in a resumable checkpoint (:meth:`state_dict`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, NamedTuple

import torch.nn as nn

from rwkvtune.train.memory_check import run_tokens
from rwkvtune.train.runtime import gradient_sync


class BatchCount(NamedTuple):
    """What :meth:`TrainingMethod.count` says of a batch."""

    units: float  # loss units: the denominator of the step's loss (tokens, pairs or completions)
    tokens: float  # tokens the model processes for it (throughput)


class MetricSums:
    """A method's metrics accumulated over micro-batches, processes and the steps of one metrics
    row. Every entry is a sum: ``sums`` are logged (as means, by :meth:`rows`), ``counts`` are the
    denominators a method counts itself (GRPO: completion tokens), added up alike but never logged.
    This default (sft, dpo): every sum is a mean per loss unit of the row (sft: target tokens, dpo:
    pairs), ``"loss"`` among them. A method whose values are means over something else subclasses
    it and says so in its :meth:`rows`."""

    def __init__(self, sums: dict[str, float] | None = None, counts: dict[str, float] | None = None):
        self.sums = dict(sums or {})
        self.counts = dict(counts or {})

    @property
    def loss(self) -> float:
        """The summed loss (what the finiteness check watches)."""
        return self.sums.get("loss", 0.0)

    def __getitem__(self, name: str) -> float:
        return self.sums[name]

    def add(self, other: "MetricSums") -> "MetricSums":
        for mine, theirs in ((self.sums, other.sums), (self.counts, other.counts)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v
        return self

    def reduced(self, all_sum: Callable[[list[float]], list[float]]) -> "MetricSums":
        """These sums added over every process; ``all_sum`` sums a list of floats over them (every
        process holds the same names: the same steps sample, the same options apply)."""
        sums, counts = sorted(self.sums), sorted(self.counts)
        total = all_sum([self.sums[k] for k in sums] + [self.counts[k] for k in counts])
        out = type(self)()
        out.sums, out.counts = dict(zip(sums, total[:len(sums)])), dict(zip(counts, total[len(sums):]))
        return out

    def rows(self, units: float) -> dict[str, float | None]:
        """The logged values: each sum per loss unit (None for a row without any)."""
        return {k: v / units if units else None for k, v in self.sums.items()}


def no_tick(what: str, done: int, of: int) -> None:
    """A StepContext's ``tick`` when nothing shows progress (tests, other processes)."""


@dataclasses.dataclass
class StepContext:
    """What a method needs to run one micro-batch."""

    cfg: Any                                   # the resolved TrainConfig
    device: str
    autocast: Callable[[], ContextManager]     # the run's mixed-precision context
    scale: float = 1.0                         # multiply a summed loss by this before backward
    runner: nn.Module | None = None            # the module to call: DDP-wrapped under torchrun
    sync: bool = True                          # whether this micro-batch's backward syncs gradients
    mode: Any = None                           # the run's Mode (for reference passes)
    step: int = 0                              # the optimizer step being computed (1-based)
    # Progress inside a step or an eval for the progress line: tick("eval batch", 3, 9).
    tick: Callable[[str, int, int], None] = no_tick

    def sync_context(self, sync_now: bool) -> ContextManager:
        """Under DDP or FSDP, skip the gradient reduction of a backward that is not the step's last."""
        if self.runner is None:
            return contextlib.nullcontext()
        return gradient_sync(self.runner, sync_now)


class TrainingMethod:
    """Base class; see the module docstring. Subclasses set ``name`` and override the hooks."""

    name = ""
    item_name = "windows"  # what one dataset item is, for people ("pairs", "prompts")
    token_units = True  # whether a loss unit is a token (then the logged token count is the units)

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def opts(self):
        """This method's own options (``cfg.dpo``, ``cfg.grpo``; rwkvtune.models.rwkv7.method_config),
        or None (sft has none)."""
        return self.cfg.method_options()

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per batch of data (GRPO: num_iterations updates per batch of rollouts)."""
        return 1

    @classmethod
    def problems(cls, cfg) -> list[str]:
        """This method's problems with the rest of the run (mode, strategy), each "field: found X,
        expected Y"; its own options' rules are their class's (DPOConfig.problems, ...)."""
        return []

    def memory_shape(self, dataset) -> tuple[int, int]:
        """For the memory estimate: (sequences per dataset item that run through the model in one
        graph, the most tokens such a sequence holds). SFT: one window, at most ctx_len (less when
        the data's longest window is shorter)."""
        return 1, run_tokens(dataset, self.cfg)

    def keeps_reference_copy(self, mode) -> bool:
        """Whether the run keeps a frozen copy of the whole model as its reference (full mode
        only; lora and state switch their trained parts off instead)."""
        return False

    def setup(self, run) -> None:
        """Called once the run is built, before the first step (and on resume): e.g. to prepare a
        reference model. ``run`` is the trainer's :class:`~rwkvtune.train.trainer.Run`."""

    def close(self) -> None:
        """Release what the method started (GRPO: its reward worker process); called once when
        train() returns, also on errors."""

    def build_datasets(self, tokenizer, vocab_size: int):
        """(training set, evaluation set or None): indexable datasets of items for :meth:`collate`."""
        raise NotImplementedError

    def splits(self, read):
        """(training set, evaluation set or None): ``read(path)`` of the data and the eval data."""
        return read(self.cfg.data), (read(self.cfg.eval_data) if self.cfg.eval_data else None)

    def collate(self, items: list, device) -> dict:
        raise NotImplementedError

    def count(self, batch: dict) -> BatchCount:
        """The batch's loss units and the tokens the model processes for it."""
        raise NotImplementedError

    def begin_step(self, module, micro_batches: list[dict], ctx: StepContext) -> list[dict]:
        """Called once per optimizer step before its micro-batches run (e.g. to sample rollouts);
        ``micro_batches`` is empty on the steps that reuse the data of an earlier one
        (:attr:`steps_per_batch` > 1). Returns the micro-batches to run."""
        return micro_batches

    def forward_backward(self, module, batch: dict, ctx: StepContext) -> MetricSums:
        """Forward and backward of one micro-batch; returns its metric sums, ``"loss"`` among them
        (the summed loss whose gradient was taken before scaling by ``ctx.scale``)."""
        raise NotImplementedError

    def new_metrics(self) -> MetricSums:
        """An empty accumulator of this method's metric sums (the trainer adds each micro-batch's)."""
        return MetricSums()

    def evaluate(self, module, dataset, ctx: StepContext) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
