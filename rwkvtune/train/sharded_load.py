"""Fill a sharded (FSDP) module without a whole copy of the model anywhere.

The eager way builds the whole model on every process, then FSDP shards it: for 13.3B that is
53 GB of fp32 per process in host memory and again on each GPU, the floor of every launch. Here
every process builds the module on the meta device (shapes only), FSDP shards it, each process
allocates only its own shards, and fills them tensor by tensor: from the memory-mapped model file
(init pretrained), or from the official initialisation computed one block at a time (init
scratch). One whole tensor exists at a time (at most one block, or the head: V x C), then its slice.
A quantized base (``--base-quant``) is the exception to sharding: each process quantizes every big
matrix as it reads it (one fp32 matrix at a time) and keeps the whole quantized base.

The values equal the eager build's: the init draws the same random numbers in the same order, and
the mode's own tensors (LoRA adapters, a tuned state) are drawn as its ``prepare`` draws them, so a
sharded run equals a single-process one (tests/test_fsdp.py).
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
import torch.nn as nn

from rwkvtune.errors import CheckpointError
from rwkvtune.models.rwkv7.model import (allocation_guard, initial_tensors, loaded_tensor, open_checkpoint,
                                         quantized_layer)
from rwkvtune.models.rwkv7.quant import QuantLinear


def fill_shards(module: nn.Module, mode, model_config, cfg, device: str) -> None:
    """``module``: a mode-prepared TrainModule built on the meta device and already sharded.
    Allocates its shards (in host memory with ``cpu_offload``, as FSDP's offload expects) and
    copies each one's slice of the starting weights in: the model file's (checked as they are
    read) or the seeded official init's."""
    fresh = mode.initial_values(module)  # first: drawn as the eager build's prepare draws them
    with allocation_guard(model_config, device):
        module.to_empty(device="cpu" if cfg.cpu_offload else device)
    params = dict(module.named_parameters())
    if cfg.init == "pretrained":
        base, path, _, _ = open_checkpoint(model_config.model_path, expect=model_config)

        def source() -> Iterator[tuple[str, torch.Tensor]]:
            for name, p in params.items():
                if name not in fresh:
                    key = _official(name)
                    if key not in base:
                        raise CheckpointError(f"{path}: has no tensor {key} for parameter {name}; pass the model "
                                              f"file this run was configured for")
                    yield name, loaded_tensor(key, base[key], path, "cpu", p.dtype)
    else:
        base = None

        def source() -> Iterator[tuple[str, torch.Tensor]]:
            for key, value in initial_tensors(model_config, cfg.seed, layer0_v=module.model.layer0_v):
                yield f"model.{key}", value

    filled = set()
    with torch.no_grad():
        for name, full in itertools.chain(fresh.items(), source()):
            _copy_shard(params[name], full.to(params[name].dtype), name)
            filled.add(name)
    if set(params) - filled:  # every tensor of the module comes from somewhere, or it holds garbage
        raise CheckpointError(f"no starting value for {sorted(set(params) - filled)[:3]}")
    if base is not None:
        _quantize_placeholders(module, base, path, device)
        mode.base_loaded(module, base)


def _quantize_placeholders(module: nn.Module, base: dict[str, torch.Tensor], path: str, device: str) -> None:
    """--base-quant: each QuantLinear placeholder (rwkvtune.models.rwkv7.model.meta_model) replaced
    by the file's matrix quantized on this process, one at a time (one fp32 matrix exists at a
    time), as a whole-model load quantizes them. Not sharded: FSDP2 shards parameters, and a
    quantized layer has none (its codes and scales are buffers), so every process holds the whole
    quantized base, on the compute device also with cpu_offload (its products run there)."""
    placeholders = [n for n, m in module.named_modules() if isinstance(m, QuantLinear)]
    for name in placeholders:
        kind = module.get_submodule(name).kind
        module.set_submodule(name, quantized_layer(_official(name + ".weight"), base, path, kind, device))
    if placeholders:
        module.model.quant_source = path  # merging reads the full-precision matrices from it again


def _official(name: str) -> str:
    """A TrainModule parameter's key in the model file (LoRA wraps a Linear as ``.base``)."""
    return name.removeprefix("model.").replace(".base.", ".")


def _copy_shard(p: torch.Tensor, full: torch.Tensor, name: str) -> None:
    """Copy this process's slice of ``full`` into the (sharded) parameter ``p``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(p.shape):
        raise CheckpointError(f"{name}: the starting tensor is {list(full.shape)}, the model's {list(p.shape)}")
    if not isinstance(p, DTensor):
        p.copy_(full)
        return
    local = p.to_local()
    # src_data_rank=None: every process holds the full tensor already and keeps its own slice
    # (no communication); FSDP's shards follow the same torch.chunk split of dim 0.
    mine = distribute_tensor(full.to(local.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
    local.copy_(mine)
