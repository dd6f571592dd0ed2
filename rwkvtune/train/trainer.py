"""The training recipe: setup, then a visible loop.

``train(cfg)`` runs full fine-tuning, LoRA or state tuning, from a pretrained file or from
scratch, on one process or under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU).

Exactness rules the loop follows:
* the loss of an optimizer step is the token-weighted mean over the whole global batch
  (all micro-batches, all ranks), so gradient accumulation and DDP equal one big batch;
* resumable checkpoints hold weights, optimizer, step, data position and every RNG, so a run
  killed at any moment and resumed reproduces the uninterrupted run's losses;
* samples longer than ctx_len (``long_context``) run in ctx_len chunks carrying the RNN state,
  with backward per chunk (truncated BPTT, memory bounded by ctx_len) or through all chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from rwkvtune.configs.model_loader import load_model_config
from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.models.rwkv7.model import RWKV7, RWKV7State
from rwkvtune.train import checkpointing
from rwkvtune.train.data import build_dataset, collate
from rwkvtune.train import metrics
from rwkvtune.train.metrics import MetricsLogger
from rwkvtune.train.loss import loss_sum
from rwkvtune.train.optim import lr_at, param_groups, set_lr
from rwkvtune.utils import atomic_write_text


class TrainingDiverged(RwkvtuneError):
    """The loss became NaN or inf."""


class Terminated(RwkvtuneError):
    """A signal stopped training after a step (and its checkpoint). The CLI exits 128 + the signal
    number, what a shell reports for it: 143 for SIGTERM, 130 for Ctrl-C."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_status = 128 + int(signum)


class _GracefulStop:
    """The SIGTERM and SIGINT (Ctrl-C) handler while train() runs.

    In the loop the first signal only records the request: the loop finishes the optimizer step,
    saves a resumable checkpoint and raises Terminated (stopping mid-step would save weights,
    optimizer, data position and RNGs out of step with each other). A second Ctrl-C, or any signal
    outside the loop (setup, final eval and saving: no step to finish), stops at once.
    """

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def __init__(self):
        self.requested: int | None = None   # the signal number that asked to stop
        self.in_loop = False
        self.out: Path | None = None

    def describe(self) -> str:
        return "terminated by SIGTERM" if self.requested == signal.SIGTERM else "interrupted (Ctrl-C)"

    def __call__(self, signum, frame):
        again = self.requested is not None
        self.requested = signum
        if self.in_loop and not again:
            if signum == signal.SIGINT:
                tqdm.write("Ctrl-C: stopping after this step to save a resumable checkpoint "
                           "(Ctrl-C again to quit at once)", file=sys.stderr)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # the CLI names the checkpoints already on disk
        message = self.describe()
        if self.out is not None and any((self.out / "checkpoints").glob("step-*.pt")):
            message += (f"; the checkpoints in {self.out / 'checkpoints'} are kept; continue with: "
                        f"rwkvtune train --resume {self.out}")
        raise Terminated(message, signum)


class TrainModule(nn.Module):
    """What the optimizer sees: the model plus, in state mode, the trainable initial WKV state."""

    def __init__(self, model: RWKV7, wkv_init: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.wkv_init = nn.Parameter(wkv_init) if wkv_init is not None else None

    def forward(self, idx, state: RWKV7State | None = None):
        init = self.wkv_init if state is None else None
        return self.model(idx, state=state, return_state=True, wkv_init=init)


@dataclasses.dataclass
class Dist:
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


def check_model_file(cfg: TrainConfig, model_config, dry_run: bool = False) -> bool:
    """Fail before any data work when a pretrained run has no model file.

    A dry run only needs the dimensions, which a config (registry name or .json) has without its
    weights file: then it returns False (the file is missing) instead of failing.
    """
    path = model_config.model_path
    if cfg.init == "pretrained" and (not path or not os.path.exists(path)):
        if dry_run and path:
            return False
        raise RwkvtuneError(
            f"model file not found: {path or '(config has no model_file)'}; put "
            f"{model_config.model_file or 'the .pth'} in $RWKVTUNE_MODEL_DIR (now {os.path.dirname(path) or 'unset'}), "
            f"pass --model PATH.pth, or train from scratch with --init scratch")
    return True


def check_out_dir(out: Path, resuming: bool) -> None:
    """Fail before any work when --out cannot hold a run, or holds another run (never overwrite it)."""
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"--out {out}: {blocker} is a file, not a directory; choose another --out")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable (read-only or no permission); choose another "
                          f"--out")
    if not resuming and (any((out / "checkpoints").glob("step-*.pt")) or (out / "final.pth").exists()
                         or (out / "state.pth").exists()):
        raise ConfigError(f"--out {out}: already holds a run (checkpoints or final outputs); continue it with "
                          f"--resume {out}, or choose another --out (or delete that directory)")


def select_device(device: str, d: Dist) -> str:
    """The device of this process: cuda:LOCAL_RANK under DDP; a CUDA device is made current only
    when it has an index (torch.cuda.set_device refuses a bare "cuda")."""
    if device == "cuda" and d.world_size > 1:
        device = f"cuda:{d.local_rank}"
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    return device


def build_model(cfg: TrainConfig, model_config, device: str) -> RWKV7:
    if cfg.init == "scratch":
        model = RWKV7.from_config(model_config, seed=cfg.seed)
    else:
        # A frozen base in bf16 (LoRA/state with precision bf16) is loaded as bf16 directly, so
        # no fp32 copy of the whole model ever exists.
        frozen_bf16 = cfg.mode != "full" and cfg.precision == "bf16"
        # expect=: a file of other dims than the config (e.g. under a registry name) is refused.
        model = RWKV7.from_checkpoint(model_config.model_path, expect=model_config,
                                      dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    model.set_wkv_backend(cfg.wkv_backend)
    model.grad_checkpoint = cfg.grad_checkpoint
    return model.to(device).train()


def build_meta_module(cfg: TrainConfig, model_config) -> TrainModule:
    """The run's module on the meta device (shapes, no storage), for a dry run to count parameters
    without the weights file."""
    with torch.device("meta"):
        return prepare_mode(cfg, RWKV7(model_config))


def prepare_mode(cfg: TrainConfig, model: RWKV7) -> TrainModule:
    """Freeze/wrap parameters for the mode; returns the module whose trainable params are optimized."""
    if cfg.mode == "full":
        return TrainModule(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.precision == "bf16":
        # Frozen base stored in bf16 (half the memory); trainable tensors below stay fp32.
        model.to(torch.bfloat16)
    if cfg.mode == "state":
        c = model.config
        init = torch.zeros(c.n_layer, c.n_head, c.head_size_a, c.head_size_a, device=model.emb.weight.device)
        return TrainModule(model, init)
    from rwkvtune.peft.lora import apply_lora, unfreeze_parts

    apply_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    unfreeze_parts(model, cfg.train_parts)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return TrainModule(model)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; frozen leaves out those of :func:`count_unused`."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad) - count_unused(module)
    return trainable, frozen


def count_unused(module: nn.Module) -> int:
    """Parameters the forward never uses: layer 0's value-residual v0/v1/v2, which released files
    carry (and final.pth keeps) although layer 0 defines v_first instead of mixing it in."""
    att = module.model.blocks[0].att
    return sum(getattr(att, n).numel() for n in ("v0", "v1", "v2")) if att.has_v else 0


def run_micro_batch(module, batch, cfg: TrainConfig, scale: float, l2_factor: float, sync_last: bool,
                    autocast, ddp_module=None) -> float:
    """Forward + backward of one micro-batch; returns its summed loss (float).

    Sequences longer than ctx_len run in chunks carrying the RNN state. Truncated BPTT
    detaches the state and runs backward per chunk; full BPTT keeps one graph.
    """
    idx, labels = batch["input_ids"], batch["labels"]
    T = idx.shape[1]
    chunks = [(s, min(T, s + cfg.ctx_len)) for s in range(0, T, cfg.ctx_len)]
    runner = ddp_module or module
    state, total, graph_loss = None, 0.0, None
    for ci, (s, e) in enumerate(chunks):
        last = ci == len(chunks) - 1
        sync = sync_last and (last or cfg.bptt == "full")
        ctx = contextlib.nullcontext() if (ddp_module is None or sync) else ddp_module.no_sync()
        with ctx:
            with autocast():
                logits, state = runner(idx[:, s:e], state)
                loss = loss_sum(logits, labels[:, s:e], l2_factor)
            if not loss.requires_grad:
                # State tuning under truncated BPTT: only the first chunk reaches the initial
                # state. A zero term keeps backward (and DDP's gradient sync) well defined.
                loss = loss + sum(0.0 * p.sum() for p in module.parameters() if p.requires_grad)
            total += float(loss.detach())
            if cfg.bptt == "full":
                graph_loss = loss if graph_loss is None else graph_loss + loss
            else:
                (loss * scale).backward()
                state = state.detach()
    if graph_loss is not None:
        with (contextlib.nullcontext() if (ddp_module is None or sync_last) else ddp_module.no_sync()):
            (graph_loss * scale).backward()
    return total


@torch.no_grad()
def evaluate(module: TrainModule, dataset, cfg: TrainConfig, device: str, autocast) -> dict:
    """Token-weighted loss and perplexity over every window of ``dataset`` (in order)."""
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    bs = cfg.batch_size
    for start in range(0, len(dataset), bs):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + bs))], device)
        idx, labels = batch["input_ids"], batch["labels"]
        state = None
        for s in range(0, idx.shape[1], cfg.ctx_len):
            with autocast():
                logits, state = module(idx[:, s:s + cfg.ctx_len], state)
            total += float(loss_sum(logits, labels[:, s:s + cfg.ctx_len]))
        count += int((labels != -100).sum())
    module.train(was_training)
    loss = total / max(1, count)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def _all_sum(values: list[float], d: Dist, device: str) -> list[float]:
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(cfg: TrainConfig, dry_run: bool = False) -> dict:
    """Run a training job described by ``cfg``; returns a summary dict.

    SIGTERM or Ctrl-C while it runs saves a resumable checkpoint after the current step and raises
    :class:`Terminated` (see :class:`_GracefulStop`); the previous handlers are restored on return.
    """
    stop = _GracefulStop()
    if threading.current_thread() is not threading.main_thread():
        return _train(cfg, dry_run, stop)  # Python sets signal handlers in the main thread only
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(cfg, dry_run, stop)
    finally:
        for signum, handler in previous.items():
            # None: the previous handler was not set from Python; the default is the nearest we can do
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _train(cfg: TrainConfig, dry_run: bool, stop: _GracefulStop) -> dict:
    # ---------------------------------------------------------------- setup
    resume_dir = cfg.resume
    if resume_dir:
        cfg = checkpointing.resumed_config(resume_dir, cfg)
    cfg.validate()
    model_config = load_model_config(cfg.model)
    # resolve() copies cfg, so the caller's config keeps the paths it gave
    cfg = checkpointing.absolute_paths(cfg.resolve(model_config))
    has_weights = check_model_file(cfg, model_config, dry_run)
    out = Path(cfg.out)
    check_out_dir(out, resuming=bool(resume_dir))
    stop.out = out
    metrics.check_packages(cfg)
    d = setup_distributed(cfg.device)
    device = select_device(cfg.device, d)
    torch.manual_seed(cfg.seed)

    from rwkvtune.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    train_set = build_dataset(cfg.data, tokenizer, cfg, model_config.vocab_size)
    eval_set = build_dataset(cfg.eval_data, tokenizer, cfg, model_config.vocab_size) if cfg.eval_data else None
    from rwkvtune.data.dataset import WindowSampler

    sampler = WindowSampler(len(train_set), seed=cfg.seed, shuffle=True, rank=d.rank,
                            world_size=d.world_size, batch_size=cfg.batch_size)
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    # An upper bound: collate trims the columns after a batch's last target.
    tokens_per_step = cfg.batch_size * cfg.grad_accum * d.world_size * cfg.ctx_len
    resume_path = resume_step = None
    if resume_dir and not dry_run:
        resume_path = checkpointing.latest_checkpoint(resume_dir)
        resume_step = checkpointing.checkpoint_step(resume_path)
        done = checkpointing.completed_summary(out, resume_step, total_steps)
        if done is not None:
            # Finishing again would rewrite final.pth and the logs for no training at all.
            if d.main:
                print(f"run {resume_dir} is complete ({resume_step}/{total_steps} steps); nothing to do (raise "
                      f"--max-steps to train further)", file=sys.stderr)
            return done

    if not has_weights:
        module = build_meta_module(cfg, model_config)
    else:
        model = build_model(cfg, model_config, device)
        module = prepare_mode(cfg, model).to(device)
    trainable, frozen = count_params(module)
    unused = count_unused(module)
    if dry_run:
        report = dry_run_report(cfg, model_config, trainable, frozen, tokens_per_step, total_steps, len(train_set),
                                unused)
        if not has_weights:
            report["model_file_missing"] = model_config.model_path
            print(f"note: model file {model_config.model_path} is not present yet; parameters are counted from "
                  f"the config (put {model_config.model_file} there before training)", file=sys.stderr)
        report["device"], report["memory_available_gib"] = device, memory_available_gib(device)
        print(dry_run_summary(report), file=sys.stderr)
        return report

    groups = param_groups(module.named_parameters(), cfg.lr, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
    step, tokens_seen = 0, 0
    if resume_dir:
        step, tokens_seen = checkpointing.load_latest(resume_dir, module, optimizer, sampler)
    ddp = None
    if d.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    use_bf16 = cfg.precision == "bf16"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def autocast():
        return torch.autocast(dev_type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    logger = MetricsLogger(out, cfg, enabled=d.main, resume_step=step if resume_dir else None)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
        unused_note = f" (+{unused:,} unused layer-0 v-residual params)" if unused else ""
        logger.info(f"model {model_config.model_name}: {trainable:,} trainable / {frozen:,} frozen "
                    f"params{unused_note}, {len(train_set)} windows, {total_steps} steps of up to "
                    f"{tokens_per_step} tokens")
        if resume_dir:
            logger.info(f"resuming {resume_dir} from step {step} of {total_steps} (checkpoint {resume_path})")
        if cfg.precision == "bf16" and dev_type == "cpu":
            logger.info("note: bf16 on CPU is emulated on CPUs without native bf16 (AVX512-BF16/AMX) and can "
                        "be far slower than fp32; measured 74x slower here (bench/bench_lora.py)")
        if len(train_set) < sampler.global_batch:
            logger.info(f"warning: {cfg.data} gives {len(train_set)} window(s) of ctx_len {cfg.ctx_len}, fewer than "
                        f"one batch of {sampler.global_batch}: every batch repeats windows; add data or lower "
                        f"--batch-size")
        elif len(train_set) < sampler.global_batch * cfg.grad_accum:
            logger.info(f"warning: {cfg.data} gives {len(train_set)} window(s) of ctx_len {cfg.ctx_len}, fewer than "
                        f"the {sampler.global_batch * cfg.grad_accum} one optimizer step uses ({sampler.global_batch} "
                        f"per batch x grad_accum {cfg.grad_accum}): every step repeats windows; add data or lower "
                        f"--grad-accum")
    progress = logger.progress(total_steps, initial=step)

    # ---------------------------------------------------------------- loop
    with logger:  # on any error: flush TensorBoard, mark the wandb run failed
        last_eval = None
        # Sums since the last metrics row (log_every steps).
        window = {"steps": 0, "loss": 0.0, "tokens": 0.0, "tokens_in": 0.0, "seconds": 0.0, "grad_norm": None}
        stop.in_loop = True
        while step < total_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.lr_final, cfg.warmup_steps, total_steps)
            set_lr(optimizer, lr)
            micro = []
            for _ in range(cfg.grad_accum):
                ids = sampler.current_batch()
                micro.append(collate([train_set[i] for i in ids], device))
                sampler.advance(1)
            # n_tok: targets (the loss's denominator); n_in: tokens run through the model (throughput;
            # collate has trimmed the columns after each batch's last target).
            n_tok, n_in = _all_sum([float(sum(int((b["labels"] != -100).sum()) for b in micro)),
                                    float(sum(b["input_ids"].numel() for b in micro))], d, device)
            n_tok = max(1.0, n_tok)
            scale = d.world_size / n_tok  # DDP averages over ranks: undo it, then divide by global tokens
            # L2Wrap's per-token coefficient; the 1/n_tok reaches it through the scaled loss's gradient.
            l2 = 1e-4 if cfg.l2wrap else 0.0
            loss_total = 0.0
            for i, b in enumerate(micro):
                loss_total += run_micro_batch(module, b, cfg, scale, l2, sync_last=(i == len(micro) - 1),
                                              autocast=autocast, ddp_module=ddp)
            loss_total, = _all_sum([loss_total], d, device)
            loss = loss_total / n_tok
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at step {step + 1}; stopped without saving. The last good checkpoint "
                    f"is in {out / 'checkpoints'} (resume with --resume {out} and a lower --lr)")
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in module.parameters() if p.requires_grad], cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(n_tok)
            window["steps"] += 1
            window["loss"] += loss_total
            window["tokens"] += n_tok
            window["tokens_in"] += n_in
            window["seconds"] += time.perf_counter() - t0
            if grad_norm is not None:
                window["grad_norm"] = max(grad_norm, window["grad_norm"] or 0.0)
            if step % cfg.log_every == 0 or step == total_steps or stop.requested:
                # One row per log_every steps: token-weighted mean loss, the largest grad norm (the
                # one that shows a spike), throughput over the window, the lr of this step.
                row = {"step": step, "loss": window["loss"] / window["tokens"], "lr": lr, "tokens": tokens_seen,
                       "tokens_per_s": window["tokens_in"] / window["seconds"],
                       "grad_norm": window["grad_norm"]}
                logger.log_step(row, progress, advance=window["steps"])
                window.update(steps=0, loss=0.0, tokens=0.0, tokens_in=0.0, seconds=0.0, grad_norm=None)
            if eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                last_eval = evaluate(module, eval_set, cfg, device, autocast)
                logger.log_eval(step, last_eval)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps and d.main:
                checkpointing.save(out, step, tokens_seen, module, optimizer, sampler, cfg)
            stop_now, = _all_sum([float(stop.requested is not None)], d, device)  # all ranks stop after one step
            if stop_now:
                progress.close()
                path = out / "checkpoints" / f"step-{step:07d}.pt"
                if d.main and not path.exists():  # else save_every just wrote it
                    path = checkpointing.save(out, step, tokens_seen, module, optimizer, sampler, cfg)
                if d.world_size > 1:
                    dist.barrier()  # no rank exits before rank 0 has saved
                raise Terminated(f"{stop.describe()} after step {step} of {total_steps}; saved the resumable "
                                 f"checkpoint {path}; continue with: rwkvtune train --resume {out}", stop.requested)
        stop.in_loop = False
        progress.close()

        # ---------------------------------------------------------------- finish
        if eval_set is not None:
            # A resume that only finishes (killed after the final eval) already has its result.
            last_eval = logger.evals.get(step) if d.main else None
            if last_eval is None:
                last_eval = evaluate(module, eval_set, cfg, device, autocast)
                logger.log_eval(step, last_eval)
        summary = {"steps": step, "tokens": tokens_seen, "out": str(out)}
        if d.main:
            checkpointing.save(out, step, tokens_seen, module, optimizer, sampler, cfg)
            summary.update(checkpointing.write_final(out, module, cfg))
            logger.finish()
            # A resume that only finishes (killed while writing the final files) logs no step itself.
            summary["loss"] = logger.last_loss if logger.last_loss is not None else (
                logger.rows[-1]["loss"] if logger.rows else None)
            if last_eval:
                summary.update(last_eval)
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if d.world_size > 1:
        dist.barrier()
    return summary


def memory_available_gib(device: str) -> float | None:
    """Total memory of the device the run would use: the GPU's, or the machine's RAM on CPU."""
    try:
        if device.startswith("cuda"):
            return round(torch.cuda.mem_get_info(torch.device(device))[1] / 2 ** 30, 2)
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30, 2)
    except (ValueError, OSError, AttributeError, RuntimeError):  # e.g. no sysconf on this platform
        return None


def dry_run_summary(report: dict) -> str:
    """One line for people (the JSON on stdout is for tools), with a warning when the estimate
    exceeds 90% of the device's memory and what to change."""
    mem, avail = report["memory_estimate_gib"], report["memory_available_gib"]
    line = (f"dry run: {report['model']['name']}, mode {report['config']['mode']}: "
            f"{report['trainable_params']:,} trainable / {report['frozen_params']:,} frozen params, "
            f"{report['total_steps']} step{'s' if report['total_steps'] != 1 else ''} of up to "
            f"{report['tokens_per_step']:,} tokens; memory estimate "
            f"{mem:.1f} GiB" + (f" of {avail:.1f} GiB on {report['device']}" if avail else ""))
    if avail and mem > 0.9 * avail:
        line += ("; too much for this device: lower batch_size (raise grad_accum to keep the effective batch), "
                 "set grad_checkpoint=true, or use mode lora or state")
    return line


def dry_run_report(cfg, model_config, trainable, frozen, tokens_per_step, total_steps, n_windows,
                   unused: int = 0) -> dict:
    """Resolved config, dims, parameter counts, tokens per step and a memory estimate."""
    c = model_config
    # fp32 weights + fp32 grads and two AdamW moments for trainable params.
    weights = (trainable + frozen + unused) * 4 + trainable * 12
    # About 67 C-sized vectors per token per layer are kept for backward (measured with saved-
    # tensor hooks on the 0.1B shape at T=512); with checkpointing
    # only each block's input is kept, plus one block's worth during recomputation.
    act_bytes = 2 if cfg.precision == "bf16" else 4
    per_layer = cfg.batch_size * cfg.ctx_len * c.n_embd * act_bytes
    acts = per_layer * (c.n_layer + 67 if cfg.grad_checkpoint else 67 * c.n_layer)
    # logits, log-softmax, their gradient and the L2Wrap buffer: ~4 fp32 tensors of B x T x V
    logits = cfg.batch_size * cfg.ctx_len * c.vocab_size * 4 * 4
    mem = weights + acts + logits
    return {
        "config": cfg.to_dict(),
        "model": {"name": c.model_name, "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                  "head_size_a": c.head_size_a, "dim_att_lora": c.dim_att_lora, "dim_aaa_lora": c.dim_aaa_lora,
                  "dim_mv_lora": c.dim_mv_lora, "dim_gate_lora": c.dim_gate_lora, "dim_ffn": c.dim_ffn},
        "trainable_params": trainable,
        "frozen_params": frozen,
        "unused_params": unused,  # layer 0's v0/v1/v2: stored, never used by the forward
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
        "train_windows": n_windows,
        "memory_estimate_gib": round(mem / 2 ** 30, 2),
    }
