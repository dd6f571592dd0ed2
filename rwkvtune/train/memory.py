"""Memory of a training run, per process, in bytes: :func:`estimate_memory`; and the dry run's report.

Standard library only (``rwkvtune plan`` and the checks run it without importing torch). Each term
follows what the code allocates; the activation coefficients are exact fits of the tensors autograd
saves (saved-tensor hooks, 10-12 random shapes each), the CPU heap terms are fits of measured RSS
(``bench/bench_memory.py``; tests/test_memory.py holds both to the code and to real runs).

Notation: P parameters, L layers, C width, F FFN width, H heads of N, V vocab, D the four
low-rank dims, B sequences per forward (the micro-batch, x2 for DPO's chosen and rejected, x G for
GRPO's group), T tokens per sequence, W processes, s = 1/W under fsdp (else 1).

Terms (bytes, one process):

* ``weights``: every stored parameter: fp32 (4 B); a frozen base with precision bf16 is bf16 (2 B);
  LoRA adapters and a tuned state are fp32. x s (0 with cpu_offload: in host memory). A quantized
  base (``base_quant``, lora and state) stores its big matrices (QUANT_MATRICES) in QUANT_BYTES,
  NOT x s: its codes and scales are buffers, which FSDP2 does not shard (every process holds the
  whole quantized base, on the device also with cpu_offload), and FSDP never gathers them.
* ``dequant``: a quantized base's layer dequantized for its product (one at a time, the largest
  is the head): DEQUANT_BYTES per element (the fp32 intermediates on CPU, bf16 on GPU).
* ``optimizer``: AdamW's exp_avg + exp_avg_sq, fp32: 8 B per trainable parameter, x s.
* ``gradients``: 4 B per trainable parameter (fp32, also FSDP's fp32 reduce) x s at the update; in
  backward the head's gradient exists from the loss on (unsharded under FSDP), and one block's.
* ``ddp_buckets``: DDP on >= 2 processes keeps its all-reduce buckets, a flat copy of every
  trainable gradient (4 B each), for the whole run.
* ``activations``: what autograd keeps for backward, L x T x B x ``saved_per_token_layer`` (fitted
  coefficients below, plus the WKV kernel's own), plus ln_out's input, the hidden states and the
  scored rows of the loss (3C fp32 per token) and the recurrent states the forward returns. With
  grad_checkpoint only each block's input (and v_first) is kept, plus one block recomputed in
  backward. One layer's backward working set, 0.6 x that layer's saved tensors (measured 0.42-0.6),
  comes on top while that layer runs.
* ``loss``: the chunked head + cross-entropy (rwkvtune.train.loss): up to 1024 rows at a time, each
  V logits; backward holds 4 such fp32 rows (logits, log-softmax, their gradient, L2Wrap's):
  16 B x rows x V (measured 3.5-4.0). Under autocast over fp32 weights, also the head's bf16 cast.
* ``fsdp_buffers``: FSDP2 all-gathers each block's parameters before use (this block and the one
  prefetched: 2 blocks) and keeps the root (emb, head, ln_out) unsharded from forward to the end of
  backward, in the compute dtype (bf16 on GPU with bf16, else fp32); a block's unsharded gradient
  (fp32) exists until its reduce-scatter.
* ``autocast``: bf16 autocast over fp32 weights (full fine-tune, GPU, ddp) casts every block matrix
  to bf16 and the matmul keeps the cast for backward: 2 B per matrix parameter; over a bf16 base the
  LoRA adapters' A and B are cast the same way.
* ``optimizer_step``: AdamW's temporaries: on CPU the per-tensor loop (the square root of exp_avg_sq
  and the denominator: 8 B x the largest trainable tensor); on GPU the foreach path, a copy of every
  exp_avg_sq (4 B per trainable parameter, x s).
* ``retained`` (CPU, glibc): tensors under 32 MiB come from the heap, and the backward's new tensors
  rarely fit the holes freed activations leave, so the heap grows during backward by HEAP_GROWTH x
  the activations; what backward frees (activations, growth, the working set, small loss slices)
  stays in the heap through the optimizer step and saving. Under FSDP the per-parameter unsharded
  copies and gradients of every block stay there too (FSDP_HEAP_SETS block-sized sets per layer).
* ``save``: copies held while writing outputs: final.pth in save_dtype (2 B per parameter for bf16;
  FSDP gathers the whole model onto the main process), the resumable checkpoint's fp32 clone of the
  trainable tensors. On GPU these are host memory.
* ``load``: building the model (a quantized base: plus the largest matrix's quantization
  temporaries, QUANT_LOAD_BYTES per element): under ddp the whole model on the device, plus on CPU the
  memory-mapped checkpoint's pages (its file size) or the init's temporaries (orthogonal init of
  the head, 2.5 x it). fsdp builds on meta, shards, and fills each process's shards one tensor at
  a time (from the file or the seeded init): x s, plus one V x C fp32 tensor and its source; a
  quantized base whole (with the largest matrix's quantization temporaries) on every process.
* ``reference``: DPO and GRPO in full mode keep a frozen copy of the starting model (fp32) as
  their reference, x s (sharded like the policy under fsdp); lora and state switch their trained
  parts off instead (0).
* ``runtime``: on GPU the CUDA context and library workspaces, 1 GiB per process (assumed: no GPU
  was available to measure it); on CPU what the first training step adds besides tensors (code
  pages, allocator arenas: measured 100 MiB).

Phases; the estimate is the largest (``peak``):

* ``load``   = load (+ runtime on GPU)
* ``step``   = weights + optimizer + ddp_buckets + fsdp_buffers + autocast + activations + head
  gradient + max(loss, one layer's working set + its gradient) + runtime (+ heap growth and FSDP's
  heap sets on CPU)
* ``update`` = weights + optimizer + ddp_buckets + gradients + optimizer_step + runtime (+ retained)
* ``save``   = weights + optimizer + runtime (+ retained and the save copies on CPU)

``host`` (GPU runs): the model is built in host memory first (stored bytes, whole; under fsdp one
tensor at a time), outputs are written from host copies, and cpu_offload keeps the
sharded weights, gradients and AdamW state there.
"""

from __future__ import annotations

import dataclasses
import math

from rwkvtune.io.layout import LAYER0_V_KEYS
from rwkvtune.models.rwkv7.config import DEFAULT_LORA_TARGETS

GIB = 2 ** 30
# A run fits when its estimate is at most this fraction of the memory it may use: the rest is
# headroom for allocator fragmentation and what the model leaves out (tested: estimates within 20%).
FIT_FRACTION = 0.9
GPU_RUNTIME = GIB  # CUDA context + cuBLAS/NCCL workspaces per process (assumed, not measured here)
# What the first training step adds to a CPU process besides tensors: code pages of the backward and
# optimizer kernels, allocator arenas, thread buffers. Measured: 98-101 MiB over 1 and 2 threads,
# full and lora, on a model of 0.8 MiB (so independent of the shape).
CPU_RUNTIME = 100 * 2 ** 20
# glibc serves allocations below its largest mmap threshold (32 MiB on 64-bit Linux) from its heap
# and keeps freed heap memory for reuse; larger tensors are unmapped when freed.
MMAP_MAX = 32 * 2 ** 20
FSDP_HEAP_SETS = 4  # block-sized heap sets per layer FSDP leaves in glibc's heap on CPU (measured 3.6-5.3)
# On CPU the backward's new tensors rarely fit the holes the freed activations leave, so glibc's heap
# grows during backward, by a fraction of the activations a run without checkpointing keeps (RSS over
# live bytes, measured on 2-4 shapes each, 0.06-3.7 GiB of activations): full 0.47-0.59, lora
# 0.85-1.12, state 0.74-0.76; with grad_checkpoint (every block recomputed) 0.60-0.73.
HEAP_GROWTH = {"full": 0.55, "lora": 1.0, "state": 0.75, "checkpointed": 0.7}
WKV_CHUNK = 32  # rwkvtune.models.rwkv7.wkv.DEFAULT_CHUNK_SIZE (a test keeps them equal)
LOSS_ROWS = 1024  # rwkvtune.train.loss.DEFAULT_CHUNK_TOKENS (a test keeps them equal)
LAYER_BACKWARD = 0.6  # one layer's backward working set / that layer's saved tensors (measured 0.42-0.6)
LOSS_ROW_BYTES = 16  # bytes per logit held in the loss backward: 4 fp32 [rows, V] tensors (measured)

# Saved-for-backward bytes per token per layer, without the WKV kernel's own, as coefficients of
# (C, F, D_decay, D_aaa, D_mv, D_gate, H, 1). Exact fits of the model's saved tensors (torch
# saved-tensor hooks, 10-12 random shapes each, residual 0). "fp32": no autocast; "autocast":
# bf16 autocast over fp32 weights; "bf16": bf16 autocast over bf16 weights (a frozen bf16 base, or
# FSDP's bf16 mixed precision). LoRA adds to "state", per adapted Linear, its input and its rank-r
# product (4 B per element in fp32, 2 B under autocast), and under autocast the bf16 casts of the
# adapters' A and B (per layer, not per token: counted in the ``autocast`` term).
SAVED = {
    ("fp32", "full"): (108, 8, 4, 4, 4, 4, 20, 16),
    ("fp32", "state"): (60, 4, 4, 0, 0, 4, 20, 16),
    ("autocast", "full"): (84, 4, 2, 2, 2, 2, 20, 16),
    ("bf16", "full"): (58, 4, 2, 2, 2, 2, 10, 8),
    ("bf16", "state"): (34, 2, 2, 0, 0, 2, 10, 8),
}
STRATEGIES = ("ddp", "fsdp")
# A quantized frozen base (rwkvtune.models.rwkv7.quant; a test keeps the names equal): the matrices
# it quantizes, and their bytes per element (int8: the codes and an fp32 scale per output row, taken
# as 4 B over the 768-wide inputs of the smallest size; nf4: 4-bit codes, an int8 scaler per 64 and an
# fp32 factor per 64 x 256 values).
QUANT_MATRICES = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value", "head")
QUANT_BYTES = {"int8": 1 + 4 / 768, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
# Dequantizing one layer: on CPU one fp32 copy (4 B per element: the codes-as-floats and the scaled
# copy exist together only briefly; with 8 B the tiny quickstart-shape LoRA runs measured 1.16-1.17x
# over, with 4 B 1.13-1.14x, the unquantized run 1.09x); on GPU bitsandbytes' bf16 output (2 B,
# assumed). Quantizing one at load: its fp32 copy, the scaled copy and the codes (int32 before
# packing): 12 B per element.
DEQUANT_BYTES = {"cpu": 4, "gpu": 2}
QUANT_LOAD_BYTES = 12


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the estimate depends on (the TrainConfig fields, the launch and the device kind)."""

    mode: str = "full"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    batch_size: int = 1  # micro-batch per process (dataset items)
    rows: int = 1  # sequences per item run together: 2 for DPO's pairs, num_generations for GRPO
    reference_copy: bool = False  # a frozen fp32 copy of the model as the reference (DPO/GRPO, full mode)
    ctx_len: int = 1024  # tokens per sample that run through the model at once (activations)
    grad_checkpoint: bool = False
    strategy: str = "ddp"
    world_size: int = 1
    cpu_offload: bool = False
    device: str = "cpu"  # "cpu" or "gpu"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    train_parts: tuple[str, ...] = ()
    save_dtype: str = "bf16"
    wkv: str = "auto"  # whose saved tensors: "chunked", "fla"; auto: fla on GPU, chunked on CPU
    init: str = "pretrained"
    file_bytes: int | None = None  # size of the model file (CPU load); None: 2 B per parameter
    packing: bool = False  # documents packed into windows: the WKV kernel also keeps per-chunk segment masks
    base_quant: str = "none"  # "int8" or "nf4": the frozen base's big matrices quantized (lora, state)

    @classmethod
    def from_config(cls, cfg, world_size: int = 1, tokens: int | None = None, **kw) -> "Settings":
        """From a resolved TrainConfig; ``tokens``: tokens per sample actually run (<= ctx_len)."""
        device = "gpu" if str(cfg.device).startswith("cuda") else "cpu"
        return cls(mode=cfg.mode, precision=cfg.precision or ("bf16" if device == "gpu" else "fp32"),
                   batch_size=cfg.batch_size, ctx_len=tokens or cfg.ctx_len, grad_checkpoint=cfg.grad_checkpoint,
                   strategy=cfg.strategy, world_size=world_size, cpu_offload=cfg.cpu_offload, device=device,
                   lora_r=cfg.lora_r, lora_targets=tuple(cfg.lora_targets), train_parts=tuple(cfg.train_parts),
                   save_dtype=cfg.save_dtype, init=cfg.init, base_quant=getattr(cfg, "base_quant", "none"),
                   packing=bool(cfg.packing) and cfg.method == "sft", **kw)

    def replace(self, **kw) -> "Settings":
        return dataclasses.replace(self, **kw)

    @property
    def sequences(self) -> int:
        """Sequences in one forward: the micro-batch times the rows per item."""
        return self.batch_size * self.rows

    @property
    def shard(self) -> float:
        """Fraction of the sharded state this process holds."""
        return 1.0 / self.world_size if self.strategy == "fsdp" else 1.0

    @property
    def quant(self) -> str | None:
        """The base's quantization where it applies (a frozen base: lora and state), else None."""
        return self.base_quant if self.base_quant in QUANT_BYTES and self.mode != "full" else None

    @property
    def wkv_backend(self) -> str:
        return self.wkv if self.wkv != "auto" else ("fla" if self.device == "gpu" else "chunked")


@dataclasses.dataclass(frozen=True)
class Inventory:
    """Parameter counts and bytes of the model prepared for a mode (no sharding applied)."""

    n_params: int  # every stored parameter (base, adapters, state)
    stored: int  # bytes as stored
    trainable: int  # trainable parameters
    largest_trainable: int  # elements of the largest trainable tensor
    largest_quantized: int  # elements of the largest quantized matrix (0: none)
    root: int  # parameters outside the blocks (emb, head, ln_out, a tuned state), quantized ones excluded
    block: int  # parameters of the largest block, quantized ones excluded (FSDP gathers the rest)
    block_trainable: int
    block_matrices: int  # parameters of block matrices stored fp32 (autocast casts them)
    adapters: int  # LoRA adapter parameters (autocast casts them too)
    block_heap: int  # parameters of the largest block in tensors below MMAP_MAX as fp32 (glibc heap)
    head_trainable: int  # trainable elements of the head (its gradient exists through backward)
    originals: int  # bytes of LoRA train_parts kept for the reference model
    lora_inputs: int  # per layer: sum of adapted Linears' input features
    lora_ranks: int  # per layer: sum of adapters' ranks
    quantized: int = 0  # bytes of the quantized matrices (part of stored; never sharded by FSDP)


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_part(key: str, parts) -> bool:
    """rwkvtune.peft.lora.PART_PATTERNS, on official key names."""
    return (("ln" in parts and (".ln" in key or key.startswith("ln_out"))) or ("emb" in parts and key.startswith("emb."))
            or ("head" in parts and key.startswith("head.")))


def _adapter(key: str, shape, s: Settings) -> int:
    """LoRA parameters added next to this tensor: lora_A [r, in] + lora_B [out, r] of a targeted Linear."""
    if s.mode != "lora" or len(shape) != 2 or not key.endswith(".weight") or key.startswith("emb."):
        return 0
    return s.lora_r * (shape[0] + shape[1]) if _matches(key[: -len(".weight")], s.lora_targets) else 0


def inventory(c, s: Settings) -> Inventory:
    """What each parameter costs in this mode: dtype, trainable or not, where it lives."""
    base_bytes = 2 if s.mode != "full" and s.precision == "bf16" else 4  # a frozen base in bf16
    n = stored = trainable = largest = root = head_tr = originals = adapters = lora_in = lora_r = big_q = quant = 0
    blocks: dict[str, list[int]] = {}  # block prefix -> [params, trainable, fp32 matrices, heap-sized]
    for key, shape in c.param_shapes().items():
        numel, adapter = math.prod(shape), _adapter(key, shape, s)
        train = (s.mode == "full" and key not in LAYER0_V_KEYS) or (s.mode == "lora" and _is_part(key, s.train_parts))
        size = 4 if s.mode == "full" or train else base_bytes
        quantized = bool(s.quant) and not train and len(shape) == 2 and _matches(key.removesuffix(".weight"),
                                                                                  QUANT_MATRICES)
        if quantized:
            size, big_q, quant = QUANT_BYTES[s.quant], max(big_q, numel), quant + int(numel * QUANT_BYTES[s.quant])
        # what FSDP gathers: a quantized matrix is buffers (whole on every process), never gathered
        gathered = 0 if quantized else numel
        n, stored, adapters = n + numel + adapter, stored + int(numel * size) + 4 * adapter, adapters + adapter
        trainable += (numel if train else 0) + adapter
        largest = max(largest, numel if train else 0, s.lora_r * max(shape) if adapter else 0)
        originals += numel * base_bytes if train and s.mode == "lora" else 0  # kept for the reference model
        head_tr += numel if train and key.startswith("head.") else 0
        if not key.startswith("blocks."):
            root += gathered + adapter
            continue
        if adapter and key.startswith("blocks.0."):  # per layer: what the adapters keep for backward
            lora_in, lora_r = lora_in + shape[1], lora_r + s.lora_r
        b = blocks.setdefault(".".join(key.split(".")[:2]), [0, 0, 0, 0])
        # matrices a matmul uses (r_k is elementwise; layer 0's v1/v2 are never used)
        matmul = len(shape) == 2 and not key.endswith("r_k") and key not in LAYER0_V_KEYS
        b[0], b[1] = b[0] + gathered + adapter, b[1] + (numel if train else 0) + adapter
        b[2] += numel if matmul and size == 4 else 0
        b[3] += gathered if 4 * numel < MMAP_MAX else 0
    if s.mode == "state":  # the tuned initial WKV state, fp32, trainable
        wkv = c.n_layer * c.n_head * c.head_size_a ** 2
        n, stored, trainable, root, largest = n + wkv, stored + 4 * wkv, trainable + wkv, root + wkv, wkv
    big = max(blocks.values(), key=lambda b: b[0])
    return Inventory(n, stored, trainable, largest, big_q, root, big[0], big[1], sum(b[2] for b in blocks.values()),
                     adapters, big[3], head_tr, originals, lora_in, lora_r, quant)


def _regime(s: Settings) -> str:
    """How activations are stored: fp32, bf16 autocast over fp32 weights, or over bf16 weights."""
    if s.precision != "bf16":
        return "fp32"
    bf16_weights = s.mode != "full" or (s.strategy == "fsdp" and s.device == "gpu")  # frozen base / FSDP mixed prec.
    return "bf16" if bf16_weights else "autocast"


def saved_per_token_layer(c, s: Settings, inv: Inventory) -> float:
    """Bytes autograd keeps per token per layer (the WKV kernel's included)."""
    regime = _regime(s)
    coef = SAVED[(regime, "state" if s.mode == "lora" else s.mode)]
    terms = (c.n_embd, c.dim_ffn, c.dim_att_lora, c.dim_aaa_lora, c.dim_mv_lora, c.dim_gate_lora, c.n_head, 1)
    saved = sum(a * b for a, b in zip(coef, terms))
    if s.mode == "lora":  # each adapter keeps its input and its rank-r product
        saved += (4 if regime == "fp32" else 2) * (inv.lora_inputs + inv.lora_ranks)
    return saved + _wkv_saved(c, s)


def _wkv_saved(c, s: Settings) -> float:
    """The WKV kernel's saved tensors per token per layer.

    chunked (rwkvtune.models.rwkv7.wkv._ChunkSaved, fp32 whatever the input dtype): per head and
    token 12N (Q, KB, EQ, E3, Wm, U1, [U; v], v) + 5 Lc (the 2Lc x 2Lc score blocks and the Lc x Lc
    inverse) + (N^2 + 3N) / Lc (the chunk's entering state and decay factors), on T padded to a
    multiple of the chunk Lc = 32 (1,062 floats at N = 64). fla (chunk_rwkv7, fla-core 0.6.0) saves
    only its six inputs r, w, k, v, a, b in the compute dtype and recomputes the rest in backward
    (read from its source; not measured: no GPU).
    Packed documents add the chunk's segment tables (``wkv._Seg``): the [2Lc, 2Lc] same-segment
    mask (bool: Lc floats' worth per token) and one per-token float column (the others are shared or
    recomputed), measured with saved-tensor hooks.
    """
    N, H = c.head_size_a, c.n_head
    if s.wkv_backend == "fla":
        return 6 * c.n_embd * (2 if s.precision == "bf16" else 4)
    pad = math.ceil(s.ctx_len / WKV_CHUNK) * WKV_CHUNK / s.ctx_len
    packed = (WKV_CHUNK + 1) if s.packing else 0
    return 4 * H * (12 * N + 5 * WKV_CHUNK + (N * N + 3 * N) / WKV_CHUNK + packed) * pad


def activations(c, s: Settings, inv: Inventory) -> tuple[int, int]:
    """(kept for backward at its start, one layer's backward working set), bytes."""
    tokens = s.sequences * s.ctx_len
    layer = saved_per_token_layer(c, s, inv) * tokens
    act = 4 if _regime(s) != "bf16" else 2  # the residual stream's dtype
    # Outside the blocks: ln_out's input, the hidden states the loss keeps, the scored rows (fp32).
    root = 3 * c.n_embd * 4 * tokens
    # The states the forward returns (per layer: WKV [B, H, N, N] fp32 and two [B, C]), stacked: twice.
    states = 2 * c.n_layer * s.sequences * (c.n_head * c.head_size_a ** 2 + 2 * c.n_embd) * 4
    if s.grad_checkpoint:  # each block's input, v_first, and one block recomputed in backward
        kept = (c.n_layer + 1) * tokens * c.n_embd * act + layer
    else:
        kept = c.n_layer * layer
    return int(kept + root + states), int(LAYER_BACKWARD * layer)


@dataclasses.dataclass
class MemoryEstimate:
    """Per-process memory of a run: named terms, the phases built from them, and the peak."""

    settings: Settings
    terms: dict[str, int]
    phases: dict[str, int]
    host: int  # host (CPU) memory of one process; on a CPU run the same as the peak

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def as_dict(self) -> dict:
        return {"bytes": self.peak, "gib": round(self.peak_gib, 2), "phase": self.peak_phase,
                "host_gib": round(self.host / GIB, 2), "terms": dict(self.terms), "phases": dict(self.phases),
                "settings": dataclasses.asdict(self.settings)}

    def describe(self) -> str:
        """'12.3 GiB at step (weights 1.2, optimizer 2.3, ...)': the peak phase's nonzero terms."""
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.terms.items() if v >= GIB / 200)
        return f"{self.peak_gib:.1f} GiB per process, peak at {self.peak_phase} ({parts} GiB)"


def estimate_memory(c, s: Settings) -> MemoryEstimate:
    """Peak memory of one process of a training run of model ``c`` (a ModelConfig) with ``s``."""
    inv = inventory(c, s)
    sh, gpu = s.shard, s.device == "gpu"
    ddp_multi = s.strategy == "ddp" and s.world_size > 1
    fsdp = s.strategy == "fsdp"
    offload = fsdp and s.cpu_offload and gpu  # sharded state lives in host memory
    resident = 0.0 if offload else sh  # fraction of weights/grads/optimizer on the device
    kept, layer_ws = activations(c, s, inv)
    layer_saved = saved_per_token_layer(c, s, inv) * s.sequences * s.ctx_len  # one layer, not checkpointed
    rows = min(LOSS_ROWS, s.sequences * s.ctx_len)
    compute = 2 if gpu and s.precision == "bf16" else 4  # bytes of an all-gathered parameter
    t = {
        # a quantized base is not sharded: FSDP2 shards parameters, its codes are buffers (every process)
        "weights": int((inv.stored - inv.quantized) * resident) + inv.quantized,
        "optimizer": int(8 * inv.trainable * resident),
        "gradients": 0,
        "ddp_buckets": 4 * inv.trainable if ddp_multi else 0,
        "activations": kept,
        "loss": LOSS_ROW_BYTES * rows * c.vocab_size + (2 * c.vocab_size * c.n_embd if _regime(s) == "autocast" else 0),
        "fsdp_buffers": int((inv.root + 2 * inv.block) * compute + 4 * inv.block_trainable) if fsdp else 0,
        "autocast": 2 * (inv.block_matrices if _regime(s) == "autocast" else inv.adapters if _regime(s) == "bf16"
                         else 0),
        "originals": inv.originals,
        "dequant": DEQUANT_BYTES["gpu" if gpu else "cpu"] * inv.largest_quantized,
        "reference": int(4 * inv.n_params * resident) if s.reference_copy else 0,  # sharded like the policy
        "runtime": GPU_RUNTIME if gpu else CPU_RUNTIME,
    }
    # Backward: the head's gradient (unsharded until the root's reduce-scatter under FSDP) exists
    # from the loss onwards; then each block's gradient, alongside that block's working set.
    head_grad = 4 * inv.head_trainable * (1 if fsdp else resident)
    block_grad = 4 * inv.block_trainable * (0 if fsdp else resident)  # FSDP: counted in fsdp_buffers
    base = t["weights"] + t["optimizer"] + t["originals"] + t["reference"] + t["ddp_buckets"] + t["runtime"]
    step = (base + t["fsdp_buffers"] + t["autocast"] + t["dequant"] + kept + head_grad
            + max(t["loss"], layer_ws + block_grad))
    grads = int(4 * inv.trainable * resident)
    step_tmp = 0 if offload else (4 * inv.trainable * sh if gpu else 8 * inv.largest_trainable * sh)
    # CPU (glibc): the heap grows during backward (HEAP_GROWTH), and what backward freed stays in
    # it through the optimizer step and saving (loss slices only when small enough to be in it).
    # Under FSDP so do the per-parameter unsharded copies and gradients of every block (measured
    # 3.6-5.3 block-sized sets per layer on three shapes, 5 used), from the first backward on.
    growth = 0 if gpu else HEAP_GROWTH["checkpointed" if s.grad_checkpoint else s.mode] * c.n_layer * layer_saved
    small_loss = t["loss"] if rows * c.vocab_size * 4 < MMAP_MAX else 0
    retained = 0 if gpu else int(kept + growth + layer_ws + small_loss)
    fsdp_heap = FSDP_HEAP_SETS * c.n_layer * 4 * inv.block_heap if fsdp and not gpu else 0
    save = _save_copies(c, s, inv)
    phases = {
        "load": _load(c, s, inv),
        "step": int(step + growth + fsdp_heap),
        "update": int(base + grads + step_tmp + retained + fsdp_heap),
        "save": int(base + retained + fsdp_heap + (0 if gpu else save)),
    }
    t.update(gradients=int(max(grads, head_grad + block_grad)), optimizer_step=int(step_tmp),
             retained=retained + fsdp_heap, save=save)
    host = max(phases.values()) if not gpu else _host(c, s, inv, save, offload)
    return MemoryEstimate(s, t, phases, int(host))


def estimate_gib(c, cfg, world_size: int = 1, tokens: int | None = None) -> float:
    """The per-process estimate of a resolved TrainConfig, GiB (what bench scripts print beside a
    measured peak). On GPU it includes GPU_RUNTIME, which torch.cuda.max_memory_allocated does not see."""
    return estimate_memory(c, Settings.from_config(cfg, world_size=world_size, tokens=tokens)).peak_gib


def _save_copies(c, s: Settings, inv: Inventory) -> int:
    """Copies held while writing final.pth and the resumable checkpoint (main process)."""
    out_bytes = 2 if s.save_dtype == "bf16" else 4
    if s.strategy == "fsdp":  # the whole model gathered onto the main process, one tensor in flight
        return inv.n_params * out_bytes + 4 * c.vocab_size * c.n_embd
    final = 0
    if s.mode == "full":  # official_state_dict: a copy when the dtype changes
        final = inv.n_params * out_bytes if out_bytes != 4 or s.device == "gpu" else 0
    elif s.mode == "lora":  # merged_state_dict: every tensor in save_dtype
        final = inv.n_params * out_bytes
    checkpoint = 4 * inv.trainable  # checkpointing.save clones the trainable tensors to the CPU
    return max(final, checkpoint)


def _load(c, s: Settings, inv: Inventory) -> int:
    """Building the model: under ddp the whole model on the device, plus on CPU the checkpoint's
    memory-mapped pages (pretrained) or the init's temporaries (scratch: orthogonal init of the
    head, 2.5 x it). Under fsdp (rwkvtune.train.sharded_load) only this process's shards, plus one
    whole tensor at a time (at most the head, V x C, fp32) and on CPU its source: the file's pages,
    or the head's init temporaries."""
    one = 4 * c.vocab_size * c.n_embd
    if s.strategy == "fsdp":
        gpu = s.device == "gpu"
        shards = int((inv.stored - inv.quantized + inv.originals) * (0 if gpu and s.cpu_offload else s.shard)) + one
        # every process quantizes the whole base (on the compute device), one matrix at a time
        shards += inv.quantized + QUANT_LOAD_BYTES * inv.largest_quantized
        if gpu:
            return shards + GPU_RUNTIME
        if s.init == "scratch":
            return shards + int(2.5 * one)
        return shards + one + (s.file_bytes if s.file_bytes is not None else 2 * c.n_params)
    full = inv.stored + inv.originals + QUANT_LOAD_BYTES * inv.largest_quantized
    if s.device == "gpu":
        return full + GPU_RUNTIME
    if s.init == "scratch":
        return full + int(2.5 * one)
    return full + (s.file_bytes if s.file_bytes is not None else 2 * c.n_params)


def _host(c, s: Settings, inv: Inventory, save: int, offload: bool) -> int:
    """Host memory of one process of a GPU run: the model is loaded on the CPU first (whole, as
    stored; under fsdp one tensor at a time, a model file's pages being the shared, evictable
    page cache), outputs are written from host copies, and cpu_offload keeps the sharded
    state there."""
    load = inv.stored + inv.originals
    if s.strategy == "fsdp":  # one tensor at a time (a scratch head's orthogonal init: 2.5 x it)
        load = int(4 * c.vocab_size * c.n_embd * (2.5 if s.init == "scratch" else 1))
    state = (inv.stored - inv.quantized + 12 * inv.trainable) / s.world_size if offload else 0
    step_tmp = 8 * inv.largest_trainable / s.world_size if offload else 0
    return int(max(load, state + step_tmp + save))


# --------------------------------------------------------------------------------------- dry run
def dry_run_problems(report: dict) -> list[str]:
    """What would stop the run or leave it unable to start: memory beyond the device, an --out it
    may not write, a model file not there yet."""
    out = []
    if report.get("memory_fix"):
        out.append(f"too much for this device: {report['memory_fix']}")
    if report.get("out_problem"):
        out.append(f"the run itself would be refused: {report['out_problem']}")
    if report.get("model_file_missing"):
        out.append("model file not found (parameters are counted from the config): "
                   f"{report.get('model_file_hint') or report['model_file_missing']}")
    return out


def dry_run_summary(report: dict) -> str:
    """The verdict in one line: ready or NOT READY and why, with the model, trainable parameters,
    steps and the memory estimate against the device."""
    return "; ".join([_verdict(report), *dry_run_problems(report)])


def _verdict(report: dict) -> str:
    mem, avail = report["memory_estimate_gib"], report["memory_available_gib"]
    problems, warnings = dry_run_problems(report), report.get("warnings") or []
    verdict = "NOT READY" if problems else "ready" + (f" with {len(warnings)} warning(s)" if warnings else "")
    line = (f"dry run: {verdict}: {report['model']['name']}, mode {report['config']['mode']}: "
            f"{report['trainable_params']:,} trainable / {report['frozen_params']:,} frozen params, "
            f"{report['total_steps']} step{'s' if report['total_steps'] != 1 else ''} of up to "
            f"{report['tokens_per_step']:,} tokens; memory estimate "
            f"{mem:.1f} GiB" + (f" of {avail:.1f} GiB available on {report['device']}" if avail else ""))
    return line


def _origin(report: dict, field: str) -> str:
    """Where a value of the dry run came from, as " (LoRA default)", or "" when the report does not say."""
    origin = (report.get("origins") or {}).get(field)
    return f" ({origin})" if origin else ""


def dry_run_text(report: dict) -> str:
    """What ``rwkvtune train --dry-run`` prints for people: the verdict first, then the setup in a
    few lines and the warnings the run would start with; the full report is ``--json``."""
    cfg, m, est = report["config"], report["model"], report.get("memory_estimate") or {}
    avail = report["memory_available_gib"]
    lines = [_verdict(report), *(f"  problem: {p}" for p in dry_run_problems(report)),
        f"  model     {m['name']} (n_layer {m['n_layer']}, n_embd {m['n_embd']}, vocab_size {m['vocab_size']}), "
        f"mode {cfg['mode']}, init {cfg['init']}",
        f"  data      {cfg['data']}: {report['train_windows']:,} {report.get('item_name', 'windows')} (ctx_len "
        f"{cfg['ctx_len']}), batch_size {cfg['batch_size']} x grad_accum {cfg['grad_accum']} per step",
        f"  schedule  {report['total_steps']} steps ({'--max-steps' if cfg.get('max_steps') else str(cfg['epochs']) + ' epoch(s)'}), "
        f"lr {cfg['lr']:g}{_origin(report, 'lr')} -> {cfg['lr_final']:g} (cosine), warmup {cfg['warmup_steps']} steps",
        f"  memory    {report['memory_estimate_gib']:.1f} GiB per process"
        + (f", peak at {est['phase']}" if est.get("phase") else "")
        + (f", host RAM {est['host_gib']:.1f} GiB" if est.get("host_gib") and report["device"] != "cpu" else "")
        + (f"; {avail:.1f} GiB available on {report['device']}" if avail else f"; on {report['device']}"),
        f"  run       --out {cfg['out']}{_origin(report, 'out')}, precision {cfg['precision']}, save_every {cfg['save_every']}",
    ]
    lines += report.get("warnings") or []
    lines.append("full report (every setting, the model's dims, the memory terms): add --json")
    return "\n".join(lines)


def dry_run_report(cfg, model_config, module, tokens_per_step, total_steps, n_windows) -> dict:
    """Resolved config, dims, parameter counts (of the meta-device module) and tokens per step."""
    from rwkvtune.train.objective import count_params

    trainable, frozen, unused = count_params(module)
    c = model_config
    return {
        "config": cfg.to_dict(),
        "model": {"name": c.model_name, "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                  "head_size_a": c.head_size_a, "dim_att_lora": c.dim_att_lora, "dim_aaa_lora": c.dim_aaa_lora,
                  "dim_mv_lora": c.dim_mv_lora, "dim_gate_lora": c.dim_gate_lora, "dim_ffn": c.dim_ffn},
        "trainable_params": trainable,
        "frozen_params": frozen,
        "unused_params": unused,  # layer 0's v0/v1/v2: stored, never used by the forward
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
        "train_windows": n_windows,
    }
