"""The training recipe: setup, then a visible loop, then finish.

``train(cfg)`` runs any training method (:mod:`rwkvtune.train.methods`: the language-model
objective by default) in any mode (:mod:`rwkvtune.peft`: full, lora, state), from a pretrained file
or from scratch, on one process or under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU).

Exactness rules the loop follows:
* the loss of an optimizer step is the mean over the loss units (target tokens for ``sft``) of
  the whole global batch (all micro-batches, all ranks), so gradient accumulation and DDP equal
  one big batch;
* resumable checkpoints hold weights, optimizer, step, data position, the method's state and
  every RNG, so a run killed at any moment and resumed reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from rwkvtune.configs.detect import inspect_checkpoint
from rwkvtune.configs.model_loader import ModelConfig, load_model_config
from rwkvtune.configs.run_source import run_weights
from rwkvtune.data.dataset import WindowSampler
from rwkvtune import log
from rwkvtune.errors import ConfigError, OutputError, RwkvtuneError
from rwkvtune.hub import missing_model_hint
from rwkvtune.models.cpu_precision import bf16_cpu_flags
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.models.rwkv7.model import RWKV7, allocation_guard, meta_model
from rwkvtune.models.rwkv7.quant import require_backend
from rwkvtune.peft import get_mode
from rwkvtune.peft.base import Mode
from rwkvtune.tokenizer import get_tokenizer
from rwkvtune.train import checkpointing, run_lock
from rwkvtune.train.checkpointing import CheckpointState
from rwkvtune.train.manifest import check_step_within
from rwkvtune.train.memory import GIB, dry_run_report
from rwkvtune.train.memory_check import check_memory, memory_report
from rwkvtune.train.methods import get_method
from rwkvtune.train.methods.base import MetricSums, StepContext, TrainingMethod
from rwkvtune.train.metrics import MetricsLogger, check_packages
from rwkvtune.train.objective import TrainModule, count_params
from rwkvtune.train.optim import lr_at, param_groups, set_lr
from rwkvtune.train.progress import Progress
from rwkvtune.train.run_dir import RunDir
from rwkvtune.train.runtime import Dist, agree, all_sum, autocast_factory, select_device, setup_distributed
from rwkvtune.train.setup_checks import (check_model_file, check_out_dir, ctx_warnings, data_warnings,
                                         out_dir_problem, schedule_warnings, validate_config)
from rwkvtune.train.signals import GracefulStop, Terminated, graceful_stop, interrupted_message
from rwkvtune.train.strategy import (Strategy, check_strategy, get_strategy, join_single_process_group,
                                     resume_world_size)
from rwkvtune.train.task_eval import check_eval_tasks, run_eval_tasks
from rwkvtune.utils import atomic_write_text, keep_freed_memory, plural


class TrainingDiverged(RwkvtuneError):
    """The loss became NaN or inf."""


@dataclasses.dataclass(kw_only=True)
class Run:
    """Everything setup() builds and the loop and finish() use."""

    cfg: TrainConfig
    model_config: ModelConfig
    dist: Dist
    device: str
    run: RunDir
    mode: Mode
    method: TrainingMethod
    train_set: Any
    eval_set: Any
    sampler: Any
    module: TrainModule
    runner: nn.Module  # the module wrapped for distribution (DDP), or the (FSDP-sharded) module itself
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    logger: MetricsLogger
    autocast: Callable
    total_steps: int
    tokens_per_step: int
    step: int = 0
    tokens: int = 0
    last_eval: dict | None = None
    saved_step: int | None = None  # step of the newest resumable checkpoint this process saved

    def context(self, **kw) -> StepContext:
        return StepContext(cfg=self.cfg, device=self.device, autocast=self.autocast, runner=self.runner,
                           mode=self.mode, tick=self.logger.tick, **kw)


def train(cfg: TrainConfig, dry_run: bool = False) -> dict:
    """Run a training job described by ``cfg``; returns a summary dict.

    SIGTERM or Ctrl-C while it runs saves a resumable checkpoint after the current step and raises
    :class:`Terminated` (see :class:`rwkvtune.train.signals.GracefulStop`).
    """
    with graceful_stop() as stop, contextlib.ExitStack() as cleanup:
        try:
            run = setup(cfg, dry_run, stop, cleanup)
            if isinstance(run, dict):  # a dry run's report, or a finished run's summary
                return run
            # On any error: flush TensorBoard, mark the wandb run failed; the progress line is closed
            # first, so it is never redrawn after an error line.
            with run.logger, run.logger.progress(run.total_steps, initial=run.step) as progress:
                loop(run, stop, progress)
                with progress.phase("finishing (final eval, outputs)"):
                    return finish(run)
        except KeyboardInterrupt as e:  # an immediate Ctrl-C: only here is the run's directory known
            if str(e):
                raise
            raise KeyboardInterrupt(interrupted_message(stop.run_dir)) from e


# ---------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, dry_run: bool, stop: GracefulStop, cleanup: contextlib.ExitStack) -> Run | dict:
    """Resolve the config, check every input, build data, model, optimizer and logger
    (``cleanup`` takes what must be undone when train() returns)."""
    resume_dir, device_asked, error = cfg.resume, cfg.device, None
    try:  # checks of the files every process reads alike; under torchrun they agree below
        cfg, model_config = _resolve(cfg)
        if cfg.threads:  # restored when train() returns: a library call leaves the process as it was
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(cfg.threads)
        has_weights = check_model_file(cfg, model_config, dry_run)
        run = RunDir(cfg.out, cfg.save_format)
        # A dry run writes nothing, so it is never refused for --out: it says what the run would meet.
        out_note = out_dir_problem(run, resuming=bool(resume_dir)) if dry_run else check_out_dir(run, bool(resume_dir))
        stop.run_dir = run
        check_packages(cfg)
        if cfg.base_quant != "none":  # its library (torchao, bitsandbytes), before anything is written
            require_backend(cfg.base_quant, cfg.device)
        check_eval_tasks(cfg)
    except RwkvtuneError as e:
        error = e
    d = setup_distributed(device_asked if error else cfg.device)
    agree(error)  # the first process's refusal on every process, said once (rank 0)
    cfg = _agree_precision(cfg, d)
    if d.main and not dry_run:
        _lock_run_dir(run, resume_dir, cleanup)
    device = select_device(cfg.device, d)
    check_strategy(cfg, device)
    if cfg.strategy == "fsdp" and not dry_run and join_single_process_group(device):
        cleanup.callback(torch.distributed.destroy_process_group)  # FSDP needs a group, also of one process
    torch.manual_seed(cfg.seed)
    mode, method = get_mode(cfg.mode), get_method(cfg)
    cleanup.callback(method.close)  # e.g. GRPO's reward worker process

    train_set, eval_set = method.build_datasets(get_tokenizer(), model_config.vocab_size)
    sampler = WindowSampler(len(train_set), seed=cfg.seed, shuffle=True, rank=d.rank, world_size=d.world_size,
                            batch_size=cfg.batch_size)
    total_steps = cfg.max_steps or (math.ceil(sampler.batches_per_epoch / cfg.grad_accum) * cfg.epochs
                                    * method.steps_per_batch)
    # Sequences per item and the most tokens one holds (a ctx_len beyond the data's longest window
    # costs nothing); with whether a whole reference copy is kept: what the memory plan needs.
    rows, sample_tokens = method.memory_shape(train_set)
    method_shape = dict(rows=rows, reference_copy=method.keeps_reference_copy(mode))
    # An upper bound: collate trims the columns after a batch's last target.
    tokens_per_step = cfg.batch_size * rows * cfg.grad_accum * d.world_size * sample_tokens
    world_change = None
    if resume_dir and not dry_run:
        # Every process reads the same checkpoint: they agree on the first refusal (rank 0 says it).
        done, error = None, None
        try:
            resume_path = checkpointing.resume_checkpoint(resume_dir)
            step = checkpointing.checkpoint_step(resume_path)
            done = checkpointing.completed_summary(run.path, step, total_steps)
            if done is None:
                check_step_within(resume_path, step, total_steps)
                # another number of processes: said (or refused where undefined) before any weight is read
                world_change = resume_world_size(resume_dir, cfg, d, sampler, method.steps_per_batch,
                                                 tokens_per_step)
        except RwkvtuneError as e:
            error = e
        agree(error)
        if done is not None:  # finishing again would rewrite final.pth and the logs for no training
            if d.main:
                log.info(f"run {resume_dir} is complete ({step}/{total_steps} steps); nothing to do (raise "
                         f"--max-steps to train further)")
            return done

    if dry_run:
        report = _dry_run(cfg, model_config, d, device, mode, has_weights, sample_tokens, tokens_per_step,
                          total_steps, len(train_set), method_shape)
        if out_note:
            report["out_problem"] = out_note
        report["origins"] = dict(cfg.origins)  # where lr and out came from (e.g. "LoRA default")
        # What the run would warn about at its start; the CLI prints the report (memory.dry_run_text).
        report.update(item_name=method.item_name, warnings=(
            data_warnings(cfg, len(train_set), sampler.global_batch) + schedule_warnings(cfg, total_steps)
            + ctx_warnings(cfg, model_config)))
        return report
    check_memory(cfg, model_config, d, device, sample_tokens, **method_shape)  # before any weights are loaded
    strategy = get_strategy(cfg, d, device)
    # FSDP: built on meta, sharded, then each process fills only its shards (file or seeded init)
    module = build_module(cfg, mode, model_config, device, meta=strategy.fills_shards)
    runner = strategy.wrap(module)  # FSDP shards the module's parameters in place: optimizer after this
    if strategy.fills_shards:
        # No collective inside: every process reads the same file and meets a damaged tensor alike;
        # they agree on the first refusal, said once (rank 0), instead of one line per process.
        error = None
        try:
            strategy.fill(module, mode, model_config)
        except RwkvtuneError as e:
            error = e
        agree(error)
    optimizer = torch.optim.AdamW(param_groups(module.named_parameters(), cfg.lr, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas, eps=cfg.adam_eps)
    state = CheckpointState(step=0, tokens=0)
    if resume_dir:  # the method's state too (each process its own)
        state = strategy.load_checkpoint(resume_dir, module=module, optimizer=optimizer, sampler=sampler,
                                         method=method)
    step = state.step
    logger = MetricsLogger(run, cfg, enabled=d.main, resume_step=step if resume_dir else None)
    if resume_dir:
        changes = checkpointing.schedule_changes(resume_dir, cfg)
        if changes:  # a row at the resumed step records the new schedule in the run's history
            logger.log_event(step, {"resumed": True, "schedule_changed": changes})
        if world_change:
            logger.log_event(step, {"resumed": True, "world_size_changed": world_change})
    r = Run(cfg=cfg, model_config=model_config, dist=d, device=device, run=run, mode=mode, method=method,
            train_set=train_set, eval_set=eval_set, sampler=sampler, module=module, runner=runner, strategy=strategy,
            optimizer=optimizer, logger=logger, autocast=autocast_factory(device, cfg.precision),
            total_steps=total_steps, tokens_per_step=tokens_per_step, step=state.step, tokens=state.tokens)
    _announce(r, resume_dir)
    if cfg.keep_freed_memory:  # before the steps: they allocate the temporaries
        why_not = keep_freed_memory() if device == "cpu" else f"it is for CPU runs, this one runs on {device}"
        r.logger.info("keep_freed_memory: glibc keeps freed memory for the next step (peak RSS can exceed the plan)"
                      if why_not is None else f"keep_freed_memory: not applied: {why_not}")
    method.setup(r)
    return r


def _agree_precision(cfg: TrainConfig, d: Dist) -> TrainConfig:
    """Under torchrun, every process trains in rank 0's precision where it was chosen per CPU (each
    process timed its own matmuls; a busy core could tip one of them the other way)."""
    if d.world_size == 1 or not cfg.origins.get("precision", "").startswith("chosen for this CPU"):
        return cfg
    chosen = [(cfg.precision, cfg.origins["precision"])]
    torch.distributed.broadcast_object_list(chosen, src=0)  # our own strings, not a file's
    cfg.precision, cfg.origins["precision"] = chosen[0]
    return cfg


def _lock_run_dir(run: RunDir, resume_dir: str | None, cleanup: contextlib.ExitStack) -> None:
    """Hold the run directory's lock until train() returns (main process only), check again under
    it that a new run meets no other run's files, and remove what killed writers left."""
    cleanup.enter_context(run_lock.hold(run, "--resume" if resume_dir else "--out"))
    check_out_dir(run, resuming=bool(resume_dir))  # a run that finished since the first check
    removed = run.remove_stale_temp_files()
    if removed:
        log.info(f"removed {len(removed)} temporary file(s) that an interrupted run left in {run.path}: "
                 f"{', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''}")


def _dry_run(cfg, model_config, d, device, mode, has_weights, tokens, tokens_per_step, total_steps,
             n_windows, method_shape) -> dict:
    """The dry run's report: counts from a meta-device module (no weights are ever materialised,
    whatever init says) and the memory estimate against this device, with the fix when it does not fit."""
    module = build_module(cfg, mode, model_config, device, meta=True)
    report = dry_run_report(cfg, model_config, module, tokens_per_step, total_steps, n_windows)
    estimate, avail, fix = memory_report(cfg, model_config, d, device, tokens, **method_shape)
    report.update(device=device, memory_estimate_gib=round(estimate.peak_gib, 2), memory_estimate=estimate.as_dict(),
                  memory_available_gib=round(avail / GIB, 2) if avail is not None else None, memory_fix=fix)
    if not has_weights:
        report.update(model_file_missing=model_config.model_path, model_file_hint=missing_model_hint(model_config))
    return report


def _resolve(cfg: TrainConfig) -> tuple[TrainConfig, ModelConfig]:
    """The config to run: a resumed run's saved one (plus what may change), validated, with None
    fields filled from the model's recommendations and existing paths made absolute."""
    if cfg.resume:
        cfg = checkpointing.resumed_config(cfg.resume, cfg)
    validate_config(cfg)
    cfg = _from_run_dir(cfg)
    model_config = load_model_config(cfg.model)
    # resolve() copies cfg, so the caller's config keeps the paths it gave
    return checkpointing.absolute_paths(cfg.resolve(model_config)), model_config


def _from_run_dir(cfg: TrainConfig) -> TrainConfig:
    """``model`` naming a training run's directory: its final.pth, as an absolute path (so the saved
    config names the file trained from, and a resume finds it from any directory). A run that
    left an adapter or a state on an unchanged base is refused, naming the base to train from."""
    route = "train from that base with --model (an adapter merged first: rwkvtune merge-lora BASE ADAPTER OUT)"
    final = run_weights(cfg.model, ConfigError, route) if cfg.model else None
    if final is None:
        return cfg
    out = dataclasses.replace(cfg, model=os.path.abspath(final))
    out.sources = dict(cfg.sources)  # where each option came from, for validation messages
    return out


def build_module(cfg: TrainConfig, mode: Mode, model_config: ModelConfig, device: str,
                 meta: bool = False) -> TrainModule:
    """The model prepared for the mode, on ``device``; ``meta=True``: shapes only (a dry run counts
    parameters without the weights file; FSDP shards it before any weight exists)."""
    if meta:
        # --base-quant: the big matrices are quantized placeholders (no parameters: FSDP shards the
        # rest; every process quantizes the whole base into them when it fills its shards). A full
        # fine-tune with base_quant is refused before this (peft/full.py).
        quant = cfg.base_quant if not mode.trains_base else "none"
        model = meta_model(model_config, _file_has_layer0_v(cfg, model_config), quant)
        with torch.device("meta"):
            model.set_wkv_backend(cfg.wkv_backend)
            model.grad_checkpoint = cfg.grad_checkpoint
            return TrainModule.for_mode(mode, model.train(), cfg)
    with allocation_guard(model_config, device):  # a config in range can still be too large to hold
        return _build_module(cfg, mode, model_config, device)


def _build_module(cfg: TrainConfig, mode: Mode, model_config: ModelConfig, device: str) -> TrainModule:
    if cfg.init == "scratch":
        model = RWKV7.from_config(model_config, seed=cfg.seed)
    else:
        # A frozen base in bf16 (precision bf16 and a mode that does not train the base) is loaded as
        # bf16 directly, so no fp32 copy of the whole model ever exists. expect=: a file of other
        # dims than the config (e.g. under a registry name) is refused.
        # --base-quant: the big matrices quantized as they are read, on the device they run on.
        bf16_base = not mode.trains_base and cfg.precision == "bf16"
        model = RWKV7.from_checkpoint(model_config.model_path, expect=model_config,
                                      dtype=torch.bfloat16 if bf16_base else torch.float32, quant=cfg.base_quant,
                                      device=device if cfg.base_quant != "none" else "cpu")
    model.set_wkv_backend(cfg.wkv_backend)
    model.grad_checkpoint = cfg.grad_checkpoint
    return TrainModule.for_mode(mode, model.to(device).train(), cfg).to(device)


def _file_has_layer0_v(cfg: TrainConfig, model_config: ModelConfig) -> bool:
    """Whether the model file stores layer 0's unused v0/v1/v2 (read from its index, no tensor
    data); True when there is no file to read (the registry's parameter count includes them)."""
    path = model_config.model_path
    if cfg.init != "pretrained" or not path or not os.path.isfile(path):
        return True
    try:
        return inspect_checkpoint(path).has_layer0_v
    except RwkvtuneError:
        return True


def threads_origin(threads: int | None) -> str:
    """Where torch's CPU thread count came from, for the startup line: torchrun sets
    OMP_NUM_THREADS=1 for every process unless it is set, which silently makes a run single-threaded."""
    if threads:
        return "--threads"
    env = os.environ.get("OMP_NUM_THREADS")
    if env is None:
        return "torch's default; set with --threads"
    by = " (torchrun sets it to 1 unless you do)" if "TORCHELASTIC_RUN_ID" in os.environ else ""
    return f"from OMP_NUM_THREADS={env}{by}; set with --threads"


def run_origins(cfg: TrainConfig) -> str:
    """The learning rate and run directory with where each came from (a default is said as one)."""
    origins = getattr(cfg, "origins", {})
    lr = f"lr {cfg.lr:g}" + (f" ({origins['lr']})" if "lr" in origins else "") + f", lr_final {cfg.lr_final:g}"
    return f"{lr}; run directory {cfg.out}" + (f" ({origins['out']})" if "out" in origins else "")


def _announce(r: Run, resume_dir: str | None) -> None:
    """Save the resolved config and say what runs (main process only)."""
    if not r.dist.main:
        return
    cfg = r.cfg
    r.run.path.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(r.run.config)
    trainable, frozen, unused = count_params(r.module)
    unused_note = f" (+{unused:,} unused layer-0 v-residual params)" if unused else ""
    r.logger.info(f"model {r.model_config.model_name}: {trainable:,} trainable / {frozen:,} frozen params"
                  f"{unused_note}, {plural(len(r.train_set), r.method.item_name[:-1], r.method.item_name)}, "
                  f"{plural(r.total_steps, 'step')}"
                  + (f" of up to {plural(r.tokens_per_step, 'token')}" if r.method.token_units else ""))
    r.logger.info(f"device {r.device}, precision {cfg.precision}, {plural(torch.get_num_threads(), 'CPU thread')} "
                  f"({threads_origin(cfg.threads)})")
    r.logger.info(run_origins(cfg))
    if resume_dir:
        r.logger.info(f"resuming {resume_dir} from step {r.step} of {r.total_steps} (checkpoint "
                      f"{checkpointing.resume_checkpoint(resume_dir)})")
    auto = cfg.origins.get("precision", "")
    if auto.startswith("chosen for this CPU"):  # precision was not given: say why this one
        other = "fp32" if cfg.precision == "bf16" else "bf16"
        r.logger.info(f"precision {cfg.precision} ({auto}); --precision {other} to override")
    elif cfg.precision == "bf16" and not r.device.startswith("cuda") and not bf16_cpu_flags():
        r.logger.info("note: this CPU lacks native bf16 (AVX512-BF16/AMX): bf16 is emulated and can be far slower "
                      "than fp32")
    warnings = (data_warnings(cfg, len(r.train_set), r.sampler.global_batch) + schedule_warnings(cfg, r.total_steps)
                + ctx_warnings(cfg, r.model_config))
    for warning in warnings:
        r.logger.info(warning)


# ----------------------------------------------------------------------------------------- loop
class _Window:
    """Sums since the last metrics row (log_every steps): the method's sums, loss units, tokens
    run through the model, seconds, and the largest grad norm (the one that shows a spike)."""

    def __init__(self, sums: MetricSums):
        self.steps, self.grad_norm = 0, None
        self.units = self.tokens_in = self.seconds = 0.0
        self.sums = sums  # the method's accumulator: it knows what each logged value is a mean over

    def add(self, sums: MetricSums, units: float, tokens_in: float, seconds: float, grad_norm: float | None) -> None:
        self.steps += 1
        self.units, self.tokens_in, self.seconds = self.units + units, self.tokens_in + tokens_in, self.seconds + seconds
        self.sums.add(sums)
        if grad_norm is not None:
            self.grad_norm = max(grad_norm, self.grad_norm or 0.0)


def loop(r: Run, stop: GracefulStop, progress: Progress) -> None:
    """Optimizer steps until total_steps; logs, evaluates and saves on schedule; a signal ends it
    after the current step with a checkpoint (:class:`Terminated`). ``progress`` (the logger's)
    is told each step's start, and eval and saving by name."""
    cfg, window = r.cfg, _Window(r.method.new_metrics())
    if cfg.eval_on_start and _has_eval(r) and r.step == 0 and 0 not in r.logger.evals:
        r.logger.log_eval(0, evaluate(r))
    stop.in_loop = True
    while r.step < r.total_steps:
        progress.begin_step(r.step)
        t0 = time.perf_counter()
        lr = lr_at(r.step, cfg.lr, cfg.lr_final, cfg.warmup_steps, r.total_steps)
        set_lr(r.optimizer, lr)
        sums, units, tokens_in = train_step(r)
        if not math.isfinite(sums.loss):
            raise TrainingDiverged(diverged_message(r, sums.loss))
        grad_norm = r.strategy.clip_grad_norm(r.module, cfg.grad_clip) if cfg.grad_clip > 0 else None
        r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)
        r.step += 1
        r.tokens += int(units if r.method.token_units else tokens_in)
        window.add(sums, units, tokens_in, time.perf_counter() - t0, grad_norm)
        if r.step % cfg.log_every == 0 or r.step == r.total_steps or stop.requested:
            # Means over the window's loss units; none (null) when the window had no loss units.
            metrics = window.sums.rows(window.units)
            row = {"step": r.step, **metrics, "lr": lr, "tokens": r.tokens,
                   "tokens_per_s": window.tokens_in / window.seconds, "grad_norm": window.grad_norm}
            r.logger.log_step(row, progress, advance=window.steps)
            window = _Window(r.method.new_metrics())
        if _has_eval(r) and cfg.eval_every and r.step % cfg.eval_every == 0 and r.step < r.total_steps:
            r.last_eval = evaluate(r)
            r.logger.log_eval(r.step, r.last_eval)
        if cfg.save_every and r.step % cfg.save_every == 0 and r.step < r.total_steps:
            with progress.phase("saving checkpoint"):
                save_checkpoint(r)
        stop_now, = all_sum([float(stop.requested is not None)], r.dist, r.device)  # all ranks stop together
        if stop_now:
            progress.close()
            _stop_after_step(r, stop)
    stop.in_loop = False


def _has_eval(r: Run) -> bool:
    return r.eval_set is not None or bool(r.cfg.eval_tasks)


def evaluate(r: Run) -> dict:
    """The method's eval on eval_data, and the eval_tasks' metrics (see rwkvtune.train.task_eval)."""
    with r.logger.phase("eval"):
        result = r.method.evaluate(r.module, r.eval_set, r.context()) if r.eval_set is not None else {}
        if r.cfg.eval_tasks:
            result.update(run_eval_tasks(r.cfg, r.module, r.autocast, r.dist.main, r.dist.world_size))
    return result


def diverged_message(r: Run, loss: float) -> str:
    """What to do when the loss of the next step is not finite: resume with a lower lr from a
    checkpoint at least one update before that step (the weights of the step just before it
    already give this loss on this batch, whatever the lr), named with the exact command."""
    step, lr = r.step + 1, r.cfg.lr
    head = f"loss is {loss} at step {step}; stopped without saving"
    kept = r.run.checkpoint_files()
    usable = [p for p in kept if r.run.checkpoint_step_of(p) <= step - 2]
    if usable:
        path = usable[-1]
        return (f"{head}. Resume from the checkpoint of step {r.run.checkpoint_step_of(path)} with a lower learning "
                f"rate (this run's peak lr is {lr:g}): rwkvtune train --resume {shlex.quote(str(path))} "
                f"--lr {lr / 2:g}")
    if kept:
        return (f"{head}. The only checkpoint kept (step {r.run.checkpoint_step_of(kept[-1])}) holds the weights "
                f"that give this loss, so resuming cannot avoid it: start a new run with a lower --lr (this run's "
                f"peak lr is {lr:g}, e.g. --lr {lr / 2:g}) and another --out, or save checkpoints more often")
    return (f"{head}; no checkpoint was saved yet (save_every {r.cfg.save_every}): run the same command again "
            f"with a lower --lr (this run's peak lr is {lr:g}, e.g. --lr {lr / 2:g})")


def train_step(r: Run) -> tuple[MetricSums, float, float]:
    """Forward and backward of one optimizer step's micro-batches; returns (metric sums over all ranks,
    loss units, tokens processed). Gradients are those of the step's mean loss."""
    micro = []
    tick = r.logger.tick
    if r.step % r.method.steps_per_batch == 0:  # else the method reuses an earlier step's data
        for _ in range(r.cfg.grad_accum):
            micro.append(r.method.collate([r.train_set[i] for i in r.sampler.current_batch()], r.device))
            r.sampler.advance(1)
    micro = r.method.begin_step(r.module, micro, r.context(step=r.step + 1))
    counts = [r.method.count(b) for b in micro]
    units, tokens_in = all_sum([sum(c.units for c in counts), sum(c.tokens for c in counts)], r.dist, r.device)
    # DDP averages gradients over ranks: undo that, then divide by the global loss units. (A step
    # without any, e.g. chat windows holding only prompt tokens, has a zero loss and zero gradients.)
    scale = r.dist.world_size / max(1.0, units)
    totals = r.method.new_metrics()
    for i, batch in enumerate(micro):
        tick("micro-batch", i, len(micro))
        sums = r.method.forward_backward(r.module, batch, r.context(scale=scale, sync=i == len(micro) - 1,
                                                                    step=r.step + 1))
        tick("micro-batch", i + 1, len(micro))
        totals.add(sums)
    return totals.reduced(lambda values: all_sum(values, r.dist, r.device)), units, tokens_in


def save_checkpoint(r: Run):
    """A resumable checkpoint of this step (every process calls it; the strategy decides who writes)."""
    r.saved_step = r.step
    state = CheckpointState(step=r.step, tokens=r.tokens, method_state=r.method.state_dict())
    return r.strategy.save_checkpoint(r.run, state, module=r.module, optimizer=r.optimizer, sampler=r.sampler)


def _stop_after_step(r: Run, stop: GracefulStop) -> None:
    if r.saved_step != r.step:  # else save_every just wrote it
        save_checkpoint(r)
    if r.dist.world_size > 1:
        torch.distributed.barrier()  # no rank exits before rank 0 has saved
    path = checkpointing.latest_checkpoint(r.run.path)
    raise Terminated(f"{stop.describe()} after step {r.step} of {r.total_steps}; saved the resumable checkpoint "
                     f"{path}; resume with: rwkvtune train --resume {r.run.path}", stop.requested)


# --------------------------------------------------------------------------------------- finish
def finish(r: Run) -> dict:
    """Final eval, the mode's outputs, a last resumable checkpoint, the plot, then summary.json
    (written last: its presence marks the run complete)."""
    if _has_eval(r):
        # A resume that only finishes (killed after the final eval) already has its result.
        r.last_eval = r.logger.evals.get(r.step) if r.dist.main else None
        if r.last_eval is None:
            r.last_eval = evaluate(r)
            r.logger.log_eval(r.step, r.last_eval)
    summary = {"steps": r.step, "tokens": r.tokens, "out": str(r.run.path)}
    # The model first: the resumable checkpoint is several times larger, and a full disk must not
    # cost the trained model. (Every process takes part: FSDP gathers the shards.)
    outputs = r.strategy.save_outputs(r.run, r.mode, r.module, r.model_config)
    summary.update(outputs)
    try:
        save_checkpoint(r)
    except OutputError as e:
        saved = ", ".join(outputs.values())  # (none on the other processes of a sharded run)
        raise OutputError(f"{e}; the trained model is saved: {saved}" if saved else str(e)) from e
    if r.dist.main:
        r.logger.finish()
        # A resume that only finishes (killed while writing the final files) logs no step itself.
        summary["loss"] = r.logger.last_loss if r.logger.last_loss is not None else (
            r.logger.rows[-1]["loss"] if r.logger.rows else None)
        if r.last_eval:
            summary.update(r.last_eval)
        atomic_write_text(r.run.summary, json.dumps(summary, indent=2) + "\n")
    if r.dist.world_size > 1:
        torch.distributed.barrier()
    return summary
