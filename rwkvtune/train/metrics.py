"""Metrics: metrics.jsonl, a progress bar, optional TensorBoard/wandb, and a loss-curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out: Path, cfg, enabled: bool = True, resume_step: int | None = None):
        self.out, self.enabled = Path(out), enabled
        self.path = self.out / "metrics.jsonl"
        self.rows: list[dict] = []
        self.tb = self.wandb = None
        self.last_loss = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Keep the history up to the resumed step; a kill may have left later or torn lines.
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(row)
            from rwkvtune.utils import atomic_write_text

            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.rows = [r for r in kept if "loss" in r]
        elif self.path.exists():
            self.path.unlink()
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:
                self.tb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                from rwkvtune.errors import ConfigError

                raise ConfigError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
            self.wandb = wandb.init(project=cfg.wandb, config=cfg.to_dict(), dir=str(self.out))

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def progress(self, total: int, initial: int = 0):
        return tqdm(total=total, initial=initial, disable=not self.enabled, unit="step", dynamic_ncols=True,
                    file=sys.stderr)

    def _write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_step(self, row: dict, progress) -> None:
        self.last_loss = row["loss"]
        if not self.enabled:
            return
        self.rows.append(row)
        self._write(row)
        progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        progress.update(1)
        if self.tb:
            for k in ("loss", "lr", "tokens_per_s"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])
        if self.wandb:
            self.wandb.log(row, step=row["step"])

    def log_eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **result}
        self._write(row)
        self.info(f"step {step}: eval_loss {result['eval_loss']:.4f}, eval_ppl {result['eval_ppl']:.2f}")
        if self.tb:
            self.tb.add_scalar("eval/loss", result["eval_loss"], step)
        if self.wandb:
            self.wandb.log(result, step=step)

    def finish(self) -> None:
        if not self.enabled:
            return
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
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
        if not self.rows:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows], label="train loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
