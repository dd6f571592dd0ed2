"""Resumable checkpoints: save, find, check and load them; the config a resumed run continues with.

A checkpoint (``checkpoints/step-NNNNNNN.pt`` in the run directory, see
:mod:`rwkvtune.train.run_dir`) holds the trainable tensors, the optimizer, the data position, the
training method's state and every RNG, as tensors and plain values only: it loads with
``torch.load(weights_only=True)``, so a file planted there cannot run code. Every file is written
to a temporary name and renamed, so a process killed at any moment leaves either the previous or
the new checkpoint, never a torn one. Each carries a manifest (every tensor's shape, dtype and
checksum, the step), checked before a resume loads anything (:mod:`rwkvtune.train.manifest`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rwkvtune.data.binidx import bin_path, idx_path, strip_suffix
from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.io.checkpoint import check_pickle_size
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train import manifest
from rwkvtune.train.run_dir import CHECKPOINT_NAME, RANK_STATE_NAME, RunDir
from rwkvtune.utils import atomic_torch_save, atomic_write_text, read_error


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so the checkpoint loads with
    ``torch.load(weights_only=True)`` (no pickled numpy objects)."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
    else:  # checkpoints of rwkvtune <= 0.1.0 kept numpy's own tuple
        np.random.set_state(np_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass
class CheckpointState:
    """A checkpoint's counters beside its tensors: what ``save`` writes and ``load_latest`` returns."""

    step: int  # optimizer steps done
    tokens: int  # tokens the model has processed (the metrics' running total)
    method_state: dict = dataclasses.field(default_factory=dict)  # the method's state_dict (GRPO's rollouts)

    def fields(self) -> dict:
        """The checkpoint file's keys for these counters."""
        return {"step": self.step, "tokens": self.tokens, "method": self.method_state or {}}

    @classmethod
    def read(cls, ck: dict) -> "CheckpointState":
        """From a checkpoint file's (or trainer.pt's) mapping, already verified."""
        return cls(step=int(ck["step"]), tokens=int(ck["tokens"]), method_state=ck.get("method", {}))


def save(run: RunDir, state: CheckpointState, *, module, optimizer, sampler, cfg,
         rank_states: dict | None = None) -> Path:
    """Write the checkpoint of ``state.step``, point ``latest`` at it, keep the newest keep_checkpoints.

    ``rank_states``: a run on several processes, each of which has written its own state file
    (:mod:`rwkvtune.train.rank_state`); recorded here, so the resume reads those files. This file's
    rename is what makes them part of the checkpoint."""
    path = run.checkpoint(state.step)
    trainable = {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
    ck = {**state.fields(), "trainable": trainable, "optimizer": optimizer.state_dict(),
          "sampler": sampler.state_dict(), "rng": rng_state(), "config": cfg.to_dict()}
    if rank_states:
        ck["rank_states"] = rank_states
    atomic_torch_save(manifest.with_manifest(ck), path)  # one file with its manifest: complete or absent
    atomic_write_text(run.latest, path.name + "\n")
    prune(run, state.step, cfg.keep_checkpoints, rank_states["nonce"] if rank_states else None)
    return path


def prune(run: RunDir, step: int, keep: int, nonce: int | None = None) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (the one just saved). Newer ones are
    left alone: they belong to the run a resume from an earlier checkpoint branched off (it lowers
    the lr after a divergence) and are replaced when this run saves the same steps.

    Per-process state files up to ``step`` go with their checkpoint, and those of ``step`` itself
    from another save than this one's ``nonce`` (a branch's, or a save killed before its main file)."""
    upto = [p for p in run.checkpoint_files() if run.checkpoint_step_of(p) <= step]
    for old in upto[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    kept = {run.checkpoint_step_of(p) for p in run.checkpoint_files() if p.suffix == ".pt"}
    for f in run.rank_state_files():
        m = RANK_STATE_NAME.fullmatch(f.name)
        s = int(m["step"])
        if s <= step and (s not in kept or (s == step and int(m["nonce"], 16) != nonce)):
            f.unlink(missing_ok=True)


def latest_checkpoint(out: str | Path) -> Path:
    """The newest resumable checkpoint of the run in ``out``.

    ``checkpoints/latest`` names it; the name is only trusted when it is a checkpoint file name of
    this run's own directory (``step-NNNNNNN.pt``, a regular file, no link leading elsewhere), so a
    planted pointer cannot make a resume read any other file on disk.
    """
    if not Path(out).is_dir():
        what = "not a directory" if Path(out).exists() else "no such directory"
        raise CheckpointError(f"--resume {out}: {what}; pass the --out directory of the run to continue")
    run = RunDir(out)
    pointer = run.latest
    if pointer.is_file() and not pointer.is_symlink():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if run.is_own_checkpoint(name):
            return run.checkpoints / name
    found = run.checkpoint_files()
    if not found:
        raise CheckpointError(f"{run.checkpoints}: no resumable checkpoint found; the run saved none yet "
                              f"(lower --save-every) or --resume points at the wrong directory")
    return found[-1]


def run_dir_of(resume: str | Path) -> Path:
    """The run directory that ``--resume`` names: the directory itself, or the run of a checkpoint
    (``RUN/checkpoints/step-NNNNNNN.pt``, or a sharded folder) given to continue from that one."""
    p = Path(resume)
    if CHECKPOINT_NAME.fullmatch(p.name) and p.parent.name == "checkpoints":
        return p.parent.parent
    return p


def resume_checkpoint(resume: str | Path) -> Path:
    """The checkpoint ``--resume`` continues from: the one given, or the run's newest."""
    run = RunDir(run_dir_of(resume))
    if run.path == Path(resume):
        return latest_checkpoint(resume)
    name = Path(resume).name
    if not run.is_own_checkpoint(name):
        kept = ", ".join(p.name for p in run.checkpoint_files()) or "none"
        raise CheckpointError(f"--resume {resume}: no such checkpoint in {run.checkpoints} (it holds: {kept}); pass "
                              f"one of them, or the run directory {run.path} to continue from the newest")
    return run.checkpoints / name


def completed_summary(out: str | Path, step: int, total_steps: int) -> dict | None:
    """summary.json of a run that already finished at checkpoint ``step`` (>= total_steps), else None.

    summary.json is written last, after final.pth: a run killed while finishing has none (or an
    older one) and must finish again rather than count as complete.
    """
    if step < total_steps:
        return None
    try:
        summary = json.loads(RunDir(out).summary.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == step else None


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint_info(path)["step"])


def read_checkpoint_info(path: Path) -> dict:
    """A checkpoint's step, config and other small entries, without reading its tensor data: of a
    ``.pt`` file (memory-mapped) or of a sharded folder's ``trainer.pt``, checked against the
    checkpoint's manifest (:mod:`rwkvtune.train.manifest`)."""
    if not Path(path).is_dir():
        info = _load(path, mmap=True)
        manifest.check_values(path, info)
        return info
    meta = Path(path) / "trainer.pt"
    if not meta.is_file():
        raise CheckpointError(f"{path}: sharded checkpoint without trainer.pt; it is incomplete: move it away to "
                              f"resume from the one before it")
    check_pickle_size(meta)
    try:
        info = torch.load(meta, map_location="cpu", weights_only=True)
    except OSError as e:
        raise read_error(meta, e) from e
    except Exception as e:
        raise CheckpointError(f"{meta}: cannot read ({type(e).__name__}); it holds Python objects rwkvtune never "
                              f"unpickles, or is corrupt: move this checkpoint away") from e
    if not isinstance(info, dict) or not {"step", "config", "sampler", "rng"} <= set(info):
        raise CheckpointError(f"{meta}: not written by rwkvtune train; move this checkpoint away")
    manifest.check_sharded_info(path, info)
    return info


def _numpy_globals() -> list:
    """What checkpoints of rwkvtune <= 0.1.0 need besides tensors: numpy's RNG key array (a plain
    uint32 ndarray). Allowed by name, so nothing else in a file can be unpickled."""
    core = getattr(np, "_core", None) or np.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def _load(path: Path, mmap: bool = False) -> dict:
    """A resumable checkpoint, or a CheckpointError saying which file is unreadable.

    Loaded with ``weights_only=True``: tensors, containers and plain values only, so a file planted
    in ``checkpoints/`` cannot run code. ``mmap=True`` leaves tensor data on disk: for reading only
    the saved config, which would otherwise read the whole file (weights and optimizer state) a
    second time on resume.
    """
    check_pickle_size(path, "this resumable checkpoint")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as e:  # unreadable, not corrupt
        raise read_error(path, e, what="this resumable checkpoint") from e
    except Exception as e:
        refused = "weights only" in str(e).lower() or "weights_only" in str(e)
        why = ("it holds Python objects other than tensors and plain values, which rwkvtune never unpickles "
               "(loading them could run code); it was not written by rwkvtune train: delete it or move it away"
               if refused else "it is corrupt: move it away to resume from the one before it")
        raise CheckpointError(f"{path}: cannot read this resumable checkpoint ({type(e).__name__}); {why}") from e
    if not isinstance(ck, dict) or not {"step", "trainable", "optimizer", "config"} <= set(ck):
        raise CheckpointError(f"{path}: not a resumable checkpoint written by rwkvtune train; move it away")
    return ck


# Options that --resume may change: bookkeeping and runtime ones, which do not alter the run being
# continued, and the learning-rate schedule (a run that diverged continues with a lower lr; the
# schedule is a function of the step, so the new values apply from the resumed step on).
SCHEDULE_FIELDS = ("lr", "lr_final", "warmup_steps")
RESUME_MAY_CHANGE = ("max_steps", "resume", "out", "save_every", "keep_checkpoints", "eval_every", "log_every",
                     "tensorboard", "wandb", "device", "eval_data", "cpu_offload", "eval_on_start",
                     "threads", "memory_check", "eval_tasks", "eval_tasks_limit", "keep_freed_memory") + SCHEDULE_FIELDS

# Options that name files. A run saves them absolute, so `--resume` works from any directory, and
# compares them as paths, so a relative path on the command line equals the saved absolute one.
PATH_FIELDS = ("model", "data", "eval_data")


def _names_file(field: str, value: str) -> bool:
    """Whether ``value`` of a PATH_FIELDS option is an existing path (not a registry model name)."""
    if field == "model":
        # load_model_config reads a name with these suffixes as a path (when it exists), others as names
        return value.lower().endswith((".pth", ".pt", ".json")) and os.path.exists(value)
    prefix = strip_suffix(value)  # a binidx prefix names PREFIX.idx + PREFIX.bin, not itself
    return os.path.exists(value) or os.path.isfile(idx_path(prefix)) or os.path.isfile(bin_path(prefix))


def absolute_paths(cfg):
    """``cfg`` (changed in place) with its existing file paths made absolute; returns it."""
    for k in PATH_FIELDS:
        value = getattr(cfg, k)
        if value and _names_file(k, value):
            setattr(cfg, k, os.path.abspath(value))
    return cfg


def _same(field: str, given, saved) -> bool:
    if given == saved:
        return True
    # Relative paths are taken from the current directory, as data loading does (so an old run that
    # saved relative paths still resumes from the directory it ran in).
    return (field in PATH_FIELDS and isinstance(given, str) and isinstance(saved, str)
            and os.path.abspath(given) == os.path.abspath(saved))


def resumed_config(out: str | Path, cfg):
    """The saved run's config (so `--resume DIR` alone continues it); a given max_steps extends it.

    Other options given with --resume must equal the saved ones (they would silently change or be
    ignored), except those in RESUME_MAY_CHANGE. ``out`` is the run directory or one of its
    checkpoints (see :func:`resume_checkpoint`).
    """
    path = resume_checkpoint(out)
    ck = read_checkpoint_info(path)
    saved = TrainConfig().update(ck["config"], source=f"{out}/checkpoints")
    # key by key, a method option as "grpo.epsilon"
    default, given = TrainConfig().flat_dict(), cfg.flat_dict()
    saved_d = saved.flat_dict()
    changed = [k for k, v in given.items()
               if k not in RESUME_MAY_CHANGE and v != default[k] and not _same(k, v, saved_d[k])]
    if changed:
        was = ", ".join(f"{k}={saved_d[k]!r}" for k in changed)
        now = ", ".join(f"{k}={given[k]!r}" for k in changed)
        raise ConfigError(f"--resume {out}: the run was saved with {was} but this command sets {now}; a resumed run "
                          f"keeps its config (only max_steps, the lr schedule (lr, lr_final, warmup_steps) and "
                          f"logging/saving/runtime options may change): drop those options, or start a new run with "
                          f"another --out")
    for k in RESUME_MAY_CHANGE:
        # Given: set by a flag, recipe or override (sources), or differing from the default (a
        # config built in Python). max_steps too: it extends the run.
        if k not in ("resume", "out") and (k in cfg.sources or given[k] != default[k]):
            setattr(saved, k, getattr(cfg, k))
            # validate() names where a value came from: this command's source, not the checkpoint
            if k in cfg.sources:
                saved.sources[k] = cfg.sources[k]
            else:
                saved.sources.pop(k, None)
    saved.resume = str(out)
    saved.out = str(run_dir_of(out))
    return saved


def schedule_changes(out: str | Path, cfg) -> dict[str, dict]:
    """{field: {"from": saved, "to": now}} for the lr schedule fields that this resume changes
    (for the metrics row that records the change at the resumed step)."""
    saved = read_checkpoint_info(resume_checkpoint(out))["config"]
    return {k: {"from": saved.get(k), "to": getattr(cfg, k)} for k in SCHEDULE_FIELDS
            if k in saved and saved[k] != getattr(cfg, k)}


def load_latest(out: str | Path, *, module, optimizer, sampler) -> CheckpointState:
    """Restore the checkpoint ``--resume out`` names (the run's newest, or the one given) into the
    run; returns its counters."""
    path = resume_checkpoint(out)
    if path.is_dir():
        raise CheckpointError(f"{path}: a sharded checkpoint (strategy fsdp); resume it with strategy fsdp")
    ck = _load(path)
    # Nothing goes into the model or the optimizer before every tensor matches the manifest and
    # this run's model (a NaN saved by a diverging step is named here, not met as a NaN loss).
    manifest.verify_pt(path, ck)
    manifest.check_fits(path, ck, module, optimizer)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, t in ck["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(ck["optimizer"])
    sampler.load_state_dict(ck["sampler"])
    set_rng_state(ck["rng"])
    return CheckpointState.read(ck)
