"""How a run spreads over processes: ``ddp`` (every process holds the whole model) or ``fsdp``
(PyTorch's FSDP2: parameters, gradients and optimizer state sharded over the processes).

The trainer asks its :class:`Strategy` to wrap the module, clip gradients, save and load resumable
checkpoints and write the final outputs; nothing else in the loop depends on the strategy.

FSDP (``strategy: fsdp``): ``fully_shard`` on every block, then on the root (embeddings, ln_out,
head, a tuned state), so one block's full parameters exist at a time. On GPU with precision bf16,
``MixedPrecisionPolicy`` computes with bf16 parameters and reduces gradients in fp32; on CPU
everything stays fp32. ``cpu_offload`` keeps the sharded parameters, gradients and optimizer state
in host memory (CPUOffloadPolicy; GPU runs only). Frozen base weights (lora, state) are sharded too,
except a quantized base (``--base-quant``): its codes and scales are buffers, and FSDP2 shards
parameters only, so every process holds the whole quantized base (quantized from the model file as
it fills its shards, on the compute device) and only the full-precision rest is sharded.
Resumable checkpoints are ``torch.distributed.checkpoint`` folders (each process writes its shard;
a run resumes on any number of processes) read back without unpickling anything but the
checkpoint's own index classes (:mod:`rwkvtune.train.dcp_safe`). ``final.pth`` is gathered tensor
by tensor onto the main process, with the model file's own key set (with or without layer 0's unused
v0/v1/v2). A resume on another number of processes says what changes (:func:`resume_world_size`).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from rwkvtune import log
from rwkvtune.errors import ConfigError, RwkvtuneError, on_every_rank
from rwkvtune.models.rwkv7.model import meta_model
from rwkvtune.models.rwkv7.quant import base_quant_of, quantized_layers, quantized_state_keys
from rwkvtune.train import checkpointing, rank_state
from rwkvtune.train.objective import TrainModule
from rwkvtune.train.runtime import agree
from rwkvtune.train.sharded_load import fill_shards


class Strategy:
    """``ddp``: the whole model on every process; one process needs no wrapper at all."""

    name = "ddp"
    collective_save = False  # whether every process takes part in saving (else the main one alone)
    fills_shards = False  # whether the module is built on meta, wrapped, then filled by fill()

    def __init__(self, cfg, d, device: str):
        self.cfg, self.dist, self.device = cfg, d, device

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.dist.world_size == 1:
            return module
        ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def decoding(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """The context for calling ``module`` a different number of times on each process (RNN
        decoding, where each process's rows finish at their own step): nothing to do here."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm))

    def save_checkpoint(self, run, state: checkpointing.CheckpointState, *, module, optimizer,
                        sampler) -> Path | None:
        """The main process writes the checkpoint; on several processes each first writes its own
        state beside it (:mod:`rwkvtune.train.rank_state`: GRPO's rollouts differ per process)."""
        rank_states = None
        if self.dist.world_size > 1:  # a collective: a failed write stops every process
            nonce = rank_state.shared_nonce(self.dist)
            rank_states = rank_state.write(run.checkpoint(state.step), self.dist, state.step, nonce,
                                           state.method_state)
        if not self.dist.main:
            return None
        return checkpointing.save(run, state, module=module, optimizer=optimizer, sampler=sampler, cfg=self.cfg,
                                  rank_states=rank_states)

    def load_checkpoint(self, out, *, module, optimizer, sampler, method) -> checkpointing.CheckpointState:
        """Restore the checkpoint ``--resume out`` names into the run and ``method``; returns its counters."""
        state = checkpointing.load_latest(out, module=module, optimizer=optimizer, sampler=sampler)
        self.restore_own_state(out, method, state.method_state)
        return state

    def restore_own_state(self, out, method, main_state: dict) -> None:
        """Every process: the method's state and the RNGs from its own state file of the checkpoint
        (else from the main file: ``main_state``). A collective."""
        error = None
        try:
            path = checkpointing.resume_checkpoint(out)
            rank_state.restore(path, checkpointing.read_checkpoint_info(path), self.dist, method, main_state)
        except RwkvtuneError as e:
            error = e
        agree(error)  # one line from rank 0, every process out

    def save_outputs(self, run, mode, module, model_config) -> dict[str, str]:
        return mode.save_outputs(run, module, self.cfg) if self.dist.main else {}


class FSDPStrategy(Strategy):
    name = "fsdp"
    collective_save = True

    fills_shards = True

    def fill(self, module: nn.Module, mode, model_config) -> None:
        """Allocate the meta-built, sharded ``module``'s shards and fill them with the starting
        weights (the model file's, or the seeded init's), one tensor at a time."""
        fill_shards(module, mode, model_config, self.cfg, self.device)

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        cuda = self.device.startswith("cuda")
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cuda and self.cfg.precision == "bf16" else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy() if self.cfg.cpu_offload else OffloadPolicy()
        for block in module.model.blocks:
            fully_shard(block, mp_policy=mp, offload_policy=offload)
        fully_shard(module, mp_policy=mp, offload_policy=offload)
        return module

    @contextlib.contextmanager
    def decoding(self, module: nn.Module):
        """Gather every parameter once and keep it gathered until the block ends, so forwards inside
        it run no collectives: a sharded forward all-gathers, and decoding makes a different number
        of forwards on each process. Costs the whole model's unsharded parameters on every process
        while it lasts (as one block's do during training, times n_layer)."""
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for m in sharded:  # the same modules in the same order on every process
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in sharded:
                # as wrap() left them: blocks reshard after forward, the root does not (FSDP's
                # own choice for the root: backward would gather it again at once)
                m.set_reshard_after_forward(m is not module, recurse=False)
                m.reshard()

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def save_checkpoint(self, run, state: checkpointing.CheckpointState, *, module, optimizer, sampler) -> Path:
        from rwkvtune.train import dcp_safe  # torch.distributed.checkpoint: ~1 s of import, fsdp only

        return dcp_safe.save(run, state, module=module, optimizer=optimizer, sampler=sampler, cfg=self.cfg,
                             d=self.dist)

    def load_checkpoint(self, out, *, module, optimizer, sampler, method) -> checkpointing.CheckpointState:
        from rwkvtune.train import dcp_safe  # torch.distributed.checkpoint: ~1 s of import, fsdp only

        state = dcp_safe.load_latest(out, module=module, optimizer=optimizer, sampler=sampler)
        self.restore_own_state(out, method, state.method_state)
        return state

    def save_outputs(self, run, mode, module, model_config) -> dict[str, str]:
        """Gather every tensor onto the main process into a plain copy of the module, then let the
        mode write its files from it (so final.pth is the official layout, written atomically)."""
        shadow = _gathered_copy(module, mode, model_config, self.cfg, self.dist.main)
        return mode.save_outputs(run, shadow, self.cfg) if self.dist.main else {}


def _gathered_copy(module: nn.Module, mode, model_config, cfg, keep: bool) -> nn.Module | None:
    """A plain (unsharded) module equal to the sharded ``module``, on the CPU of the process with
    ``keep`` (None elsewhere). Tensors are gathered one at a time, and frozen base weights are kept
    in bf16 when saving bf16, so host memory stays near one copy of the model in its saved dtype."""
    # The model file's own key set: a file without layer 0's unused v0/v1/v2 (many RWKV-7 releases)
    # is sharded without them, and final.pth is written without them (the rwkv package ignores them)
    layer0_v = module.model.layer0_v
    # A quantized base's layers are not sharded (buffers, whole on every process): the shadow takes
    # the module's own layers (no copy, nothing to gather) in place of its placeholders.
    quantized = quantized_layers(module)
    with torch.device("meta"):
        shadow = (TrainModule.for_mode(mode, meta_model(model_config, layer0_v, base_quant_of(module)), cfg)
                  if keep else None)
    skip = quantized_state_keys(quantized)
    save_bf16 = cfg.save_dtype == "bf16"
    full = {}
    for name, tensor in module.state_dict().items():
        if name in skip:
            continue
        value = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # collective: every rank
        if keep:
            # trained small tensors (adapters, a state) stay fp32 for merging; base weights may be bf16
            small = "lora_" in name or name == "wkv_init"
            full[name] = value.detach().to("cpu", torch.bfloat16 if save_bf16 and not small else value.dtype,
                                           copy=True)
    if not keep:
        return None
    shadow.load_state_dict(full, strict=True, assign=True)
    for name, layer in quantized.items():
        shadow.set_submodule(name, layer)
    for attr in ("lora_base_fingerprint", "lora_config", "lora_train_parts", "quant_source"):
        if hasattr(module.model, attr):
            setattr(shadow.model, attr, getattr(module.model, attr))
    return shadow


def resume_world_size(resume, cfg, d, sampler, steps_per_batch: int, tokens_per_step: int) -> dict | None:
    """What a resume on another number of processes changes, said on the main process before any
    weight is read; None when the global batch is the saved one (or an older checkpoint does not
    record it).

    Kept: the model and optimizer state (a sharded checkpoint reshards; a ddp one is whole), the
    step, the lr schedule (a function of the step), the data position (the sampler continues the
    epoch from the saved window, nothing skipped or repeated). What changes: the samples and tokens
    of each step. Refused where the result is not defined: a run whose length is counted in epochs
    (its number of steps would change midway: the message gives the --max-steps that finishes the
    epochs), and a step inside a batch that later steps reuse (GRPO's num_iterations; those rollouts
    belong to the saved processes)."""
    path = checkpointing.resume_checkpoint(resume)
    info = checkpointing.read_checkpoint_info(path)
    saved = info.get("sampler") or {}
    old_gb = saved.get("global_batch")
    if old_gb is None and isinstance(info.get("world_size"), int):  # sharded checkpoints before the sampler kept it
        old_gb = info["world_size"] * cfg.batch_size
    if not isinstance(old_gb, int) or old_gb <= 0 or old_gb == sampler.global_batch:
        step = int(info["step"])
        if d.world_size > 1 and step % steps_per_batch and rank_state.saved_for(info, d, path) is None:
            # Saved before each process kept its own state: the file holds process 0's rollouts only.
            raise on_every_rank(ConfigError(
                f"--resume {resume}: the checkpoint of step {step} is inside a batch whose rollouts the next steps "
                f"reuse (num_iterations {steps_per_batch}), and it holds process 0's rollouts only (saved by an "
                f"older rwkvtune); resume from a checkpoint at a multiple of {steps_per_batch} steps"))
        return None
    old_ws, new_ws = old_gb // cfg.batch_size, d.world_size
    step, accum = int(info["step"]), cfg.grad_accum
    before, after = old_gb * accum, sampler.global_batch * accum  # samples per optimizer step
    where = f"--resume {resume}: saved by {old_ws} process(es), resumed on {new_ws}"
    if step % steps_per_batch:
        raise on_every_rank(ConfigError(
            f"{where} at step {step}, inside a batch whose rollouts the next steps reuse (num_iterations "
            f"{steps_per_batch}); resume on {old_ws} process(es), or from a checkpoint at a multiple of "
            f"{steps_per_batch} steps"))
    if cfg.max_steps is None:
        epoch, position = int(saved.get("epoch", 0)), int(saved.get("position", 0))
        left = max(0, (cfg.epochs - epoch) * sampler.n - position)  # windows still due, without wrap filler
        until = step + math.ceil(left / after) * steps_per_batch
        raise on_every_rank(ConfigError(
            f"{where}: the run's length is {cfg.epochs} epoch(s) of steps of {before} samples, now {after}, so its "
            f"step count would change midway; pass --max-steps {until} to train the {left} windows left, or "
            f"resume on {old_ws} process(es)"))
    old_tokens = tokens_per_step // new_ws * old_ws
    if d.main:
        log.info(f"{where}: samples per step (batch_size x grad_accum x processes) {before} -> {after}, tokens "
                 f"per step up to {old_tokens:,} -> {tokens_per_step:,}; kept: model and optimizer state "
                 f"(resharded), step {step}, the lr schedule and the data position (nothing skipped or repeated)")
    return {"world_size": {"from": old_ws, "to": new_ws}, "samples_per_step": {"from": before, "to": after},
            "max_tokens_per_step": {"from": old_tokens, "to": tokens_per_step}}


def get_strategy(cfg, d, device: str) -> Strategy:
    if cfg.strategy == "fsdp":
        return FSDPStrategy(cfg, d, device)
    return Strategy(cfg, d, device)


def check_strategy(cfg, device: str) -> None:
    """Options the strategy cannot honour here, refused before any work."""
    if cfg.cpu_offload and not device.startswith("cuda"):
        raise ConfigError(f"cpu_offload: true on {device}: offloading moves sharded state from the GPU to host "
                          f"memory; on CPU the run already lives there: drop cpu_offload")


def join_single_process_group(device: str) -> bool:
    """FSDP needs a process group even on one process: a group of one, met through a temporary
    file (no network port). Returns whether it made one (the caller then destroys it)."""
    if dist.is_initialized():
        return False
    store_dir = tempfile.mkdtemp(prefix="rwkvtune-pg-")
    atexit.register(shutil.rmtree, store_dir, ignore_errors=True)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            store=dist.FileStore(os.path.join(store_dir, "store"), 1), rank=0, world_size=1)
    return True
