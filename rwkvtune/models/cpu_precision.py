"""What ``precision: None`` means on a CPU: bf16 where the CPU multiplies bf16 natively and a quick
check shows it faster than fp32, fp32 elsewhere, with the reason said at the start of a run.

Why a check on top of the flags: AVX512-BF16 / AMX-BF16 in /proc/cpuinfo say the instructions
exist, not that this torch build uses them (oneDNN picks its kernels at run time) nor that they
pay at training shapes. Without either flag torch emulates bf16 matmuls with fp32 arithmetic plus
conversions, which is slower than fp32, so no check runs there.

The check (:func:`bf16_matmul_speedup`) times one training-shaped matmul (256 x 768 @ 768 x 2048,
0.8 GFLOP: 4-16 ms in fp32 on 2-4 cores) in fp32 and bf16, interleaved, best of a few, in about
0.1-0.3 s with oneDNN's first-call setup included; once per process (cached). A first bf16 call on
16 rows ends it early where bf16 is emulated (seconds per full-size call otherwise). bf16 is chosen
at a speedup of at least :data:`MIN_SPEEDUP`: a whole training step gains less than its matmuls (the WKV recurrence
and the elementwise work stay fp32 or memory bound), so a marginal matmul gain is not worth the
lower precision.

``RWKVTUNE_CPU_PRECISION=fp32|bf16`` fixes the choice without detection (the test suite sets fp32
so its figures do not depend on the machine; a CI fleet of mixed CPUs can do the same).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import torch

from rwkvtune.errors import ConfigError

ENV = "RWKVTUNE_CPU_PRECISION"
# /proc/cpuinfo flag -> name said to the user, strongest first
BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
MIN_SPEEDUP = 1.3  # bf16/fp32 matmul rate at or above which a CPU run defaults to bf16
CHECK_SHAPE = (256, 768, 2048)  # m, k, n of the timed matmul
CHECK_BUDGET_S = 0.06  # wall-clock seconds the timed calls may take (after one warm-up call each)
PROBE_ROWS = 16    # rows of the first bf16 calls, which catch an emulated bf16 early
SLOW_PROBE = 0.25  # a probe below this bf16/fp32 ratio ends the check (emulated bf16: ~0.01)


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" or "bf16"
    reason: str     # why, as the run's first lines say it: "CPU has AMX-BF16: bf16 matmul 3.1x fp32"
    native: bool    # the CPU has native bf16 (a flag above), whatever was chosen


def bf16_cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 features of this CPU by user-facing name (from /proc/cpuinfo's flags;
    ``cpuinfo``: its text, for tests). Empty where unknown (no /proc/cpuinfo: macOS, Windows)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [name for flag, name in BF16_FLAGS if flag in flags]


def bf16_matmul_speedup(budget_s: float = CHECK_BUDGET_S) -> float:
    """bf16 / fp32 throughput of one training-shaped matmul on this CPU (> 1: bf16 faster).
    Interleaved fp32 and bf16 calls, best of each, so load from other processes hits both alike."""
    m, k, n = CHECK_SHAPE
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    torch.mm(a32, b32)  # oneDNN builds its kernels on first use
    t = time.perf_counter()
    torch.mm(a32, b32)
    t32 = time.perf_counter() - t
    # Where the flags promise bf16 but the build emulates it, the full-size bf16 call takes seconds
    # (3 s against 25 ms in fp32 on an AVX2 machine): PROBE_ROWS rows (twice: the first builds the
    # kernel) tell that apart in a fraction of it. Native bf16 on 16 rows is never 4x slower per row.
    for _ in range(2):
        t = time.perf_counter()
        torch.mm(a16[:PROBE_ROWS], b16)
        t16 = (time.perf_counter() - t) * m / PROBE_ROWS
    if t32 / t16 < SLOW_PROBE:
        return t32 / t16
    torch.mm(a16, b16)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    end = time.perf_counter() + budget_s
    for i in range(50):
        for a, b in ((a32, b32), (a16, b16)):
            t = time.perf_counter()
            torch.mm(a, b)
            best[a.dtype] = min(best[a.dtype], time.perf_counter() - t)
        if i >= 2 and time.perf_counter() > end:
            break
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def choose(flags: list[str], speedup=bf16_matmul_speedup) -> PrecisionChoice:
    """The choice for a CPU with the native-bf16 ``flags`` (:func:`bf16_cpu_flags`); ``speedup``
    is called only when there is one."""
    if not flags:
        return PrecisionChoice("fp32", "CPU lacks AVX512-BF16/AMX: bf16 matmul would be slower", False)
    ratio = speedup()
    has = f"CPU has {flags[0]}"
    if ratio >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"{has}: bf16 matmul {ratio:.1f}x fp32", True)
    return PrecisionChoice("fp32", f"{has}, but bf16 matmul is only {ratio:.2f}x fp32 here (bf16 needs "
                                   f">= {MIN_SPEEDUP}x)", True)


@functools.lru_cache(maxsize=None)
def default_cpu_precision() -> PrecisionChoice:
    """What a CPU run trains in when no precision is given (once per process)."""
    pinned = os.environ.get(ENV, "").strip()
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise ConfigError(f"environment variable {ENV}: found {pinned!r}, expected fp32 or bf16 (or unset it "
                              f"to choose by this CPU)")
        return PrecisionChoice(pinned, f"{ENV}={pinned}", bool(bf16_cpu_flags()))
    return choose(bf16_cpu_flags())
