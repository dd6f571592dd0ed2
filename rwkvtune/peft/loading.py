"""``load_model``: a model as every command names it, with what tunes it (a LoRA adapter, a tuned
initial WKV state), loaded in one place.

A name is a registry name, a model file or Hugging Face folder, or a training run's directory
(:mod:`rwkvtune.configs.run_source`): its ``final.pth``, or its base model with the run's
``adapter.pth`` or ``state.pth``. ``generate``, ``eval`` (loss and ``--tasks``) and Python go
through here, so a run directory means the same model everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rwkvtune.configs.run_source import resolve_run, run_part
from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.peft.lora import load_adapter
from rwkvtune.peft.state import load_state_file


def _labelled(label: str | None, load, *args):
    """``load(*args)``; a file the user passed by flag has its errors name the flag."""
    try:
        return load(*args)
    except CheckpointError as e:
        if label is None:
            raise
        raise CheckpointError(f"{label} {e}") from e


def _labelled_config(label: str, resolve, *args):
    """``resolve(*args)`` with its one-line error naming the flag (or argument) it is about."""
    try:
        return resolve(*args)
    except ConfigError as e:
        raise ConfigError(f"{label} {e}") from e


def load_model(model: str, adapter: str | None = None, state: str | None = None, device="cpu",
               dtype: torch.dtype = torch.float32, flags: bool = False, base_quant: str = "none"):
    """(RWKV7 in eval mode, tuned initial WKV state [L, H, N, N] or None).

    ``adapter``/``state``: files to apply besides the model's own, or a LoRA / state-tuning run's
    directory for its adapter or state; a run directory that brings its own adapter or state
    cannot take another of the same kind (which one would win is not obvious), nor a run's
    final.pth its own adapter again (it is merged in): both are refused. ``flags=True``: errors
    about these files name ``--adapter`` and ``--state`` (the CLI). ``base_quant`` "int8" or
    "nf4": the base's big matrices quantized at load (:mod:`rwkvtune.models.rwkv7.quant`); an
    adapter applies on top as in training.
    """
    run = resolve_run(model)
    adapter = _labelled_config("--adapter" if flags else "adapter", run_part, adapter, "adapter") if adapter else None
    state = _labelled_config("--state" if flags else "state", run_part, state, "state") if state else None
    own_adapter = own_state = None
    if run is not None and run.is_final and adapter and Path(adapter).resolve().parent == Path(run.run).resolve():
        flag = "--adapter" if flags else "adapter"
        raise ConfigError(f"{flag} {adapter}: is the adapter of the run {run.run}, already merged into its "
                          f"{Path(run.model).name}; pass that run's base model with {flag}, or drop {flag}")
    if run is not None:
        own_adapter, own_state = run.adapter, run.state
        for given, own, name in ((adapter, own_adapter, "adapter"), (state, own_state, "state")):
            if given and own:
                flag = f"--{name}" if flags else name
                raise ConfigError(f"{flag} {given}: the run {run.run} brings its own {name} ({own}); pass the "
                                  f"base model {run.model} with {flag} {given}, or drop {flag}")
        model = run.model
    net = RWKV7.from_checkpoint(model, device=device, dtype=dtype, quant=base_quant)
    for path, label in ((own_adapter, None), (adapter, "--adapter" if flags else None)):
        if path:
            _labelled(label, load_adapter, net, path)
    wkv_init = None
    for path, label in ((own_state, None), (state, "--state" if flags else None)):
        if path:
            wkv_init = _labelled(label, load_state_file, path, net)
    return net.eval(), wkv_init
