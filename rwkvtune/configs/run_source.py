"""A training run's directory as a model name: the one resolver every command uses.

``rwkvtune train --out runs/x`` leaves, depending on the mode (see rwkvtune/train/run_dir.py for
the whole layout):

* full and LoRA: ``final.pth`` (LoRA: merged), which is the run's model;
* LoRA without ``final.pth`` (removed to save space): ``adapter.pth`` on the run's base model;
* state: ``state.pth``, a tuned initial WKV state on the run's (unchanged) base model.

``config.yaml`` (the resolved config the run saved) names the base (``model``), how it began
(``init``) and the file suffix (``save_format``). :func:`resolve_run` turns a directory into a
:class:`RunModel` (which weights to load, and which adapter or state to put on them); the loaders
(``RWKV7.from_checkpoint``, ``rwkvtune.peft.loading.load_model``, ``load_model_config``, ``export``,
``inspect``) all go through it. Only file names and config.yaml are read here, no tensor.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.safe_yaml import read_yaml_file

# The names RunDir (rwkvtune/train/run_dir.py) gives a run's outputs; configs sits below train, so
# they are spelled here too, and a test checks that both agree.
OUTPUT_STEMS = ("final", "adapter", "state")
SUFFIXES = (".pth", ".safetensors")
RUN_CONFIG = "config.yaml"
# A base that is itself a run directory is followed this many times at most (a config.yaml naming
# its own directory would otherwise loop).
_MAX_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class RunModel:
    """What a run directory stands for as a model: ``model`` (a model file, or the base's name or
    path), plus the run's ``adapter`` or tuned ``state`` file to apply to it (None when ``model`` is
    the run's own ``final`` file)."""

    run: str
    model: str
    adapter: str | None = None
    state: str | None = None

    @property
    def is_final(self) -> bool:
        return self.adapter is None and self.state is None

    def describe(self) -> str:
        """For messages: 'runs/x (its final.pth)' or 'runs/x (state.pth on base 0.1b)'."""
        if self.is_final:
            return f"{self.run} (its {Path(self.model).name})"
        part = self.adapter or self.state
        return f"{self.run} ({Path(part).name} on its base model {self.model})"


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory that is not a Hugging Face model folder (no config.json):
    the only directories a model name can then be are training runs."""
    p = Path(os.fspath(path))
    return p.is_dir() and not (p / "config.json").is_file()


def _output(run: Path, stem: str) -> Path | None:
    found = [run / f"{stem}{s}" for s in SUFFIXES if (run / f"{stem}{s}").is_file()]
    return found[0] if found else None


def _run_config(run: Path) -> dict:
    path = run / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run}: a training run without its {RUN_CONFIG}, which names the base model its "
                          f"adapter or state goes on; pass that base with --model and the file with --adapter or "
                          f"--state")
    try:
        saved = read_yaml_file(path, "run config", f"restore the {RUN_CONFIG} the run wrote")
    except RwkvtuneError as e:
        raise ConfigError(str(e)) from e
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), str) or not saved["model"].strip():
        raise ConfigError(f"{path}: expected the run's resolved config with a 'model' field (the base model), "
                          f"found {type(saved).__name__ if not isinstance(saved, dict) else 'no model field'}; "
                          f"restore the {RUN_CONFIG} the run wrote")
    return saved


def resolve_run(path: str | os.PathLike, _depth: int = 0) -> RunModel | None:
    """The model a run directory stands for, or None when ``path`` is not a directory (or is a
    Hugging Face folder). A directory that holds no run output is refused in one line."""
    if not is_run_dir(path):
        return None
    run = Path(os.fspath(path))
    final = _output(run, "final")
    if final is not None:
        return RunModel(str(run), str(final))
    adapter, state = _output(run, "adapter"), _output(run, "state")
    if adapter is None and state is None:
        what = ("a training run that has not finished (no final.pth, adapter.pth or state.pth yet); continue it "
                f"with `rwkvtune train --resume {run}`" if (run / "checkpoints").is_dir() or (run / RUN_CONFIG).is_file()
                else "a directory that is neither a Hugging Face model folder (config.json) nor a training run "
                     "(final.pth, adapter.pth or state.pth); expected a registry name (see `rwkvtune models`), a "
                     ".pth or .safetensors checkpoint, a Hugging Face RWKV-7 folder or a finished run's directory")
        raise ConfigError(f"{run}: is {what}")
    saved = _run_config(run)
    if saved.get("init") == "scratch":
        raise ConfigError(f"{run}: its {'adapter' if adapter else 'state'} was trained on a model initialised from "
                          f"scratch (init: scratch in {run / RUN_CONFIG}), which no file holds; only a run's "
                          f"final.pth can be loaded")
    base = saved["model"]
    if not os.path.isabs(base) and not os.path.exists(base) and os.path.exists(run / base):
        base = str(run / base)  # a path the run recorded relative to itself
    if is_run_dir(base):
        if _depth >= _MAX_DEPTH or Path(base).resolve() == run.resolve():
            raise ConfigError(f"{run / RUN_CONFIG}: model {base!r} leads back to a run directory again; name the "
                              f"base model file")
        inner = resolve_run(base, _depth + 1)
        if not inner.is_final:
            raise ConfigError(f"{run}: its base {base} is itself a run without final.pth; name the base model file")
        base = inner.model
    return RunModel(str(run), base, adapter=None if state else str(adapter), state=str(state) if state else None)


def run_part(path: str | os.PathLike, stem: str) -> str:
    """What ``--adapter``/``--state`` names (``stem`` "adapter" or "state"): a file as given, or a
    training run's directory, meaning its ``<stem>.pth`` (or ``.safetensors``). A run without one
    is refused in one line."""
    if not is_run_dir(path):
        return os.fspath(path)
    found = _output(Path(os.fspath(path)), stem)
    if found is None:
        raise ConfigError(f"{os.fspath(path)}: is a directory without {stem}.pth or {stem}.safetensors; expected "
                          f"the {stem} file, or the directory of a run of `rwkvtune train --mode "
                          f"{'lora' if stem == 'adapter' else 'state'}`")
    return str(found)


def run_weights(path: str | os.PathLike, error: type = ConfigError, route: str = "") -> str | None:
    """The model file a run directory trained (its final.pth), or None when ``path`` is not a run
    directory. A run whose result is an adapter or a tuned state on an unchanged base has no such
    file: refused in one line, with ``route`` (how this caller's user loads both instead)."""
    run = resolve_run(path)
    if run is None or run.is_final:
        return None if run is None else run.model
    what = ("a state-tuning run: its result is state.pth" if run.state
            else "a LoRA run without final.pth: its result is adapter.pth")
    route = route or f"load both with: model, wkv_init = rwkvtune.load_model({run.run!r})"
    raise error(f"{run.run}: is {what} on the unchanged base model {run.model}; {route}")
