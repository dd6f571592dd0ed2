"""The flags of ``rwkvtune train``: which TrainConfig options have one (:data:`TRAIN_FLAGS`), and
each flag as derived from its option (:func:`flag_options`): its name is the option's, its type,
choices, default and help section are the field's, its help the field's comment unless the table
says more. rwkvtune/cli/train.py builds the parser from this alone, so flags and options cannot
drift apart, and giving an option a flag is one line in the table.

Plain data beside the dataclasses (config.py, method_config.py); no argparse here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from rwkvtune.bounds import THREADS_PER_CORE
from rwkvtune.constants import MODE_DEFAULT_LR, SCRATCH_LR
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.config import FLAT_KEYS, TrainConfig, option_docs
from rwkvtune.models.rwkv7.method_config import METHOD_SECTIONS


@dataclasses.dataclass(frozen=True)
class Flag:
    """How ``rwkvtune train`` takes one option as a flag (an entry of :data:`TRAIN_FLAGS`). Its
    name, type, choices, default and help section come from the option's field (:func:`flag_options`)."""

    help: str = ""  # "" -> the field's comment in its dataclass
    metavar: str | None = None  # the value's name in the usage (None: argparse's, or the choices)
    repeat: bool = False  # a list given one flag per item (--reward A --reward B), not comma-separated


def _lr_text(lr: float) -> str:
    """A learning rate as people write it: 1e-4, 6e-4."""
    return f"{lr:.0e}".replace("e-0", "e-")


# The options `rwkvtune train` takes as flags: recipe key -> Flag; every other option is a recipe
# key or key=value. The flag is the key with dashes (eval_on_start -> --eval-on-start), TRL's name
# where TRL has the option (beta, loss_type, num_generations, max_completion_length, temperature,
# top_p, epsilon, eval_on_start, save_format); a method option goes by its flat key (--beta is the
# run's method's). rwkvtune/cli/train.py builds the parser from flag_options(), so a flag cannot
# drift from its option: giving a field a flag is one line here.
TRAIN_FLAGS: dict[str, Flag] = {
    # what to train
    "model": Flag("registry name (0.1b), .pth checkpoint, .json config or a training run's directory"),
    "init": Flag("pretrained (load the model file) or scratch (official init)"),
    "mode": Flag("full, lora or state"),
    "method": Flag("training objective: sft (default), dpo (preference pairs) or grpo (rewards on samples)"),
    # data
    "data": Flag("training data: .jsonl (text/chat/prompt-response/alpaca/sharegpt) or binidx prefix"),
    "eval_data": Flag("evaluation data (same formats as --data)"),
    "data_format": Flag(), "on_data_error": Flag(),  # shared with eval and data prepare (cli/common.py)
    # shapes and schedule
    "ctx_len": Flag("tokens per window (default: model's recommended)"),
    "batch_size": Flag("micro-batch per process (default: model's recommended)"),
    "grad_accum": Flag("micro-batches per optimizer step"),
    "lr": Flag(f"peak learning rate (default by --mode: lora {_lr_text(MODE_DEFAULT_LR['lora'])}, state "
               f"{_lr_text(MODE_DEFAULT_LR['state'])}, full the model's recommended_lr, or {_lr_text(SCRATCH_LR)} "
               f"with --init scratch; the run says which it used)"),
    "lr_final": Flag("final learning rate of the cosine (default: lr/10)"),
    "warmup_steps": Flag("linear warmup steps"),
    "max_steps": Flag("optimizer steps (default: --epochs over the data)"),
    "epochs": Flag("passes over the data when --max-steps is not given"),
    "weight_decay": Flag("AdamW weight decay on 2-D weight matrices"),
    "grad_clip": Flag("max gradient norm (0 disables)"),
    "betas": Flag("AdamW betas, comma-separated (default: 0.9,0.99, the reference trainer's)"),
    "adam_eps": Flag(), "l2wrap": Flag(),
    "seed": Flag("random seed (data order, init, dropout), 0..4294967295"),
    # long samples
    "long_context": Flag("keep samples whole; train long ones in ctx-len chunks carrying the state"),
    "bptt": Flag("long samples: truncated (default) or full backprop through chunks"),
    "packing": Flag("sft on jsonl: pack short documents into shared windows with the RNN state reset at each "
                    "document's start, exactly as if each ran alone; --no-packing: one document per window, padded"),
    # PEFT
    "lora_r": Flag("LoRA rank"),
    "lora_alpha": Flag("LoRA alpha (scaling = alpha / r)"),
    "lora_dropout": Flag("dropout on the LoRA input"),
    "lora_targets": Flag("comma-separated Linear names to adapt (e.g. att.key,ffn.value)"),
    "train_parts": Flag("LoRA mode: also train ln, emb and/or head (comma-separated)"),
    "base_quant": Flag("lora/state modes: store the frozen base's big matrices (att r/k/v/o, ffn, head) as int8 "
                       "(per-channel) or nf4 (QLoRA; CPU needs torchao, CUDA bitsandbytes), quantized at load"),
    # method options: beta and loss_type are the run's method's
    "beta": Flag(), "loss_type": Flag(),
    "label_smoothing": Flag(), "simpo_gamma": Flag(), "precompute_ref": Flag(),
    "reward": Flag("a reward function, repeatable: exact_match:FIELD, regex:PATTERN, format:REGEX, length_penalty:N "
                   "or path/to/file.py:function (see rwkvtune/train/rewards.py)", metavar="SPEC", repeat=True),
    "reward_weights": Flag("one weight per --reward, comma-separated (default: all 1)"),
    "num_generations": Flag(), "max_completion_length": Flag(), "temperature": Flag(), "top_p": Flag(),
    "epsilon": Flag(), "epsilon_high": Flag(), "num_iterations": Flag(), "scale_rewards": Flag(),
    "reward_timeout": Flag(), "stop": Flag("a string that ends a completion, repeatable (--stop X --stop Y)", metavar="TEXT",
                                           repeat=True),
    # runtime
    "device": Flag(),  # shared with generate and eval (cli/common.py)
    "strategy": Flag("under torchrun: ddp (default) or fsdp (sharded parameters, gradients, optimizer)"),
    "cpu_offload": Flag("fsdp on GPU: keep sharded parameters, gradients and optimizer state in host memory"),
    "precision": Flag("fp32 or bf16 (default: bf16 autocast on GPU; on CPU bf16 where it has AVX512-BF16/AMX "
                      "and a quick check finds it faster, else fp32; the run says which and why)"),
    "grad_checkpoint": Flag("recompute activations in backward: less memory, ~30% slower"),
    "memory_check": Flag("refuse (before loading weights) a run whose memory estimate exceeds the device's memory; "
                         "--no-memory-check runs anyway"),
    "wkv_backend": Flag(),
    "keep_freed_memory": Flag("CPU: glibc keeps freed memory for the next step instead of returning it (faster "
                              "where page faults are slow, e.g. virtual machines; higher peak RSS than planned)"),
    "threads": Flag(f"CPU threads of torch's ops, at most {THREADS_PER_CORE}x the cores (default: torch's own, usually "
                    f"the number of cores)"),
    # outputs
    "out": Flag("run directory (default: a new runs/<model>-<mode>-<method>-<YYYYmmdd-HHMMSS>, said at the start); "
                "must be new, empty, or a run of this tool (it holds rwkvtune-run.json): any other directory is "
                "refused, never overwritten"),
    "save_every": Flag("steps between resumable checkpoints (0: end only)"),
    "keep_checkpoints": Flag(),
    "eval_every": Flag("steps between evaluations on --eval-data (0: end only)"),
    "eval_on_start": Flag(),
    "eval_tasks": Flag("comma-separated lm-eval tasks (or a suite) run with each evaluation on rank 0; needs lm-eval"),
    "eval_tasks_limit": Flag(),
    "log_every": Flag(),
    "save_dtype": Flag(),  # shared with merge-lora (cli/common.py)
    "save_format": Flag(),
    "tensorboard": Flag("TensorBoard logs in <out>/tb (default: when tensorboard is installed; --tensorboard "
                        "requires it)"),
    "wandb": Flag("log to this wandb project"),
    "resume": Flag("continue the run in DIR from its last checkpoint (or from DIR/checkpoints/step-N.pt: that one)",
                   metavar="DIR"),
}


@dataclasses.dataclass(frozen=True)
class FlagOption:
    """One flag of ``rwkvtune train`` as :func:`flag_options` derives it from its option."""

    name: str  # the recipe key (a field, or a method option's flat key): the parser's dest
    flag: str  # "--" + name with dashes
    group: str  # the help section: the field's section in the dataclass, or the method(s) it belongs to
    kind: Any  # int, float, str, bool; "list" (comma-separated), "repeat" (one flag per item)
    choices: tuple[str, ...]  # the fixed set of values (validate checks them), or ()
    default: str  # the default as the help shows it ("" when there is nothing to show)
    help: str
    metavar: str | None = None


def _kind(hint: Any, repeat: bool) -> Any:
    """The flag's kind from a field's annotation (``int | None`` -> int, ``tuple[str, ...]`` -> list)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return "repeat" if repeat else "list"
    if hint in (int, float, str, bool):
        return hint
    raise TypeError(f"no flag kind for the type {hint!r}")


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return "" if value in (None, "") else str(value)


def flag_options() -> list[FlagOption]:
    """Every flag of :data:`TRAIN_FLAGS`, in the order of the options in their dataclasses, with
    the type, choices, default and help section of its option: what rwkvtune/cli/train.py turns
    into the parser. A key of the table that names no option is an error here (and in the tests)."""
    unknown = sorted(set(TRAIN_FLAGS) - set(TrainConfig.option_names()))
    if unknown:
        raise ConfigError(f"TRAIN_FLAGS: {', '.join(unknown)}: not TrainConfig options")
    hints, choices = typing.get_type_hints(TrainConfig), TrainConfig.choices()
    docs = {name: (section, doc) for section, name, doc in TrainConfig.field_docs()}
    out = []
    for section, name, doc in TrainConfig.field_docs():
        if name in METHOD_SECTIONS:  # the method options, grouped by the methods that have them
            for key, sections in FLAT_KEYS.items():
                if key in TRAIN_FLAGS and name == sections[0]:
                    out.append(_method_flag(key, sections))
            continue
        if name in TRAIN_FLAGS:
            spec = TRAIN_FLAGS[name]
            out.append(FlagOption(name, "--" + name.replace("_", "-"), docs[name][0] or "options",
                                  _kind(hints[name], spec.repeat), tuple(choices.get(name, ())),
                                  _default_text(getattr(TrainConfig, name, None)), spec.help or doc, spec.metavar))
    return out


def _method_flag(key: str, sections: tuple[str, ...]) -> FlagOption:
    """The flag of a method option's flat key; beta and loss_type, which both methods have, show
    each method's meaning and default."""
    spec = TRAIN_FLAGS[key]
    found = []  # (section, comment, default, choices)
    for section in sections:
        cls = METHOD_SECTIONS[section]
        doc = dict((n, d) for _, n, d in option_docs(cls))[key]
        default = next(f for f in dataclasses.fields(cls) if f.name == key).default
        found.append((section, doc, _default_text(default), cls.CHOICES.get(key, ())))
    kinds = {_kind(typing.get_type_hints(METHOD_SECTIONS[s])[key], spec.repeat) for s in sections}
    if len(kinds) != 1:
        raise TypeError(f"{key}: of different types in {', '.join(sections)}")
    choices = tuple(dict.fromkeys(c for *_, cs in found for c in cs))  # in order, once each
    if len(sections) == 1:
        group, help_, default = f"method {sections[0]}", spec.help or found[0][1], found[0][2]
    else:
        group = f"method {' and '.join(sections)} (the option of the run's --method)"
        help_ = spec.help or "; ".join(f"{s}: {doc} (default: {d or 'none'})" for s, doc, d, _ in found)
        default = ""
    return FlagOption(key, "--" + key.replace("_", "-"), group, kinds.pop(), choices, default, help_, spec.metavar)


