"""``eval_tasks`` during training: lm-eval tasks on the model being trained, every ``eval_every``
steps and at the end, logged beside the loss (metrics.jsonl, TensorBoard, wandb, loss.png) as
``eval_<task>/<metric>``.

The main process (rank 0) runs the tasks on the unwrapped model (its LoRA adapters or tuned
initial state included) under the run's precision; the other processes wait at a barrier. A
sharded (fsdp) model cannot run on one process, so config validation refuses that combination.
Task names and lm-eval's presence are checked at setup, before the first step.
"""

from __future__ import annotations

import time

import torch

from rwkvtune import log
from rwkvtune.evaluate import require_lm_eval
from rwkvtune.evaluate.harness import expand_tasks, run_tasks, task_manager


def check_eval_tasks(cfg) -> None:
    """At setup: lm-eval installed and every task name known (one line otherwise)."""
    if not cfg.eval_tasks:
        return

    require_lm_eval("eval_tasks")

    task_manager(expand_tasks(list(cfg.eval_tasks)))


def flatten(summary: dict) -> dict[str, float]:
    """``{"eval_<task>/<metric>": value}`` of the shown rows (groups, not their subtasks)."""
    out = {}
    for task in summary["shown"]:
        for metric, m in summary["results"][task].items():
            if m.get("value") is not None:
                out[f"eval_{task}/{metric}"] = m["value"]
    return out


def run_eval_tasks(cfg, module, autocast, main: bool, world_size: int, batch_size: int = 32) -> dict[str, float]:
    """The task metrics of ``module`` (a TrainModule) on the main process ({} on the others)."""
    result: dict[str, float] = {}
    if main:
        from rwkvtune.evaluate.lm import RwkvLM  # imports lm_eval, an optional package

        t0 = time.perf_counter()
        was_training = module.training
        module.eval()
        try:
            wkv_init = module.wkv_init.detach() if module.wkv_init is not None else None
            lm = RwkvLM(module.model, wkv_init=wkv_init, batch_size=batch_size, autocast=autocast)
            limit = cfg.eval_tasks_limit
            limit = int(limit) if limit is not None and limit >= 1 else limit
            summary = run_tasks(lm, expand_tasks(list(cfg.eval_tasks)), limit=limit, bootstrap_iters=0)
        finally:
            module.train(was_training)
        result = flatten(summary)
        log.info(f"eval_tasks: {time.perf_counter() - t0:.1f} s")
    if world_size > 1:
        torch.distributed.barrier()
    return result
