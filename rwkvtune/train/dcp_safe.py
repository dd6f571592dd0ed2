"""Sharded resumable checkpoints (FSDP) with ``torch.distributed.checkpoint``, read without
running code from the files.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` of the run directory:

* each process's shard of the trainable tensors and their AdamW state (``__R_0.distcp``) and the
  index ``.metadata``, written by ``torch.distributed.checkpoint`` (so a run resumes on any
  number of processes: the loader reshards);
* ``trainer.pt``: step, tokens, data position, RNG states, the config and the method's state,
  tensors and plain values only.

torch's own reader unpickles ``.metadata`` with plain ``pickle`` and the non-tensor entries with
``torch.load(weights_only=False)``: either lets a planted file run code. :class:`SafeReader`
unpickles the index with an allow-list of the checkpoint's own index classes, and
:class:`SafePlanner` loads every other entry with ``weights_only=True``.

The folder is written under a temporary name and renamed when every process has written its shard,
so a run killed mid-save keeps the previous checkpoint.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rwkvtune.errors import CheckpointError
from rwkvtune.train import checkpointing
from rwkvtune.utils import (
    atomic_torch_save,
    atomic_write_text,
    is_write_failure,
    output_error,
    read_error,
    tensor_bytes,
)

TRAINER_FILE = "trainer.pt"
# Frozen base weights are not saved: the run rebuilds them from its model file. (Loading is not
# strict about them; every trainable tensor must be in the checkpoint, which dcp.load enforces.)
OPTIONS = StateDictOptions(ignore_frozen_params=True)
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)

# What a checkpoint index may contain, by (module, name): nothing else is ever constructed.
_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = getattr(torch, name, None) if module == "torch" else None
        if (module, name) in _INDEX_CLASSES or isinstance(dtype, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeReader(FileSystemReader):
    """FileSystemReader whose index is unpickled with an allow-list (see the module docstring)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _IndexUnpickler(f).load()
        except OSError as e:
            raise read_error(path, e) from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a checkpoint index rwkvtune reads ({e}); rwkvtune never unpickles "
                                  f"other objects (loading them could run code): move this checkpoint away") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Loads the checkpoint's non-tensor entries (optimizer hyper-parameters) with weights_only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save(run, step, tokens, module, optimizer, sampler, cfg, method_state, d) -> Path:
    """Every process writes its shard into a temporary folder; the main process adds trainer.pt,
    renames the folder into place, points ``latest`` at it and prunes old checkpoints."""
    final, tmp = run.checkpoint_dir(step), run.checkpoint_temp_dir(step)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer, options=OPTIONS)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except CheckpointException as e:  # every process gets every process's failures
        raise _save_error(e, final, tmp, d, needed=tensor_bytes([model_sd, optim_sd]) * d.world_size) from None
    if d.main:
        atomic_torch_save({"step": step, "tokens": tokens, "sampler": sampler.state_dict(),
                           "rng": checkpointing.rng_state(), "config": cfg.to_dict(), "method": method_state or {},
                           "world_size": d.world_size}, tmp / TRAINER_FILE)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run saving the same step again
        tmp.rename(final)
        atomic_write_text(run.latest, final.name + "\n")
        checkpointing.prune(run, step, cfg.keep_checkpoints)
    dist.barrier()  # no process goes on (or exits) before the checkpoint is in place
    return final


def _save_error(e: CheckpointException, final, tmp, d, needed: int) -> BaseException:
    """A failed write of a shard (disk full) as one OutputError naming the checkpoint and the space
    it needs, the temporary folder removed; any other failure as it came."""
    cause = next((failure[0] for failure in (getattr(e, "failures", None) or {}).values()), None)
    if cause is None or not is_write_failure(cause):
        return e
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else None
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_error(final, cause, needed, written)


def load_latest(out, module, optimizer, sampler) -> tuple[int, int, dict]:
    """Restore the checkpoint ``--resume out`` names (resharded to this run's processes)."""
    path = checkpointing.resume_checkpoint(out)
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint of a run without sharding; resume it with strategy ddp (drop "
                              f"strategy=fsdp)")
    meta = checkpointing.read_checkpoint_info(path)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    SafeReader(path).read_metadata()  # its refusal, in its own words (dcp.load would hide it in a fallback)
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner())
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this sharded checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is incomplete or from another "
                              f"model or mode: move it away to resume from the one before it") from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=LOAD_OPTIONS)
    sampler.load_state_dict(meta["sampler"])
    checkpointing.set_rng_state(meta["rng"])
    return int(meta["step"]), int(meta["tokens"]), meta.get("method", {})
