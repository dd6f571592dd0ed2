"""rwkvtune: training toolkit for RWKV-7 ("x070") language models.

The public names are imported lazily (PEP 562), so ``import rwkvtune`` does not import torch::

    from rwkvtune import RWKV7, ModelConfig, TrainConfig, load_model_config, list_available_models

Training and generation live in their subpackages: ``rwkvtune.train.trainer.train(cfg)`` and
``rwkvtune.generate.generate(model, tokenizer, prompt)``.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "RWKV7": "rwkvtune.models.rwkv7.model",
    "RWKV7State": "rwkvtune.models.rwkv7.model",
    "ModelConfig": "rwkvtune.configs.model_loader",
    "load_model_config": "rwkvtune.configs.model_loader",
    "list_available_models": "rwkvtune.configs.model_loader",
    "TrainConfig": "rwkvtune.models.rwkv7.config",
    "DPOConfig": "rwkvtune.models.rwkv7.method_config",
    "GRPOConfig": "rwkvtune.models.rwkv7.method_config",
    "load_model": "rwkvtune.peft.loading",  # (model, wkv_init) of any model name, run directories included
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'rwkvtune' has no attribute {name!r}")


def __dir__():
    return __all__
