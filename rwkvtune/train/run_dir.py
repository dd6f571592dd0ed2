"""The layout of a training run's directory: every file name a run writes, in one place.

::

    config.yaml                  the resolved training config
    metrics.jsonl                one JSON object per logged step (and eval rows)
    rollouts.jsonl               method grpo: every sampled completion with its rewards
    ref_logps.safetensors        method dpo with precompute_ref: the reference's log-probs
    loss.png                     train (and eval) loss curves
    summary.json                 written last: the run is complete
    tb/                          TensorBoard event files
    wandb-run-id                 the wandb run a resume continues
    checkpoints/step-0000050.pt  resumable: trainable weights, optimizer, data position, RNGs
    checkpoints/step-0000050/    the same, sharded over processes (strategy fsdp), with manifest.json
    checkpoints/step-0000050.rank-1-of-2.HEX.pt
                                 several processes (ddp): process 1's own state (the method's, e.g.
                                 GRPO's rollouts, and its RNGs); HEX: the save's nonce, also in
                                 step-0000050.pt. Under fsdp: step-0000050/rank-1-of-2.pt
    checkpoints/latest           name of the newest checkpoint
    final.pth                    official-layout model (full and LoRA modes, merged)
    adapter.pth / state.pth      LoRA adapter / tuned initial state
    state.rwkv-peft.pth          the tuned state in the layout RWKV-PEFT and RWKV Runner load
    run.lock                     while a run trains here: locked by it, naming its pid, host, command
    rwkvtune-run.json            the marker, written first (before run.lock) when a run takes the directory

The marker says "a run of this tool": ``--out`` writes only into a directory that is missing, empty,
or marked (a directory holding anything else, e.g. a user's own config.yaml or loss.png, is refused,
since a run would overwrite those names). Runs of versions before the marker have none: a directory
with resumable checkpoints under checkpoints/ (step-NNNNNNN.pt files or sharded folders) is
recognised as such an older run, which ``--resume`` continues (marking it then) and a new run refuses
as any finished run. A ``--dry-run`` writes nothing, marker included.

With ``save_format: safetensors`` the model, adapter and state are ``.safetensors`` instead.

Temporary names (a killed run leaves them; a run that takes the lock removes them): ``.NAME.PID.HEX.tmp``
of atomic writes (:data:`rwkvtune.utils.TEMP_NAME`) here and in checkpoints/, and
``checkpoints/.step-NNNNNNN.tmp/``, a sharded checkpoint being written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from rwkvtune.bounds import clip
from rwkvtune.utils import TEMP_NAME, atomic_write_text
from rwkvtune import __version__

# step-NNNNNNN.pt: one file (one process, DDP); step-NNNNNNN/: a sharded folder (FSDP)
CHECKPOINT_NAME = re.compile(r"step-(\d{7})(\.pt)?")
# One process's own state beside a checkpoint of several processes (rwkvtune.train.rank_state): in a
# sharded folder rank-R-of-N.pt; beside a ddp file step-NNNNNNN.rank-R-of-N.HEX.pt, named by the
# save's nonce, so a save killed before its main file leaves the previous save's files in place.
RANK_STATE_NAME = re.compile(r"step-(?P<step>\d{7})\.rank-(?P<rank>\d+)-of-(?P<world>\d+)\.(?P<nonce>[0-9a-f]{16})\.pt")
SHARDED_TEMP_NAME = re.compile(r"\.step-\d{7}\.tmp")
LOCK_NAME = "run.lock"
MARKER_NAME = "rwkvtune-run.json"
MARKER_TOOL = "rwkvtune"
_MARKER_MAX_BYTES = 4096  # the marker is one short JSON line; a larger file is not one


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (a temp file of a live writer is not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


class RunDir:
    """Paths of one run directory (nothing is created until something is written)."""

    def __init__(self, path: str | Path, save_format: str = "pth"):
        self.path = Path(path)
        self.suffix = ".safetensors" if save_format == "safetensors" else ".pth"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    rollouts = property(lambda self: self.path / "rollouts.jsonl")
    ref_logps = property(lambda self: self.path / "ref_logps.safetensors")
    loss_plot = property(lambda self: self.path / "loss.png")
    summary = property(lambda self: self.path / "summary.json")
    tensorboard = property(lambda self: self.path / "tb")
    wandb_id = property(lambda self: self.path / "wandb-run-id")
    checkpoints = property(lambda self: self.path / "checkpoints")
    latest = property(lambda self: self.path / "checkpoints" / "latest")
    final = property(lambda self: self.path / f"final{self.suffix}")
    adapter = property(lambda self: self.path / f"adapter{self.suffix}")
    state = property(lambda self: self.path / f"state{self.suffix}")
    state_peft = property(lambda self: self.path / "state.rwkv-peft.pth")
    lock = property(lambda self: self.path / LOCK_NAME)
    marker = property(lambda self: self.path / MARKER_NAME)

    # ---- whose directory it is (see the module docstring)
    def is_marked(self) -> bool:
        """Whether the run marker is here and is this tool's: a regular file (not a link), at most
        a few KB, holding a JSON object with "tool": "rwkvtune"."""
        p = self.marker
        if p.is_symlink() or not p.is_file():
            return False
        try:
            with open(p, "rb") as f:
                raw = f.read(_MARKER_MAX_BYTES + 1)
            info = json.loads(raw.decode("utf-8")) if len(raw) <= _MARKER_MAX_BYTES else None
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(info, dict) and info.get("tool") == MARKER_TOOL

    def mark(self) -> None:
        """Write the marker (atomically), creating the directory if needed."""

        info = {"tool": MARKER_TOOL, "version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(self.marker, json.dumps(info) + "\n")

    def entries(self) -> list[str]:
        """Names in the directory, sorted ([] when it is missing or not a directory)."""
        try:
            return sorted(os.listdir(self.path))
        except OSError:
            return []

    def ownership(self) -> str:
        """"missing" (no directory), "empty", "own" (marked), "legacy" (unmarked, with resumable
        checkpoints: a run of a version before the marker) or "foreign" (anything else)."""
        if not self.path.is_dir():
            return "missing"
        if not self.entries():
            return "empty"
        if self.is_marked():
            return "own"
        return "legacy" if self.checkpoint_files() else "foreign"

    def foreign_problem(self, flag: str = "--out") -> str:
        """The one-line refusal for a directory that holds files no run of this tool wrote."""
        names = self.entries()
        listed = ", ".join(clip(repr(n)[1:-1], 40) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return (f"{flag} {self.path}: the directory holds files that are not a rwkvtune run's ({listed}; no "
                f"{MARKER_NAME}), which a run would overwrite; choose a new or empty directory for {flag}")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}.pt"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def checkpoint_temp_dir(self, step: int) -> Path:
        """Where a sharded checkpoint is written before it is renamed into place."""
        return self.checkpoints / f".step-{step:07d}.tmp"

    @staticmethod
    def rank_state_file(checkpoint: Path, rank: int, world_size: int, nonce: int) -> Path:
        """Where process ``rank`` of ``world_size`` keeps its own state for ``checkpoint`` (a
        sharded folder or a ``.pt`` file) saved with ``nonce``."""
        checkpoint = Path(checkpoint)
        if checkpoint.suffix != ".pt":  # a sharded folder (or its temporary name)
            return checkpoint / f"rank-{rank}-of-{world_size}.pt"
        return checkpoint.with_name(f"{checkpoint.stem}.rank-{rank}-of-{world_size}.{nonce:016x}.pt")

    def rank_state_files(self) -> list[Path]:
        """The per-process state files beside this run's ddp checkpoints (not the sharded ones':
        those live and go with their folder)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*.rank-*.pt") if RANK_STATE_NAME.fullmatch(p.name))

    @staticmethod
    def checkpoint_step_of(path: Path) -> int:
        """The step in a checkpoint's name (step-0000050.pt -> 50)."""
        return int(CHECKPOINT_NAME.fullmatch(Path(path).name).group(1))

    def is_own_checkpoint(self, name: str) -> bool:
        """Whether ``name`` is a checkpoint directly in checkpoints/ (not a link out of it): a
        ``.pt`` file, or a sharded folder."""
        if not CHECKPOINT_NAME.fullmatch(name):
            return False
        path = self.checkpoints / name
        if path.is_symlink():
            return False
        return path.is_file() if name.endswith(".pt") else path.is_dir()

    def checkpoint_files(self) -> list[Path]:
        """This run's resumable checkpoints (files or sharded folders), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((p for p in self.checkpoints.glob("step-*") if self.is_own_checkpoint(p.name)),
                      key=lambda p: p.name.removesuffix(".pt"))

    def outputs(self) -> list[Path]:
        """The files a finished run may hold besides its logs (in either save format)."""
        return [self.path / f"{name}{suffix}" for name in ("final", "adapter", "state")
                for suffix in (".pth", ".safetensors")]

    def holds_run(self) -> bool:
        """Whether a run was (at least partly) trained here: a checkpoint or a final output."""
        return bool(self.checkpoint_files()) or any(p.exists() for p in self.outputs())

    def stale_temp_files(self) -> list[Path]:
        """Temporary files and folders that killed writers left here and in checkpoints/ (by our
        temp-name patterns only; an atomic write's file only when its writing process is gone)."""
        found = []
        for folder in (self.path, self.checkpoints):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.is_symlink():
                    continue
                m = TEMP_NAME.fullmatch(p.name)
                if m and p.is_file() and not _alive(int(m["pid"])):
                    found.append(p)
                elif folder == self.checkpoints and SHARDED_TEMP_NAME.fullmatch(p.name) and p.is_dir():
                    found.append(p)
        return found

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove :meth:`stale_temp_files` (only while this process holds the run's lock: a sharded
        temp folder has no pid, so only the lock tells that no run is writing it); returns them."""
        found = self.stale_temp_files()
        for p in found:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return found
