"""Manifests of resumable checkpoints: what a checkpoint held when it was written, checked before a
resume puts any of it into the model or the optimizer.

A resume trusts nothing it reads back. A ``.pt`` checkpoint whose tensor was replaced by a scalar
would be broadcast into the weight, a deleted tensor would silently keep its fresh init, flipped
bytes or a NaN written into a shard would train on, a step beyond the run would end it at once.
So every checkpoint carries a manifest, written with it:

* ``.pt`` (one process, DDP): under the key ``manifest`` of the same file, so the checkpoint and
  its manifest are one atomic write (a process killed at any moment leaves the previous checkpoint
  or the new one, each with its manifest). It lists every tensor of the file (trainable weights,
  AdamW moments and step counts, RNG states) by its path, e.g. ``optimizer/state/3/exp_avg``, with
  its shape, dtype and CRC-32, and a CRC-32 of the plain values under each top-level entry (step,
  tokens, the sampler's data position, the RNGs' scalar parts, the config, the method's state,
  the optimizer's hyper-parameters).
* a sharded folder (FSDP, ``torch.distributed.checkpoint``): ``manifest.json`` with the size and
  CRC-32 of every file of the folder (each process's shard, the index, ``trainer.pt``) and the
  step. It is written into the temporary folder before the folder is renamed into place, so a
  folder under its final name always has its manifest.

CRC-32 (zlib), not SHA-256: this guards against damage (bit rot, a torn copy, a hand edit), not
against someone who rewrites the manifest too; CRC-32 runs at about 1.6 GB/s per core here,
SHA-256 at 1.0 GB/s, and both release the GIL, so tensors are hashed on up to 8 threads.
``bench/bench_manifest.py`` measures the cost on the 0.1B shape.

Checkpoints written before manifests existed resume with a warning: everything but the checksums
is still checked (names and shapes against the model, dtypes, finiteness, the step).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch

from rwkvtune import log
from rwkvtune.errors import CheckpointError
from rwkvtune.tensor_checks import count_non_finite
from rwkvtune.train.run_dir import CHECKPOINT_NAME, RunDir
from rwkvtune.utils import atomic_write_text

MANIFEST_KEY = "manifest"  # in a .pt checkpoint
MANIFEST_FILE = "manifest.json"  # in a sharded checkpoint folder
VERSION = 1
_MANIFEST_MAX_BYTES = 64 << 20  # a manifest.json larger than this is not one rwkvtune wrote
_CHUNK = 64 << 20  # bytes read at a time when hashing a file


def _threads() -> int:
    """Threads hashing tensors or files: zlib.crc32 releases the GIL, so they run in parallel. As
    many as torch computes with (the run's --threads), at most 8: more rarely helps (memory
    bandwidth)."""
    return max(1, min(8, torch.get_num_threads()))


# ------------------------------------------------------------------------------------ helpers
def tensor_crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's values in row-major order (its storage layout does not matter)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.view(torch.uint8).numpy()) & 0xFFFFFFFF


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


def _parallel(fn, items: list) -> list:
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(_threads(), len(items))) as pool:
        return list(pool.map(fn, items))


def _walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) of a nest of dicts, lists and tuples; tensors are leaves. Dict keys in sorted
    order (by their repr), so the walk does not depend on insertion order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            yield from _walk(obj[k], f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}/{i}")
    else:
        yield path, obj


def _tensors(ck: dict) -> dict[str, torch.Tensor]:
    return {p: v for p, v in _walk({k: v for k, v in ck.items() if k != MANIFEST_KEY})
            if isinstance(v, torch.Tensor)}


def _values_crc(entry: Any) -> int:
    """CRC-32 of the plain values of one top-level entry, by path (tensors are left out: the
    manifest lists them one by one, which names the one that differs). Reads no tensor data."""
    text = "\n".join(f"{p}={type(v).__name__}:{v!r}" for p, v in _walk(entry) if not isinstance(v, torch.Tensor))
    return zlib.crc32(text.encode("utf-8", "backslashreplace")) & 0xFFFFFFFF


def non_finite(t: torch.Tensor) -> int:
    """Number of NaN/inf values of ``t``. A NaN or inf anywhere makes the sum NaN or inf, so a
    finite sum proves every value finite: one reduction, about 15x faster than
    count_non_finite's isfinite().all() (0.06 s against 1.1 s for a 200 MB tensor here). Summed in
    fp32 at least (fp16 sums overflow at 65504); a non-finite sum (or finite values whose sum
    overflows) is counted exactly. (Could move into tensor_checks.count_non_finite for every loader.)"""
    if t.element_size() > 1:  # fp8 has no sum kernel: counted exactly
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if t.numel() == 0 or bool(torch.isfinite(t.detach().sum(dtype=acc))):
            return 0
    return count_non_finite(t)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _hex(crc: int) -> str:
    return f"{crc:08x}"


def previous_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint of the same run older than ``path`` (what to resume from instead)."""
    path = Path(path)
    m = CHECKPOINT_NAME.fullmatch(path.name)
    if not m or path.parent.name != "checkpoints":
        return None
    older = [p for p in RunDir(path.parent.parent).checkpoint_files()
             if RunDir.checkpoint_step_of(p) < int(m.group(1))]
    return older[-1] if older else None


def damaged(path: Path, what: str) -> CheckpointError:
    """One line: the checkpoint, what differs, and the checkpoint to resume from instead."""
    prev = previous_checkpoint(path)
    advice = (f"resume from {prev} instead (rwkvtune train --resume {prev}), or delete {path}" if prev else
              f"no earlier checkpoint of this run is kept: delete {path} and start the run again")
    return CheckpointError(f"{path}: {what}; the checkpoint was damaged or changed after it was written: {advice}")


def _warn_legacy(path: Path) -> None:
    if not _is_main():
        return
    log.warn(f"{path} has no manifest (written before rwkvtune checked checkpoints): its checksums "
             f"cannot be verified; names, shapes, dtypes, finiteness and the step are still checked")


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------- step checks
def check_step(path: Path, step: Any, manifest_step: Any = None) -> int:
    """The step a checkpoint holds: an int equal to the one in its name (and its manifest's)."""
    path = Path(path)
    named = RunDir.checkpoint_step_of(path) if CHECKPOINT_NAME.fullmatch(path.name) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise damaged(path, f"step is {step!r}, expected a whole number >= 0"
                            + (f" ({named}, as its name says)" if named is not None else ""))
    if manifest_step is not None and step != manifest_step:
        raise damaged(path, f"step differs from its manifest (expected {manifest_step}, found {step})")
    if named is not None and step != named:
        raise damaged(path, f"step differs from its name (expected {named}, found {step})")
    return step


def check_step_within(path: Path, step: int, total_steps: int) -> None:
    """A checkpoint beyond the run's last step would end it at once with nothing trained."""
    if step > total_steps:
        raise CheckpointError(f"{path}: holds step {step}, beyond this run's {total_steps} steps (expected 0.."
                              f"{total_steps}); raise --max-steps to at least {step}, or resume from an earlier "
                              f"checkpoint")


# ---------------------------------------------------------------------- .pt checkpoints
def build(ck: dict) -> dict:
    """The manifest of a ``.pt`` checkpoint's contents (hashes every tensor, on a few threads)."""
    tensors = _tensors(ck)
    names = list(tensors)
    crcs = _parallel(lambda n: tensor_crc(tensors[n]), names)
    return {"version": VERSION, "checksum": "crc32", "step": ck["step"],
            "tensors": {n: {"shape": list(tensors[n].shape), "dtype": _dtype(tensors[n]), "crc32": _hex(c)}
                        for n, c in zip(names, crcs)},
            "values": {k: _hex(_values_crc(v)) for k, v in ck.items() if k != MANIFEST_KEY}}


def with_manifest(ck: dict) -> dict:
    """``ck`` with its manifest under MANIFEST_KEY (the dict to save)."""
    return {**ck, MANIFEST_KEY: build(ck)}


def _manifest_of(path: Path, ck: dict) -> dict | None:
    m = ck.get(MANIFEST_KEY)
    if m is None:
        return None
    ok = (isinstance(m, dict) and m.get("version") == VERSION and isinstance(m.get("tensors"), dict)
          and isinstance(m.get("values"), dict)
          and all(isinstance(e, dict) and {"shape", "dtype", "crc32"} <= set(e) for e in m["tensors"].values()))
    if not ok:
        raise damaged(path, f"its manifest is not one rwkvtune {VERSION=} writes")
    return m


def check_values(path: Path, ck: dict) -> None:
    """The cheap part (no tensor data read: works on a memory-mapped load): the step, and the plain
    values of every top-level entry against the manifest. Legacy checkpoints: the step only."""
    m = _manifest_of(path, ck)
    check_step(path, ck.get("step"), None if m is None else m.get("step"))
    if m is None:
        return
    listed, found = set(m["values"]), {k for k in ck if k != MANIFEST_KEY}
    if listed - found:
        raise damaged(path, f"entry {sorted(listed - found)[0]!r} listed in its manifest is missing")
    if found - listed:
        raise damaged(path, f"entry {sorted(found - listed)[0]!r} is not in its manifest")
    for k in sorted(listed):
        crc = _hex(_values_crc(ck[k]))
        if crc != m["values"][k]:
            raise damaged(path, f"the values of entry {k!r} differ from its manifest (crc32 expected "
                                f"{m['values'][k]}, found {crc})")


def verify_pt(path: Path, ck: dict) -> bool:
    """Every tensor of a loaded ``.pt`` checkpoint against its manifest: the same names, shapes,
    dtypes and checksums, all floating-point values finite. Returns whether it had a manifest
    (a legacy one gets a warning and the finiteness check)."""
    check_values(path, ck)
    m = _manifest_of(path, ck)
    tensors = _tensors(ck)
    sparse = next((n for n, t in tensors.items() if t.layout != torch.strided), None)
    if sparse is not None:
        raise damaged(path, f"tensor {sparse} is stored as a {str(tensors[sparse].layout).removeprefix('torch.')} "
                            f"tensor, expected a dense one")
    if m is not None:
        listed = m["tensors"]
        missing = [n for n in listed if n not in tensors]
        if missing:
            raise damaged(path, f"tensor {missing[0]} listed in its manifest is missing"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in tensors if n not in listed]
        if extra:
            raise damaged(path, f"tensor {extra[0]} is not in its manifest")
        for n, e in listed.items():
            t = tensors[n]
            if list(t.shape) != list(e["shape"]):
                raise damaged(path, f"tensor {n} has shape {list(t.shape)}, expected {list(e['shape'])} (its manifest)")
            if _dtype(t) != e["dtype"]:
                raise damaged(path, f"tensor {n} is {_dtype(t)}, expected {e['dtype']} (its manifest)")
        names = list(listed)
        crcs = _parallel(lambda n: _hex(tensor_crc(tensors[n])), names)
        for n, crc in zip(names, crcs):
            if crc != listed[n]["crc32"]:
                raise damaged(path, f"tensor {n} has crc32 {crc}, expected {listed[n]['crc32']} (its manifest): "
                                    f"its bytes changed")
    else:
        _warn_legacy(path)
    for n, t in tensors.items():
        if t.is_floating_point():
            bad = non_finite(t)
            if bad:
                raise damaged(path, f"tensor {n} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}")
    return m is not None


def check_fits(path: Path, ck: dict, module, optimizer) -> None:
    """The checkpoint against this run's model and optimizer, whatever its manifest says: every
    trainable parameter present with its shape and dtype, the optimizer's groups and moments the
    same sizes, the data position whole numbers >= 0 (what a checkpoint without manifest can
    still be checked for)."""
    trainable = ck["trainable"]
    if not isinstance(trainable, dict):
        raise damaged(path, f"entry 'trainable' is a {type(trainable).__name__}, expected a dict of tensors")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    unknown = [n for n in trainable if n not in params]
    if unknown:
        raise CheckpointError(f"{path}: parameters {unknown[:3]} do not exist in this model; resume with the "
                              f"same model and mode")
    absent = [n for n in params if n not in trainable]
    if absent:
        raise damaged(path, f"trainable tensor {absent[0]} is missing (it would keep its fresh init)"
                            + (f", and {len(absent) - 1} more" if len(absent) > 1 else ""))
    for n, t in trainable.items():
        p = params[n]
        if not isinstance(t, torch.Tensor):
            raise damaged(path, f"trainable {n} is a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != tuple(p.shape):
            raise damaged(path, f"trainable tensor {n} has shape {list(t.shape)}, expected {list(p.shape)} "
                                f"(this model's)")
        if t.dtype != p.dtype:
            raise damaged(path, f"trainable tensor {n} is {_dtype(t)}, expected {_dtype(p)} (this model's)")
    _check_optimizer(path, ck["optimizer"], module, optimizer)
    sampler = ck.get("sampler")
    if isinstance(sampler, dict):
        for key in ("epoch", "position"):
            v = sampler.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise damaged(path, f"sampler {key} is {v!r}, expected a whole number >= 0")


def _check_optimizer(path: Path, saved: Any, module, optimizer) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise damaged(path, "entry 'optimizer' is not an optimizer state (param_groups and state)")
    ours = optimizer.state_dict()["param_groups"]
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in ours]:
        raise damaged(path, f"optimizer has parameter groups of sizes {sizes}, expected "
                            f"{[len(g['params']) for g in ours]} (this run's)")
    # The saved state is keyed by the index each parameter has in the saved groups; the same
    # index in this optimizer's groups is the parameter it is loaded into.
    names = {id(p): n for n, p in module.named_parameters()}
    by_index = {}
    for saved_g, g, our_g in zip(groups, optimizer.param_groups, ours):
        by_index.update(zip(saved_g["params"], zip(g["params"], our_g["params"])))
    for idx, entry in state.items():
        if idx not in by_index or not isinstance(entry, dict):
            raise damaged(path, f"optimizer state {idx!r} belongs to no parameter of its groups")
        p = by_index[idx][0]
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise damaged(path, f"optimizer state {k} of {names.get(id(p), idx)} has shape {list(v.shape)}, "
                                    f"expected {list(p.shape)} (the parameter's)")


# ------------------------------------------------------------------- sharded checkpoints
_SHARD_FILE = re.compile(r"__(\d+)_\d+\.distcp")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value: Any) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p.name != MANIFEST_FILE)


def seal_sharded(folder: Path, step: int) -> None:
    """Collective (every process): hash the files of a sharded checkpoint being written in
    ``folder`` (each process its own shards, the main one the rest), then the main process writes
    ``manifest.json`` there. Call after every file is written, before the folder is renamed."""
    rank, world = _world()
    mine, error = {}, None
    try:
        names = [n for n in _files(folder)
                 if (int(m.group(1)) % world if (m := _SHARD_FILE.fullmatch(n)) else 0) == rank]
        sums = _parallel(lambda n: (os.path.getsize(folder / n), file_crc(folder / n)), names)
        mine = {n: {"bytes": b, "crc32": _hex(c)} for n, (b, c) in zip(names, sums)}
    except OSError as e:
        error = f"{folder}: cannot read back the checkpoint's files to write their manifest: {e}"
    everyone = _gather((mine, error))
    failed = next((err for _, err in everyone if err), None)
    if failed:
        raise CheckpointError(failed)
    if rank == 0:
        files = {n: e for part, _ in everyone for n, e in part.items()}
        atomic_write_text(folder / MANIFEST_FILE, json.dumps(
            {"version": VERSION, "checksum": "crc32", "step": step, "world_size": world,
             "files": dict(sorted(files.items()))}, indent=1) + "\n")


def read_sharded_manifest(path: Path) -> dict | None:
    """A sharded checkpoint's manifest.json, checked for form; None when it has none (legacy)."""
    f = Path(path) / MANIFEST_FILE
    if not f.exists() and not f.is_symlink():
        return None
    if f.is_symlink() or not f.is_file():
        raise damaged(path, f"{MANIFEST_FILE} is not a regular file")
    if f.stat().st_size > _MANIFEST_MAX_BYTES:
        raise damaged(path, f"{MANIFEST_FILE} is {f.stat().st_size} bytes, more than a manifest rwkvtune writes")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(path, f"{MANIFEST_FILE} cannot be read ({type(e).__name__}: {e})") from e
    ok = (isinstance(m, dict) and m.get("version") == VERSION and isinstance(m.get("files"), dict)
          and all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") and isinstance(e, dict)
                  and isinstance(e.get("bytes"), int) and isinstance(e.get("crc32"), str)
                  for n, e in m["files"].items()))
    if not ok:
        raise damaged(path, f"{MANIFEST_FILE} is not a manifest rwkvtune {VERSION=} writes")
    return m


def _check_file(path: Path, name: str, entry: dict) -> str | None:
    f = path / name
    if f.is_symlink() or not f.is_file():
        return f"file {name} listed in its manifest is missing"
    size = f.stat().st_size
    if size != entry["bytes"]:
        return f"file {name} is {size} bytes, expected {entry['bytes']} (its manifest)"
    crc = _hex(file_crc(f))
    if crc != entry["crc32"]:
        return f"file {name} has crc32 {crc}, expected {entry['crc32']} (its manifest): its bytes changed"
    return None


def check_sharded_info(path: Path, info: dict) -> None:
    """The cheap part, on one process: trainer.pt (step, data position, RNGs, config) against the
    manifest, and the step against the manifest and the folder's name."""
    m = read_sharded_manifest(path)
    if m is None:
        check_step(path, info.get("step"))
        return
    entry = m["files"].get("trainer.pt")
    problem = ("file trainer.pt is not in its manifest" if entry is None
               else _check_file(Path(path), "trainer.pt", entry))
    if problem:
        raise damaged(path, problem)
    check_step(path, info.get("step"), m.get("step"))


def verify_sharded(path: Path) -> bool:
    """Collective (every process): every file of the sharded checkpoint ``path`` against its
    manifest (each process checks a share of them; all raise the same error). Returns whether it
    had a manifest."""
    path = Path(path)
    rank, world = _world()
    problem, has = None, True  # problem: a whole message (every process raises the first one)
    try:
        m = read_sharded_manifest(path)
        if m is None:
            has = False
        else:
            names = sorted(m["files"])
            results = _parallel(lambda n: _check_file(path, n, m["files"][n]), names[rank::world])
            what = next((p for p in results if p), None)
            problem = str(damaged(path, what)) if what else None
    except CheckpointError as e:
        problem = str(e)
    except OSError as e:
        problem = str(damaged(path, f"a file of it cannot be read ({e})"))
    failed = next((p for p in _gather(problem) if p), None)
    if failed:
        raise CheckpointError(failed)
    if not has:
        _warn_legacy(path)
    return has


def check_loaded_finite(path: Path, state: dict) -> None:
    """Collective: every floating-point value this process loaded from a sharded checkpoint is
    finite (a NaN saved by a run, or one in a checkpoint without manifest), before training on it."""
    bad = {}
    for name, t in _walk(state):
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.is_floating_point():
                n = non_finite(local)
                if n:
                    bad[name] = n
    total: dict[str, int] = {}
    for part in _gather(bad):
        for name, n in part.items():
            total[name] = total.get(name, 0) + n
    if total:
        name = sorted(total)[0]
        raise damaged(path, f"tensor {name} holds {total[name]} non-finite value(s) (NaN or inf)"
                            + (f"; {len(total) - 1} more tensor(s) do too" if len(total) > 1 else ""))
