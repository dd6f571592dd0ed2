"""RWKV-7 ("x070"): model, WKV kernels and training configuration."""

from rwkvtune.models.rwkv7.model import RWKV7, RWKV7State

__all__ = ["RWKV7", "RWKV7State"]
