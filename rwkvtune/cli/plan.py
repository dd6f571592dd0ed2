"""``rwkvtune plan``: per-GPU memory of every launch of a size, and what fits which card.

Without torch (the estimate is arithmetic over the registry config); ``--pick`` alone looks at this
machine's GPUs (through torch) unless ``--gpus`` and ``--gpu-memory`` say what they are.
"""

from __future__ import annotations

import argparse
import json
import sys

from rwkvtune.bounds import Bound, check_flag
from rwkvtune.cli import _Parser
from rwkvtune.cli.train import add_arguments as add_train_arguments, config_from_args
from rwkvtune.configs.model_loader import load_model_config
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.config import TRAIN_BOUNDS
from rwkvtune.train import plan
from rwkvtune.train.memory import FIT_FRACTION, GIB
from rwkvtune.train import memory_check

# The numeric flags of `plan` (ctx_len and batch_size: those of training).
PLAN_BOUNDS = {"ctx_len": TRAIN_BOUNDS["ctx_len"], "batch_size": TRAIN_BOUNDS["batch_size"],
               "gpus": Bound(int, 1, 2 ** 16, optional=True),
               "gpu_memory": Bound(float, 0, 1e6, lo_open=True, optional=True, each=True,
                                   note="card sizes in GB, e.g. 24 80"),
               "host_memory": Bound(float, 0, 1e6, lo_open=True, optional=True, note="host RAM in GiB, e.g. 64")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Estimate the per-GPU memory of each mode (full, lora, state) on 1, 2 and 8 GPUs with ddp, fsdp "
                     "and fsdp+offload at the recommended ctx_len and batch, mark what fits each card and name the "
                     "cheapest launch that fits. No torch, no weights: counts come from the registry config.")
    p.add_argument("size", nargs="?", help="registry name (0.1b ... 13.3b, or your own); default: the six sizes")
    p.add_argument("--ctx-len", type=int, help="tokens per sample (default: the model's recommended)")
    p.add_argument("--batch-size", type=int, help="micro-batch per GPU (default: the model's recommended)")
    p.add_argument("--gpu-memory", type=float, nargs="+", metavar="GB",
                   help="card sizes to check, GB as marketed (default: 24 48 80 141)")
    p.add_argument("--host-memory", type=float, metavar="GIB",
                   help="host RAM of the machine in GiB: a launch whose processes (one per GPU) need more than "
                        "90%% of it does not fit (default: this machine's total RAM, or its cgroup limit)")
    p.add_argument("--json", action="store_true", help="print every estimate as JSON")
    p.add_argument("--pick", action="store_true",
                   help="print the `rwkvtune train` flags (--strategy, --cpu-offload) of the cheapest launch that "
                        "fits this machine's GPUs (or --gpus and --gpu-memory)")
    p.add_argument("--gpus", type=int, help="with --pick: number of GPUs (default: those visible to torch)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], metavar="ARGS",
                   help="with --pick, last: the `rwkvtune train` options of the run (mode, ctx_len, ...)")


def run(args: argparse.Namespace) -> int:
    for name, bound in PLAN_BOUNDS.items():
        check_flag("--" + name.replace("_", "-"), getattr(args, name), bound, ConfigError)
    if args.pick:
        return _pick(args)
    if args.train_args:
        raise ConfigError("--train-args: only with --pick (it plans one run on this machine's GPUs)")
    cards = {g: plan.card_gib(g) for g in args.gpu_memory} if args.gpu_memory else plan.CARDS
    sizes = [args.size] if args.size else list(plan.SIZES)
    host, host_note = _host_memory(args)
    if args.json:
        out = {s: [_row_json(r, host) for r in _rows(load_model_config(s), args)] for s in sizes}
        print(json.dumps(out, indent=1))
        return 0
    print(host_note + "\n")
    names = {load_model_config(s).model_name for s in sizes}
    for i, size in enumerate(sizes):
        c = load_model_config(size)
        print(("\n" if i else "") + "\n".join(_table(c, _rows(c, args), args, cards, host)))
        print("\n".join(_quant_table(c, args, cards, host)))
    if names & _seed_names():  # only the sizes asked for (plan 7.2b: not 13.3B)
        print("\nThe configs README's recommendations are for dual-GPU training; on two GPUs:")
        print("\n".join(plan.seed_dual_gpu(load_model_config, names, host_gib=host)))
    return 0


def _host_memory(args) -> tuple[float | None, str]:
    """(the host RAM the plan weighs, GiB, or None when unknown; the line that says which)."""

    if args.host_memory is not None:
        host, where = args.host_memory, "from --host-memory"
    else:
        total = memory_check.host_total()
        if total is None:
            return None, "host RAM: unknown on this machine, not weighed (pass --host-memory GIB)"
        host, where = total / GIB, "this machine's total; --host-memory GIB plans for another"
    return host, (f"host RAM: {host:.1f} GiB ({where}); a launch fits when its processes (one per GPU, on this "
                  f"machine) need at most {FIT_FRACTION:.0%} of it")


def _seed_names() -> set[str]:
    return {load_model_config(s).model_name for s, _, _ in plan.SEED_DUAL}


def _rows(c, args):
    return plan.launches(c, args.ctx_len or c.recommended_ctx_len, args.batch_size or c.recommended_batch_size)


def _row_json(r, host: float | None) -> dict:
    return {"mode": r.mode, "gpus": r.gpus, "strategy": r.strategy, "cpu_offload": r.offload,
            "per_gpu_gib": round(r.estimate.peak_gib, 2), "phase": r.estimate.peak_phase,
            "host_gib_per_process": round(r.estimate.host / 2 ** 30, 2),
            "host_gib_all_processes": round(r.host_bytes / 2 ** 30, 2), "host_memory_gib": host,
            "fits_host_memory": r.fits_host(host),
            "terms_gib": {k: round(v / 2 ** 30, 3) for k, v in r.estimate.terms.items()}}


def _table(c, rows, args, cards: dict, host: float | None = None) -> list[str]:
    """The size's launches, what fits each card (and the host RAM), and the cheapest launch per card."""
    ctx, batch = args.ctx_len or c.recommended_ctx_len, args.batch_size or c.recommended_batch_size
    ram = f"; 'ram': the card fits, the {host:.0f} GiB of host RAM does not" if host is not None else ""
    lines = [f"{c.model_name}: {c.n_params:,} params; ctx_len {ctx}, batch_size {batch} per GPU, bf16 autocast, AdamW",
             f"per-GPU peak memory and host RAM per process (GiB); a card fits when the peak is at most "
             f"{FIT_FRACTION:.0%} of its memory{ram}",
             "",
             f"{'mode':<6}{'GPUs':>5}  {'strategy':<13}{'per GPU':>8}{'host':>8}   fits (GB): "
             + " ".join(f"{g:>4g}" for g in cards)]
    for r in rows:
        marks = " ".join(f"{_mark(r, gib, host):>4}" for gib in cards.values())
        lines.append(f"{r.mode:<6}{r.gpus:>5}  {r.name:<13}{r.estimate.peak / GIB:>8.1f}{r.estimate.host / GIB:>8.1f}"
                     f"               {marks}")
    lines += ["", "cheapest that fits (fewest GPUs, then ddp < fsdp < fsdp+offload; then full > lora > state):"]
    for card, gib in cards.items():
        per_mode = " | ".join(f"{m}: {_short(plan.cheapest(rows, gib, m, host))}" for m in plan.MODES)
        best = plan.cheapest(rows, gib, host_gib=host)
        lines.append(f"  {card:g} GB: {best.describe() if best else plan.nothing_fits(rows, gib, host)}   [{per_mode}]")
    return lines


def _quant_table(c, args, cards: dict, host: float | None) -> list[str]:
    """LoRA and state on one GPU (ddp) with the frozen base quantized (--base-quant int8 / nf4)."""
    ctx, batch = args.ctx_len or c.recommended_ctx_len, args.batch_size or c.recommended_batch_size
    lines = ["", "with a quantized frozen base (--base-quant; lora and state, 1 GPU, ddp):",
             f"{'mode+base':<11}{'strategy':<13}{'per GPU':>8}{'host':>8}   fits (GB): "
             + " ".join(f"{g:>4g}" for g in cards)]
    rows = []
    for quant in ("int8", "nf4"):
        for r in plan.launches(c, ctx, batch, modes=("lora", "state"), gpu_counts=(1,), base_quant=quant):
            if r.strategy != "ddp":
                continue
            rows.append((quant, r))
            marks = " ".join(f"{_mark(r, gib, host):>4}" for gib in cards.values())
            lines.append(f"{r.mode + '+' + quant:<11}{r.name:<13}{r.estimate.peak / GIB:>8.1f}"
                         f"{r.estimate.host / GIB:>8.1f}               {marks}")
    # Per card, the first that fits: LoRA before state tuning, int8 before nf4 (int8 loses less).
    order = sorted(rows, key=lambda qr: (qr[1].mode != "lora", qr[0] != "int8"))
    lines += ["", "with a quantized base, per card (lora before state, int8 before nf4: int8 loses less):"]
    for card, gib in cards.items():
        fit = next(((q, r) for q, r in order if r.fits(gib, host)), None)
        lines.append(f"  {card:g} GB: " + (f"{fit[1].mode} --base-quant {fit[0]} on 1 GPU "
                                          f"({fit[1].estimate.peak / GIB:.1f} GiB per GPU, "
                                          f"{fit[1].estimate.host / GIB:.1f} GiB of host RAM)"
                                          if fit else "none fits"))
    return lines


def _mark(r, card_gib: float, host: float | None) -> str:
    if not r.fits_card(card_gib):
        return "-"
    return "yes" if r.fits_host(host) else "ram"


def _short(r) -> str:
    return f"{r.gpus}x {r.name}" if r else "-"


def _pick(args) -> int:
    """The train flags of the cheapest launch that fits this machine (stdout), and why (stderr)."""
    if not args.size:
        raise ConfigError("--pick needs a SIZE (e.g. rwkvtune plan 7.2b --pick)")
    cfg = _train_config(args)
    c = load_model_config(cfg.model or args.size)
    gpus, card = args.gpus, plan.card_gib(args.gpu_memory[0]) if args.gpu_memory else None
    if gpus is None or card is None:
        found, smallest = _visible_gpus()
        gpus, card = gpus or found, card or smallest
    if not gpus or not card:
        raise ConfigError("--pick: no CUDA GPU visible; pass --gpus N --gpu-memory GB to plan for another machine")
    settings = dict(grad_checkpoint=bool(cfg.grad_checkpoint), lora_r=cfg.lora_r, lora_targets=tuple(cfg.lora_targets),
                    train_parts=tuple(cfg.train_parts), base_quant=cfg.base_quant)
    rows = plan.launches(c, cfg.ctx_len or c.recommended_ctx_len, cfg.batch_size or c.recommended_batch_size,
                         modes=(cfg.mode,), gpu_counts=(gpus,), precision=cfg.precision or "bf16", **settings)
    host, host_note = _host_memory(args)
    chosen = plan.pick(rows, card, host)
    fits = "fits" if chosen.fits(card, host) else (
        "does not fit (no launch does; the trainer's memory check says what to change)")
    print(f"plan: {c.model_name} {chosen.describe()} on {gpus} x {card:g} GB: {fits}; {host_note}", file=sys.stderr)
    print(" ".join(chosen.train_args()))
    return 0


def _train_config(args):
    """The TrainConfig that `rwkvtune train` would build from --train-args."""
    parser = _Parser(prog="rwkvtune plan --pick --train-args")
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(args.train_args))


def _visible_gpus() -> tuple[int, float | None]:
    """(CUDA GPUs torch sees, the smallest one's memory in GiB as torch reports it)."""
    import torch

    if not torch.cuda.is_available():
        return 0, None
    n = torch.cuda.device_count()
    return n, min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2 ** 30
