"""Training methods (``--method``): each one file here, sharing the trainer's loop.

``sft``: next-token cross-entropy on the target tokens (pretraining and supervised fine-tuning);
``dpo``: preference optimisation (DPO, IPO, SimPO) on prompt/chosen/rejected pairs;
``grpo``: group relative policy optimisation with rewards on sampled completions.
"""

from __future__ import annotations

from rwkvtune.constants import METHODS
from rwkvtune.errors import ConfigError


def method_class(name: str):
    """The :class:`~rwkvtune.train.methods.base.TrainingMethod` subclass called ``name``."""
    if name == "sft":
        from rwkvtune.train.methods.sft import SFT

        return SFT
    if name == "dpo":
        from rwkvtune.train.methods.dpo import DPO

        return DPO
    if name == "grpo":
        from rwkvtune.train.methods.grpo import GRPO

        return GRPO
    raise ConfigError(f"method: found {name!r}, expected one of {', '.join(METHODS)}")


def get_method(cfg):
    """The training method the config asks for."""
    return method_class(cfg.method)(cfg)
