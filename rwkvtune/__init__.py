"""rwkvtune: training toolkit for RWKV-7 ("x070") language models."""

__version__ = "0.1.0"
