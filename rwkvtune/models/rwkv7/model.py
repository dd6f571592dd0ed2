"""The RWKV-7 ("x070") language model in one file.

Parameter names and shapes are exactly the official checkpoint layout (docs/rwkv7.md §2), so
released ``.pth`` files load with strict key checking and saved files load in the ``rwkv``
package and in RWKV-LM. The model takes a :class:`ModelConfig` and nothing else; no
environment variables, no compilation at import.

Shapes: B batch, T time, C = n_embd, H heads of N = head_size_a channels, V vocab.

Two ways to run the same maths:
* parallel over T (training, prefill): the WKV recurrence runs through :func:`wkv7`
  (chunked PyTorch on CPU, fla on CUDA);
* RNN mode (decoding): pass ``state=`` and ``return_state=True``; the state carries per layer
  the TimeMix previous input, the WKV matrix [H, N, N] (fp32) and the ChannelMix previous input.
A sequence fed whole, token by token, or in chunks gives the same logits.

Packed documents: ``doc_start`` [B, T] bool marks where a document begins. There the token shift
sees zeros (as at t = 0) and every layer's WKV state restarts from its initial state (zeros, or
``wkv_init`` in state tuning), so each document's logits equal those of the document run alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvtune.configs.check import compare_config, mismatch_error
from rwkvtune.configs.detect import detect
from rwkvtune.configs.model_loader import ModelConfig, is_model_path, load_model_config
from rwkvtune.configs.run_source import run_weights
from rwkvtune.errors import CheckpointError, RwkvtuneError
from rwkvtune.hub import missing_model_hint
from rwkvtune.io.checkpoint import load_state_dict, save_state_dict
from rwkvtune.io.layout import LAYER0_V_KEYS, strip_prefix
from rwkvtune.models.rwkv7.quant import QuantLinear, check_kind, replace_big_matrices, require_backend
from rwkvtune.models.rwkv7.wkv import wkv7
from rwkvtune.tensor_checks import check_finite, check_stored
from rwkvtune.utils import human_bytes, human_count

# decay = exp(-DECAY_SCALE * sigmoid(d)) lies in (exp(-0.6065), 1); 0.606531 = exp(-0.5).
DECAY_SCALE = 0.606531
# GroupNorm eps of ln_x: 1e-5 * head_size_divisor**2 with divisor 8, as the reference trainer
# and the `rwkv` package use for every head size (equals 1e-5 * N for the released N = 64).
LN_X_EPS = 64e-5


class ModelInputError(RwkvtuneError, ValueError):
    """Bad input to the model: token ids, state shapes, dtypes or devices."""


class ModelAllocationError(RwkvtuneError):
    """The model does not fit in the device's memory (a config within the allowed ranges can still
    be far too large to allocate)."""


def _is_allocation_failure(e: BaseException) -> bool:
    # torch raises RuntimeError ("DefaultCPUAllocator: can't allocate memory") on CPU and
    # torch.OutOfMemoryError (a RuntimeError) on CUDA; Python's own MemoryError elsewhere.
    words = ("can't allocate memory", "not enough memory", "out of memory", "DefaultCPUAllocator")
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in words))


def describe_size(config: ModelConfig, dtype: torch.dtype = torch.float32) -> str:
    """"model NAME (n_layer L, n_embd C, vocab_size V, dim_ffn F: P parameters, B in float32)"."""
    n = config.n_params
    return (f"model {config.model_name} (n_layer {config.n_layer}, n_embd {config.n_embd}, vocab_size "
            f"{config.vocab_size}, dim_ffn {config.dim_ffn}: {human_count(n)} parameters, "
            f"{human_bytes(n * dtype.itemsize)} in {str(dtype).replace('torch.', '')})")


@contextlib.contextmanager
def allocation_guard(config: ModelConfig, device, dtype: torch.dtype = torch.float32):
    """Turn a failed allocation while the model is built into one line: its size and what to change."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not _is_allocation_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelAllocationError(
            f"{describe_size(config, dtype)} cannot be allocated on {device or 'cpu'} ({first[:160]}); use a smaller "
            f"config (fewer n_layer, a smaller n_embd, vocab_size or dim_ffn), a device with more memory, or "
            f"(for LoRA and state tuning) precision bf16") from e


@dataclasses.dataclass
class RWKV7State:
    """Recurrent state of the whole model, stacked over layers.

    att_x_prev: [L, B, C] previous token's TimeMix input (model dtype)
    wkv:        [L, B, H, N, N] WKV matrices, fp32 (row = value index, column = key index)
    ffn_x_prev: [L, B, C] previous token's ChannelMix input (model dtype)
    """

    att_x_prev: torch.Tensor
    wkv: torch.Tensor
    ffn_x_prev: torch.Tensor

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32) -> "RWKV7State":
        L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size_a
        return cls(
            att_x_prev=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32),
            ffn_x_prev=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        )

    def detach(self) -> "RWKV7State":
        return RWKV7State(self.att_x_prev.detach(), self.wkv.detach(), self.ffn_x_prev.detach())

    def clone(self) -> "RWKV7State":
        return RWKV7State(self.att_x_prev.clone(), self.wkv.clone(), self.ffn_x_prev.clone())

    def select(self, index) -> "RWKV7State":
        """Rows of the batch (e.g. ``state.select([0])``) for per-sequence decoding."""
        return RWKV7State(self.att_x_prev[:, index], self.wkv[:, index], self.ffn_x_prev[:, index])


class LayerState(NamedTuple):
    """One layer's recurrent state (batch B): each field None means zeros (start of a sequence).

    att_x_prev: [B, C] previous token's TimeMix input
    wkv:        [B, H, N, N] fp32 WKV matrix (row = value index, column = key index)
    ffn_x_prev: [B, C] previous token's ChannelMix input
    """

    att_x_prev: torch.Tensor | None = None
    wkv: torch.Tensor | None = None
    ffn_x_prev: torch.Tensor | None = None


def _orthogonal_(w: torch.Tensor, gain: float) -> None:
    rows, cols = w.shape
    if rows > cols:  # keep the per-output scale of a square orthogonal map (reference trainer rule)
        gain *= math.sqrt(rows / cols)
    nn.init.orthogonal_(w, gain=gain)


def _shifted(x, x_prev, doc_start):
    """Token shift: each position's previous input [B, T, C]; zeros (or the carried ``x_prev``) at
    t = 0, and zeros where ``doc_start`` begins a document (a document sees nothing before it)."""
    prev = torch.zeros_like(x[:, :1]) if x_prev is None else x_prev[:, None].to(x.dtype)
    shifted = torch.cat([prev, x[:, :-1]], dim=1)
    return shifted if doc_start is None else shifted.masked_fill(doc_start[..., None], 0.0)


class TimeMix(nn.Module):
    """Attention replacement: token shift, low-rank decay/ICLR/value-residual/gate, WKV-7."""

    def __init__(self, config: ModelConfig, layer_id: int, has_v: bool = True):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size_a
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.w1 = nn.Parameter(torch.zeros(C, config.dim_att_lora))
        self.w2 = nn.Parameter(torch.zeros(config.dim_att_lora, C))
        self.a1 = nn.Parameter(torch.zeros(C, config.dim_aaa_lora))
        self.a2 = nn.Parameter(torch.zeros(config.dim_aaa_lora, C))
        # Layer 0 never uses its value-residual params (it defines v_first); some released files
        # still carry them, so they exist when the file has them and stay frozen.
        self.has_v = has_v
        if has_v:
            self.v0 = nn.Parameter(torch.zeros(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, config.dim_mv_lora))
            self.v2 = nn.Parameter(torch.zeros(config.dim_mv_lora, C))
            if layer_id == 0:
                for p in (self.v0, self.v1, self.v2):
                    p.requires_grad_(False)
        self.g1 = nn.Parameter(torch.zeros(C, config.dim_gate_lora))
        self.g2 = nn.Parameter(torch.zeros(config.dim_gate_lora, C))
        self.k_k = nn.Parameter(torch.zeros(1, 1, C))
        self.k_a = nn.Parameter(torch.zeros(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)
        self.wkv_backend = "auto"

    def forward(self, x, v_first, x_prev=None, wkv_state=None, doc_start=None, wkv_reset=None):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _shifted(x, x_prev, doc_start) - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        d = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # decay logit
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        log_decay = -DECAY_SCALE * torch.sigmoid(d.float())  # fp32: decay close to 1 needs precision

        a4 = a.view(B, T, H, N)
        # The recurrence runs in fp32 whatever autocast says (bf16 state updates drift). w_bound:
        # |log_decay| <= DECAY_SCALE by construction, so the kernel need not measure it (no host sync).
        with torch.autocast(x.device.type, enabled=False):
            y, new_state = wkv7(r.view(B, T, H, N), log_decay.view(B, T, H, N), k.view(B, T, H, N),
                                v.view(B, T, H, N), -kk, kk * a4, wkv_state, backend=self.wkv_backend,
                                w_bound=DECAY_SCALE, doc_start=doc_start,
                                reset_state=wkv_reset if doc_start is not None else None)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(-1, keepdim=True) * v.view(B, T, H, N)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), v_first, x[:, -1], new_state


class ChannelMix(nn.Module):
    """FFN: token shift, then value(relu(key(x))^2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)

    def forward(self, x, x_prev=None, doc_start=None):
        h = x + (_shifted(x, x_prev, doc_start) - x) * self.x_k
        return self.value(torch.relu(self.key(h)) ** 2), x[:, -1]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, has_v: bool = True):
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=1e-5)
        self.ln1 = nn.LayerNorm(C, eps=1e-5)
        self.ln2 = nn.LayerNorm(C, eps=1e-5)
        self.att = TimeMix(config, layer_id, has_v)
        self.ffn = ChannelMix(config)

    def forward(self, x, v_first, state: LayerState, doc_start=None, wkv_reset=None):
        if self.layer_id == 0:  # inside the block's forward, so a sharded block 0 has its ln0 gathered
            x = self.ln0(x)
        dx, v_first, att_last, wkv_state = self.att(self.ln1(x), v_first, state.att_x_prev, state.wkv, doc_start,
                                                    wkv_reset)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), state.ffn_x_prev, doc_start)
        # What leaves the block is tensors of its own, not views into activations: a sharded
        # (FSDP2) block hooks its outputs, and a view's hooks are lost to in-place ops.
        own = lambda t: t.clone() if t._is_view() else t  # noqa: E731
        return x + dx, own(v_first), LayerState(own(att_last), own(wkv_state), own(ffn_last))


class RWKV7(nn.Module):
    """RWKV-7 language model. ``model(idx)`` -> logits [B, T, V]."""

    def __init__(self, config: ModelConfig, layer0_v: bool = True):
        super().__init__()
        self.config = config
        V, C = config.vocab_size, config.n_embd
        # Built on the meta device (a dry run, FSDP before sharding): no init draw, because
        # nn.Embedding's normal_ on meta runs through a decomposition that imports torch._dynamo
        # (~2 s of every such process). Elsewhere the default init as always (seeded draws unchanged).
        on_meta = torch.empty(0).device.type == "meta"
        self.emb = nn.Embedding(V, C, _weight=torch.empty(V, C)) if on_meta else nn.Embedding(V, C)
        self.blocks = nn.ModuleList(
            Block(config, i, has_v=(i > 0 or layer0_v)) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.grad_checkpoint = False

    @property
    def layer0_v(self) -> bool:
        return self.blocks[0].att.has_v

    def set_wkv_backend(self, backend: str) -> None:
        """"auto" (default), "chunked", "reference" or "fla"."""
        for block in self.blocks:
            block.att.wkv_backend = backend

    # ---- forward ---------------------------------------------------------------------------
    def _check_inputs(self, idx: torch.Tensor, state: RWKV7State | None) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.long, torch.int32, torch.int64):
            found = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ModelInputError(f"idx: expected a LongTensor of token ids [B, T], found {found}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ModelInputError(f"idx: expected shape [B, T] with T >= 1, found {list(idx.shape)}; "
                                  f"use idx[None] for a single sequence")
        dev = self.emb.weight.device
        if idx.device != dev:
            raise ModelInputError(f"idx is on {idx.device} but the model is on {dev}; move it with idx.to('{dev}')")
        if idx.device.type == "cpu":
            # On an accelerator this check would copy to the host every call; there the ids come from
            # data loading and generation, which check them where they are produced.
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ModelInputError(f"token id {bad} is outside the model's vocab [0, {self.config.vocab_size}); "
                                      f"check the tokenizer matches the model")
        if state is not None:
            c = self.config
            expect = (c.n_layer, idx.shape[0], c.n_head, c.head_size_a, c.head_size_a)
            if not isinstance(state, RWKV7State):
                raise ModelInputError(f"state: expected RWKV7State, found {type(state).__name__}")
            if tuple(state.wkv.shape) != expect or tuple(state.att_x_prev.shape) != expect[:2] + (c.n_embd,):
                raise ModelInputError(f"state: wkv shape {list(state.wkv.shape)} / x_prev {list(state.att_x_prev.shape)} "
                                      f"does not fit this model and batch (expected wkv {list(expect)}); "
                                      f"the state comes from another model or batch size")
            if state.wkv.device != dev:
                raise ModelInputError(f"state is on {state.wkv.device} but the model is on {dev}")

    def forward(self, idx: torch.Tensor, state: RWKV7State | None = None, return_state: bool = False,
                wkv_init: torch.Tensor | None = None, last_only: bool = False, hidden: bool = False,
                doc_start: torch.Tensor | None = None):
        """Logits [B, T, V]; with ``return_state=True`` also the state after the last token.

        ``wkv_init`` [L, H, N, N] or [L, B, H, N, N]: a (trainable) initial WKV state used when
        ``state`` is None (state tuning). ``last_only=True``: logits of the last position only,
        [B, 1, V] (prefill for generation: skips the head over the prompt, a V x C matmul per token).
        ``hidden=True``: the final hidden states ``ln_out(x)`` [B, T, C] instead of logits, for a
        loss that applies ``self.head`` in slices of the sequence (never all [B, T, V] logits at once).
        ``doc_start`` [B, T] bool: packed documents, each restarting at its True position from the
        initial state (``wkv_init``, also when a carried ``state`` is given, or zeros).
        """
        self._check_inputs(idx, state)
        if doc_start is not None:
            self._check_doc_start(idx, doc_start)
        x = self.emb(idx)
        B = idx.shape[0]
        v_first = None
        finals: list[LayerState] = []
        for i, block in enumerate(self.blocks):
            if state is not None:
                layer_state = LayerState(state.att_x_prev[i], state.wkv[i], state.ffn_x_prev[i])
            elif wkv_init is not None:  # state tuning: a trained initial WKV state, zeros elsewhere
                layer_state = LayerState(wkv=wkv_init[i] if wkv_init.dim() == 5 else wkv_init[i].expand(B, -1, -1, -1))
            else:
                layer_state = LayerState()
            reset = None
            if doc_start is not None and wkv_init is not None:
                reset = wkv_init[i] if wkv_init.dim() == 5 else wkv_init[i].expand(B, -1, -1, -1)
            if self.grad_checkpoint and torch.is_grad_enabled():
                x, v_first, final = checkpoint(block, x, v_first, layer_state, doc_start, reset, use_reentrant=False)
            else:
                x, v_first, final = block(x, v_first, layer_state, doc_start, reset)
            if return_state:
                finals.append(final)
        if last_only:
            x = x[:, -1:]
        logits = self.ln_out(x) if hidden else self.head(self.ln_out(x))
        if not return_state:
            return logits
        return logits, RWKV7State(*(torch.stack(parts) for parts in zip(*finals)))

    def _check_doc_start(self, idx: torch.Tensor, doc_start) -> None:
        if not isinstance(doc_start, torch.Tensor) or doc_start.dtype != torch.bool or doc_start.shape != idx.shape:
            found = (f"{doc_start.dtype} {list(doc_start.shape)}" if isinstance(doc_start, torch.Tensor)
                     else type(doc_start).__name__)
            raise ModelInputError(f"doc_start: expected a bool tensor shaped like idx {list(idx.shape)} (True where "
                                  f"a packed document begins), found {found}")
        if doc_start.device != idx.device:
            raise ModelInputError(f"doc_start is on {doc_start.device} but idx is on {idx.device}")

    def zero_state(self, batch_size: int = 1) -> RWKV7State:
        w = self.emb.weight
        return RWKV7State.zeros(self.config, batch_size, device=w.device, dtype=w.dtype)

    # ---- initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def init_weights_(self, seed: int | None = None) -> "RWKV7":
        """Official from-scratch initialisation of the reference trainer (docs/rwkv7.md §4)."""
        for name, value in initial_tensors(self.config, seed, layer0_v=self.layer0_v):
            self.get_parameter(name).copy_(value)
        return self

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int | None = None, device=None,
                    dtype: torch.dtype = torch.float32) -> "RWKV7":
        """A new model with the official initialisation (training from scratch)."""
        with allocation_guard(config, device, dtype):
            return cls(config).init_weights_(seed).to(device=device, dtype=dtype)

    # ---- checkpoints -----------------------------------------------------------------------
    def official_state_dict(self, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The state dict in the official layout (contiguous, CPU, ``dtype`` or as stored)."""
        return {k: (v.detach().to("cpu", dtype=dtype) if dtype else v.detach().cpu()).contiguous()
                for k, v in self.state_dict().items()}

    def save_checkpoint(self, path: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16) -> None:
        """Write an official-layout ``.pth`` (bf16 by default, like released files), atomically."""
        save_state_dict(self.official_state_dict(dtype), path)

    def load_official_state_dict(self, sd: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        """Strict load with an error listing every mismatching key (and the registry entry that fits)."""
        sd, _ = strip_prefix(sd)
        has_v = all(k in sd for k in LAYER0_V_KEYS)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        expected = self.config.param_shapes(layer0_v=self.layer0_v)
        if any(shapes.get(k) != tuple(s) for k, s in expected.items() if k not in LAYER0_V_KEYS) or \
                set(shapes) - set(expected) - set(LAYER0_V_KEYS):
            raise mismatch_error(self.config, source, shapes)
        if has_v != self.layer0_v:
            sd = {k: v for k, v in sd.items() if k not in LAYER0_V_KEYS}
            if self.layer0_v:  # file lacks the unused layer-0 value-residual params: keep ours
                own = self.state_dict()
                sd.update({k: own[k] for k in LAYER0_V_KEYS})
        self.load_state_dict(sd, strict=True)

    @classmethod
    def from_checkpoint(cls, path_or_name: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                        wkv_backend: str = "auto", expect: ModelConfig | None = None,
                        quant: str = "none") -> "RWKV7":
        """Load a ``.pth`` (dims detected from the file), a registry name (its model_path), or a
        training run's directory (its final.pth; a state or adapter run: see ``rwkvtune.load_model``).

        A registry name (or ``expect``) also states the dims the file must have: a file of another
        shape is refused with every difference listed, instead of silently loading other dims.
        Returns the model in eval mode, on ``device`` in ``dtype`` (fp32 on CPU by default).
        ``quant`` "int8" or "nf4": the big matrices (:data:`quant.BIG_MATRICES`) become frozen
        :class:`quant.QuantLinear` layers, each quantized as it is read (one full-precision matrix
        exists at a time); ``model.quant_source`` names the file they came from.
        """
        check_kind(quant)
        if quant != "none":
            require_backend(quant, device)  # a missing library is said before any weight is read
        sd, path, config, has_layer0_v = open_checkpoint(path_or_name, expect)
        with torch.device("meta"):
            model = cls(config, layer0_v=has_layer0_v)
        with allocation_guard(config, device, dtype):
            if quant == "none":
                model.load_state_dict({k: loaded_tensor(k, v, path, device, dtype) for k, v in sd.items()},
                                      strict=True, assign=True)
            else:
                _load_quantized(model, sd, path, device, dtype, quant)
        # assign=True keeps requires_grad of the loaded tensors: restore the module's choices.
        for name, p in model.named_parameters():
            p.requires_grad_(name not in LAYER0_V_KEYS)
        model.set_wkv_backend(wkv_backend)
        return model.eval()


@torch.no_grad()
def initial_tensors(config: ModelConfig, seed: int | None = None, layer0_v: bool = True
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The official from-scratch initialisation (docs/rwkv7.md §4), one tensor at a time: (name,
    fp32 CPU tensor), block by block, then emb, ln_out and head, drawing random numbers in that
    order. :meth:`RWKV7.init_weights_` copies them into a whole model; a sharded run copies each
    one's slice into its shards, so at most one block (or the head) exists whole."""
    if seed is not None:
        torch.manual_seed(seed)
    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    for l in range(L):
        with torch.device("meta"):  # built without drawing random numbers: the init sets every tensor
            block = Block(config, l, has_v=(l > 0 or layer0_v))
        block.to_empty(device="cpu")
        _init_block_(block, config, l)
        for name, p in block.named_parameters():
            yield f"blocks.{l}.{name}", p.detach()
    yield "emb.weight", torch.empty(V, C).uniform_(-1e-4, 1e-4)
    yield "ln_out.weight", torch.ones(C)
    yield "ln_out.bias", torch.zeros(C)
    head = torch.empty(V, C)
    nn.init.orthogonal_(head, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
    yield "head.weight", head


def _init_block_(block: "Block", c: ModelConfig, l: int) -> None:
    """Block ``l``'s official initialisation, in place (the reference trainer's order of draws)."""
    L, C, N = c.n_layer, c.n_embd, c.head_size_a
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    att, ffn = block.att, block.ffn
    r01 = l / (L - 1) if L > 1 else 0.0
    r10 = 1.0 - l / L
    www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)

    def put(p, values):
        p.copy_(torch.as_tensor(values, dtype=torch.float64).expand(p.shape).to(p.dtype))

    put(att.x_r, 1 - ddd ** (0.2 * r10))
    put(att.x_g, 1 - ddd ** (0.2 * r10))
    put(att.x_w, 1 - ddd ** (0.9 * r10))
    put(att.x_a, 1 - ddd ** (0.9 * r10))
    put(att.x_k, 1 - ddd ** (0.7 * r10))
    put(att.x_v, 1 - ddd ** (0.7 * r10))
    put(ffn.x_k, 1 - ddd ** (r10 ** 4))
    put(att.w0, www + 0.5 + 2.5 * zigzag)
    put(att.a0, -0.19 + 0.3 * zigzag + 0.4 * linear)
    put(att.k_k, 0.71 - 0.1 * linear)
    put(att.k_a, torch.tensor(1.02))
    put(att.r_k, torch.tensor(-0.04))
    lowrank = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
    if att.has_v:
        put(att.v0, 0.73 - 0.4 * linear)
        lowrank.append((att.v1, att.v2))
    for first, second in lowrank:
        first.zero_()
        _orthogonal_(second, 0.1)
    put(att.ln_x.weight, torch.tensor(((1 + l) / L) ** 0.7))
    att.ln_x.bias.zero_()
    for ln in (block.ln1, block.ln2) + ((block.ln0,) if l == 0 else ()):
        ln.weight.fill_(1.0)
        ln.bias.zero_()
    _orthogonal_(att.receptance.weight, 1.0)
    _orthogonal_(att.key.weight, 0.1)
    _orthogonal_(att.value.weight, 1.0)
    att.output.weight.zero_()
    _orthogonal_(ffn.key.weight, 1.0)
    ffn.value.weight.zero_()


def meta_model(config: ModelConfig, layer0_v: bool = True, quant: str = "none") -> "RWKV7":
    """The model's shapes only, on the meta device (a dry run counts its parameters; FSDP shards it
    before any weight exists). ``quant`` "int8" or "nf4": its big matrices are :class:`QuantLinear`
    placeholders without codes (and without parameters, so FSDP never shards them); a sharded run
    quantizes each from the model file once its shards exist (rwkvtune.train.sharded_load)."""
    check_kind(quant)
    with torch.device("meta"):
        model = RWKV7(config, layer0_v=layer0_v)
        if quant != "none":
            replace_big_matrices(model, lambda _, m: QuantLinear(m.in_features, m.out_features, quant))
    return model


def open_checkpoint(path_or_name: str | os.PathLike, expect: ModelConfig | None = None
                    ) -> tuple[dict[str, torch.Tensor], str, ModelConfig, bool]:
    """A model file's tensors without reading them (memory-mapped, in the official key layout),
    checked against ``expect`` or the registry entry a name stands for: (tensors, the file's path,
    its config, whether it stores layer 0's unused v0/v1/v2). Each tensor is checked as it is read
    (:func:`loaded_tensor`)."""
    path = str(path_or_name)
    path = run_weights(path, CheckpointError) or path  # a training run's directory: its final.pth
    if not (is_model_path(path) or os.path.exists(path)):
        expect = expect or load_model_config(path)
        if expect.model_path.endswith((".pth", ".pt")) and not os.path.exists(expect.model_path):
            raise CheckpointError(f"model {path!r}: model file not found: {missing_model_hint(expect)}; or pass "
                                  f"the .pth path")
        path = expect.model_path
    sd, prefix = load_state_dict(path, mmap=True)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    info = detect(shapes, source=path, key_prefix=prefix)
    if expect is not None and compare_config(expect, info):
        raise mismatch_error(expect, path, shapes, info)
    if info.extra_keys:
        raise CheckpointError(f"{path}: unexpected keys {', '.join(info.extra_keys[:5])} (not part of RWKV-7 "
                              f"x070); this file is from a variant rwkvtune does not support")
    return sd, path, ModelConfig.from_checkpoint(info), info.has_layer0_v


def _load_quantized(model: "RWKV7", sd: dict[str, torch.Tensor], path: str, device, dtype, quant: str) -> None:
    """Fill a meta-built ``model`` from the file's (memory-mapped) tensors, the big matrices
    quantized one at a time (each read in fp32, quantized, then dropped)."""
    sd, _ = strip_prefix(sd)
    names = replace_big_matrices(model, lambda name, _: quantized_layer(name + ".weight", sd, path, quant, device))
    quantized = {n + ".weight" for n in names}
    rest = {k: loaded_tensor(k, v, path, device, dtype) for k, v in sd.items() if k not in quantized}
    result = model.load_state_dict(rest, strict=False, assign=True)
    buffers = {n + "." + b for n in names for b in model.get_submodule(n)._buffers}
    missing = set(result.missing_keys) - buffers
    if missing or result.unexpected_keys:  # open_checkpoint checked the keys: a bug if reached
        raise CheckpointError(f"{path}: keys missing {sorted(missing)[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.quant_source = path


def quantized_layer(key: str, tensors: dict[str, torch.Tensor], path: str, quant: str, device) -> QuantLinear:
    """The model file's (memory-mapped) matrix ``key`` read in fp32, checked, and quantized onto
    ``device``: the one full-precision copy lives only inside this call. A whole-model load and a
    sharded one (rwkvtune.train.sharded_load, every process its own copy) quantize alike."""
    if key not in tensors:
        raise CheckpointError(f"{path}: has no tensor {key}; pass the model file this run was configured for")
    return QuantLinear.from_weight(loaded_tensor(key, tensors[key], path, "cpu", torch.float32), quant, device)


def loaded_tensor(key: str, stored: torch.Tensor, source: str, device, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a model file on ``device`` in ``dtype``, checked: dense floating point as stored
    (an int64 or complex weight would be cast silently), and finite in the copy the model keeps (one
    NaN makes every logit NaN), so no second copy is ever made."""
    check_stored(key, stored, source)
    out = stored.to(device=device, dtype=dtype, copy=True)
    check_finite(key, out, source)
    return out
