"""Training methods (``--method``): each one file here, sharing the trainer's loop.

``sft``: next-token cross-entropy on the target tokens (pretraining and supervised fine-tuning).
"""

from __future__ import annotations

METHODS = ("sft",)


def get_method(cfg):
    """The :class:`~rwkvtune.train.methods.base.TrainingMethod` the config asks for."""
    name = getattr(cfg, "method", "sft")
    if name == "sft":
        from rwkvtune.train.methods.sft import SFT

        return SFT(cfg)
    from rwkvtune.errors import ConfigError

    raise ConfigError(f"method: found {name!r}, expected one of {', '.join(METHODS)}")
