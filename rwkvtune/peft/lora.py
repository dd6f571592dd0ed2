"""LoRA adapters for RWKV-7 Linear layers (PEFT; unrelated to the model's own w1/w2 "lora dims").

``apply_lora`` wraps each ``nn.Linear`` whose qualified name ends with one of the target
suffixes (default: att receptance/key/value/output and ffn key/value) in a :class:`LoRALinear`:
``y = base(x) + (alpha / r) * B(A(dropout(x)))`` with B zero-initialised, so training starts
from the base model exactly. A target that matches nothing is an error, never a silent no-op.

The adapter file is self-describing: r, alpha, dropout, targets, trained parts, the adapter and
part tensors, and a fingerprint of the base weights; applying it to another base is refused.
Merging (``W + (alpha / r) B A``) is done in fp32 whatever the storage dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.io.artifacts import load_artifact, save_artifact
from rwkvtune.io.checkpoint import save_state_dict
from rwkvtune.models.rwkv7.model import open_checkpoint
from rwkvtune.models.rwkv7.quant import (QuantLinear, base_quant_of, fingerprint_sample, quantized_layers,
                                         quantized_state_keys)
from rwkvtune.peft.base import Mode
from rwkvtune.tensor_checks import check_tensor

ADAPTER_FORMAT = "rwkvtune-lora-v1"
PART_PATTERNS = {
    "ln": lambda n: ".ln" in n or n.startswith("ln_out"),
    "emb": lambda n: n.startswith("emb."),
    "head": lambda n: n.startswith("head."),
}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or quantized :class:`QuantLinear`) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.device if isinstance(base, QuantLinear) else base.weight.device
        # Adapters are fp32 even over a bf16 base: their updates are small relative to W.
        self.lora_A = nn.Parameter(self.initial_A(r, base.in_features, device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: exactly the base layer (the reference model of preference training)
        if not isinstance(base, QuantLinear):  # (a quantized layer has no parameters)
            base.weight.requires_grad_(False)

    @staticmethod
    def initial_A(r: int, in_features: int, device=None) -> torch.Tensor:
        """A's initial value: nn.Linear's init, as in peft (B starts at zero, so the update does)."""
        a = torch.empty(r, in_features, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return a

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        delta = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        if isinstance(self.base, QuantLinear):  # computes in x's dtype (autocast's) itself
            return self.base(x) + delta * self.scaling
        w = self.base.weight
        base = self.base(x) if x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type) else F.linear(x.to(w.dtype), w).to(x.dtype)
        return base + delta * self.scaling

    def delta(self) -> torch.Tensor:
        """The adapter's update (alpha / r) B A, fp32 [out, in]."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W + (alpha / r) B A; over a quantized base W is the dequantized one (the model training
        saw; :func:`merged_state_dict` merges into the full-precision file instead)."""
        base = self.base.dequantize() if isinstance(self.base, QuantLinear) else self.base.weight.float()
        return (base + self.delta()).to(dtype)


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every Linear whose name ends with a target suffix; returns the wrapped names."""
    if r < 1:
        raise ConfigError(f"lora_r: found {r}, expected >= 1")
    linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    wrapped, unmatched = [], []
    for target in targets:
        hits = [n for n in linear_names if n == target or n.endswith("." + target)]
        if not hits:
            unmatched.append(target)
        wrapped += hits
    if unmatched:
        examples = sorted({n.split(".", 2)[-1] for n in linear_names})
        raise ConfigError(f"lora_targets: {unmatched} match no Linear layer; available: {', '.join(examples)}")
    model.lora_base_fingerprint = base_fingerprint(model)
    for name in sorted(set(wrapped)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return sorted(set(wrapped))


def unfreeze_parts(model: nn.Module, parts) -> None:
    """Also train whole parts of the base: "ln" (all LayerNorms), "emb", "head".

    Their values before training are kept (``model.lora_part_originals``, same dtype and device),
    so that :func:`lora_disabled` gives back the exact base model.
    """
    originals = {}
    for part in parts:
        hits = [(n, p) for n, p in model.named_parameters() if PART_PATTERNS[part](n)]
        if not hits:
            raise ConfigError(f"train_parts: {part!r} matched no parameter")
        for n, p in hits:
            originals[n] = p.detach().clone()
            p.requires_grad_(True)
    model.lora_train_parts = list(parts)
    model.lora_part_originals = originals


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` computes exactly its base (adapters off, trained parts at their values
    before training); everything is restored on exit."""
    lora = list(_lora_modules(model).values())
    params = dict(model.named_parameters())
    originals = getattr(model, "lora_part_originals", {})
    trained = {n: params[n].data for n in originals}
    try:
        for m in lora:
            m.enabled = False
        for n, value in originals.items():
            params[n].data = value.to(trained[n].dtype)
        yield
    finally:
        for m in lora:
            m.enabled = True
        for n, value in trained.items():
            params[n].data = value


def _official_name(name: str) -> str:
    return name.replace(".base.", ".")


def merged_state_dict(model: nn.Module, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The official-layout state dict with every adapter merged (in fp32, then cast).

    A quantized base (``--base-quant``) is merged into the full-precision file it was quantized
    from (``model.quant_source``, read again tensor by tensor), never into its dequantized values:
    the result is what merging the adapter into that file with ``merge-lora`` gives."""
    lora = _lora_modules(model)
    quant = quantized_layers(model)
    source = _quant_source(model) if quant else {}
    codes = quantized_state_keys(quant)  # not official tensors
    out = {}
    for name, t in model.state_dict().items():
        if ".lora_A" in name or ".lora_B" in name or name in codes:
            continue
        owner = name.rsplit(".base.", 1)[0] if ".base." in name else None
        if owner in lora and name.endswith(".base.weight"):
            t = lora[owner].merged_weight(torch.float32)
        out[_official_name(name)] = t.detach().to("cpu", dtype=dtype).contiguous()
    for qname in quant:
        official = _official_name(qname + ".")
        owner = qname.removesuffix(".base")
        w = source[official + "weight"].float()
        if owner in lora:
            w = w + lora[owner].delta().cpu()
        out[official + "weight"] = w.to(dtype).contiguous()
    return out


def _quant_source(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full-precision file a quantized base was loaded from (memory-mapped), checked to be the
    same file (its fingerprint) as at load."""
    path = getattr(model, "quant_source", None)
    if path is None:
        raise CheckpointError("a quantized base without the file it came from cannot be merged; load it with "
                              "RWKV7.from_checkpoint(..., quant=...)")
    tensors = open_checkpoint(path)[0]
    want = getattr(model, "lora_base_fingerprint", None) or base_fingerprint(model)
    if want and fingerprint(tensors) != want:
        raise CheckpointError(f"{path}: the base model file changed since this run loaded it (fingerprint "
                              f"{fingerprint(tensors)}, loaded {want}); restore it, or merge the adapter into the "
                              f"file you now have with rwkvtune merge-lora")
    return tensors


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge adapters into the base Linears in place (fp32 maths) and unwrap them."""
    if quantized_layers(model):
        raise ConfigError("merge_lora: the base is quantized (no weights to merge into in place); use "
                          "merged_state_dict (it merges into the full-precision file) or rwkvtune merge-lora")
    for name, m in _lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            m.base.weight.copy_(m.merged_weight(m.base.weight.dtype))
        setattr(parent, child, m.base)
    return model


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the base weights' shapes and a strided sample of their values (bf16-rounded,
    so fp32 and bf16 loads of the same file agree); adapters and trained parts excluded.
    A model on the meta device (shapes only, e.g. a dry run) has no values: its fingerprint is ""."""
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        return ""
    for name, m in quantized_layers(model).items():  # the full-precision weight's sample, kept at load
        for b in m._buffers:
            state.pop(f"{name}.{b}", None)
        state[f"{name}.weight"] = ((m.out_features, m.in_features), m.fp_sample)
    return fingerprint(state)


def fingerprint(tensors) -> str:
    """:func:`base_fingerprint` of a mapping name -> tensor (a model's state dict, or a model
    file's tensors in the official layout, which are read 64 values each); a value may also be
    (shape, its sample) as a quantized layer keeps them."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        if ".lora_" in name:
            continue
        shape, sample = t if isinstance(t, tuple) else (tuple(t.shape), fingerprint_sample(t))
        h.update(_official_name(name).encode())
        h.update(str(tuple(shape)).encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def adapter_state(model: nn.Module) -> dict:
    """Everything needed to rebuild the fine-tune on the same base."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ConfigError("model has no LoRA adapters; call apply_lora first")
    parts = list(getattr(model, "lora_train_parts", []))
    tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
               if p.requires_grad and ".lora_" in n}
    part_tensors = {_official_name(n): p.detach().cpu().clone() for n, p in model.named_parameters()
                    if p.requires_grad and ".lora_" not in n}
    return {"format": ADAPTER_FORMAT, **cfg, "train_parts": parts, "lora": tensors, "parts": part_tensors,
            "base_fingerprint": model.lora_base_fingerprint, "base_quant": base_quant_of(model)}


class LoraMode(Mode):
    """LoRA adapters on the targeted Linear layers (and optionally whole ln/emb/head parts)."""

    name = "lora"

    def conflicts(self, cfg) -> list[tuple[dict[str, str], str]]:
        out = super().conflicts(cfg)
        if not cfg.lora_targets and not cfg.train_parts:
            out.append(({"lora_targets": "empty", "mode": repr(cfg.mode)},
                        "LoRA mode would train nothing (no train_parts either); name layers to adapt (e.g. "
                        "lora_targets=[att.key,ffn.value]) or use the default"))
        return out

    def prepare(self, model, cfg) -> None:
        self.freeze(model, cfg.precision == "bf16")
        apply_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        unfreeze_parts(model, cfg.train_parts)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trained tensors are fp32 even over a bf16 base
        return None

    def initial_values(self, module) -> dict[str, torch.Tensor]:
        out = {}
        # apply_lora wraps layers in sorted name order: A's draws come in that order
        for name, m in sorted(_lora_modules(module).items()):
            out[f"{name}.lora_A"] = LoRALinear.initial_A(m.r, m.base.in_features)
            out[f"{name}.lora_B"] = torch.zeros(m.base.out_features, m.r)
        return out

    def base_loaded(self, module, base: dict[str, torch.Tensor]) -> None:
        model = module.model
        model.lora_base_fingerprint = fingerprint(base)
        params = dict(model.named_parameters())
        model.lora_part_originals = {n: params[n].detach().clone() for n in getattr(model, "lora_part_originals", {})}

    def save_outputs(self, run, module, cfg) -> dict[str, str]:
        dtype = torch.bfloat16 if cfg.save_dtype == "bf16" else torch.float32
        save_adapter(run.adapter, module.model)
        save_state_dict(merged_state_dict(module.model, dtype), run.final)
        return {"adapter": str(run.adapter), "final": str(run.final)}

    def reference(self, module):
        return lora_disabled(module.model)


def save_adapter(path, model: nn.Module) -> None:
    """Write the adapter atomically (``.safetensors`` or a torch file, by the suffix)."""
    save_artifact(adapter_state(model), path)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Apply a saved adapter to a freshly loaded base model; refuses another base."""
    state = load_artifact(path, "adapter", "adapter.pth from --mode lora")
    if not isinstance(state, dict) or state.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not an rwkvtune LoRA adapter (expected format {ADAPTER_FORMAT!r})")
    found = base_fingerprint(model)
    if state["base_fingerprint"] != found:
        raise CheckpointError(f"{path}: adapter was trained on another base model (fingerprint "
                              f"{state['base_fingerprint']}, this base has {found}); load the base it was "
                              f"trained on")
    for group in ("lora", "parts"):
        for n, t in state.get(group, {}).items():
            check_tensor(n, t, path, what="adapter tensor")  # small: a full pass costs nothing
    apply_lora(model, state["targets"], r=state["r"], alpha=state["alpha"], dropout=state["dropout"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["lora"].items():
            params[n].copy_(t)
        official = {_official_name(n): p for n, p in params.items()}
        for n, t in state["parts"].items():
            official[n].copy_(t)
    return model
