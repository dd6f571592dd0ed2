"""MetricsLogger: metrics.jsonl, and the optional TensorBoard and wandb paths.

Neither tensorboard nor wandb is a test dependency: their absence is simulated with a None entry
in sys.modules (which makes the import raise ImportError), and their use is checked with small
recording fakes put in sys.modules. The logger is driven directly, in the order trainer.train()
calls it, so these tests need no model and run in well under a second.
"""

import importlib.machinery
import json
import sys
import types

import pytest

from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.metrics import MetricsLogger
from rwkvtune.train.run_dir import RunDir

# metrics.py does `from torch.utils.tensorboard import SummaryWriter`; that package's __init__
# imports tensorboard, so the fake goes in at this level.
TB_MODULE = "torch.utils.tensorboard"


def _cfg(**kw):
    base = dict(model="0.1b", data="d.jsonl", tensorboard=False, wandb=None)
    base.update(kw)
    return TrainConfig(**base)


def _row(step, loss=None, **kw):
    row = {"step": step, "loss": 2.0 / step if loss is None else loss, "lr": 1e-3, "tokens": 32 * step,
           "tokens_per_s": 1000.0, "grad_norm": 0.5}
    row.update(kw)
    return row


class _Progress:
    """The bits of a tqdm bar that log_step uses."""

    def __init__(self):
        self.updates, self.postfix = 0, None

    def set_postfix(self, **kw):
        self.postfix = kw

    def update(self, n):
        self.updates += n


def _strict_rows(path):
    """metrics.jsonl parsed as strict JSON (NaN/Infinity tokens are an error, as in jq or JS)."""

    def reject(token):
        raise ValueError(f"not valid JSON: {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


# ---- fakes -------------------------------------------------------------------------------------


class FakeSummaryWriter:
    def __init__(self, log_dir, purge_step=None, **kw):
        self.log_dir, self.purge_step, self.kw = log_dir, purge_step, kw
        self.scalars, self.flushes, self.closes = [], 0, 0
        # flushed_scalars: what had reached the "disk" at each flush.
        self.flushed_scalars = 0
        self.writers.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1
        self.flushed_scalars = len(self.scalars)

    def close(self):
        self.closes += 1


@pytest.fixture
def fake_tb(monkeypatch):
    mod = types.ModuleType(TB_MODULE)
    writer_cls = type("SummaryWriter", (FakeSummaryWriter,), {"writers": []})
    mod.SummaryWriter = writer_cls
    monkeypatch.setitem(sys.modules, TB_MODULE, mod)
    return writer_cls.writers


class FakeRun:
    def __init__(self, run_id, init_kwargs):
        self.id, self.init_kwargs = run_id, init_kwargs
        self.logged, self.finished = [], []

    def log(self, data, step=None):
        self.logged.append((dict(data), step))

    def finish(self, exit_code=None):
        self.finished.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec() looks at it
    mod.runs, mod.init_env, mod.init_error = [], [], None

    def init(**kwargs):
        import os

        if mod.init_error is not None:
            raise mod.init_error
        mod.init_env.append(os.environ.get("WANDB_MODE"))
        run = FakeRun(kwargs.get("id") or f"fake{len(mod.runs)}", kwargs)
        mod.runs.append(run)
        return run

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


@pytest.fixture
def no_plot(monkeypatch):
    """finish() draws loss.png with matplotlib; these tests check the other outputs."""
    calls = []
    monkeypatch.setattr(MetricsLogger, "plot", lambda self: calls.append(self))
    return calls


# ---- metrics.jsonl -----------------------------------------------------------------------------


def test_jsonl_rows_written_and_flushed_per_line(tmp_path, no_plot):
    out = tmp_path / "run"
    logger = MetricsLogger(out, _cfg())
    progress = _Progress()
    rows = [_row(1), _row(2, grad_norm=None)]
    for i, row in enumerate(rows):
        logger.log_step(row, progress)
        # On disk at once (a killed run keeps every logged step), not only at finish().
        assert _strict_rows(out / "metrics.jsonl") == rows[:i + 1]
    logger.log_eval(2, {"eval_loss": 1.5, "eval_ppl": 4.48, "eval_tokens": 64})
    assert _strict_rows(out / "metrics.jsonl")[-1] == {"step": 2, "eval_loss": 1.5, "eval_ppl": 4.48,
                                                       "eval_tokens": 64}
    assert progress.updates == 2 and progress.postfix["loss"] == "1.0000"
    assert logger.last_loss == 1.0 and logger.rows == rows
    logger.finish()
    assert no_plot == [logger]


def test_jsonl_non_finite_values_are_valid_json_null(tmp_path):
    out = tmp_path / "run"
    logger = MetricsLogger(out, _cfg())
    logger.log_step(_row(1, grad_norm=float("inf"), tokens_per_s=float("nan")), _Progress())
    logger.log_eval(1, {"eval_loss": float("nan"), "eval_ppl": float("nan"), "eval_tokens": 8})
    train_row, eval_row = _strict_rows(out / "metrics.jsonl")
    assert train_row["grad_norm"] is None and train_row["tokens_per_s"] is None and train_row["loss"] == 2.0
    assert eval_row == {"step": 1, "eval_loss": None, "eval_ppl": None, "eval_tokens": 8}


def test_jsonl_resume_keeps_rows_up_to_checkpoint_and_appends(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = [_row(s) for s in range(1, 6)] + [{"step": 2, "eval_loss": 1.0, "eval_ppl": 2.7, "eval_tokens": 8},
                                            {"step": 4, "eval_loss": 0.9, "eval_ppl": 2.5, "eval_tokens": 8}]
    # As left by a run killed after step 5 (checkpoint at 3), mid-write of a line; an older
    # version wrote a bare NaN token.
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old)
                                       + '{"step": 3, "loss": NaN}\n' + '{"step": 6, "lo')
    logger = MetricsLogger(out, _cfg(), resume_step=3)
    kept = _strict_rows(out / "metrics.jsonl")
    assert kept == old[:3] + [old[5], {"step": 3, "loss": None}]
    assert [r["step"] for r in logger.rows] == [1, 2, 3, 3]  # the loss rows, for loss.png
    logger.log_step(_row(4, loss=0.25), _Progress())
    assert _strict_rows(out / "metrics.jsonl") == kept + [_row(4, loss=0.25)]


def test_jsonl_fresh_run_replaces_old_file(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps(_row(1, loss=9.0)) + "\n")
    logger = MetricsLogger(out, _cfg())
    assert not (out / "metrics.jsonl").exists()
    logger.log_step(_row(1), _Progress())
    assert _strict_rows(out / "metrics.jsonl") == [_row(1)]


def test_disabled_logger_writes_and_imports_nothing(tmp_path, monkeypatch):
    # Non-main DDP ranks: no files, no optional packages needed, but last_loss is kept.
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, TB_MODULE, None)
    logger = MetricsLogger(tmp_path / "run", _cfg(tensorboard=True, wandb="proj"), enabled=False)
    logger.log_step(_row(1), _Progress())
    logger.log_eval(1, {"eval_loss": 1.0, "eval_ppl": 2.7, "eval_tokens": 8})
    logger.finish()
    assert logger.last_loss == 2.0 and not (tmp_path / "run").exists()


# ---- missing packages --------------------------------------------------------------------------


def test_missing_wandb_is_one_line_error_at_setup_before_touching_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps(_row(1)) + "\n")
    with pytest.raises(ConfigError) as e:
        MetricsLogger(out, _cfg(wandb="proj"))
    msg = str(e.value)
    assert "--wandb" in msg and "pip install wandb" in msg and "\n" not in msg
    assert isinstance(e.value.__cause__, ImportError)  # the cause is kept (shown by --debug)
    # Raised before the logger cleared the previous metrics of the directory.
    assert _strict_rows(out / "metrics.jsonl") == [_row(1)]


def test_missing_tensorboard_is_silent_by_default_and_an_error_when_asked_for(tmp_path, monkeypatch, capsys):
    # The default (None) uses tensorboard when installed and says nothing otherwise; tensorboard=true
    # is a request, so its absence is a one-line error at setup naming the pip command.
    monkeypatch.setitem(sys.modules, TB_MODULE, None)
    out = tmp_path / "run"
    logger = MetricsLogger(out, _cfg(tensorboard=None))
    assert logger.tb is None and capsys.readouterr().err == ""
    logger.log_step(_row(1), _Progress())
    logger.close()
    assert _strict_rows(out / "metrics.jsonl") == [_row(1)] and not (out / "tb").exists()
    with pytest.raises(ConfigError) as e:
        MetricsLogger(tmp_path / "run2", _cfg(tensorboard=True))
    assert "pip install tensorboard" in str(e.value) and "tensorboard=false" in str(e.value)
    assert not (tmp_path / "run2").exists()


def test_tensorboard_off_needs_nothing_and_says_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, TB_MODULE, None)
    logger = MetricsLogger(tmp_path / "run", _cfg(tensorboard=False))
    assert logger.tb is None and capsys.readouterr().err == ""


# ---- TensorBoard -------------------------------------------------------------------------------


def test_tensorboard_scalars_flushed_each_step_and_closed(tmp_path, fake_tb, no_plot):
    out = tmp_path / "run"
    logger = MetricsLogger(out, _cfg(tensorboard=True))
    (writer,) = fake_tb
    assert writer.log_dir == str(out / "tb")
    # A fresh run hides whatever an earlier attempt left in tb/ (as metrics.jsonl is restarted).
    assert writer.purge_step == 0
    progress = _Progress()
    logger.log_step(_row(1, lr=1e-3, tokens_per_s=500.0), progress)
    assert writer.flushed_scalars == 4  # on disk before the next step, as metrics.jsonl is
    logger.log_step(_row(2, lr=2e-3, tokens_per_s=600.0, **{"rewards/margins": 0.25}), progress)
    logger.log_eval(2, {"eval_loss": 0.75, "eval_ppl": 2.1, "eval_tokens": 16})
    assert writer.scalars == [
        ("train/loss", 2.0, 1), ("train/lr", 1e-3, 1), ("train/tokens_per_s", 500.0, 1), ("train/grad_norm", 0.5, 1),
        ("train/loss", 1.0, 2), ("train/lr", 2e-3, 2), ("train/tokens_per_s", 600.0, 2), ("train/grad_norm", 0.5, 2),
        ("train/rewards/margins", 0.25, 2),
        ("eval/loss", 0.75, 2), ("eval/ppl", 2.1, 2),
    ]
    assert writer.flushed_scalars == 11 and writer.closes == 0
    logger.finish()
    assert writer.closes == 1 and logger.tb is None and no_plot == [logger]
    logger.close()  # idempotent
    assert writer.closes == 1


def test_tensorboard_resume_purges_steps_after_checkpoint(tmp_path, fake_tb):
    out = tmp_path / "run"
    MetricsLogger(out, _cfg(tensorboard=True)).close()
    logger = MetricsLogger(out, _cfg(tensorboard=True), resume_step=3)
    fresh, resumed = fake_tb
    # Same logdir; events the interrupted run logged at steps >= 4 are hidden, as step 4 comes again.
    assert resumed.log_dir == fresh.log_dir == str(out / "tb") and resumed.purge_step == 4
    logger.log_step(_row(4), _Progress())
    assert resumed.scalars[0] == ("train/loss", 0.5, 4)


# ---- wandb -------------------------------------------------------------------------------------


def test_wandb_init_log_and_finish(tmp_path, fake_wandb, monkeypatch, no_plot):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = _cfg(wandb="my-proj", lr=3e-4)
    logger = MetricsLogger(out, cfg)
    (run,) = fake_wandb.runs
    # Offline mode comes from the environment: no mode/settings passed that would override it.
    assert run.init_kwargs == {"project": "my-proj", "config": cfg.to_dict(), "dir": str(out)}
    assert run.init_kwargs["config"]["lr"] == 3e-4 and fake_wandb.init_env == ["offline"]
    assert RunDir(out).wandb_id.read_text().strip() == run.id
    progress = _Progress()
    logger.log_step(_row(1), progress)
    logger.log_step(_row(2, grad_norm=None), progress)
    logger.log_eval(2, {"eval_loss": 0.75, "eval_ppl": 2.1, "eval_tokens": 16})
    assert run.logged == [(_row(1), 1), (_row(2, grad_norm=None), 2),
                          ({"eval_loss": 0.75, "eval_ppl": 2.1, "eval_tokens": 16}, 2)]
    assert run.finished == []
    logger.finish()
    assert run.finished == [None] and logger.wandb is None
    logger.close()
    assert run.finished == [None]


def test_wandb_resume_continues_the_same_run(tmp_path, fake_wandb):
    out = tmp_path / "run"
    first = MetricsLogger(out, _cfg(wandb="proj"))
    first.log_step(_row(1), _Progress())
    first.close()
    first_id = fake_wandb.runs[0].id
    resumed = MetricsLogger(out, _cfg(wandb="proj"), resume_step=1)
    run = fake_wandb.runs[1]
    assert run.init_kwargs["id"] == first_id and run.init_kwargs["resume"] == "allow"
    assert run.init_kwargs["project"] == "proj"
    resumed.log_step(_row(2), _Progress())
    assert run.logged == [(_row(2), 2)]
    resumed.close()
    # A fresh (not resumed) run in that directory is a new wandb run, and its id replaces the old one.
    MetricsLogger(out, _cfg(wandb="proj")).close()
    fresh = fake_wandb.runs[2]
    assert "id" not in fresh.init_kwargs and "resume" not in fresh.init_kwargs
    assert fresh.id != first_id and RunDir(out).wandb_id.read_text().strip() == fresh.id


def test_wandb_resume_without_saved_id_starts_a_run(tmp_path, fake_wandb):
    # E.g. the first attempt ran without --wandb: a plain new run, whose id is kept from now on.
    out = tmp_path / "run"
    MetricsLogger(out, _cfg(wandb="proj"), resume_step=5).close()
    (run,) = fake_wandb.runs
    assert "id" not in run.init_kwargs and RunDir(out).wandb_id.read_text().strip() == run.id


def test_wandb_init_failure_is_one_line_config_error(tmp_path, fake_wandb):
    fake_wandb.init_error = RuntimeError("api_key not configured (no-tty)")
    with pytest.raises(ConfigError) as e:
        MetricsLogger(tmp_path / "run", _cfg(wandb="proj"))
    msg = str(e.value)
    assert "--wandb proj" in msg and "api_key not configured" in msg and "WANDB_MODE=offline" in msg
    assert "\n" not in msg


def test_close_on_error_flushes_tensorboard_and_fails_wandb_run(tmp_path, fake_tb, fake_wandb, no_plot):
    with pytest.raises(RuntimeError, match="diverged"):
        with MetricsLogger(tmp_path / "run", _cfg(tensorboard=True, wandb="proj")) as logger:
            logger.log_step(_row(1), _Progress())
            raise RuntimeError("diverged")
    (writer,), (run,) = fake_tb, fake_wandb.runs
    assert writer.closes == 1 and run.finished == [1] and no_plot == []
    # A clean exit after finish() closes nothing twice.
    with MetricsLogger(tmp_path / "run2", _cfg(tensorboard=True, wandb="proj")) as logger:
        logger.finish()
    assert fake_tb[1].closes == 1 and fake_wandb.runs[1].finished == [None]


def test_close_finishes_wandb_even_if_tensorboard_close_fails(tmp_path, fake_tb, fake_wandb):
    logger = MetricsLogger(tmp_path / "run", _cfg(tensorboard=True, wandb="proj"))

    def broken_close():
        raise OSError("disk full")

    fake_tb[0].close = broken_close
    with pytest.raises(OSError, match="disk full"):
        logger.close()
    assert fake_wandb.runs[0].finished == [None]
