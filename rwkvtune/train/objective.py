"""What the optimizer sees and what the training methods ask of it: :class:`TrainModule`, the
model plus the tensor a fine-tuning mode adds (state mode: the trainable initial WKV state), with
one method per result (logits, hidden states, summed loss, per-sequence and per-token negative
log-likelihood; the losses themselves are in :mod:`rwkvtune.train.loss`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rwkvtune.train import loss as loss_lib


class TrainModule(nn.Module):
    """The model in RNN-state form plus, in state mode, the trainable initial WKV state.

    Each method returns (its result, the state after the last token); without a carried ``state``
    a sequence starts from ``wkv_init`` (zeros when None, or inside a mode's reference context).
    ``doc_start`` [B, T] bool marks packed documents: each restarts at its first token from the
    initial state (``wkv_init``, also when a ``state`` is carried in, or zeros), as if run alone.

    Why the losses are computed inside the module's forward rather than by the caller from its
    outputs: under FSDP2 every parameter is sharded, and only a module's ``__call__`` (its forward
    pre-hook) all-gathers them. The head is gathered like every layer only if it runs inside a
    forward; the caller cannot apply ``model.head`` itself (the chunked losses apply it in slices
    of the sequence, never all [B, T, V] logits at once). Under DDP the call must also go through
    the DDP wrapper, whose forward arranges the gradient sync. So every method below is one call
    of ``via`` (the DDP- or FSDP-wrapped module; default this module), which runs :meth:`forward`
    with the name of the result.
    """

    RESULTS = ("logits", "hidden", "loss_sum", "sequence_nll", "token_nll")

    def __init__(self, model: nn.Module, wkv_init: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.wkv_init = nn.Parameter(wkv_init) if wkv_init is not None else None
        self.reference_active = False  # True inside Mode.reference(): the initial state is zeros

    @classmethod
    def for_mode(cls, mode, model: nn.Module, cfg) -> "TrainModule":
        """``model`` prepared in place for the fine-tuning ``mode`` (a :class:`rwkvtune.peft.base.Mode`),
        with the tensor the mode adds."""
        return cls(model, mode.prepare(model, cfg))

    # ---- one method per result --------------------------------------------------------------------
    def logits(self, idx, state=None, last_only: bool = False, via: nn.Module | None = None, doc_start=None):
        """(logits [B, T, V], or [B, 1, V] of the last position with ``last_only``, state)."""
        return (via or self)(idx, state, "logits", last_only=last_only, doc_start=doc_start)

    def hidden(self, idx, state=None, via: nn.Module | None = None, doc_start=None):
        """(final hidden states ``ln_out(x)`` [B, T, C], state), for losses that use the head themselves."""
        return (via or self)(idx, state, "hidden", doc_start=doc_start)

    def loss_sum(self, idx, labels, state=None, l2wrap: float = 0.0, via: nn.Module | None = None, doc_start=None):
        """(summed next-token loss over the scored labels, plus L2Wrap with factor ``l2wrap``, state):
        :func:`rwkvtune.train.loss.chunked_loss_sum`."""
        return (via or self)(idx, state, "loss_sum", labels=labels, l2wrap=l2wrap, doc_start=doc_start)

    def sequence_nll(self, idx, labels, state=None, via: nn.Module | None = None, doc_start=None):
        """(summed negative log-likelihood of each sequence's scored tokens [B], state)."""
        return (via or self)(idx, state, "sequence_nll", labels=labels, doc_start=doc_start)

    def token_nll(self, idx, labels, state=None, temperature: float = 1.0, via: nn.Module | None = None,
                  doc_start=None):
        """(each scored token's negative log-likelihood [B, T] at ``temperature``, 0 elsewhere, state)."""
        return (via or self)(idx, state, "token_nll", labels=labels, temperature=temperature, doc_start=doc_start)

    # ---- the one entry point (see the class docstring) --------------------------------------------
    def forward(self, idx, state, result: str, labels=None, l2wrap: float = 0.0, temperature: float = 1.0,
                last_only: bool = False, doc_start=None):
        # The model reads wkv_init only without a carried state, or as the reset state at doc_start.
        init = self.wkv_init if (state is None or doc_start is not None) and not self.reference_active else None
        if result == "logits":
            return self.model(idx, state=state, return_state=True, wkv_init=init, last_only=last_only,
                              doc_start=doc_start)
        h, state = self.model(idx, state=state, return_state=True, wkv_init=init, hidden=True, doc_start=doc_start)
        if result == "hidden":
            return h, state
        if result == "loss_sum":
            return loss_lib.chunked_loss_sum(h, self.model.head, labels, l2wrap), state
        if result == "sequence_nll":
            return loss_lib.chunked_sequence_nll(h, self.model.head, labels), state
        if result == "token_nll":
            return loss_lib.chunked_token_nll(h, self.model.head, labels, temperature), state
        raise ValueError(f"result: found {result!r}, expected one of {', '.join(self.RESULTS)}")


def count_params(module: TrainModule) -> tuple[int, int, int]:
    """(trainable, frozen, unused) parameter counts. Unused: layer 0's value-residual v0/v1/v2,
    which released files carry (and final.pth keeps) although layer 0 defines v_first instead."""
    att = module.model.blocks[0].att
    unused = sum(getattr(att, n).numel() for n in ("v0", "v1", "v2")) if att.has_v else 0
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad) - unused
    return trainable, frozen, unused
