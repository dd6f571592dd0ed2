"""Training data: binidx files, jsonl formats, packing into windows, and the sampler.

Names are imported lazily (PEP 562) so that ``import rwkvtune.data`` does not pull in torch;
only building a torch item does.
"""

from importlib import import_module

_EXPORTS = {
    "BinIdxDataset": "binidx",
    "BinIdxWriter": "binidx",
    "Sample": "formats",
    "ReadStats": "formats",
    "read_samples": "formats",
    "encode_record": "formats",
    "PackedDataset": "dataset",
    "BinIdxWindows": "dataset",
    "WindowSampler": "dataset",
    "load_dataset": "dataset",
    "prepare_binidx": "prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
