"""Measure the peak memory of a real ``rwkvtune train`` run (CPU), per process.

Usage (a script, also under torchrun: one JSON file per rank)::

    python tests/memory_probe.py OUT_PREFIX -- --model ... --data ... [train args]
    torchrun --nproc-per-node 2 tests/memory_probe.py OUT_PREFIX -- [train args]

writes ``OUT_PREFIX.rank<R>.json`` with ``baseline`` (VmRSS just before the trainer builds the
model, bytes), ``peak`` (VmHWM at the end of the run, bytes), ``peak_over_baseline`` and the
``estimate`` (the breakdown the trainer's memory check computed for this process).

Why this measures what the estimator predicts: the trainer's own code runs unchanged (flags parsed
by the CLI, the memory check, build_module, the strategy, the loop, final.pth and the resumable
checkpoint); only :func:`rwkvtune.train.trainer.build_module` is wrapped to take the baseline.
Everything before it (Python, torch, the tokenizer, the data, a process group) is in the
baseline; the model, optimizer, activations, loss slices, gradients and saving are after it. The
high-water mark is reset at the baseline (``/proc/self/clear_refs`` ``5``, Linux >= 4.0), so an
earlier transient (reading the data) cannot count; where that file cannot be written the peak is
VmHWM as is (an upper bound). RSS is what the machine must hold: it includes allocator
fragmentation and pages glibc keeps after a free, which a count of live tensor bytes would miss.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def status_bytes(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    prefix, sep, *train_args = argv
    assert sep == "--", "usage: memory_probe.py OUT_PREFIX -- [rwkvtune train args]"
    from rwkvtune.cli import main as cli_main
    from rwkvtune.train import trainer

    seen: dict = {}
    build = trainer.build_module

    def measured_build(*args, **kwargs):
        gc.collect()
        seen["reset"] = reset_peak()
        seen["baseline"] = status_bytes("VmRSS")
        return build(*args, **kwargs)

    check = trainer.check_memory

    def captured_check(*args, **kwargs):
        result = check(*args, **kwargs)
        seen["estimate"] = result.as_dict() if result is not None else None
        return result

    trainer.build_module = measured_build
    trainer.check_memory = captured_check
    status = cli_main(["train", *train_args])
    rank = int(os.environ.get("RANK", "0"))
    peak = status_bytes("VmHWM")
    seen.update(status=status, rank=rank, peak=peak, peak_over_baseline=peak - seen.get("baseline", 0))
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(seen, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
