"""Checks that run before any data or model work, so a run fails in seconds, not after loading."""

from __future__ import annotations

import math
import os

from rwkvtune.bounds import bound_problems
from rwkvtune.constants import METHODS, MODES
from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.hub import missing_model_hint
from rwkvtune.models.rwkv7.config import TRAIN_BOUNDS
from rwkvtune.peft import get_mode
from rwkvtune.train.memory_check import scratch_advice
from rwkvtune.train.methods import method_class
from rwkvtune.train.run_dir import RunDir
from rwkvtune.utils import plural


def validate_config(cfg) -> None:
    """``cfg.validate()`` with the rules of its mode and of its training method: TrainConfig is
    plain data in the models layer and knows neither (raises one ConfigError naming every problem)."""
    mode_conflicts = get_mode(cfg.mode).conflicts(cfg) if cfg.mode in MODES else []
    # a method's rules compare numbers: only once every number is within its bound
    in_bounds = not bound_problems(cfg, TRAIN_BOUNDS)
    method_problems = method_class(cfg.method).problems(cfg) if cfg.method in METHODS and in_bounds else []
    cfg.validate(mode_conflicts, method_problems)


def check_model_file(cfg, model_config, dry_run: bool = False) -> bool:
    """Fail before any data work when a pretrained run has no model file.

    A dry run only needs the dimensions, which a config (registry name or .json) has without its
    weights file: then it returns False (the file is missing) instead of failing.
    """
    path = model_config.model_path
    if cfg.init == "pretrained" and (not path or not os.path.exists(path)):
        if dry_run and path:
            return False
        # From scratch is a full fine-tune's memory: the advice carries settings that fit this machine.
        raise RwkvtuneError(f"model file not found: {missing_model_hint(model_config)}; or pass --model PATH.pth, "
                            f"{scratch_advice(cfg, model_config)}")
    return True


def check_out_dir(run: RunDir, resuming: bool) -> None:
    """Fail before any work when --out cannot hold a run, holds another run, or holds files that no
    run of this tool wrote (never overwrite either; see rwkvtune.train.run_dir)."""
    problem = out_dir_problem(run, resuming)
    if problem is not None:
        raise ConfigError(problem)


def out_dir_problem(run: RunDir, resuming: bool) -> str | None:
    """Why a run may not write into ``run``'s directory (one line), or None. The directory must be
    missing, empty or this tool's run (marked; or, to resume, an unmarked older run with
    checkpoints); a new run also needs one without checkpoints or final outputs."""
    out = run.path
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"--out {out}: {blocker} is a file, not a directory; choose another --out"
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable (read-only or no permission); choose another --out"
    owner = run.ownership()
    if owner == "foreign":
        return run.foreign_problem("--resume" if resuming else "--out")
    if not resuming and run.holds_run():
        return (f"--out {out}: already holds a run (checkpoints or final outputs); continue it with --resume {out}, "
                f"or choose another --out (or delete that directory)")
    return None


def data_warnings(cfg, n_windows: int, global_batch: int) -> list[str]:
    """Warnings when the data is too small for the batch: every batch or step repeats windows."""
    if n_windows < global_batch:
        return [f"warning: {cfg.data} gives {plural(n_windows, 'window')} of ctx_len {cfg.ctx_len}, fewer than one batch of "
                f"{global_batch}: every batch repeats windows; add data or lower --batch-size"]
    if n_windows < global_batch * cfg.grad_accum:
        return [f"warning: {cfg.data} gives {plural(n_windows, 'window')} of ctx_len {cfg.ctx_len}, fewer than the "
                f"{global_batch * cfg.grad_accum} one optimizer step uses ({global_batch} per batch x grad_accum "
                f"{cfg.grad_accum}): every step repeats windows; add data or lower --grad-accum"]
    return []


# Fewer optimizer steps than this learn almost nothing, whatever the lr: the first try of a
# fine-tune on a small file (one epoch of 1-2 steps at ctx_len 1024) must say so, not look done.
MIN_LEARNING_STEPS = 10
# A warmup of at most this fraction of the run leaves most steps at (or near) the peak lr.
WARMUP_FRACTION = 0.1


def schedule_warnings(cfg, total_steps: int) -> list[str]:
    """Warnings about a schedule that does not do what its names say: one that cannot learn (a
    warmup that takes the whole run, or fewer than MIN_LEARNING_STEPS steps), with the
    --warmup-steps / --epochs / --max-steps values that give one that can; and a final lr above
    the peak (a resume that lowered --lr only)."""
    out = []
    if cfg.warmup_steps >= total_steps or total_steps < MIN_LEARNING_STEPS:
        out.append(_cannot_learn(cfg, total_steps))
    if cfg.lr_final > cfg.lr:
        out.append(f"warning: lr_final {cfg.lr_final:g} > lr {cfg.lr:g}: the cosine rises instead of decaying; "
                   f"set --lr-final below --lr")
    return out


def _cannot_learn(cfg, total_steps: int) -> str:
    """Why this schedule barely moves the loss and the flags of one that learns: at least
    MIN_LEARNING_STEPS steps (more epochs, or --max-steps) with a warmup of at most
    WARMUP_FRACTION of them; or, keeping the warmup, the steps that make it that fraction."""

    from rwkvtune.train.optim import lr_at

    warmup, steps = cfg.warmup_steps, total_steps
    # Steps of one pass over the data (total_steps is a whole number of epochs without --max-steps).
    per_epoch = None if cfg.max_steps else max(1, steps // max(1, cfg.epochs))

    def steps_flag(target: int) -> tuple[str, int]:
        """The flag that gives at least ``target`` steps, and the steps it gives."""
        if per_epoch is None:
            return f"--max-steps {target}", target
        epochs = math.ceil(target / per_epoch)
        return f"--epochs {epochs}", epochs * per_epoch

    if warmup >= steps:
        reached = max(lr_at(s, cfg.lr, cfg.lr_final, warmup, steps) for s in range(steps))
        head = (f"warning: warmup_steps {warmup} >= the run's {plural(steps, 'step')}: the learning rate only reaches "
                f"{reached:.3g} of its peak {cfg.lr:g}, so the loss may barely move")
    else:
        runs = f"--max-steps {steps}" if per_epoch is None else f"{cfg.epochs} epoch(s) of {per_epoch} step(s)"
        head = (f"warning: the run has only {steps} optimizer step(s) ({runs}), too few to learn from, so the loss "
                f"may barely move")
    fixes = []
    more, total = steps_flag(MIN_LEARNING_STEPS) if steps < MIN_LEARNING_STEPS else ("", steps)
    short_warmup = int(WARMUP_FRACTION * total)
    if warmup > short_warmup:
        fixes.append(f"lower --warmup-steps to {short_warmup}" + (f" and pass {more}" if more else ""))
    elif more:
        fixes.append(f"pass {more}")
    fixes[-1] += f" ({total} steps, {min(warmup, short_warmup)} of warmup)"
    if warmup > short_warmup and warmup:
        keep, kept = steps_flag(max(MIN_LEARNING_STEPS, math.ceil(warmup / WARMUP_FRACTION)))
        fixes.append(f"keep --warmup-steps {warmup} with {keep} ({kept} steps)")
    if per_epoch is not None and cfg.batch_size * cfg.grad_accum > 1:
        fixes.append("a smaller --batch-size or --grad-accum (more steps per epoch)")
    tail = "; more data also gives more steps per epoch" if per_epoch is not None else ""
    return f"{head}; {', or '.join(fixes)}{tail}"


def ctx_warnings(cfg, model_config) -> list[str]:
    """A warning when the training windows are longer than the context the model was trained with (its
    config's ctx_len: the ``ctx<N>`` of a release's file name). Not an error: RWKV is recurrent and a
    fine-tune may mean to extend the context; but by mistake it costs memory and quality."""
    trained = getattr(model_config, "ctx_len", None)
    if not trained or cfg.ctx_len <= trained:
        return []
    return [f"warning: ctx_len {cfg.ctx_len} is longer than the {trained} tokens {model_config.model_name} was "
            f"trained with (its ctx_len, ctx{trained} in a release's file name): fine if you mean to extend its "
            f"context, else lower --ctx-len to {trained} or less (or pick a release with a longer context: "
            f"`rwkvtune models releases SIZE`)"]
