"""Each process's own part of a resumable checkpoint of a run on several processes.

Weights, optimizer and data position are one for the whole run (the main process's file, or the
shards every process reads from); what differs per process is the training method's state (GRPO with
``num_iterations`` > 1: the rollouts of the current batch, which the next steps of the batch reuse,
sampled by each process for its own prompts) and the RNGs. Each process saves them in its own file
(:meth:`RunDir.rank_state_file`), written atomically, and reads back its own, so a run resumed
on the same number of processes continues as the uninterrupted one, inside a batch too.

The main file records each file's size and CRC-32 (covered by the main file's own manifest), checked
before the file is parsed, as every other file of a checkpoint. The file is then read with
``torch.load(weights_only=True)`` (tensors and plain values only, so a planted file cannot run code)
and checked: its format tag, the process index and count it was written for (this process's), its
step and the save's nonce (those of the main file: a file of another save or run is refused), then
the method's state by the method itself.

On another number of processes the main file's state (process 0's) is used, as before these files
existed: such a resume is refused inside a batch (:func:`rwkvtune.train.strategy.resume_world_size`),
and at a batch boundary the method's state is not used. (Process 0's state is also kept in the main
file, which one process reads; the few MB of rollouts twice cost nothing beside the optimizer state.)
"""

from __future__ import annotations

import secrets
from pathlib import Path

import torch
import torch.distributed as dist

from rwkvtune.errors import CheckpointError, OutputError, RwkvtuneError, on_every_rank
from rwkvtune.io.checkpoint import check_pickle_size
from rwkvtune.train import checkpointing, manifest
from rwkvtune.train.run_dir import RunDir
from rwkvtune.utils import atomic_torch_save, read_error

FORMAT = "rwkvtune-rank-state"
VERSION = 1
# The main file's record of the processes' files: {"world_size": N, "nonce": int, "files": [{"bytes":
# int, "crc32": "8 hex digits"} for each process]}. The main file's manifest covers it (its values'
# checksum; trainer.pt's by manifest.json), so each file is checked, as every other file of a
# checkpoint, by its size and checksum before it is parsed.
KEY = "rank_states"


def shared_nonce(d) -> int:
    """A random number drawn by the main process and known to every process (a collective)."""
    nonce = [secrets.randbits(62) if d.main else None]
    if d.world_size > 1:
        dist.broadcast_object_list(nonce, src=0)
    return int(nonce[0])


def _gather(d, value) -> list:
    if d.world_size == 1:
        return [value]
    out = [None] * d.world_size
    dist.all_gather_object(out, value)  # our own small values, never a file's
    return out


def write_own(checkpoint: Path, d, step: int, nonce: int, method_state: dict | None) -> dict:
    """Write this process's state file for ``checkpoint`` (atomically); returns its size and
    CRC-32, as the main file records them."""
    path = RunDir.rank_state_file(checkpoint, d.rank, d.world_size, nonce)
    atomic_torch_save({"format": FORMAT, "version": VERSION, "rank": d.rank, "world_size": d.world_size,
                       "step": step, "nonce": nonce, "method": method_state or {}, "rng": checkpointing.rng_state()},
                      path)
    try:
        return {"bytes": path.stat().st_size, "crc32": f"{manifest.file_crc(path):08x}"}
    except OSError as e:
        raise OutputError(f"{path}: cannot read back this process's checkpoint state to hash it: {e}") from e


def write(checkpoint: Path, d, step: int, nonce: int, method_state: dict | None) -> dict:
    """Collective: every process writes its own state file (:func:`write_own`); returns, on every
    process, the record the main file keeps under :data:`KEY`. A failed write (disk full) on any
    process is raised on every process, so none waits for the others; rank 0 says it."""
    mine, error = None, None
    try:
        mine = write_own(checkpoint, d, step, nonce, method_state)
    except RwkvtuneError as e:
        error = e
    everyone = _gather(d, (mine, None if error is None else str(error)))
    first = next((err for _, err in everyone if err), None)
    if first is not None:
        raise on_every_rank(error if error is not None and str(error) == first else OutputError(first)) from error
    return {"world_size": d.world_size, "nonce": nonce, "files": [f for f, _ in everyone]}


def saved_for(info: dict, d, source: Path) -> dict | None:
    """The main file's :data:`KEY` record when every process of this run's number saved its own
    state; None otherwise (one process, another number, or a checkpoint from before). A record
    for this number that is malformed is refused (falling back to process 0's state would be
    the silent error these files exist to prevent)."""
    entry = info.get(KEY)
    if d.world_size == 1 or entry is None or (isinstance(entry, dict) and entry.get("world_size") != d.world_size):
        return None
    files = entry.get("files") if isinstance(entry, dict) else None
    if not (isinstance(entry, dict) and type(entry.get("nonce")) is int and isinstance(files, list)
            and len(files) == d.world_size
            and all(isinstance(f, dict) and type(f.get("bytes")) is int and isinstance(f.get("crc32"), str)
                    for f in files)):
        raise CheckpointError(f"{source}: its record of the processes' own state files ({KEY}) is malformed; the "
                              f"checkpoint is damaged: move it away to resume from the one before it")
    return entry


def read(checkpoint: Path, d, step: int, entry: dict) -> dict:
    """This process's state file of ``checkpoint`` (``entry``: the main file's record, see
    :func:`saved_for`), checked (see the module docstring) but for the method's state, which the
    method checks."""
    nonce = entry["nonce"]
    path = RunDir.rank_state_file(checkpoint, d.rank, d.world_size, nonce)
    fix = "move this checkpoint away to resume from the one before it"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CheckpointError(f"{path}: not a regular file (a link or a folder); rwkvtune reads only the files it "
                              f"wrote there: {fix}")
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the checkpoint {checkpoint.name} was saved by {d.world_size} "
                              f"processes, each with its own state file, and this one (process {d.rank}) is not "
                              f"there: {fix}")
    record = entry["files"][d.rank]
    try:
        size = path.stat().st_size
        crc = f"{manifest.file_crc(path):08x}" if size == record["bytes"] else None
    except OSError as e:
        raise read_error(path, e, what="this process's checkpoint state") from e
    if size != record["bytes"] or crc != record["crc32"]:
        found = f"{size} bytes" if size != record["bytes"] else f"crc32 {crc}"
        wanted = f"{record['bytes']} bytes" if size != record["bytes"] else f"crc32 {record['crc32']}"
        raise CheckpointError(f"{path}: {found}, expected {wanted} (recorded by {checkpoint.name} when saved); the "
                              f"file was damaged, replaced or changed since: {fix}")
    check_pickle_size(path, "this process's checkpoint state")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise read_error(path, e, what="this process's checkpoint state") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this process's checkpoint state ({type(e).__name__}); it is "
                              f"corrupt or holds Python objects rwkvtune never unpickles: {fix}") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a process state file written by rwkvtune train (expected format "
                              f"{FORMAT!r}): {fix}")
    want = {"version": VERSION, "rank": d.rank, "world_size": d.world_size, "step": step, "nonce": nonce}
    for key, expected in want.items():
        found = ck.get(key)
        if type(found) is not int or found != expected:
            what = {"version": "format version", "rank": "process index", "world_size": "number of processes",
                    "step": "step", "nonce": "save nonce (of the checkpoint's main file)"}[key]
            raise CheckpointError(f"{path}: {what} {found!r}, expected {expected!r}; the file belongs to another "
                                  f"process, save or run (copied or renamed): {fix}")
    if not isinstance(ck.get("method"), dict) or not isinstance(ck.get("rng"), dict):
        raise CheckpointError(f"{path}: holds no method state or RNG state (expected two dicts): {fix}")
    return ck


def restore(checkpoint: Path, info: dict, d, method, main_state: dict) -> None:
    """Give ``method`` this process's state, and set this process's RNGs: from its own file when
    every process of this number saved one (``info``: the checkpoint's main entries), else the
    main file's ``main_state`` (whose RNGs the loader has set already). A CheckpointError names
    the file whose state is wrong."""
    entry = saved_for(info, d, checkpoint)
    if entry is None:
        state, rng, source = main_state, None, checkpoint
    else:
        own = read(checkpoint, d, int(info["step"]), entry)
        state, rng = own["method"], own["rng"]
        source = RunDir.rank_state_file(checkpoint, d.rank, d.world_size, entry["nonce"])
    try:
        method.load_state_dict(state)
    except RwkvtuneError as e:
        raise CheckpointError(f"{source}: {e}") from e
    if rng is not None:
        try:
            checkpointing.set_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{source}: its RNG state is malformed ({type(e).__name__}); move this checkpoint "
                                  f"away to resume from the one before it") from e
