"""Before a run loads any weights: does its memory estimate fit this machine, and if not, what does?

:func:`check_memory` compares :func:`rwkvtune.train.memory.estimate_memory` for the resolved config
with what the device can give (the GPU's free memory, or on CPU the RAM available to this process
and its local siblings) and refuses a run that does not fit, naming the settings that do (computed
with the same estimator): a smaller micro-batch with more gradient accumulation (the same update),
gradient checkpointing, LoRA, FSDP over more GPUs, a shorter ctx_len. ``memory_check: false``
(``--no-memory-check``) runs anyway.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rwkvtune import log
from rwkvtune.errors import RwkvtuneError
from rwkvtune.train.memory import FIT_FRACTION, GIB, MemoryEstimate, Settings, estimate_memory
from rwkvtune.utils import plural


class InsufficientMemoryError(RwkvtuneError):
    """The run's memory estimate exceeds what this machine can give it."""


# ------------------------------------------------------------------------------ available memory
def _meminfo(key: str) -> int | None:
    """One field of /proc/meminfo (``MemAvailable``, ``MemTotal``), bytes; None where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), bytes."""
    return _meminfo("MemAvailable")


def _meminfo_total() -> int | None:
    """This machine's RAM: MemTotal of /proc/meminfo, else the physical pages (os.sysconf), bytes."""
    total = _meminfo("MemTotal")
    if total is not None:
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def host_total() -> int | None:
    """The RAM a run on this machine can have at most: the machine's total, or the cgroup limit of
    this process where lower (a container's); None if unknown. (What ``rwkvtune plan`` weighs.)"""
    values = [v for v in (_meminfo_total(), _cgroup_limits()[0]) if v is not None]
    return min(values) if values else None


def _cgroup_room() -> int | None:
    """Memory left under this process's cgroup limit (v2 memory.max, v1 limit_in_bytes), bytes."""
    limit, usage = _cgroup_limits()
    return None if limit is None or usage is None else max(0, limit - usage)


def _cgroup_limits() -> tuple[int | None, int | None]:
    """(limit, usage) of this process's cgroup memory (v2 memory.max, v1 limit_in_bytes), bytes;
    (None, None) without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, usage = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, usage = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            raw = limit.read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:  # no limit
                continue
            return int(raw), int(usage.read_text())
        except (OSError, ValueError):
            continue
    return None, None


def host_available() -> int | None:
    """RAM this process can still use: MemAvailable, or less under a cgroup limit; None if unknown."""
    values = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(values) if values else None


def available_memory(device: str) -> int | None:
    """Bytes the run's device can give: a GPU's free memory, else the host's available RAM."""
    if device.startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    return host_available()


def local_processes() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# ------------------------------------------------------------------------------------ settings
def run_tokens(dataset, cfg) -> int:
    """Tokens per sample that go through the model at once: ctx_len, or less when the data's
    longest window is shorter (collate drops the columns after a batch's last target)."""
    T = cfg.ctx_len
    longest = longest_window(dataset)
    if longest is None:
        return T
    if cfg.long_context and cfg.bptt == "full":
        return longest  # one graph through every chunk of the longest sample
    return max(1, min(T, longest))


def longest_window(dataset) -> int | None:
    """The longest item of a dataset in tokens, for the dataset kinds the sft method builds (None
    for others: the estimate then plans for ctx_len)."""
    try:
        if hasattr(dataset, "counts"):  # PackedDataset: targets per window
            return int(dataset.counts.max())
        if hasattr(dataset, "data") and hasattr(dataset.data, "num_tokens"):  # BinIdxWindows
            return int(dataset.data.num_tokens) - 1
        if hasattr(dataset, "samples"):  # WholeSamples (long context): the bos token + the sample
            return 1 + max(len(s.tokens) for s in dataset.samples)
    except (AttributeError, TypeError, ValueError):
        pass
    return None


def settings_for(cfg, model_config, world_size: int, tokens: int | None = None, **method_shape) -> Settings:
    """The estimator's settings for a resolved TrainConfig (the model file's size when present);
    ``method_shape``: the method's ``rows`` and ``reference_copy`` (see Settings)."""
    path = model_config.model_path
    file_bytes = os.path.getsize(path) if cfg.init == "pretrained" and path and os.path.isfile(path) else None
    wkv = "auto"
    if str(cfg.device).startswith("cuda"):
        from rwkvtune.models.rwkv7.wkv import _fla_installed

        wkv = "fla" if cfg.wkv_backend in ("auto", "fla") and _fla_installed() else "chunked"
    return Settings.from_config(cfg, world_size=world_size, tokens=tokens, file_bytes=file_bytes, wkv=wkv,
                                **method_shape)


# ----------------------------------------------------------------------------------------- fixes
def _fits(model_config, s: Settings, budget: float) -> MemoryEstimate | None:
    e = estimate_memory(model_config, s)
    return e if e.peak <= budget else None


def fixes(cfg, model_config, s: Settings, budget: float) -> list[str]:
    """Settings that make the run fit ``budget`` bytes per process, each with its estimate."""
    out = []
    accum = cfg.grad_accum * s.batch_size  # the effective batch per process, kept by the batch fix
    for b in range(s.batch_size - 1, 0, -1):
        e = _fits(model_config, s.replace(batch_size=b), budget)
        if e and accum % b == 0:
            out.append(f"--batch-size {b} --grad-accum {accum // b} (the same effective batch of {accum} per "
                       f"process; {e.peak_gib:.1f} GiB)")
            break
    if not s.grad_checkpoint and (e := _fits(model_config, s.replace(grad_checkpoint=True), budget)):
        out.append(f"--grad-checkpoint (about 30% slower; {e.peak_gib:.1f} GiB)")
    if s.mode == "full" and cfg.init == "pretrained" and (e := _fits(model_config, s.replace(mode="lora"), budget)):
        out.append(f"--mode lora (trains adapters, not every weight; {e.peak_gib:.1f} GiB)")
    if s.device == "gpu":
        for n in (2, 4, 8):
            if n > s.world_size and (e := _fits(model_config, s.replace(strategy="fsdp", world_size=n), budget)):
                out.append(f"--strategy fsdp on {n} GPUs (torchrun --nproc-per-node {n}; {e.peak_gib:.1f} GiB per GPU)")
                break
    if not out and (e := _fits(model_config, s.replace(batch_size=1, grad_checkpoint=True), budget)):
        out.append(f"--batch-size 1 --grad-accum {accum} --grad-checkpoint ({e.peak_gib:.1f} GiB)")
    T = next((t for t in (4096, 2048, 1024, 512, 256, 128, 64) if t < s.ctx_len
              and _fits(model_config, s.replace(ctx_len=t), budget)), None)
    if T:
        out.append(f"--ctx-len {T} ({estimate_memory(model_config, s.replace(ctx_len=T)).peak_gib:.1f} GiB)")
    return out


# ----------------------------------------------------------------------------------------- check
def memory_report(cfg, model_config, d, device: str, tokens: int, **method_shape
                  ) -> tuple[MemoryEstimate, int | None, str]:
    """(estimate, bytes available to this process or None, the fix when it does not fit, else "")."""
    s = settings_for(cfg, model_config, d.world_size, tokens, **method_shape)
    estimate = estimate_memory(model_config, s)
    avail = available_memory(device)
    if avail is None:
        return estimate, None, ""
    per_process = avail if device.startswith("cuda") else avail // local_processes()
    budget = FIT_FRACTION * per_process
    if estimate.peak <= budget:
        return estimate, per_process, ""
    found = fixes(cfg, model_config, s, budget)
    fix = ("to fit: " + ", or ".join(found)) if found else "no single change of batch size, gradient " \
        "checkpointing, mode or ctx_len fits this device: use a machine with more memory"
    return estimate, per_process, fix


def check_memory(cfg, model_config, d, device: str, tokens: int, dry_run: bool = False,
                 **method_shape) -> MemoryEstimate:
    """Refuse, before any weights are loaded, a run whose estimate exceeds what this process may
    use (``FIT_FRACTION`` of the device's free memory, shared by the local processes on CPU);
    returns the estimate. ``memory_check: false`` turns the refusal into a warning.
    ``method_shape``: the training method's ``rows`` and ``reference_copy`` (see Settings)."""
    estimate, per_process, fix = memory_report(cfg, model_config, d, device, tokens, **method_shape)
    if device.startswith("cuda") and d.main and not dry_run:
        _warn_host(estimate)
    if 2 * tokens <= cfg.ctx_len and d.main and not dry_run:  # far beyond the data, not a window's slack
        held = plural(tokens, "token", grouped=True)
        log.note(f"ctx_len {cfg.ctx_len:,} is longer than the data's longest window ({held}): "
                 f"windows hold at most {held} and memory is planned for that")
    if not fix or dry_run:
        return estimate
    where = f"{device}" + (f", shared by {local_processes()} processes" if not device.startswith("cuda")
                           and local_processes() > 1 else "")
    message = (f"memory: this run needs about {estimate.describe()}, but {per_process / GIB:.1f} GiB is available "
               f"on {where} ({FIT_FRACTION:.0%} of it may be planned: {FIT_FRACTION * per_process / GIB:.1f} "
               f"GiB); {fix}")
    if cfg.memory_check:
        raise InsufficientMemoryError(message + "; or pass --no-memory-check (memory_check: false) to run anyway")
    if d.main:
        log.warn(f"{message}; running anyway (memory_check: false)")
    return estimate


def _warn_host(estimate: MemoryEstimate) -> None:
    """A GPU run also needs host RAM (under ddp each process builds the model there first;
    cpu_offload keeps the sharded state there; the main process gathers final.pth there): a
    warning, not a refusal, when the machine's processes need more."""
    host = host_available()
    need = estimate.host * local_processes()
    if host is not None and need > FIT_FRACTION * host:
        log.warn(f"memory: this run's {local_processes()} process(es) on this machine need about "
                 f"{need / GIB:.1f} GiB of host RAM, "
                 f"{host / GIB:.1f} GiB is available; expect swapping or use fewer processes per machine")


def scratch_advice(cfg, model_config) -> str:
    """The --init scratch suggestion of a missing model file, with settings that fit this machine
    (a run from scratch needs the memory of a full fine-tune)."""
    from rwkvtune.train.runtime import Dist

    scratch = dataclasses.replace(cfg, init="scratch", mode="full")
    _, _, fix = memory_report(scratch, model_config, Dist(), cfg.device, cfg.ctx_len)
    if not fix:
        return "or train from scratch with --init scratch"
    if not fix.startswith("to fit: "):
        return "training from scratch (--init scratch) does not fit this machine's memory either"
    first = fix.removeprefix("to fit: ").split(", or ")[0].split(" (")[0]
    return f"or train from scratch with --init scratch {first} (the recommended settings need more memory than " \
           f"this machine has)"

