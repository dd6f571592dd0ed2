"""The reference model that preference and policy-gradient methods compare the policy with.

* lora and state modes: the policy itself with every trained part switched off
  (:meth:`rwkvtune.peft.base.Mode.reference`): the exact base model, no second copy in memory;
* full mode: a frozen copy of the starting model, rebuilt from where the policy came from (the
  model file, or the seeded initialisation), never copied from the policy, which on a resumed run
  has moved on. Under ``strategy: fsdp`` it is sharded like the policy and filled shard by shard.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from rwkvtune.models.rwkv7.model import RWKV7
from rwkvtune.train.objective import TrainModule


class Reference:
    def __init__(self):
        self.copy = None  # full mode: a TrainModule around a frozen copy of the starting model

    def setup(self, r) -> None:
        """Before the first step."""
        if not r.mode.trains_base:
            return
        self.copy = _starting_model(r).requires_grad_(False).eval()

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


def reference_problems(cfg, what: str) -> list[str]:
    """Configurations whose reference cannot be computed (for a method's ``problems``): LoRA
    train_parts under fsdp, where switching them back to their starting values would swap the
    storage of sharded parameters, which FSDP owns."""
    if cfg.strategy == "fsdp" and cfg.mode == "lora" and cfg.train_parts:
        return [f"train_parts: found {list(cfg.train_parts)} with {what}, mode lora and strategy fsdp, expected none: "
                f"the reference would switch sharded parameters back to their starting values, which FSDP does not "
                f"allow; drop train_parts, or use strategy ddp"]
    return []


def _starting_model(r):
    """The model the run started from, as a TrainModule on the run's device (sharded under fsdp).
    Rebuilding a seeded init must not move the run's own random stream: the draws are forked."""
    cfg, config = r.cfg, r.model_config
    cuda = str(r.device).startswith("cuda")
    kept = torch.random.fork_rng(devices=[torch.device(r.device).index or 0] if cuda else [])
    if r.strategy.fills_shards:  # fsdp: built on meta, sharded like the policy, filled shard by shard
        with torch.device("meta"):
            ref = TrainModule(RWKV7(config, layer0_v=r.module.model.layer0_v))
        ref.model.set_wkv_backend(cfg.wkv_backend)
        r.strategy.wrap(ref.requires_grad_(False))
        with kept:
            r.strategy.fill(ref, r.mode, config)
        return ref
    if cfg.init == "pretrained":
        model = RWKV7.from_checkpoint(config.model_path, expect=config)
    else:
        with kept:
            model = RWKV7.from_config(config, seed=cfg.seed)
    model.set_wkv_backend(cfg.wkv_backend)
    return TrainModule(model.to(r.device))
