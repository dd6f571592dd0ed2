"""What a fine-tuning mode is: the one place that knows what the mode trains and writes.

A mode (full, lora, state; see :func:`rwkvtune.peft.get_mode`) decides

* which of the model's tensors the optimizer sees (:meth:`Mode.prepare` freezes or adapts the
  model in place and returns the tensor the mode adds, which the trainer's
  :class:`rwkvtune.train.objective.TrainModule` holds),
* which files a finished run holds besides its logs (:meth:`Mode.save_outputs`),
* how the trained parts are switched off to get the untouched base back
  (:meth:`Mode.reference`, which preference training uses as its reference model),
* its own configuration rules (:meth:`Mode.conflicts`; its default learning rate, where it has one,
  is in :data:`rwkvtune.constants.MODE_DEFAULT_LR`).

The trainer, the CLI and the run directory call these; nothing else branches on the mode. A mode
works on the model and on the training module (``module.model``, ``module.wkv_init``,
``module.reference_active``) without importing the trainer: peft sits below train.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


class Mode:
    """Base class of the fine-tuning modes; subclasses override what differs."""

    name = ""
    trains_base = False  # whether the base model's own weights are updated (so must be fp32)

    def conflicts(self, cfg) -> list[tuple[dict[str, str], str]]:
        """Problems of this mode with other options: (fields as they read, why) pairs."""
        if cfg.init == "scratch" and not self.trains_base:
            return [({"init": repr(cfg.init), "mode": repr(cfg.mode)},
                     f"{self.name} mode trains on top of a trained base model; use init 'pretrained' (the default) "
                     f"or mode 'full'")]
        return []

    def prepare(self, model: nn.Module, cfg) -> torch.Tensor | None:
        """Freeze or adapt ``model`` in place for this mode; returns the initial value of the
        tensor the mode trains besides the model's own (state mode: the WKV state), else None."""
        raise NotImplementedError

    def initial_values(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors this mode added to the model (not in the model file), by parameter name, with
        the values :meth:`prepare` gives them, drawn from the random stream in the same order: a
        module built on the meta device and filled shard by shard (FSDP) equals one built whole."""
        return {}

    def base_loaded(self, module: nn.Module, base: dict[str, torch.Tensor]) -> None:
        """Called once a meta-built ``module`` holds its weights, with the model file's tensors
        (official names, memory-mapped): what :meth:`prepare` records of the base, recorded now."""

    def save_outputs(self, run, module: nn.Module, cfg) -> dict[str, str]:
        """Write final.pth and/or the mode's artifact into the run directory ``run``
        (:class:`rwkvtune.train.run_dir.RunDir`); returns {kind: path}."""
        raise NotImplementedError

    @contextlib.contextmanager
    def reference(self, module: nn.Module) -> Iterator[None]:
        """Inside: ``module`` computes what the untouched base model computes."""
        raise NotImplementedError(f"{self.name} mode has no built-in reference model (keep a frozen copy)")
        yield  # pragma: no cover

    @staticmethod
    def freeze(model: nn.Module, bf16_base: bool) -> None:
        """Freeze every base weight, stored in bf16 when ``bf16_base`` (half the memory; the
        trainable tensors the mode adds stay fp32)."""
        for p in model.parameters():
            p.requires_grad_(False)
        if bf16_base:
            model.to(torch.bfloat16)
