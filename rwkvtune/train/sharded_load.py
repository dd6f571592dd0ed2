"""Fill a sharded (FSDP) module from the model file without a whole copy of the model anywhere.

The eager way builds the whole model on every process, then FSDP shards it: for 13.3B that is
53 GB of fp32 per process in host memory and again on each GPU, the floor of every launch. Here
every process builds the module on the meta device (shapes only), FSDP shards it, each process
allocates only its own shards, and fills them tensor by tensor from the memory-mapped model file:
one full tensor at a time exists (the head, the largest: V x C), then its slice.

The mode's own tensors (LoRA adapters, a tuned state) get the values the eager build gives them,
drawn from the same random stream in the same order, so a sharded run equals a single-process one
(tests/test_fsdp.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rwkvtune.errors import CheckpointError


def fill_from_model_file(module: nn.Module, mode, model_config, device: str, cpu_offload: bool) -> None:
    """``module``: a mode-prepared TrainModule built on the meta device and already sharded.
    Allocates its shards (in host memory with ``cpu_offload``, as FSDP's offload expects) and
    copies each one's slice of the model file in; the file's tensors are checked as they are read."""
    from rwkvtune.models.rwkv7.model import allocation_guard, loaded_tensor, open_checkpoint

    base, path, _, _ = open_checkpoint(model_config.model_path, expect=model_config)
    fresh = mode.initial_values(module)  # before anything else draws random numbers
    with allocation_guard(model_config, device):
        module.to_empty(device="cpu" if cpu_offload else device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in fresh:
                full = fresh[name]
            else:
                key = name.removeprefix("model.").replace(".base.", ".")  # LoRA wraps a Linear as .base
                if key not in base:
                    raise CheckpointError(f"{path}: has no tensor {key} for parameter {name}; pass the model "
                                          f"file this run was configured for")
                full = loaded_tensor(key, base[key], path, "cpu", p.dtype)
            _copy_shard(p, full, name)
    mode.base_loaded(module, base)


def _copy_shard(p: torch.Tensor, full: torch.Tensor, name: str) -> None:
    """Copy this process's slice of ``full`` into the (sharded) parameter ``p``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(p.shape):
        raise CheckpointError(f"{name}: the file's tensor is {list(full.shape)}, the model's {list(p.shape)}")
    if not isinstance(p, DTensor):
        p.copy_(full)
        return
    local = p.to_local()
    # src_data_rank=None: every process holds the full tensor already and keeps its own slice
    # (no communication); FSDP's shards follow the same torch.chunk split of dim 0.
    mine = distribute_tensor(full.to(local.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
    local.copy_(mine)
