"""Running lm-eval tasks: names, data checks, results and tables.

* Task names: lm-eval's own (``hellaswag``, groups such as ``mmlu``, tags), ours in ``tasks/``
  (``rwkvtune_tiny``, ``rwkvtune_tiny_ppl``), those of ``--include-path`` folders, YAML files, and
  suites (:data:`SUITES`, e.g. ``rwkv7-paper``). Indexing lm-eval's 14k built-in task files takes
  ~20 s, so the small index (ours + include paths) is tried first and the full one built only
  when a name needs it.
* Errors, one line each: an unknown name (with the close names), a data set that is not on this
  machine (what to download and where it goes), a local data file that is missing.
* Results: ``{task: {metric: {"value", "stderr"}}}`` with the stderr lm-eval computes, printed as
  a Markdown table; :func:`compare_table` puts several models side by side.

lm-eval is imported inside the functions only (see :mod:`rwkvtune.evaluate`).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Sequence

from rwkvtune.errors import ConfigError, DataError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# The task set the RWKV-7 paper reports (zero-shot; lm-eval's defaults are 0-shot for all of them).
SUITES: dict[str, tuple[str, ...]] = {
    "rwkv7-paper": ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "sciq",
                    "mmlu"),
}

HF_CACHE_HINT = "$HF_HOME, default ~/.cache/huggingface"


def expand_tasks(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated (or listed) names with suites expanded, duplicates dropped, order kept."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    out: list[str] = []
    for name in (p.strip() for p in parts):
        for n in SUITES.get(name, (name,)) if name else ():
            if n not in out:
                out.append(n)
    if not out:
        raise ConfigError(f"--tasks: found {spec!r}, expected task names separated by commas, e.g. "
                          f"--tasks rwkvtune_tiny,hellaswag (or a suite: {', '.join(SUITES)})")
    return out


def _quiet_lm_eval() -> None:
    # lm-eval logs every task's defaults at WARNING; its real failures reach us as exceptions.
    logging.getLogger("lm_eval").setLevel(os.environ.get("RWKVTUNE_LM_EVAL_LOG", "ERROR"))


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and os.path.isfile(name)


@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *include], include_defaults=defaults)


_CODE_TAG = re.compile(r"!function\b|!!python")


def refuse_task_code(files: Sequence[Path]) -> None:
    """A user's task YAML may name Python to run (lm-eval's ``!function`` tag imports the module
    beside it): no file rwkvtune reads runs code unless the user says so (``--trust-task-code``).
    lm-eval's own installed tasks and ours are code we ship or installed, like any library."""
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ConfigError(f"{f}: cannot read this task file ({e.strerror}); check the path") from e
        m = _CODE_TAG.search(text)
        if m:
            line = text.count("\n", 0, m.start()) + 1
            raise ConfigError(f"{f}:{line}: this task YAML runs Python ({m.group(0)}); rwkvtune runs no code from "
                              f"files it reads unless told: pass --trust-task-code if you trust this folder")


def task_manager(names: Sequence[str], include_paths: Sequence[str] = (), trust_code: bool = False):
    """A TaskManager that knows every name in ``names`` (built once per process and kept). The
    user's task files (``include_paths`` folders, YAML files named in ``names``) are refused when
    they would run Python, unless ``trust_code``."""
    _quiet_lm_eval()
    include = []
    for p in include_paths:
        if not os.path.isdir(p):
            raise ConfigError(f"--include-path {p}: not a directory; pass a folder of lm-eval task YAML files")
        include.append(str(Path(p).resolve()))
    if not trust_code:
        user_files = [f for d in include for f in sorted(Path(d).rglob("*")) if f.suffix in (".yaml", ".yml")]
        refuse_task_code(user_files + [Path(n) for n in names if _is_yaml_file(n)])
    for defaults in (False, True):
        tm = _manager(tuple(include), defaults)
        unknown = [n for n in names if n not in tm.task_index and not _is_yaml_file(n)]
        if not unknown:
            return tm
    n = unknown[0]
    close = difflib.get_close_matches(n, list(tm.all_tasks) + list(SUITES), n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "no close name"
    raise ConfigError(f"--tasks: unknown task {n!r} ({hint}); lm-eval's tasks, rwkvtune's "
                      f"({', '.join(sorted(p.stem for p in TASKS_DIR.glob('*.yaml')))}), the suites "
                      f"({', '.join(SUITES)}) and those of --include-path folders are known")


def _chain(e: BaseException):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def data_error(name: str, e: Exception, tm) -> DataError:
    """The one-line error for a task whose data cannot be loaded: a hub data set not in the local
    cache (offline, or no network), or a local data file that is missing."""
    entry = tm.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    chain = _chain(e)
    text = " ".join(str(x) for x in chain)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    # The hub first: datasets looks for a local folder of that name before the hub, so a
    # FileNotFoundError sits in the chain of a hub data set that is not cached too.
    hub = re.search(r"reach '([^']+)'|[Dd]ataset '([^']+)' doesn't exist", text)
    offline = "OfflineModeIsEnabled" in text or any(type(x).__name__ in ("ConnectionError", "DatasetNotFoundError",
                                                                "OfflineModeIsEnabled", "LocalEntryNotFoundError")
                                       for x in chain)
    if hub or offline:
        dataset = next((g for g in hub.groups() if g), None) if hub else cfg.get("dataset_path")
        config = cfg.get("dataset_name") if cfg.get("dataset_path") == dataset else None
        call = f"datasets.load_dataset({dataset!r}{', ' + repr(config) if config else ''})"
        return DataError(f"task {name} needs the Hugging Face data set {dataset}, which is not in this machine's "
                         f"cache and cannot be downloaded here ({first}); on a machine with network run python -c "
                         f"\"import datasets; {call}\" and copy its cache folder ({HF_CACHE_HINT}) to the same "
                         f"place here, or put the data in local files and point a task YAML at them (dataset_path: "
                         f"json, dataset_kwargs: data_files) passed with --include-path DIR")
    if any(isinstance(x, FileNotFoundError) for x in chain) or "Unable to find" in text:
        where = f" (set in {entry.yaml_path})" if entry is not None and entry.yaml_path else ""
        return DataError(f"task {name}: a data file is missing ({first}); put the file there or fix the task's "
                         f"data_files{where}")
    return DataError(f"task {name}: its data set could not be loaded ({type(e).__name__}: {first})")


def load_tasks(tm, names: Sequence[str]) -> list:
    """lm-eval Task/Group objects for ``names``, each name's data loaded (or its one-line error)."""
    objs = []
    for name in names:
        try:
            res = tm.load([name])
        except (ConfigError, DataError):
            raise
        except Exception as e:  # lm-eval and datasets raise many types; each is turned into one line
            raise data_error(name, e, tm) from e
        if name in res.get("groups", {}):
            objs.append(res["groups"][name])
        elif name in res["tasks"]:
            objs.append(res["tasks"][name])
        else:  # a tag or a YAML path: its tasks
            objs.extend(res["tasks"].values())
    return objs


def run_tasks(lm, names: Sequence[str], *, include_paths: Sequence[str] = (), limit: float | None = None,
              num_fewshot: int | None = None, bootstrap_iters: int = 100000, seed: int = 0,
              trust_code: bool = False) -> dict:
    """Evaluate ``lm`` (an lm-eval LM) on ``names``; returns :func:`summarize` of lm-eval's results."""
    from lm_eval import simple_evaluate

    tm = task_manager(names, include_paths, trust_code)
    objs = load_tasks(tm, names)
    res = simple_evaluate(model=lm, tasks=objs, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return summarize(res)


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summarize(res: dict) -> dict:
    """``{"results": {task: {metric: {"value", "stderr"}}}, "n_samples": {task: n}, "shown": [...]}``
    from lm-eval's result dict. ``shown``: the rows a table prints (the subtasks of a group are
    left to the JSON)."""
    table: dict[str, dict[str, dict]] = {}
    for section in ("results", "groups"):
        for task, metrics in (res.get(section) or {}).items():
            row = table.setdefault(task, {})
            for key, v in metrics.items():
                if "," not in key:
                    continue
                metric, filt = key.split(",", 1)
                stderr = metric.endswith("_stderr")
                metric = metric.removesuffix("_stderr")
                name = metric if filt == "none" else f"{metric}/{filt}"
                row.setdefault(name, {"value": None, "stderr": None})["stderr" if stderr else "value"] = _number(v)
    hidden = {t for subs in (res.get("group_subtasks") or {}).values() for t in subs}
    shown = [t for t in table if t not in hidden] or list(table)
    n = {t: (v.get("effective") if isinstance(v, dict) else v) for t, v in (res.get("n-samples") or {}).items()}
    return {"results": table, "n_samples": n, "shown": shown}


def _cell(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    s = f"{m['value']:.4f}"
    return s + (f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else "")


def result_table(summary: dict) -> str:
    """One model's results as a Markdown table (task, metric, value ± stderr)."""
    lines = ["| task | metric | value ± stderr |", "|---|---|---|"]
    for task in summary["shown"]:
        for metric, m in summary["results"][task].items():
            lines.append(f"| {task} | {metric} | {_cell(m)} |")
    return "\n".join(lines)


def compare_table(runs: Sequence[tuple[str, dict]]) -> str:
    """Tasks x models: one row per (task, metric) any model has, one column per model."""
    rows: list[tuple[str, str]] = []
    for _, s in runs:
        for task in s["shown"]:
            for metric in s["results"][task]:
                if (task, metric) not in rows:
                    rows.append((task, metric))
    head = "| task | metric | " + " | ".join(label.replace("|", "/") for label, _ in runs) + " |"
    lines = [head, "|---|---|" + "---|" * len(runs)]
    for task, metric in rows:
        cells = [_cell(s["results"].get(task, {}).get(metric)) for _, s in runs]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_result(path: str) -> dict:
    """A result file written by ``rwkvtune eval --tasks ... --output`` (checked), for --compare."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--compare {path}: cannot read it as an rwkvtune eval result ({e}); pass a model or a "
                        f"JSON file written by rwkvtune eval --tasks ... --output") from e
    runs = data.get("runs") if isinstance(data, dict) else None
    ok = isinstance(runs, list) and all(isinstance(r, dict) and isinstance(r.get("results"), dict) and
                                        isinstance(r.get("shown"), list) and isinstance(r.get("label"), str)
                                        for r in runs)
    if not ok:
        raise DataError(f"--compare {path}: not an rwkvtune eval result (expected an object with \"runs\": "
                        f"[{{label, results, shown}}, ...]); pass a model or a JSON file written by --output")
    return data
