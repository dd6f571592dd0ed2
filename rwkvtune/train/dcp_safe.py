"""Sharded resumable checkpoints (FSDP) with ``torch.distributed.checkpoint``, read without
running code from the files.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` of the run directory:

* each process's shard of the trainable tensors and their AdamW state (``__R_0.distcp``) and the
  index ``.metadata``, written by ``torch.distributed.checkpoint`` (so a run resumes on any
  number of processes: the loader reshards);
* ``trainer.pt``: step, tokens, data position, RNG states, the config and the method's state,
  tensors and plain values only;
* on several processes, each one's own method state and RNGs (``rank-R-of-N.pt``, see
  :mod:`rwkvtune.train.rank_state`);
* ``manifest.json``: every file's size and CRC-32, checked before a resume reads any of them
  (:mod:`rwkvtune.train.manifest`).

torch's own reader unpickles ``.metadata`` with plain ``pickle`` and the non-tensor entries with
an unrestricted ``torch.load``: either lets a planted file run code. :class:`SafeReader`
unpickles the index with an allow-list of the checkpoint's own index classes, and
:class:`SafePlanner` loads every other entry with ``weights_only=True``.

The folder is written under a temporary name and renamed when every process has written its shard,
so a run killed mid-save keeps the previous checkpoint.

Before any tensor is read, every process checks the folder alike (:func:`check_files`): each
storage path of the index is a plain file name inside the folder (a planted ``../../x`` or ``/x`` is
refused before anything is read), every shard file exists and is as long as the index says, and
each shard's tag (a two-number row its writer saved: its process index and the save's random
nonce, also in trainer.pt) says it is the file the index means: swapped, renamed or mixed-in shard
files are refused by name. The processes then agree on the first refusal, so a run of N processes
stops at once with one line (printed by rank 0), never with N tracebacks or a hang.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rwkvtune.errors import CheckpointError, RwkvtuneError, on_every_rank
from rwkvtune.models.rwkv7.quant import quantized_layers, quantized_state_keys
from rwkvtune.train import checkpointing, manifest, rank_state
from rwkvtune.train.runtime import agree
from rwkvtune.utils import (
    atomic_torch_save,
    atomic_write_text,
    is_write_failure,
    output_error,
    read_error,
    tensor_bytes,
)

TRAINER_FILE = "trainer.pt"
# The shard tag: an int64 [world_size, 2] tensor sharded by rows, row r = (r, the save's nonce), so
# each process's file carries which process wrote it in which save (16 bytes of data per file).
SHARD_TAG = "rwkvtune_shard_of"
_TAG_MAX_BYTES = 1 << 16  # a tag blob is ~1 KB of torch.save framing; more is not a tag
# Frozen base weights are not saved: the run rebuilds them from its model file. (Loading is not
# strict about them; every trainable tensor must be in the checkpoint, which dcp.load enforces.)
# Nor is a quantized base (--base-quant): its codes and scales are buffers, which get_state_dict
# keeps, so _model_state drops them (as a single-process checkpoint, which saves the trainable
# tensors only); a resume quantizes the model file again, which gives the same codes bit for bit.
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
            raise read_error(path, e) from e
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a checkpoint index rwkvtune reads ({e}); rwkvtune never unpickles "
                                  f"other objects (loading them could run code): move this checkpoint away") from e
        from torch.distributed.checkpoint.metadata import StorageMeta

        check_storage_paths(Path(self.path), metadata)  # before anything the index names is read
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        # the index dcp.load reads with: checked again here, whichever process read it
        check_storage_paths(Path(self.path), metadata)
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)


def check_storage_paths(folder: Path, metadata) -> None:
    """Every storage entry of a checkpoint index names a plain file of ``folder`` (no ``..``, no
    absolute path, no separator, no link leading out) with a non-negative offset and length."""
    index = folder / ".metadata"
    data = getattr(metadata, "storage_data", None)
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: holds no storage table; not a checkpoint index rwkvtune writes: move this "
                              f"checkpoint away")
    root, seen = folder.resolve(), set()
    for key, info in data.items():
        rel = getattr(info, "relative_path", None)
        if rel in seen:
            continue
        fqn = getattr(key, "fqn", key)
        if not (isinstance(rel, str) and rel not in ("", ".", "..") and "/" not in rel and "\\" not in rel
                and "\0" not in rel and not os.path.isabs(rel)):
            raise CheckpointError(f"{index}: tensor {fqn} is stored at {rel!r}, outside the checkpoint folder "
                                  f"(expected a file name like __0_0.distcp in {folder}); rwkvtune reads nothing "
                                  f"there: move this checkpoint away")
        target = folder / rel
        if target.is_symlink() and target.resolve().parent != root:
            raise CheckpointError(f"{target}: a link to {target.resolve()}, outside the checkpoint folder; rwkvtune "
                                  f"reads shards only inside it: replace the link by the file, or move this "
                                  f"checkpoint away")
        seen.add(rel)
    for key, info in data.items():
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointError(f"{index}: tensor {getattr(key, 'fqn', key)} has byte range offset={offset!r}, "
                                  f"length={length!r} (expected non-negative integers); the index is damaged: move "
                                  f"this checkpoint away")


def check_files(folder: Path, metadata, nonce: int | None) -> None:
    """Every shard file the index names exists, holds every byte range the index gives it, and
    (checkpoints that carry a shard tag) is the file its writer wrote in this save. Reads only the
    index, the files' sizes and each file's tag (about 1 KB)."""
    check_storage_paths(folder, metadata)
    ends: dict[str, tuple[int, str]] = {}
    for key, info in metadata.storage_data.items():
        end = info.offset + info.length
        if end > ends.get(info.relative_path, (-1, ""))[0]:
            ends[info.relative_path] = (end, getattr(key, "fqn", str(key)))
    sizes = {}
    for rel in sorted(ends):
        try:
            sizes[rel] = (folder / rel).stat().st_size
        except FileNotFoundError as e:
            raise CheckpointError(f"{folder}: shard file {rel} is missing (the index lists it); the checkpoint is "
                                  f"incomplete: move it away to resume from the one before it") from e
        except OSError as e:

            raise read_error(folder / rel, e) from e
    _check_tags(folder, metadata, nonce, sizes)
    for rel, (end, fqn) in sorted(ends.items()):
        if sizes[rel] < end:
            raise CheckpointError(f"{folder}: shard file {rel} is {sizes[rel]:,} bytes, the index needs {end:,} (for "
                                  f"{fqn}); it is truncated: move this checkpoint away to resume from the one "
                                  f"before it")


def _check_tags(folder: Path, metadata, nonce: int | None, sizes: dict[str, int]) -> None:
    """Each shard tag row (see SHARD_TAG) read from the file the index gives it: the process index
    its writer recorded must be the row's, and the nonce the one trainer.pt recorded."""
    for key, info in metadata.storage_data.items():
        if getattr(key, "fqn", None) != SHARD_TAG:
            continue
        expected = int(key.offset[0])
        rel = info.relative_path
        if info.length > _TAG_MAX_BYTES or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{folder / '.metadata'}: the shard tag of {rel} is not one rwkvtune writes; move "
                                  f"this checkpoint away")
        if info.offset + info.length > sizes[rel]:
            continue  # truncated: said by the size check
        try:
            with open(folder / rel, "rb") as f:
                f.seek(info.offset)
                row = torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
            writer, saved_nonce = (int(v) for v in row.reshape(-1).tolist())
        except OSError as e:

            raise read_error(folder / rel, e) from e
        except Exception as e:  # not a tag at that place: the bytes are not the ones the index means
            raise CheckpointError(f"{folder}: shard file {rel} is not the file the index describes (no shard tag at "
                                  f"byte {info.offset:,}: {type(e).__name__}); the shard files were swapped, replaced "
                                  f"or damaged: move this checkpoint away to resume from the one before it") from e
        if writer != expected:
            raise CheckpointError(f"{folder}: shard file {rel} holds process {writer}'s shard, where the index expects "
                                  f"process {expected}'s; the shard files were swapped or renamed: move this "
                                  f"checkpoint away to resume from the one before it")
        if nonce is not None and saved_nonce != nonce:
            raise CheckpointError(f"{folder}: shard file {rel} was written by another save than this checkpoint's "
                                  f"{TRAINER_FILE} (copied from another checkpoint or run); move this checkpoint away "
                                  f"to resume from the one before it")


class SafePlanner(DefaultLoadPlanner):
    """Loads the checkpoint's non-tensor entries (optimizer hyper-parameters) with weights_only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save(run, state: checkpointing.CheckpointState, *, module, optimizer, sampler, cfg, d) -> Path:
    """Every process writes its shard into a temporary folder; the main process adds trainer.pt,
    renames the folder into place, points ``latest`` at it and prunes old checkpoints."""
    step = state.step
    final, tmp = run.checkpoint_dir(step), run.checkpoint_temp_dir(step)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    nonce = [secrets.randbits(62) if d.main else None]
    dist.broadcast_object_list(nonce, src=0)  # also the barrier: the folder exists before anyone writes
    model_sd, optim_sd = _model_state(module, optimizer)
    shards = {"model": model_sd, "optim": optim_sd}
    tag = _shard_tag(module, nonce[0])
    if tag is not None:
        shards[SHARD_TAG] = tag
    try:
        dcp.save(shards, checkpoint_id=str(tmp))
    except CheckpointException as e:  # every process gets every process's failures
        raise _save_error(e, final, tmp, d, needed=tensor_bytes([model_sd, optim_sd]) * d.world_size) from e
    rank_states = None
    if d.world_size > 1:  # each process's own method state and RNGs, in the folder (renamed with it)
        rank_states = rank_state.write(tmp, d, step, nonce[0], state.method_state)  # a collective
    if d.main:
        meta = {**state.fields(), "sampler": sampler.state_dict(), "rng": checkpointing.rng_state(),
                "config": cfg.to_dict(), "world_size": d.world_size, "shard_nonce": nonce[0]}
        if rank_states:
            meta[rank_state.KEY] = rank_states
        atomic_torch_save(meta, tmp / TRAINER_FILE)
    manifest.seal_sharded(tmp, step)  # every process: manifest.json (process files included) before the rename
    if d.main:
        shutil.rmtree(final, ignore_errors=True)  # a resumed run saving the same step again
        tmp.rename(final)
        atomic_write_text(run.latest, final.name + "\n")
        checkpointing.prune(run, step, cfg.keep_checkpoints)
    dist.barrier()  # no process goes on (or exits) before the checkpoint is in place
    return final


def _model_state(module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of what a checkpoint holds: the trainable tensors and their
    AdamW state, without a quantized base's buffers (see OPTIONS)."""
    model_sd, optim_sd = get_state_dict(module, optimizer, options=OPTIONS)
    codes = quantized_state_keys(quantized_layers(module))
    return {k: v for k, v in model_sd.items() if k not in codes}, optim_sd


def _shard_tag(module, nonce: int):
    """This process's row of the shard tag (see SHARD_TAG), on the mesh FSDP shards the module over;
    None for a module without sharded parameters."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = next((p.device_mesh for p in module.parameters() if isinstance(p, DTensor)), None)
    if mesh is None or mesh.ndim != 1:
        return None
    local = torch.tensor([[mesh.get_local_rank(), nonce]], dtype=torch.int64, device=mesh.device_type)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size([mesh.size(), 2]),
                              stride=(2, 1))


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


def load_latest(out, *, module, optimizer, sampler) -> checkpointing.CheckpointState:
    """Restore the checkpoint ``--resume out`` names (resharded to this run's processes).

    First every process checks the checkpoint alike without collectives (trainer.pt, the index, the
    shard files, the data position) and the processes agree on the first refusal: each raises it,
    rank 0 says it. Then ``dcp.load`` reads the shards; its failures (a CheckpointException, which is
    a BaseException, carrying every process's error) become one CheckpointError on every process."""
    path, error = Path(str(out)), None
    try:
        path = checkpointing.resume_checkpoint(out)
        if not path.is_dir():
            raise CheckpointError(f"{path}: a checkpoint of a run without sharding; resume it with strategy ddp "
                                  f"(drop strategy=fsdp)")
        meta = checkpointing.read_checkpoint_info(path)
    except RwkvtuneError as e:
        error = e
    except Exception as e:  # anything else met reading the checkpoint: said, and by every process
        error = _read_error(path, e)
    agree(error)
    try:  # a collective: each file's size and checksum against manifest.json before any file is parsed
        manifest.verify_sharded(path)
    except RwkvtuneError as e:  # every process raises the same line
        raise on_every_rank(e) from e.__cause__
    try:
        check_files(path, SafeReader(path).read_metadata(), meta.get("shard_nonce"))
        sampler.load_state_dict(meta["sampler"])
    except RwkvtuneError as e:
        error = e
    except Exception as e:
        error = _read_error(path, e)
    agree(error)
    model_sd, optim_sd = _model_state(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner())
    except CheckpointException as e:  # raised alike on every process, with every process's failures
        raise on_every_rank(_load_error(path, e)) from e
    except Exception as e:
        raise _load_error(path, e) from e
    try:
        manifest.check_loaded_finite(path, state)  # a collective: every process raises the same line
    except RwkvtuneError as e:
        raise on_every_rank(e) from e.__cause__
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=LOAD_OPTIONS)
    checkpointing.set_rng_state(meta["rng"])
    return checkpointing.CheckpointState.read(meta)


def _read_error(path: Path, e: Exception) -> CheckpointError:
    error = CheckpointError(f"{path}: cannot read this sharded checkpoint ({type(e).__name__}: {_first_line(e)})")
    error.__cause__ = e
    return error


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _load_error(path: Path, e: BaseException) -> CheckpointError:
    """One line for a failed ``dcp.load``: the first process's failure (a CheckpointException's
    str() is every process's traceback)."""
    failures = getattr(e, "failures", None) if isinstance(e, CheckpointException) else None
    if failures:
        e = failures[min(failures)][0]
    if isinstance(e, RwkvtuneError):
        return CheckpointError(f"{path}: {_first_line(e)}")
    return CheckpointError(f"{path}: cannot read this sharded checkpoint ({type(e).__name__}: {_first_line(e)}); it is "
                           f"damaged, incomplete or from another model or mode: move it away to resume from the one "
                           f"before it")
