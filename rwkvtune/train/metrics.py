"""Metrics: metrics.jsonl, the progress line (rwkvtune.train.progress), optional TensorBoard/wandb, and a loss-curve PNG."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path

from rwkvtune.errors import ConfigError
from rwkvtune.train.progress import Progress, write
from rwkvtune.train.run_dir import RunDir
from rwkvtune.utils import atomic_write_text, output_error, read_error



def _json_safe(row: dict) -> dict:
    """``row`` with non-finite floats as None: JSON has no NaN/Infinity (json.dumps would write
    the bare tokens, which strict parsers such as jq or JavaScript reject)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _restart_jsonl(path: Path, resume_step: int | None) -> list[dict]:
    """A fresh run removes ``path``; a resumed one keeps its rows up to the resumed step (a kill may
    have left later or torn lines) and returns them."""
    if resume_step is None or not path.exists():
        path.unlink(missing_ok=True)
        return []
    kept = []
    for line in _read_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= resume_step:
            kept.append(row)
    atomic_write_text(path, "".join(json.dumps(_json_safe(r)) + "\n" for r in kept))
    return kept


def _import_summary_writer():
    """torch's SummaryWriter, or the ImportError saying why not (torch.utils.tensorboard itself
    imports the tensorboard package and fails without it or with one older than 1.15)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        return None, e
    return SummaryWriter, None


WANDB_MISSING = "--wandb needs the wandb package: pip install wandb (or drop --wandb)"
TB_MISSING = "tensorboard=true needs the tensorboard package{why}: pip install tensorboard, or set tensorboard=false"


def check_packages(cfg) -> None:
    """Fail at setup, before any data or model work, when a logger asked for is not installed."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(WANDB_MISSING)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(TB_MISSING.format(why=""))


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(WANDB_MISSING) from e
    return wandb


def _read_lines(path: Path) -> list[str]:
    """The lines of a run's own log, or a one-line error when it cannot be read (permissions)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise read_error(path, e) from e


def _task_series(evals: dict[int, dict]) -> dict[str, list[tuple[int, float]]]:
    """eval_tasks metrics (``eval_<task>/<metric>``) whose every value lies in [0, 1], by name:
    (step, value) points. Perplexities and other unbounded metrics stay in metrics.jsonl/TensorBoard."""
    series: dict[str, list[tuple[int, float]]] = {}
    for step, e in sorted(evals.items()):
        for k, v in e.items():
            if k.startswith("eval_") and "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k.removeprefix("eval_"), []).append((step, float(v)))
    return {k: pts for k, pts in series.items() if all(0.0 <= v <= 1.0 for _, v in pts)}


class MetricsLogger:
    """Logs of the main process. ``resume_step`` (the checkpoint's step on --resume) continues the
    run's logs: metrics.jsonl keeps its rows up to that step, TensorBoard hides the later events of
    the interrupted run, and wandb continues the same run.

    ``finish()`` at the end closes TensorBoard/wandb and draws loss.png; ``close()`` (or using the
    logger as a context manager) closes them on any exit, marking the wandb run failed on an error.
    """

    def __init__(self, run, cfg, enabled: bool = True, resume_step: int | None = None):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.out, self.enabled = self.run.path, enabled
        self.path = self.run.metrics
        self.rows: list[dict] = []
        self.evals: dict[int, dict] = {}  # step -> eval result, those of the resumed run included
        self.tb = self.wandb = None
        self.last_loss = None
        self.bar: Progress | None = None  # the open progress line (see progress())
        if not enabled:
            return
        # Import the optional packages first: a missing wandb stops the run at setup, before any
        # file of the run directory is touched.
        SummaryWriter, tb_error = _import_summary_writer() if cfg.tensorboard is not False else (None, None)
        wandb = _import_wandb() if cfg.wandb else None
        if SummaryWriter is None and cfg.tensorboard:  # asked for (true), not the default (None: if installed)
            raise ConfigError(TB_MISSING.format(why=f" ({tb_error})"))
        self.out.mkdir(parents=True, exist_ok=True)
        kept = _restart_jsonl(self.path, resume_step)
        _restart_jsonl(self.run.rollouts, resume_step)
        self.rows = [r for r in kept if "loss" in r]
        self.evals = {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in kept
                      if any(k.startswith("eval_") for k in r)}
        if SummaryWriter is not None:
            # tensorboard is on by default and used when installed. purge_step writes a restart
            # marker: TensorBoard then hides the events of earlier files in tb/ at steps >= it, i.e.
            # those an interrupted run logged after the checkpoint we resume from (steps from
            # resume_step + 1 are logged again), and on a fresh run all of an earlier run's.
            purge_step = 0 if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(self.run.tensorboard), purge_step=purge_step)
        if wandb is not None:
            self.wandb = self._init_wandb(wandb, cfg, resume_step)

    def _init_wandb(self, wandb, cfg, resume_step: int | None):
        id_path = self.run.wandb_id
        kwargs = {}
        if resume_step is not None and id_path.exists():
            # Continue the interrupted run's wandb run rather than starting a second one. ("allow"
            # also starts it afresh under that id if it never reached the server.)
            kwargs = {"id": "".join(_read_lines(id_path)).strip(), "resume": "allow"}
        # No mode= here: wandb reads WANDB_MODE (offline/disabled) and its other settings from the
        # environment itself, and passing a mode would override them.
        try:
            run = wandb.init(project=cfg.wandb, config=cfg.to_dict(), dir=str(self.out), **kwargs)
        except Exception as e:  # no API key, no network, bad project name: one line at setup
            raise ConfigError(f"--wandb {cfg.wandb}: wandb.init failed ({type(e).__name__}: {e}); run `wandb "
                              f"login`, or set WANDB_MODE=offline to log locally and `wandb sync` later") from e
        run_id = getattr(run, "id", None)
        if isinstance(run_id, str) and run_id:
            atomic_write_text(id_path, run_id + "\n")
        return run

    def info(self, message: str) -> None:
        """A line on stderr, above the progress line when one is open."""
        if self.enabled:
            write(message)

    def progress(self, total: int, initial: int = 0) -> Progress:
        """The run's progress line on stderr (a no-op on processes other than the main one); what
        :meth:`tick` reports to until it is closed."""
        self.bar = Progress(total, initial, enabled=self.enabled)
        return self.bar

    def phase(self, what: str):
        """``with logger.phase("eval"):``: names what runs between steps on the open progress line."""
        bar = self.bar
        return bar.phase(what) if bar is not None else contextlib.nullcontext()

    def tick(self, what: str, done: int, of: int) -> None:
        """Progress inside a step or an eval (e.g. micro-batch 3 of 8) onto the open progress line."""
        bar = self.bar
        if bar is not None and not bar.closed:
            bar.tick(what, done, of)

    def _write(self, row: dict, path: Path | None = None) -> None:
        # One line per call, opened in append mode and closed (so flushed) at once.
        try:
            with open(path or self.path, "a") as f:
                f.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")
        except OSError as e:  # disk full: one line, not a traceback (the checkpoints are intact)
            raise output_error(path or self.path, e) from e

    def log_rollouts(self, rows: list[dict]) -> None:
        """Append sampled completions (method grpo) to rollouts.jsonl, one JSON object each."""
        if self.enabled and rows:
            with open(self.run.rollouts, "a") as f:
                f.write("".join(json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in rows))

    def log_step(self, row: dict, progress, advance: int = 1) -> None:
        """Write one row of training metrics; the progress line shows it and moves ``advance`` steps
        (when stderr is not a terminal: one plain line per row)."""
        self.last_loss = row["loss"]
        if not self.enabled:
            return
        self.rows.append(row)
        self._write(row)
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"  # None: a step without loss units
        progress.set_postfix(loss=loss, lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        progress.update(advance)
        if self.tb is not None:
            # Every logged quantity (the method's metrics too), but not the cumulative token count.
            for k, v in row.items():
                if k not in ("step", "tokens") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
            # Drain SummaryWriter's queue now, as metrics.jsonl is written per line: its writer thread is
            # a daemon, so queued events (and, with TensorFlow's gfile, events buffered for up to
            # flush_secs=120) are lost if the run dies.
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def log_event(self, step: int, fields: dict) -> None:
        """A row that records something other than metrics at ``step`` (e.g. a resume that changed
        the lr schedule); it carries no loss, so curves and summaries skip it."""
        if self.enabled:
            self._write({"step": step, **fields})

    def log_eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **result}
        self.evals[step] = dict(result)
        self._write(row)
        shown = [f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)][:4]  # the method's first few
        self.info(f"step {step}: " + ", ".join(shown))
        if self.tb is not None:
            for k, v in result.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"eval/{k.removeprefix('eval_')}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(result, step=step)

    def close(self, failed: bool = False) -> None:
        """Flush and close TensorBoard and finish the wandb run (marked failed with ``failed``).
        Safe to call more than once."""
        tb, run = self.tb, self.wandb
        self.tb = self.wandb = None
        try:
            if tb is not None:
                tb.close()
        finally:
            if run is not None:
                if failed:
                    run.finish(exit_code=1)
                else:
                    run.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def finish(self) -> None:
        if not self.enabled:
            return
        self.close()
        self.plot()

    def plot(self) -> Path | None:
        """loss.png next to metrics.jsonl (needs matplotlib; skipped with a note without it)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.info("note: install matplotlib for loss.png (pip install matplotlib)")
            return None
        points = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        if not points:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*points), label="train loss")
        evals = sorted((step, e["eval_loss"]) for step, e in self.evals.items() if e.get("eval_loss") is not None)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()
        tasks = _task_series(self.evals)
        if tasks:  # eval_tasks scores (accuracies and the like, all in [0, 1]) on a second axis
            ax2 = ax.twinx()
            for name, pts in tasks.items():
                ax2.plot(*zip(*pts), "s--", label=name)
            ax2.set_ylabel("task score")
            h2 = ax2.get_legend_handles_labels()
            handles = (handles[0] + h2[0], handles[1] + h2[1])
        ax.legend(*handles, fontsize="small")
        fig.tight_layout()
        path = self.run.loss_plot
        try:
            fig.savefig(path, dpi=100)
        except OSError as e:
            raise output_error(path, e) from e
        finally:
            plt.close(fig)
        return path
