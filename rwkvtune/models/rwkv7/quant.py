"""A quantized frozen base: the model's big matrices stored in int8 or nf4 (``--base-quant``).

Which matrices: att receptance/key/value/output, ffn key/value and the head (:data:`BIG_MATRICES`),
more than 95% of the parameters from 0.4B up. The small low-rank projections (w1/w2, a1/a2, v1/v2,
g1/g2), the per-channel vectors, the norms and emb stay in the model's dtype: they are a few percent
of the bytes and the most sensitive to rounding.

Formats (both deterministic functions of the full-precision tensor, so a quantized base is never
saved: it is rebuilt at load, tensor by tensor, and a resumed or merged run reads the same file):

* ``int8``: per-output-channel absmax, symmetric: ``q = round(W / s)``, ``s = max|W_row| / 127``
  (fp32 per row), ``W ~ q * s``. 1 B + 4 B/in per parameter.
* ``nf4``: QLoRA's NormalFloat4 (Dettmers et al. 2023) as torchao defines it (``to_nf4``): blocks
  of 64 values, each stored as 4-bit indices into the 16 NF4 levels times the block's absmax; the
  absmax values double-quantized (minus their mean, int8 in blocks of 256 with one fp32 factor per
  block). 0.5 B + 1/64 B + 4/16384 B per parameter. A matrix whose size is not a multiple of
  64 x 256 is padded with zero blocks (tiny test models; every released size divides evenly).

Which library runs which path, and why (measured on this project's 2-core AVX512 CPU, the 0.1B
shapes, best of 7; ``bench/bench_quant.py`` gives the whole-model figures):

* CPU int8: torch's own ``torch._weight_int8pack_mm`` (int8 weight-only GEMV/GEMM kernel) for
  up to :data:`INT8_KERNEL_ROWS` rows without autograd (decoding); it reads 1 B per weight where
  fp32 reads 4. Its input is bf16 whatever the model's dtype: with fp32 input the kernel is not
  vectorised (65536x768 head, one row: 58-85 ms, against 13-40 ms with bf16 input and 24-33 ms for
  the dense fp32 product, on this shared, loaded machine), so decoding an fp32 model over an int8
  base rounds each big layer's input and output to bf16 (a relative 2^-9, below int8's own error
  of up to 1/254 of a row's largest weight; tests/test_quant.py bounds the decoded logits). For
  more rows it has no blocked kernel in fp32 (256 rows: 20 s against 0.4 s for the dense
  product), so there the layer is dequantized to the compute dtype (one layer at a time) and
  multiplied by MKL/oneDNN: training and prefill cost one extra pass over the weight.
* CPU nf4: torchao's NF4 double quantization of the scales (``NF4Tensor.double_quantize_scalers``,
  QLoRA's definition) with torchao's NF4 levels; the 4-bit codes and the dequantization are done
  here with the same arithmetic, because torchao's eager code is 10-50x slower than need be on
  CPU (its ``to_nf4`` took 17 s for the 65536x768 head, an argmin over a [numel, 16] difference
  tensor; ``bucketize`` on the level midpoints takes ~0.3 s; its dequantization 1.3-2.4 s against
  ~0.1 s for one table lookup per byte). ``tests/test_quant.py`` holds both to torchao's
  ``to_nf4(...).get_original_weight()`` (equal values). There is no fused nf4 CPU matmul in torch
  or torchao: the layer is dequantized and multiplied like int8's many-row path.
* CUDA nf4: bitsandbytes (``quantize_4bit`` with blocksize 64, ``compress_statistics=True``: the
  same double-quantized NF4 format, and its fused ``matmul_4bit``). Imported only on CUDA.
* CUDA int8: the per-channel int8 format dequantized to bf16 per layer by torch (bitsandbytes'
  LLM.int8 is another format, with fp16 outlier columns); no GPU was available to measure more.

Under ``strategy: fsdp`` the module is built on meta with placeholder layers (``QuantLinear(in, out,
kind)``: no codes, no parameters), sharded, and each process replaces every placeholder with the
file's matrix quantized by :meth:`QuantLinear.from_weight` as it fills its shards
(rwkvtune.train.sharded_load). FSDP2 shards parameters only, and the codes and scales are buffers:
every process holds the whole quantized base (only the full-precision rest is sharded), and FSDP
never all-gathers it. Sharded checkpoints leave the codes out, as single-process ones do.

Nothing here imports torchao or bitsandbytes at module import: only :func:`quantize_weight` does,
and a missing one is a one-line :class:`QuantError` naming the pip command.
"""

from __future__ import annotations

import importlib
import logging
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.errors import ConfigError

QUANT_KINDS = ("none", "int8", "nf4")
# Module-name suffixes of the matrices that are quantized (the head is the root's "head").
BIG_MATRICES = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value", "head")
NF4_BLOCK = 64  # values per absmax block (QLoRA)
NF4_SCALER_BLOCK = 256  # absmax values per double-quantization block (QLoRA, torchao's default)
# Rows up to which int8 uses torch's int8 weight-only kernel (no autograd): decoding, batched or not.
INT8_KERNEL_ROWS = 16
# torchao's NF4 levels (torchao.quantization NF4Tensor.from_tensor): the 16 quantiles of N(0, 1)
# scaled to [-1, 1], as QLoRA's reference lists them to 4 decimals.
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
              0.3379, 0.4407, 0.5626, 0.7230, 1.0)


class QuantError(ConfigError):
    """A quantized base cannot be built here (the library it needs is missing, or a bad kind)."""


def is_big_matrix(name: str) -> bool:
    """Whether the Linear module called ``name`` (e.g. ``blocks.3.att.key``, ``head``) is quantized."""
    return any(name == t or name.endswith("." + t) for t in BIG_MATRICES)


def check_kind(kind: str, flag: str = "--base-quant") -> str:
    if kind not in QUANT_KINDS:
        raise QuantError(f"{flag}: found {kind!r}, expected one of {', '.join(QUANT_KINDS)}")
    return kind


def fingerprint_sample(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` an adapter's base fingerprint hashes (rwkvtune.peft.lora.fingerprint):
    64 strided values, bf16. A quantized layer keeps those of its full-precision weight, so an
    adapter trained on a quantized base names (and merges into) the full-precision file."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 64)
    return flat[::step][:64].to("cpu", torch.bfloat16)


def _missing(package: str, kind: str, where: str, extra: str) -> QuantError:
    return QuantError(f"--base-quant {kind} on {where} needs {package}, which is not installed: pip install "
                      f"{package} (or pip install 'rwkvtune[{extra}]'), or use --base-quant int8 / none")


def require_backend(kind: str, device) -> None:
    """Refuse (one line) a kind whose library is missing for ``device``, before any weight is read."""
    check_kind(kind)
    dev = torch.device(device)
    try:
        if kind == "nf4" and dev.type == "cuda":
            importlib.import_module("bitsandbytes")
        elif kind == "nf4":
            _torchao_double_quantize()
    except ImportError as e:
        raise (_missing("bitsandbytes", kind, "CUDA", "quant-gpu") if dev.type == "cuda"
               else _missing("torchao", kind, "CPU", "quant")) from e


# ------------------------------------------------------------------------------------- formats
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], s fp32 [out]) with W ~ q * s[:, None]; an all-zero row gets s = 1."""
    w = w.float()
    absmax = w.abs().amax(dim=1)
    s = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def _torchao_double_quantize():
    # torchao logs a warning per CUDA-only extension it cannot load on a CPU build, and torch's
    # pytree one about an enum torchao registers: noise on every CLI run, not a problem of ours.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import NF4Tensor
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return NF4Tensor.double_quantize_scalers


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchao's nf4 of ``w`` (padded to whole double-quantization blocks): codes uint8 (two 4-bit
    indices per byte, the first in the high nibble), int8 block scalers, fp32 factor per scaler
    block, fp32 scaler mean. Needs torchao (its double quantization)."""
    try:
        double_quantize = _torchao_double_quantize()
    except ImportError as e:
        raise _missing("torchao", "nf4", "CPU", "quant") from e
    flat = w.detach().float().reshape(-1)
    unit = NF4_BLOCK * NF4_SCALER_BLOCK
    pad = (-flat.numel()) % unit
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    qscalers, factor, mean = double_quantize(flat, NF4_BLOCK, NF4_SCALER_BLOCK)
    # A scaler block whose absmax values all equal their mean (e.g. an all-zero matrix) has an
    # infinite factor in torchao's arithmetic: store factor 1 and zeros, which dequantize to the mean.
    bad = ~torch.isfinite(factor) | (factor == 0)
    if bool(bad.any()):
        factor = torch.where(bad, torch.ones_like(factor), factor)
        qscalers = qscalers.view(-1, NF4_SCALER_BLOCK).masked_fill(bad[:, None], 0).reshape(-1)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    # Nearest level (ties to the lower one, as torchao's argmin): bucketize on the midpoints.
    codes = torch.bucketize(scaled.reshape(-1), (levels[1:] + levels[:-1]) / 2, out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return {"codes": packed.contiguous(), "qscalers": qscalers.to(torch.int8).contiguous(),
            "factor": factor.float().contiguous(), "mean": mean.float().reshape(()).clone()}


def _pair_table(device) -> torch.Tensor:
    """[256, 2] fp32: the two NF4 levels a code byte stands for (high nibble first)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)


def dequantize_nf4(codes, qscalers, factor, mean, shape, dtype=torch.float32) -> torch.Tensor:
    """The nf4 matrix as ``dtype``, computed in fp32 exactly as torchao's ``get_original_weight``:
    scaler = q / factor + mean per 64-value block, value = level * scaler."""
    scalers = (qscalers.view(-1, NF4_SCALER_BLOCK).float() / factor[:, None]).reshape(-1) + mean
    values = F.embedding(codes.to(torch.int32), _pair_table(codes.device)).view(-1, NF4_BLOCK)
    n = shape[0] * shape[1]
    return (values * scalers[:, None]).view(-1)[:n].view(shape).to(dtype)


# -------------------------------------------------------------------------------------- module
class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W dequantized for the product and again in backward (nothing the size of W
    is kept between them: the base is frozen, only the input's gradient is needed)."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        return F.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad):
        w = ctx.layer.dequantize(ctx.dtype)
        return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None, None


class QuantLinear(nn.Module):
    """A frozen, bias-free Linear whose weight is stored quantized (``kind`` int8 or nf4).

    ``forward(x)`` computes ``x W^T`` in x's dtype (autocast's under autocast). It has no ``weight``
    attribute on purpose: code that reads ``.weight`` of a Linear (decode preparation, merging)
    must treat a quantized layer as one; :meth:`dequantize` gives W. Casting the module (``.to``,
    ``.bfloat16()``) moves its buffers but never changes their dtypes (the fp32 scales would lose
    precision in bf16); the bitsandbytes nf4 state cannot move between devices: quantize on the
    device the layer runs on.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, sample: torch.Tensor | None = None):
        # Constructed directly: a placeholder without codes (a sharded run's meta-built module);
        # from_weight registers the codes.
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, check_kind(kind)
        # the full-precision weight's fingerprint sample (see fingerprint_sample), not saved
        self.register_buffer("fp_sample", sample if sample is not None else torch.zeros(0, dtype=torch.bfloat16),
                             persistent=False)
        self.bnb_state = None  # bitsandbytes' QuantState (CUDA nf4)

    @classmethod
    def from_weight(cls, w: torch.Tensor, kind: str, device=None) -> "QuantLinear":
        """Quantize ``w`` [out, in] (any float dtype, any device) onto ``device`` (default: w's)."""
        device = torch.device(device if device is not None else w.device)
        require_backend(kind, device)
        out_f, in_f = w.shape
        layer = cls(in_f, out_f, kind, fingerprint_sample(w))
        if kind == "int8":
            q, s = quantize_int8(w.to(device))
            layer.register_buffer("qweight", q)
            layer.register_buffer("scale", s)
        elif device.type == "cuda":
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(w.to(device, torch.bfloat16), blocksize=NF4_BLOCK,
                                               compress_statistics=True, quant_type="nf4")
            layer.register_buffer("bnb_data", packed)
            layer.bnb_state = state
        else:
            for name, t in quantize_nf4(w.to("cpu")).items():
                layer.register_buffer(name, t.to(device))
        return layer

    @property
    def device(self) -> torch.device:
        # A placeholder (no codes yet: a module built on meta for sharding) is where fp_sample is.
        return next((b for n, b in self.named_buffers() if n != "fp_sample"), self.fp_sample).device

    def nbytes(self) -> int:
        """Bytes of the stored quantized weight (scales included)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "fp_sample")

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [out, in] as ``dtype`` (a new tensor)."""
        if self.kind == "int8":
            return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)
        if self.bnb_state is not None:
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(self.bnb_data, self.bnb_state).to(dtype)
        return dequantize_nf4(self.codes, self.qscalers, self.factor, self.mean,
                              (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if self.bnb_state is not None:
            import bitsandbytes as bnb

            return bnb.matmul_4bit(x.to(dtype), self.bnb_data.t(), quant_state=self.bnb_state)
        rows = x.numel() // max(1, x.shape[-1])
        if (self.kind == "int8" and dev == "cpu" and rows <= INT8_KERNEL_ROWS and dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and x.requires_grad)):
            # bf16 in and out whatever the model's dtype: the kernel's fp32-input path is not
            # vectorised (2-4x slower than the dense fp32 product); see the module docstring.
            y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.qweight,
                                          self.scale.to(torch.bfloat16))
            return y.to(dtype).view(*x.shape[:-1], self.out_features)
        return _DequantLinear.apply(x, self, dtype)

    def _apply(self, fn, recurse=True):
        # Only the device may change: a dtype cast (model.to(torch.bfloat16)) keeps int8 codes and
        # fp32 scales as they are.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def replace_big_matrices(model: nn.Module, make) -> list[str]:
    """Replace each big-matrix ``nn.Linear`` of ``model`` (:func:`is_big_matrix`) by ``make(name,
    linear)``, in module order; returns their names. ``make`` quantizes the file's weight
    (:meth:`QuantLinear.from_weight`), or returns a placeholder ``QuantLinear(in, out, kind)``
    without codes: a module built on meta for sharding, whose layers are quantized once its shards
    exist (rwkvtune.train.sharded_load)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_big_matrix(n)]
    for name in names:
        model.set_submodule(name, make(name, model.get_submodule(name)))
    return names


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantized_state_keys(layers: dict[str, QuantLinear]) -> set[str]:
    """The state_dict keys of these quantized layers' codes and scales (``quantized_layers``): no
    official tensors, never saved (rebuilt from the model file) and never gathered by FSDP."""
    return {f"{name}.{b}" for name, layer in layers.items() for b in layer.state_dict()}


def base_quant_of(model: nn.Module) -> str:
    """"none", or the kind of the model's quantized layers."""
    kinds = {m.kind for m in quantized_layers(model).values()}
    return kinds.pop() if len(kinds) == 1 else "none" if not kinds else "mixed"
