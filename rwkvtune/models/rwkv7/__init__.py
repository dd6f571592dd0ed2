"""RWKV-7 ("x070"): model, WKV kernels and training configuration (names imported lazily, so that
the configuration class is usable without importing torch)."""

from importlib import import_module

__all__ = ["RWKV7", "RWKV7State", "LayerState"]


def __getattr__(name):
    if name in __all__:
        return getattr(import_module(f"{__name__}.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
