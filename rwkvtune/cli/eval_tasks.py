"""``rwkvtune eval --tasks ...`` and ``--compare ...``: lm-evaluation-harness benchmarks.

Prints a Markdown table (task, metric, value ± stderr) on stdout; ``--output FILE.json`` also
writes the results as JSON and the table as FILE.md. ``--compare A B ...`` puts several models
(each evaluated on --tasks) or earlier result files side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rwkvtune.bounds import Bound
from rwkvtune.models.rwkv7.config import TRAIN_BOUNDS
from rwkvtune.errors import ConfigError
from rwkvtune.bounds import check_flag
from rwkvtune.utils import atomic_write_text
from rwkvtune.cli.common import resolve_device
from rwkvtune.evaluate import require_lm_eval
from rwkvtune.evaluate import harness
from rwkvtune.evaluate.harness import compare_table, expand_tasks, read_result, result_table, task_manager


# The numeric flags of the benchmarks (see rwkvtune/bounds.py); batch_size: as in training.
TASK_BOUNDS = {"limit": Bound(float, 0, 1e9, lo_open=True, optional=True,
                              note="items per task, or a fraction of each task if < 1"),
               "num_fewshot": Bound(int, 0, 10 ** 4, optional=True),
               "batch_size": TRAIN_BOUNDS["batch_size"],
               "bootstrap_iters": Bound(int, 0, 10 ** 7, note="0 = none")}


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmarks (lm-evaluation-harness; pip install \"rwkvtune[eval]\")")
    g.add_argument("--tasks", help="comma-separated lm-eval task names (e.g. lambada_openai,hellaswag), a suite "
                                   "(rwkv7-paper), rwkvtune's own tiny tasks (rwkvtune_tiny, rwkvtune_tiny_ppl) or a "
                                   "task YAML file; replaces --data")
    g.add_argument("--compare", nargs="+", metavar="MODEL_OR_RESULT",
                   help="models (names, .pth, run directories; each evaluated on --tasks) or result files from "
                        "--output, printed as one table of tasks x models")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of your own lm-eval task YAML files (e.g. over local jsonl data); repeatable")
    g.add_argument("--trust-task-code", action="store_true",
                   help="let your task YAML files run Python (lm-eval's !function); refused without it")
    g.add_argument("--limit", type=float, default=None,
                   help="items per task (a number >= 1), or a fraction of each task (< 1); for quick looks only")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per item (default: the task's)")
    g.add_argument("--output", help="write the results as JSON to this file, and the table beside it as .md")
    g.add_argument("--prefix", choices=("newline", "eos"), default="newline",
                   help="what precedes every context: the \"\\n\" token as in RWKV's own lm-eval runs, or "
                        "token 0 (default: newline)")
    g.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="lm-eval's bootstrap iterations for the stderr of non-mean metrics; 0 = none "
                        "(default: 100000)")


def _check(args: argparse.Namespace) -> None:
    if args.data:
        raise ConfigError("--data and --tasks/--compare: pass one (--data scores loss on a file, --tasks runs "
                          "benchmarks)")

    for name, bound in TASK_BOUNDS.items():  # finite and in range first: int(inf) below would overflow
        check_flag("--" + name.replace("_", "-"), getattr(args, name), bound, ConfigError)
    if args.limit is not None and not (args.limit < 1 or args.limit == int(args.limit)):
        raise ConfigError(f"--limit: found {args.limit:g}, expected a whole number >= 1 or a fraction < 1")
    if args.compare and (args.adapter or args.state):
        raise ConfigError("--compare with --adapter/--state: compare run directories or merged models instead "
                          "(an adapter or state applies to one model)")


def _evaluate_model(args, name: str, device: str, adapter=None, state=None) -> dict:
    from rwkvtune.evaluate.lm import RwkvLM

    t0 = time.perf_counter()
    lm = RwkvLM(name, adapter=adapter, state=state, device=device, batch_size=args.batch_size or 32,
                prefix=args.prefix, precision=args.precision)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    summary = harness.run_tasks(lm, args.task_names, include_paths=args.include_path, limit=limit,
                        trust_code=args.trust_task_code,
                        num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters)
    label = name if not (adapter or state) else f"{name} + {adapter or state}"
    print(f"{label}: evaluated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return {"label": label, "model": name, "adapter": adapter, "state": state, **summary}


def _write(path: str, data: dict, table: str) -> None:
    stem, ext = os.path.splitext(path)
    json_path = path if ext == ".json" else path + ".json"
    atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
    atomic_write_text(stem + ".md" if ext == ".json" else path + ".md", table + "\n")
    print(f"wrote {json_path} and its table {os.path.splitext(json_path)[0]}.md", file=sys.stderr)


def run_tasks(args: argparse.Namespace) -> int:
    _check(args)
    require_lm_eval()

    items = ([args.model] if args.model else []) + list(args.compare or [])
    if not items:
        raise ConfigError("--tasks needs --model MODEL (or --compare MODEL ...)")
    models = [i for i in items if not (i.endswith(".json") and os.path.isfile(i))]
    args.task_names = expand_tasks(args.tasks) if args.tasks else None
    if models and not args.task_names:
        raise ConfigError(f"--compare {models[0]}: a model needs --tasks to be evaluated on (result files "
                          f"need none)")
    if args.task_names:
        task_manager(args.task_names, args.include_path, args.trust_task_code)  # unknown names fail here, before any model loads
    device = resolve_device(args.device)
    runs = []
    for item in items:
        if item in models:
            runs.append(_evaluate_model(args, item, device, args.adapter, args.state))
        else:
            runs.extend(read_result(item)["runs"])
    table = result_table(runs[0]) if len(runs) == 1 and not args.compare else \
        compare_table([(r["label"], r) for r in runs])
    print(table)
    if args.output:
        data = {"tasks": args.task_names, "runs": runs,
                "config": {"limit": args.limit, "num_fewshot": args.num_fewshot, "prefix": args.prefix,
                           "precision": args.precision, "batch_size": args.batch_size}}
        _write(args.output, data, table)
    return 0
