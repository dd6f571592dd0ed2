"""The reference model that preference and policy-gradient methods compare the policy with.

* lora and state modes: the policy itself with every trained part switched off
  (:meth:`rwkvtune.peft.base.Mode.reference`): the exact base model, no second copy in memory;
* full mode: a frozen copy of the starting model, made before the first step (not under
  ``strategy: fsdp``, where it would be a whole unsharded model per process).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

from rwkvtune.errors import ConfigError


class Reference:
    def __init__(self):
        self.copy = None  # full mode: a TrainModule around a frozen copy of the starting model

    def setup(self, r, what: str) -> None:
        """Before the first step; ``what`` names the option that needs the reference, for the error."""
        if not r.mode.trains_base:
            return
        if r.strategy.name == "fsdp":
            raise ConfigError(f"{what} in mode full with strategy fsdp would keep a whole unsharded copy of the "
                              f"model on every process; use mode lora or state (the reference is then the base, "
                              f"with nothing copied)" + (", or precompute_ref=true" if "dpo" in what else ""))
        from rwkvtune.peft.base import TrainModule

        self.copy = TrainModule(copy.deepcopy(r.module.model).requires_grad_(False)).eval()

    @contextlib.contextmanager
    def active(self, module, mode) -> Iterator:
        """Inside: the module that computes what the reference computes."""
        if self.copy is not None:
            yield self.copy
        elif mode.trains_base:  # the module itself is the reference only before the first step
            yield module
        else:
            with mode.reference(module):
                yield module
