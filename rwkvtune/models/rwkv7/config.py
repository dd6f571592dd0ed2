"""Training configuration: one documented dataclass, filled from defaults, the model config's
recommended values, a YAML recipe, CLI flags and ``key=value`` overrides (in that order).

Fields left ``None`` are resolved by :meth:`TrainConfig.resolve` from the model config
(``recommended_ctx_len``, ``recommended_batch_size``, ``recommended_lr``) and the device.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import time
import typing
from pathlib import Path
from typing import Any

import yaml

from rwkvtune.bounds import THREADS_PER_CORE, Bound, bound_problems, cpu_cores, max_threads
from rwkvtune.bounds import clip, shown as show_value
from rwkvtune.constants import (BASE_QUANTS, DATA_FORMAT_ALIASES, METHODS, MODE_DEFAULT_LR, MODES, SAVE_DTYPES,
                                SCRATCH_LR)
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.method_config import METHOD_SECTIONS, DPOConfig, GRPOConfig, flat_keys
from rwkvtune.safe_yaml import load_yaml, read_yaml_file
from rwkvtune.utils import atomic_write_text, check_device

PRECISIONS = ("fp32", "bf16")
WKV_BACKENDS = ("auto", "chunked", "reference", "fla")
STRATEGIES = ("ddp", "fsdp")
INITS = ("pretrained", "scratch")
BPTT_MODES = ("truncated", "full")
DATA_ERROR_POLICIES = ("raise", "skip")
SAVE_FORMATS = ("pth", "safetensors")
DATA_FORMATS = tuple(DATA_FORMAT_ALIASES)  # the names data_format takes (aliases of the readers' formats)
FLAT_KEYS = flat_keys()  # flat recipe key of a method option -> its section(s): beta -> (dpo, grpo)
MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding takes 0..2**32-1, torch's 64 bits: the common range
DEFAULT_LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
MAX_STEPS = 10 ** 9  # steps, step intervals: far beyond any run, so that a typo is refused

# The accepted values of every numeric option, checked by ``validate`` (see rwkvtune/bounds.py:
# finite, of the field's type, in range). Upper limits are far beyond useful values; they catch a
# typo (1e23, extra zeros) before it overflows in the maths. The options of a method (dpo, grpo) have
# their own table and rules beside them, in method_config.py.
TRAIN_BOUNDS: dict[str, Bound] = {
    "ctx_len": Bound(int, 1, 2 ** 24, optional=True),
    "batch_size": Bound(int, 1, 2 ** 16, optional=True),
    "grad_accum": Bound(int, 1, 2 ** 16),
    "lr": Bound(float, 0, 10, hi_open=True, optional=True),
    "lr_final": Bound(float, 0, 10, hi_open=True, optional=True),
    "warmup_steps": Bound(int, 0, MAX_STEPS),
    "max_steps": Bound(int, 1, MAX_STEPS, optional=True),
    "epochs": Bound(int, 1, 10 ** 6),
    "weight_decay": Bound(float, 0, 10),
    "betas": Bound(float, 0, 1, hi_open=True, each=True),
    "adam_eps": Bound(float, 0, 1, lo_open=True),
    "grad_clip": Bound(float, 0, 1e9, note="0 disables clipping"),
    "seed": Bound(int, 0, MAX_SEED, note="the range numpy's and torch's seeds share"),
    "lora_r": Bound(int, 1, 2 ** 16),
    "lora_alpha": Bound(float, 0, 1e6, lo_open=True, note="the LoRA scaling is lora_alpha / lora_r"),
    "lora_dropout": Bound(float, 0, 1, hi_open=True),
    "eval_tasks_limit": Bound(float, 0, 1e9, lo_open=True, optional=True,
                              note="items per task, or a fraction if < 1"),
    "threads": Bound(int, 1, max_threads, optional=True,
                     note=f"at most {THREADS_PER_CORE}x the {cpu_cores()} CPU cores here: more only contend, and "
                          f"very many crash torch"),
    "save_every": Bound(int, 0, MAX_STEPS, note="0: only at the end"),
    "keep_checkpoints": Bound(int, 1, 10 ** 6),
    "eval_every": Bound(int, 0, MAX_STEPS, note="0: only at the end"),
    "log_every": Bound(int, 1, MAX_STEPS),
}


@dataclasses.dataclass
class TrainConfig:
    # ---- what to train -----------------------------------------------------------------------
    model: str = ""  # registry name ("0.1b"), a .pth checkpoint or a .json config
    init: str = "pretrained"  # "pretrained": load the model file; "scratch": official init (docs/rwkv7.md §4)
    mode: str = "full"  # "full" fine-tune, "lora" adapters, "state" initial-WKV-state tuning
    method: str = "sft"  # training objective: "sft" (next-token loss on the targets)
    # ---- data --------------------------------------------------------------------------------
    data: str = ""  # .jsonl ({"text"} / {"messages"} / {"prompt","response"}) or a binidx prefix
    eval_data: str | None = None  # same formats; evaluated every eval_every steps and at the end
    data_format: str = "auto"  # "auto", "text", "chat", "prompt_response", "alpaca", "sharegpt"
    on_data_error: str = "raise"  # "raise": stop at the first bad line; "skip": skip, count, report
    # ---- shapes and schedule -----------------------------------------------------------------
    ctx_len: int | None = None  # tokens per window; None -> model's recommended_ctx_len
    batch_size: int | None = None  # micro-batch per process; None -> recommended_batch_size
    grad_accum: int = 1  # micro-batches per optimizer step (same result as a batch that large)
    lr: float | None = None  # peak learning rate; None -> the mode's default: lora 1e-4, state 1e-2, full the model's recommended_lr (init scratch: 6e-4)
    lr_final: float | None = None  # end of the cosine; None -> lr / 10
    warmup_steps: int = 10  # linear warmup from 0.01*lr (reference trainer's multiplier)
    max_steps: int | None = None  # optimizer steps; None -> epochs over the data
    epochs: int = 1  # passes over the data when max_steps is not set
    weight_decay: float = 0.0  # only on 2-D .weight matrices (docs/rwkv7.md §5)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas (the reference trainer's)
    adam_eps: float = 1e-18  # AdamW epsilon (the reference trainer's)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    l2wrap: bool = True  # the reference trainer's max-logit penalty (keeps logits from drifting)
    seed: int = 42  # data order, from-scratch init, dropout (0..2**32-1)
    # ---- long samples (infinite context) -----------------------------------------------------
    long_context: bool = False  # keep samples whole; train them in ctx_len chunks carrying state
    bptt: str = "truncated"  # "truncated": backprop within a chunk; "full": through all chunks
    packing: bool = True  # sft jsonl: short documents share windows, the state reset at each one's start (exact); false: one per window, padded
    # ---- PEFT --------------------------------------------------------------------------------
    lora_r: int = 16  # LoRA rank
    lora_alpha: float = 32.0  # LoRA scaling = lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # module-name suffixes to wrap
    train_parts: tuple[str, ...] = ()  # also train: "ln", "emb", "head" (lora mode)
    base_quant: str = "none"  # lora/state: the frozen base's big matrices stored "int8" or "nf4" (QLoRA), or "none"
    # ---- method options (rwkvtune/models/rwkv7/method_config.py) ------------------------------
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)  # method dpo (recipe section dpo:, or flat keys)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)  # method grpo (recipe section grpo:, or flat keys)
    # ---- runtime -----------------------------------------------------------------------------
    device: str = "auto"  # "auto" -> cuda if available else cpu
    strategy: str = "ddp"  # under torchrun: "ddp" (whole model per process) or "fsdp" (sharded, FSDP2)
    cpu_offload: bool = False  # fsdp on GPU: keep sharded params, grads and optimizer state in host memory
    precision: str | None = None  # None -> bf16 (autocast) on GPU; on CPU bf16 where native and faster, else fp32
    grad_checkpoint: bool = False  # recompute blocks in backward: less memory, ~30% slower
    memory_check: bool = True  # refuse (before loading weights) a run whose memory estimate exceeds the device
    wkv_backend: str = "auto"  # WKV kernel: "auto" (fla on CUDA when installed, else chunked), or one by name
    threads: int | None = None  # CPU threads of torch's ops (torch.set_num_threads); None: torch's default
    keep_freed_memory: bool = False  # CPU: glibc keeps freed memory (fewer page faults, higher peak RSS)
    # ---- outputs -----------------------------------------------------------------------------
    out: str | None = None  # the run directory (see rwkvtune/train/run_dir.py), never overwritten; None -> a new runs/<model>-<mode>-<method>-<time>
    save_every: int = 50  # optimizer steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk
    eval_every: int = 0  # 0: evaluate only at the end (if eval_data)
    eval_on_start: bool = False  # also evaluate before the first step (the starting point of the curves)
    eval_tasks: tuple[str, ...] = ()  # lm-eval tasks (or a suite) run with the evals on rank 0; needs lm-eval
    eval_tasks_limit: float | None = None  # items per eval task (a fraction if < 1); None: every item
    log_every: int = 1  # steps per metrics row (loss averaged over them, token-weighted)
    save_dtype: str = "bf16"  # dtype of final.pth ("bf16" like released files, or "fp32")
    save_format: str = "pth"  # final model, adapter and state as "pth" or "safetensors" (no pickle)
    tensorboard: bool | None = None  # TensorBoard logs in <out>/tb: None when installed, true requires it
    wandb: str | None = None  # wandb project name to log to (needs wandb installed)
    resume: str | None = None  # an --out directory to continue from its last checkpoint, or one of its checkpoints

    def __post_init__(self) -> None:
        # Where each field set by ``update`` came from ("recipe r.yaml", "command line"), so that
        # ``validate`` can name it; not a dataclass field, so never saved with the config. Kept in
        # the order the fields were last set, so a problem of several fields can blame the one
        # set last (the command line over a recipe). A method option is keyed "dpo.beta".
        self.sources: dict[str, str] = {}
        # The flat keys that two methods share (beta, loss_type) as last given: key -> (value,
        # source). Each belongs to the section of the run's method, which a later source may still
        # change (a recipe's beta with --method on the command line): see _place.
        self._shared: dict[str, tuple[Any, str | None]] = {}
        self._placed: dict[str, tuple[str, Any]] = {}  # key -> (section it went into, the value it replaced)
        # Own copies: dataclasses.replace (resolve, tests) passes the same section objects.
        self.dpo = dataclasses.replace(self.dpo) if isinstance(self.dpo, DPOConfig) else self.dpo
        self.grpo = dataclasses.replace(self.grpo) if isinstance(self.grpo, GRPOConfig) else self.grpo
        # Where resolve() took lr and out from, said at the start of a run ("--lr", "LoRA default").
        self.origins: dict[str, str] = {}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def option_names(cls) -> list[str]:
        """Every key a recipe may use: the fields, and each method option's flat key."""
        return [n for n in cls.field_names() if n not in METHOD_SECTIONS] + list(FLAT_KEYS)

    def method_options(self):
        """The options of the run's method (a DPOConfig or GRPOConfig), or None (sft)."""
        return getattr(self, self.method) if self.method in METHOD_SECTIONS else None

    def update(self, values: dict[str, Any], source: str) -> "TrainConfig":
        """Set fields from a mapping (YAML or overrides); unknown keys and bad types are errors.

        A method option comes as its section (``grpo: {num_generations: 4}``) or as its flat key
        (``num_generations: 4``); ``beta`` and ``loss_type``, which both methods have, belong to
        the run's method. The same option given both ways in one mapping with two values is an
        error; across sources, the later one wins, as for every field."""
        hints = typing.get_type_hints(type(self))
        problems = []
        sectioned: dict[tuple[str, str], Any] = {}  # (section, name) -> value, given as a section
        flat: dict[str, Any] = {}  # flat key of a method option -> value
        for key, raw in values.items():
            if not isinstance(key, str):  # YAML reads `1: x` with an int key
                problems.append(f"{show_value(key)}: expected an option name (a string)")
                continue
            key = key.replace("-", "_")
            if key in METHOD_SECTIONS:
                problems += _read_section(key, raw, sectioned)
                continue
            if key.partition(".")[0] in METHOD_SECTIONS:  # grpo.beta=0.04 on the command line
                section, _, name = key.partition(".")
                problems += _read_section(section, {name: raw}, sectioned)
                continue
            if key in FLAT_KEYS:
                try:  # None: the default, of the section a shared key (beta) goes to
                    flat[key] = None if raw is None else _option_value(FLAT_KEYS[key][0], key, raw)
                except (TypeError, ValueError) as e:
                    problems.append(f"{key}: {e}")
                continue
            if key not in hints:
                close = _suggest(key, self.option_names())
                problems.append(f"{clip(key)}: unknown option" + (f" (did you mean {close!r}?)" if close else ""))
                continue
            try:
                setattr(self, key, _coerce(raw, hints[key]))
                self._mark(key, source)
            except (TypeError, ValueError) as e:
                problems.append(f"{key}: {e}")
        # One option given flat and in its section (the section of the run's method, for beta and
        # loss_type) with two values: which was meant is unknowable.
        method = self.method if self.method in METHOD_SECTIONS else None
        for key, value in flat.items():
            sections = FLAT_KEYS[key] if len(FLAT_KEYS[key]) == 1 else (method,)
            for section in sections:
                value = _default_if_none(section, key, value) if section else value
                if (section, key) in sectioned and sectioned[section, key] != value:
                    problems.append(f"{key}: found {show_value(value)} as a flat key and "
                                    f"{show_value(sectioned[section, key])} in the {section} section, expected one "
                                    f"value; keep one of them")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems) + "; run `rwkvtune train --help` for the options")
        for (section, name), value in sectioned.items():
            setattr(getattr(self, section), name, value)
            self._mark(f"{section}.{name}", source)
            if self._placed.get(name, (None,))[0] == section:  # an explicit section value replaces a flat one
                self._shared.pop(name, None)
                self._placed.pop(name, None)
        self._set_flat(flat, source)
        return self

    def _mark(self, key: str, source: str | None) -> None:
        self.sources.pop(key, None)  # re-inserted last: the most recently set
        if source is not None:
            self.sources[key] = source

    def _set_flat(self, flat: dict[str, Any], source: str | None) -> None:
        """Flat method options into their section; the shared ones (beta, loss_type) wait in
        ``_shared`` and go into the section of the run's method (:meth:`_place`)."""
        for key, value in flat.items():
            sections = FLAT_KEYS[key]
            if len(sections) == 1:
                setattr(getattr(self, sections[0]), key, _default_if_none(sections[0], key, value))
                self._mark(f"{sections[0]}.{key}", source)
            else:
                self._shared[key] = (value, source)
        self._place()

    def _place(self) -> None:
        """Each shared flat key (beta, loss_type) into the section of the current method; one put
        into another method's section before the method changed is taken back out of it."""
        target = self.method if self.method in METHOD_SECTIONS else None
        for key, (value, source) in self._shared.items():
            placed = self._placed.get(key)
            if placed is not None and placed[0] != target:
                setattr(getattr(self, placed[0]), key, placed[1])
                self.sources.pop(f"{placed[0]}.{key}", None)
                del self._placed[key]
            if target is not None:
                section = getattr(self, target)
                if key not in self._placed:
                    self._placed[key] = (target, getattr(section, key))
                setattr(section, key, _default_if_none(target, key, value))
                self._mark(f"{target}.{key}", source)

    def validate(self, mode_conflicts=(), method_problems=()) -> None:
        """Raise one ConfigError naming every problem. This class is plain data: the rules of its
        mode (``mode_conflicts``: (fields as they read, why) pairs) and of its method
        (``method_problems``: "field: ..." lines) come from rwkvtune.train.setup_checks.validate_config,
        which is what the trainer calls."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode: found {self.mode!r}, expected one of {', '.join(MODES)}")
        if self.init not in INITS:
            problems.append(f"init: found {self.init!r}, expected 'pretrained' or 'scratch'")
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"precision: found {self.precision!r}, expected one of {', '.join(PRECISIONS)}")
        if self.bptt not in BPTT_MODES:
            problems.append(f"bptt: found {self.bptt!r}, expected 'truncated' or 'full'")
        if self.on_data_error not in DATA_ERROR_POLICIES:
            problems.append(f"on_data_error: found {self.on_data_error!r}, expected 'raise' or 'skip'")
        if self.save_format not in SAVE_FORMATS:
            problems.append(f"save_format: found {self.save_format!r}, expected 'pth' or 'safetensors'")
        if self.save_dtype not in SAVE_DTYPES:
            problems.append(f"save_dtype: found {self.save_dtype!r}, expected 'bf16' or 'fp32'")
        if self.data_format not in DATA_FORMATS:
            problems.append(f"data_format: found {show_value(self.data_format)}, expected one of "
                            f"{', '.join(DATA_FORMATS)}")
        out_of_bounds = bound_problems(self, TRAIN_BOUNDS)  # every numeric option
        problems += out_of_bounds
        # Problems of several fields, already naming their sources; the mode knows its own rules.
        conflicts = [self._conflict(shown, why) for shown, why in mode_conflicts]
        # The method options: every section's values are checked (a bad one is bad whatever the
        # method), the rules of a method only for its own run. Problems of the run's method's
        # section read as the flat key ("beta: ..."), the others with their section ("dpo.beta: ...").
        for section in METHOD_SECTIONS:
            active = self.method == section
            found = getattr(self, section).problems(active)
            out_of_bounds = out_of_bounds or found
            for p in found:
                name = p.split(":", 1)[0]
                where = self.sources.get(f"{section}.{name}", "training config")
                conflicts.append(f"{where}: {p}" if active else f"{where}: {section}.{p}")
        if self.method not in METHODS:
            problems.append(f"method: found {self.method!r}, expected one of {', '.join(METHODS)}")
        elif not out_of_bounds:  # a method's rules compare numbers that are in their bounds
            problems += method_problems
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy: found {self.strategy!r}, expected one of {', '.join(STRATEGIES)}")
        elif self.eval_tasks and self.strategy == "fsdp":
            conflicts.append(self._conflict({"eval_tasks": repr(list(self.eval_tasks)), "strategy": "'fsdp'"},
                                            "a sharded model cannot run the tasks on one process; use strategy "
                                            "ddp, or rwkvtune eval --tasks on the saved checkpoints"))
        elif self.cpu_offload and self.strategy != "fsdp":
            conflicts.append(self._conflict({"cpu_offload": "true", "strategy": repr(self.strategy)},
                                            "offloading applies to sharded state; set strategy=fsdp"))
        if self.wkv_backend not in WKV_BACKENDS:
            problems.append(f"wkv_backend: found {self.wkv_backend!r}, expected one of {', '.join(WKV_BACKENDS)}")
        if not self.model:
            problems.append("model: missing; pass --model NAME|PATH (see `rwkvtune models`)")
        if not self.data:
            problems.append("data: missing; pass --data FILE.jsonl or a binidx prefix")
        if self.base_quant not in BASE_QUANTS:
            problems.append(f"base_quant: found {show_value(self.base_quant)}, expected one of {', '.join(BASE_QUANTS)}")
        bad_parts = set(self.train_parts) - {"ln", "emb", "head"}
        if bad_parts:
            problems.append(f"train_parts: found {sorted(bad_parts)}, expected a subset of ln, emb, head")
        if problems or conflicts:
            # Each problem starts with "field:"; name where that field's value was set.
            raise ConfigError("; ".join([f"{self.sources.get(p.split(':', 1)[0], 'training config')}: {p}"
                                         for p in problems] + conflicts))

    def _conflict(self, shown: dict[str, str], why: str) -> str:
        """A problem of several fields (``shown`` maps each to how its value reads), blamed on the
        field set last, since a flag given over a recipe is what the user just changed, and naming
        where each other field was set when that is somewhere else."""
        order = list(self.sources)
        lead = max(shown, key=lambda f: order.index(f) if f in order else -1)  # ties: the first listed
        source = self.sources.get(lead, "training config")
        others = []
        for name, value in shown.items():
            if name != lead:
                other = self.sources.get(name)
                others.append(f"{name} {value}" + (f" from {other}" if other and other != source else ""))
        return f"{source}: {lead}: {shown[lead]} with {' and '.join(others)}: {why}"

    def resolve(self, model_config) -> "TrainConfig":
        """Fill ``None`` fields from the model config's recommendations and the device."""
        import torch

        c = dataclasses.replace(self)
        # The recommendation, but never beyond the context the model was trained with (its release's ctx<N>).
        c.ctx_len = c.ctx_len or min(model_config.recommended_ctx_len, model_config.ctx_len or math.inf)
        c.batch_size = c.batch_size or model_config.recommended_batch_size
        c.sources = dict(self.sources)
        c.lr, c.origins["lr"] = default_lr(c, model_config) if c.lr is None else (c.lr, _given(self, "lr", "--lr"))
        if c.out is None:
            c.out, c.origins["out"] = default_out(c, model_config), "default: a new directory; --out names one"
        else:
            c.origins["out"] = _given(self, "out", "--out")
        if c.lr_final is None:
            c.lr_final = c.lr / 10
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device(c.device)
        if c.wkv_backend == "fla" and not c.device.startswith("cuda"):
            raise ConfigError(self._conflict({"wkv_backend": "'fla'", "device": repr(c.device)},
                                             "fla runs on CUDA only; use wkv_backend=auto"))
        if c.precision is None and c.device.startswith("cuda"):
            c.precision, c.origins["precision"] = "bf16", "default on GPU"
        elif c.precision is None:  # bf16 where this CPU multiplies it natively and faster (said at the start)
            from rwkvtune.models.cpu_precision import default_cpu_precision

            choice = default_cpu_precision()
            c.precision, c.origins["precision"] = choice.precision, f"chosen for this CPU: {choice.reason}"
        return c

    @staticmethod
    def choices() -> dict[str, tuple[str, ...]]:
        """The values of each option that takes one of a fixed set (``validate`` checks them,
        ``rwkvtune train --help`` shows them)."""
        return {"mode": MODES, "method": METHODS, "init": INITS, "precision": PRECISIONS, "bptt": BPTT_MODES,
                "on_data_error": DATA_ERROR_POLICIES, "save_format": SAVE_FORMATS, "save_dtype": SAVE_DTYPES,
                "strategy": STRATEGIES, "wkv_backend": WKV_BACKENDS, "base_quant": BASE_QUANTS}

    @classmethod
    def field_docs(cls) -> list[tuple[str, str, str]]:
        """(section, field, comment) for every field, in order, from this class's source: the
        comments are the one documentation of every option (``rwkvtune train --help-all``); the
        method options (:func:`option_docs` of DPOConfig, GRPOConfig) are listed by their own."""
        return option_docs(cls)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML and JSON: tuples as lists, each method's options as its section."""
        return _plain(dataclasses.asdict(self))

    def flat_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with each method option as "section.name" (to compare configs key by key)."""
        out = {}
        for k, v in self.to_dict().items():
            if k in METHOD_SECTIONS:
                out.update({f"{k}.{name}": value for name, value in v.items()})
            else:
                out[k] = v
        return out

    def get(self, key: str) -> Any:
        """The value of a :meth:`flat_dict` key ("lr", "grpo.epsilon")."""
        section, _, name = key.rpartition(".")
        return getattr(getattr(self, section), name) if section else getattr(self, key)

    def set(self, key: str, value: Any) -> None:
        section, _, name = key.rpartition(".")
        setattr(getattr(self, section) if section else self, name, value)

    def save_yaml(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_dataclass_init = TrainConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_flat_options(self, *args, **kwargs) -> None:
    """TrainConfig(...) also takes the method options by their flat names, as a recipe does
    (``TrainConfig(method="grpo", num_generations=4)``, ``dataclasses.replace(cfg, beta=0.1)``):
    each goes into its section (beta and loss_type: the run's method's)."""
    flat = {k: kwargs.pop(k) for k in list(kwargs) if k in FLAT_KEYS}
    _dataclass_init(self, *args, **kwargs)
    if flat:
        self._set_flat(flat, source=None)


TrainConfig.__init__ = _init_with_flat_options


def option_docs(cls) -> list[tuple[str, str, str]]:
    """(section, field, comment) of every field of the dataclass ``cls``, from its source: the
    ``# ---- name ----`` lines start a section, a field's trailing comment documents it. Empty
    comments where the source cannot be read (a build without .py files)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        lines = []
    section, comments = "", {}
    for line in lines:
        head = re.match(r"\s+# -+ (.+?) -+$", line)
        field = re.match(r"\s{4}(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if head:
            section = head.group(1)
        elif field and not line.lstrip().startswith("def "):
            comments[field.group(1)] = (section, field.group(2) or "")
    names = [f.name for f in dataclasses.fields(cls)]
    return [(comments.get(n, ("", ""))[0], n, comments.get(n, ("", ""))[1]) for n in names]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _default_if_none(section: str, name: str, value: Any) -> Any:
    """None for a method option that takes no None means its default (``beta: null``, as before
    the options had sections)."""
    if value is not None:
        return value
    hint = typing.get_type_hints(METHOD_SECTIONS[section])[name]
    if type(None) in typing.get_args(hint):
        return None
    return {f.name: f for f in dataclasses.fields(METHOD_SECTIONS[section])}[name].default


def _option_value(section: str, name: str, raw: Any) -> Any:
    """``raw`` (YAML, command line) as the type of the method option ``section.name``."""
    if raw is None:
        return _default_if_none(section, name, None)
    return _coerce(raw, typing.get_type_hints(METHOD_SECTIONS[section])[name])


def _read_section(section: str, raw: Any, into: dict) -> list[str]:
    """The options of a ``dpo:`` / ``grpo:`` section into ``into[(section, name)]``; returns the
    problems (unknown names, bad types)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [f"{section}: found {show_value(raw)}, expected a mapping of {section} options (e.g. {section}: "
                f"{{beta: 0.1}})"]
    names, problems = [f.name for f in dataclasses.fields(METHOD_SECTIONS[section])], []
    for key, value in raw.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            problems.append(f"{section}.{clip(str(name))}: unknown {section} option"
                            + (f" (did you mean {close[0]!r}?)" if close else f"; expected one of {', '.join(names)}"))
            continue
        try:
            into[section, name] = _option_value(section, name, value)
        except (TypeError, ValueError) as e:
            problems.append(f"{section}.{name}: {e}")
    return problems


def default_lr(cfg: TrainConfig, model_config) -> tuple[float, str]:
    """The peak lr of a run that sets none, and what it is: the mode's entry of MODE_DEFAULT_LR, or
    for a full fine-tune the model's recommended_lr (SCRATCH_LR from scratch)."""
    lr = MODE_DEFAULT_LR.get(cfg.mode)
    if lr is not None:
        return lr, {"lora": "LoRA default", "state": "state-tuning default"}.get(cfg.mode, f"{cfg.mode} default")
    if cfg.init == "scratch":
        return SCRATCH_LR, "default for init scratch"
    return model_config.recommended_lr, f"{model_config.model_name}'s recommended_lr"


def _given(cfg: TrainConfig, field: str, flag: str) -> str:
    """Where a field the user set came from, as a run's first lines say it."""
    source = cfg.sources.get(field)
    if source == "command line":
        return flag
    if source == "command line (key=value)":
        return f"{field}=... on the command line"
    if source is None:
        return "set in the config"
    return source if source.startswith("recipe ") else f"from {source}"  # e.g. a resumed run's checkpoints


RUNS_DIR = "runs"  # where runs without --out go, under the current directory


def default_out(cfg: TrainConfig, model_config, now: float | None = None) -> str:
    """A new run directory for a run without --out: runs/<model>-<mode>-<method>-<YYYYmmdd-HHMMSS>,
    with -2, -3, ... added when that exists (two runs in one second). Under torchrun every process
    would pick its own name (clocks straddle a second; one sees the other's directory), so there
    --out is required."""
    world = os.environ.get("WORLD_SIZE", "1").strip()  # set by torchrun
    if world.isdigit() and int(world) > 1:
        raise ConfigError("out: missing under torchrun, where each process would name its own default run "
                          "directory; pass --out DIR (the same on every process)")
    model = re.sub(r"[^a-z0-9._]+", "-", str(model_config.model_name).lower()).strip("-.") or "model"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = os.path.join(RUNS_DIR, f"{model[:64]}-{cfg.mode}-{cfg.method}-{stamp}")
    path, n = base, 1
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict of TrainConfig fields (validated by ``update``), through the
    project's one YAML reader (no tags, bounded aliases and size, no duplicate keys)."""
    data = read_yaml_file(path, "recipe", "pass an existing YAML file to --config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: found a {type(data).__name__}, expected a mapping of option: value")
    return data


# Names that other trainers give these options (RWKV-LM, Hugging Face TRL); difflib cannot guess
# them (learning_rate is nothing like lr). `rwkvtune train --learning-rate` is guessed from them too.
ALIASES = {
    "learning_rate": "lr", "lr_init": "lr", "micro_bsz": "batch_size", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "accumulate_grad_batches": "grad_accum",
    "num_train_epochs": "epochs", "epoch_count": "epochs", "max_seq_length": "ctx_len", "context_length": "ctx_len",
    "gradient_checkpointing": "grad_checkpoint", "grad_cp": "grad_checkpoint", "max_grad_norm": "grad_clip",
    "gradient_clip_val": "grad_clip", "output_dir": "out", "proj_dir": "out", "lora_rank": "lora_r",
    "max_length": "ctx_len", "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints", "adam_epsilon": "adam_eps",
}


def _suggest(key: str, names: list[str]) -> str | None:
    """The option an unknown key probably meant: a known alias, or the closest name (typos)."""
    key = key.lower()
    close = difflib.get_close_matches(key, names + list(ALIASES), n=1)
    if not close:
        return None
    return ALIASES.get(close[0], close[0])


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "lora_targets=[att.key,ffn.key]"]`` -> dict; values parsed as YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {show_value(item)}: expected key=value (e.g. lr=1e-4)")
        key, value = item.split("=", 1)
        key = key.strip()
        out[key] = load_yaml(value, f"command line (key=value): {clip(key)}",
                             "write a plain value (quote text that YAML would misread)") if value else None
    return out


def _coerce(value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, or raise with what was found."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"found {show_value(value)}, expected a list")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError(f"found {len(value)} values, expected {len(args)}")
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError(f"found {show_value(value)}, expected true or false")
    if hint in (int, float):
        # An int field takes ints and numeric strings (not 1e3 or 2.5); a float field also floats.
        accepted, what = ((int, str), "an integer") if hint is int else ((int, float, str), "a number")
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise TypeError(f"found {show_value(value)}, expected {what}")
        try:
            return hint(value)
        except (ValueError, OverflowError) as e:  # OverflowError: an int beyond a double, for a float field
            raise TypeError(f"found {show_value(value)}, expected {what}") from e
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"found {show_value(value)}, expected a string")
        return str(value)
    return value
