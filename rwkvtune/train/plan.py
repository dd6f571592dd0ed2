"""The memory plan: every way to launch a size (mode x GPUs x strategy) against common GPU cards.

Everything here is :func:`rwkvtune.train.memory.estimate_memory` over a grid; no torch. "Cheapest"
(see :func:`cheapest`) orders the launches that fit a card by

1. fewest GPUs (the hardware you need);
2. the strategy with the least communication and offload: ``ddp`` (one gradient all-reduce per
   step) < ``fsdp`` (parameters all-gathered and gradients reduce-scattered every step) <
   ``fsdp+offload`` (also moves the sharded state over PCIe and runs AdamW on the CPU);
3. the mode that trains the most: full > lora > state. Modes train different things, so the plan
   also names the cheapest launch of each mode, and 3. only breaks ties for the overall pick.
"""

from __future__ import annotations

import dataclasses

from rwkvtune.constants import MODES
from rwkvtune.train.memory import FIT_FRACTION, GIB, MemoryEstimate, Settings, estimate_memory

SIZES = ("0.1b", "0.4b", "1.5b", "2.9b", "7.2b", "13.3b")
GPU_COUNTS = (1, 2, 8)
LAUNCHES = (("ddp", False), ("fsdp", False), ("fsdp", True))  # (strategy, cpu_offload), cheapest first
# Cards by their marketed size (GB) and the total memory torch reports for them (GiB): RTX 4090
# 24564 MiB, RTX 6000 Ada / L40S 49140 MiB, A100 / H100 80 GB 81559 MiB, H200 143771 MiB.
CARDS = {24: 24564 / 1024, 48: 49140 / 1024, 80: 81559 / 1024, 141: 143771 / 1024}
# The configs README's recommendations are for "dual-GPU" training; the two largest sizes are the
# ones whose fit is in question.
SEED_DUAL = (("7.2b", 1024, 1), ("13.3b", 512, 1))


def card_gib(gb: float) -> float:
    """A card's memory in GiB: the reported total for the marketed sizes in CARDS, else ``gb`` as is."""
    return CARDS.get(gb, gb)


@dataclasses.dataclass(frozen=True)
class Launch:
    mode: str
    gpus: int
    strategy: str
    offload: bool
    estimate: MemoryEstimate

    @property
    def name(self) -> str:
        return self.strategy + ("+offload" if self.offload else "")

    @property
    def rank(self) -> tuple[int, int, int]:
        """Cheapest first: GPUs, then communication/offload, then full > lora > state."""
        return self.gpus, LAUNCHES.index((self.strategy, self.offload)), MODES.index(self.mode)

    def fits(self, card_gib: float) -> bool:
        return self.estimate.peak <= FIT_FRACTION * card_gib * GIB

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"
        return f"{self.mode} on {gpus} with {self.name} ({self.estimate.peak_gib:.1f} GiB per GPU)"

    def train_args(self) -> list[str]:
        """The ``rwkvtune train`` flags of this launch (torchrun gives the process count); flags, not
        key=value words, so that the user's own options and overrides after them still win."""
        return ["--strategy", self.strategy] + (["--cpu-offload"] if self.offload else [])


def launches(model_config, ctx_len: int, batch_size: int, modes=MODES, gpu_counts=GPU_COUNTS,
             precision: str = "bf16", **settings) -> list[Launch]:
    """Every (mode, GPUs, strategy) launch of the model on GPUs, with its per-GPU estimate."""
    out = []
    for mode in modes:
        for gpus in gpu_counts:
            for strategy, offload in LAUNCHES:
                s = Settings(mode=mode, precision=precision, batch_size=batch_size, ctx_len=ctx_len,
                             strategy=strategy, world_size=gpus, cpu_offload=offload, device="gpu", **settings)
                out.append(Launch(mode, gpus, strategy, offload, estimate_memory(model_config, s)))
    return out


def cheapest(rows: list[Launch], card_gib: float, mode: str | None = None) -> Launch | None:
    """The cheapest launch (see the module docstring) that fits the card, of ``mode`` if given."""
    fitting = [r for r in rows if r.fits(card_gib) and (mode is None or r.mode == mode)]
    return min(fitting, key=lambda r: r.rank) if fitting else None


def pick(rows: list[Launch], card_gib: float) -> Launch:
    """The launch for a machine: the cheapest that fits, else the one needing the least memory
    (the trainer's memory check then says what to change)."""
    return cheapest(rows, card_gib) or min(rows, key=lambda r: (r.estimate.peak, r.rank))


def seed_dual_gpu(load) -> list[str]:
    """How the configs README's dual-GPU recommendations for 7.2B and 13.3B fit: a full fine-tune
    (the default mode) on two GPUs at the recommended ctx_len and batch, per card."""
    lines = []
    for size, ctx, batch in SEED_DUAL:
        c = load(size)
        two = [r for r in launches(c, ctx, batch, gpu_counts=(2,)) if r.mode == "full"]
        per = "; ".join(f"{r.name} {r.estimate.peak_gib:.0f} GiB per GPU ({_cards(r)}) and "
                        f"{r.estimate.host / GIB:.0f} GiB of host RAM per process" for r in two)
        lines.append(f"{c.model_name} (ctx_len {ctx}, batch {batch}) full fine-tune on two GPUs: {per}.")
        for card, gib in CARDS.items():
            best = cheapest(two, gib)
            alt = cheapest(launches(c, ctx, batch, gpu_counts=(2,)), gib)
            fit = f"{best.name}" if best else f"does not fit (cheapest on two: {alt.describe()})" if alt else \
                "does not fit in any mode"
            lines.append(f"  {card} GB cards: {fit}")
    lines.append("(ddp builds the whole model on each GPU; fsdp builds it on the meta device, shards it, and "
                 "each process reads only its shards from the model file, one tensor at a time)")
    return lines


def _cards(r: Launch) -> str:
    fit = [str(card) for card, gib in CARDS.items() if r.fits(gib)]
    return ("fits " + "/".join(fit) + " GB") if fit else "fits no card"
