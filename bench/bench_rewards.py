"""Per-call cost of running GRPO's reward functions in the reward worker process vs in-process.

Usage: python bench/bench_rewards.py [--completions 64] [--chars 400] [--calls 200]

One call scores ``--completions`` completions of ``--chars`` characters each (a GRPO step of 8
prompts x G 8 with a few hundred characters per completion), with a ``{"answer": ...}`` field.
Two functions, each timed alone:
  user    a trivial user function from a file written to a temporary directory (the cost of the
          call is then almost all the worker's: JSON encoding, two pipe messages, decoding)
  regex   the built-in ``regex:\\d+`` (runs in the worker too: a user pattern can backtrack forever)
Figures: the median and 90th percentile of ``--calls`` timed calls of ``compute_rewards`` (after
10 warm-up calls), in process (the function called directly) and through the worker, the
difference (the worker's overhead per reward function per step), and the worker's start time
(process start + imports, once per run). Prints the load average: other processes on the cores
inflate the times. A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

USER_FILE = "def score(prompts, completions, answer, **fields):\n    return [float(len(c) % 7) for c in completions]\n"


def _time(fn, calls: int) -> list[float]:
    for _ in range(10):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    from rwkvtune.train.reward_worker import start_rewards
    from rwkvtune.train.rewards import RewardFunction, build_reward, compute_rewards, parse_rewards

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--completions", type=int, default=64)
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()
    n = a.completions
    prompts = [f"prompt {i // 8}: what is {i} plus {i}?" for i in range(n)]
    completions = [(f"Let me think. {i} plus {i} is {2 * i}. " * 20)[:a.chars] for i in range(n)]
    fields = {"answer": [str(2 * i) for i in range(n)]}
    print(f"load average before {os.getloadavg()[0]:.2f} | {n} completions x {a.chars} chars, {a.calls} calls "
          f"(median, p90) per figure")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench_reward.py")
        with open(path, "w") as f:
            f.write(USER_FILE)
        specs = [f"{path}:score", r"regex:\d+"]
        t0 = time.perf_counter()
        funcs = parse_rewards(specs)
        worker = start_rewards(funcs, 60.0)
        start_ms = (time.perf_counter() - t0) * 1e3
        try:
            print(f"worker start (process, imports, the user file): {start_ms:.0f} ms, once per run")
            print(f"{'function':<8} {'in-process ms':>16} {'worker ms':>16} {'overhead ms/call':>17}")
            for label, spec, func in zip(("user", "regex"), specs, funcs):
                local = RewardFunction(func.name, build_reward(spec), func.source, spec)  # same function, here
                ins = _time(lambda: compute_rewards([local], None, prompts, completions, fields), a.calls)
                wrk = _time(lambda: compute_rewards([func], None, prompts, completions, fields), a.calls)
                med_i, med_w = statistics.median(ins), statistics.median(wrk)
                p90 = lambda xs: sorted(xs)[int(0.9 * (len(xs) - 1))]  # noqa: E731
                print(f"{label:<8} "
                      f"{med_i * 1e3:>8.3f} ({p90(ins) * 1e3:.3f}) {med_w * 1e3:>8.3f} ({p90(wrk) * 1e3:.3f}) "
                      f"{(med_w - med_i) * 1e3:>17.3f}")
        finally:
            worker.close()
    print(f"(load average after {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
