"""Where and how a run computes: processes (torchrun), devices, mixed precision."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

from rwkvtune.errors import CheckpointError, RwkvtuneError, on_every_rank


@dataclasses.dataclass
class Dist:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def select_device(device: str, d: Dist) -> str:
    """The device of this process: cuda:LOCAL_RANK under DDP; a CUDA device is made current only
    when it has an index (torch.cuda.set_device refuses a bare "cuda")."""
    if device == "cuda" and d.world_size > 1:
        device = f"cuda:{d.local_rank}"
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    return device


def all_sum(values: list[float], d: Dist, device: str) -> list[float]:
    """Element-wise sum over all processes (fp64, so token counts stay exact)."""
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """``t`` summed element-wise over all processes (in place; ``t`` itself on one process)."""
    if d.world_size > 1:
        dist.all_reduce(t)
    return t


def autocast_factory(device: str, precision: str) -> Callable[[], ContextManager]:
    """A function returning the mixed-precision context of the run: bf16 autocast, or nothing."""
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if precision == "bf16":
        return lambda: torch.autocast(dev_type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def gradient_sync(runner: torch.nn.Module, sync: bool):
    """Skip the gradient reduction of a backward that is not the step's last (DDP's no_sync, FSDP2's
    set_requires_gradient_sync); the gradients accumulate locally until the last one."""
    if sync:
        yield
    elif hasattr(runner, "no_sync"):
        with runner.no_sync():
            yield
    elif hasattr(runner, "set_requires_gradient_sync"):
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)
    else:
        yield


def agree(error: RwkvtuneError | None) -> None:
    """Raise the first (lowest rank's) of the processes' errors on every process, marked as said by
    rank 0 alone (see RwkvtuneError.every_rank); nothing when none has one. A collective: every
    process must call it at the same point."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise on_every_rank(error)
        return
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, None if error is None else str(error))  # our own strings, not a file's
    first = next((m for m in found if m), None)
    if first is None:
        return
    if error is not None and str(error) == first:
        raise on_every_rank(error)
    raise on_every_rank(CheckpointError(first)) from error
