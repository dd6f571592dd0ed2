"""What a fine-tuning mode is: the one place that knows what the mode trains and writes.

A mode (full, lora, state; see :func:`rwkvtune.peft.get_mode`) decides

* which of the model's tensors the optimizer sees (:meth:`Mode.prepare` returns a
  :class:`TrainModule`),
* which files a finished run holds besides its logs (:meth:`Mode.save_outputs`),
* how the trained parts are switched off to get the untouched base back
  (:meth:`Mode.reference`, which preference training uses as its reference model),
* its own configuration rules and defaults.

The trainer, the CLI and the run directory call these; nothing else branches on the mode.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from rwkvtune.train import loss as loss_lib


class TrainModule(nn.Module):
    """What the optimizer sees: the model plus, in state mode, the trainable initial WKV state.

    ``forward(idx, state)`` runs the model in RNN-state form: (logits, the state after the last
    token); without a carried ``state`` a sequence starts from ``wkv_init`` (zeros when None).
    With ``labels``: (summed next-token loss, state), the head and the loss computed in slices of
    the sequence (:func:`rwkvtune.train.loss.chunked_loss_sum`), never all [B, T, V] logits at once;
    inside this forward, so a sharded (FSDP) head is gathered like every other layer. With
    ``reduce="sequence"``: (summed negative log-likelihood of each sequence [B], state); with
    ``reduce="token"``: (each scored token's negative log-likelihood [B, T] at ``temperature``, state).
    ``hidden=True``: (final hidden states [B, T, C], state), for losses that use the head themselves.
    ``doc_start`` [B, T] bool: packed documents; each restarts at its first token from the initial
    state (``wkv_init``, also when a ``state`` is carried in, or zeros).
    """

    def __init__(self, model: nn.Module, wkv_init: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.wkv_init = nn.Parameter(wkv_init) if wkv_init is not None else None
        self.reference_active = False  # True inside Mode.reference(): the initial state is zeros

    def forward(self, idx, state=None, labels=None, l2wrap: float = 0.0, hidden: bool = False,
                reduce: str = "sum", temperature: float = 1.0, last_only: bool = False, doc_start=None):
        # The model reads wkv_init only without a carried state, or as the reset state at doc_start.
        init = self.wkv_init if (state is None or doc_start is not None) and not self.reference_active else None
        if labels is None:
            return self.model(idx, state=state, return_state=True, wkv_init=init, hidden=hidden, last_only=last_only,
                              doc_start=doc_start)
        h, state = self.model(idx, state=state, return_state=True, wkv_init=init, hidden=True, doc_start=doc_start)
        if reduce == "sequence":
            return loss_lib.chunked_sequence_nll(h, self.model.head, labels), state
        if reduce == "token":
            return loss_lib.chunked_token_nll(h, self.model.head, labels, temperature), state
        return loss_lib.chunked_loss_sum(h, self.model.head, labels, l2wrap), state


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

    def default_lr(self) -> float | None:
        """A learning rate this mode needs whatever the model recommends, or None."""
        return None

    def prepare(self, model: nn.Module, cfg) -> TrainModule:
        raise NotImplementedError

    def initial_values(self, module: TrainModule) -> dict[str, torch.Tensor]:
        """The tensors this mode added to the model (not in the model file), by parameter name, with
        the values :meth:`prepare` gives them, drawn from the random stream in the same order: a
        module built on the meta device and filled shard by shard (FSDP) equals one built whole."""
        return {}

    def base_loaded(self, module: TrainModule, base: dict[str, torch.Tensor]) -> None:
        """Called once a meta-built ``module`` holds its weights, with the model file's tensors
        (official names, memory-mapped): what :meth:`prepare` records of the base, recorded now."""

    def save_outputs(self, run, module: TrainModule, cfg) -> dict[str, str]:
        """Write final.pth and/or the mode's artifact into the run directory ``run``
        (:class:`rwkvtune.train.run_dir.RunDir`); returns {kind: path}."""
        raise NotImplementedError

    @contextlib.contextmanager
    def reference(self, module: TrainModule) -> Iterator[None]:
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


def count_params(module: nn.Module) -> tuple[int, int, int]:
    """(trainable, frozen, unused) parameter counts. Unused: layer 0's value-residual v0/v1/v2,
    which released files carry (and final.pth keeps) although layer 0 defines v_first instead."""
    att = module.model.blocks[0].att
    unused = sum(getattr(att, n).numel() for n in ("v0", "v1", "v2")) if att.has_v else 0
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad) - unused
    return trainable, frozen, unused
