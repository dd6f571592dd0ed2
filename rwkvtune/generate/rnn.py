"""One-token decode steps for a batch of rows, with the RNN state updated in place.

``RWKV7.forward(idx, state=..., return_state=True)`` returns a fresh state each call: at batch
32 on the 0.1B shape that is 75 MB of new WKV matrices per token (stacked over layers, after
three out-of-place updates per layer). On CPU glibc hands allocations that large back to the OS
and maps them anew, and the page faults cost about a fifth of the step (measured at batch 32 on
one core: 220 ms, 171 ms with glibc told to keep freed memory). :class:`BatchDecoder`
runs the same maths for T = 1 (reference section 1, "RNN mode") through the model's own modules
(so LoRA-wrapped or decode-prepared linears work unchanged) but keeps one state buffer and updates
it in place: the WKV update is ``S *= decay; S += [S a, v] @ [b; k]`` (one batched rank-2 GEMM),
and the output is read from the old S with the same pass that computes ``S a``.
Tests check it against ``RWKV7.forward`` (logits and state).

Models that are not :class:`RWKV7` (wrappers, test doubles) are stepped with their own forward.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.generate.decoding import SplitChoice, model_device, rows_linear
from rwkvtune.models.rwkv7.model import DECAY_SCALE, RWKV7


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``; a plain bias-free nn.Linear takes the few-rows product (the decode-prepared
    subclass does so itself; LoRA-wrapped layers run as they are)."""
    if type(mod) is nn.Linear and mod.bias is None:
        return rows_linear(x, mod.weight)
    return mod(x)


class _Consts(NamedTuple):
    """One layer's per-channel parameters, rearranged once per decoder so a step needs fewer ops:
    the six TimeMix token-shift mixes stacked (one addcmul instead of six), and 1 - k_a."""

    mix: torch.Tensor       # [6, C]: x_r, x_w, x_k, x_v, x_a, x_g
    one_m_ka: torch.Tensor  # [C]: 1 - k_a, so k * (1 + (a - 1) k_a) = k * addcmul(1 - k_a, a, k_a)


def _consts(att) -> _Consts:
    C = att.x_r.shape[-1]
    mix = torch.cat([p.detach().view(1, C) for p in (att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g)])
    return _Consts(mix, 1 - att.k_a.detach().view(C))


def _time_mix(att, cst: _Consts, x: torch.Tensor, v_first, x_prev: torch.Tensor, S: torch.Tensor):
    """TimeMix of one token per row: x [B, C]; x_prev [B, C] and S [B, H, N, N] (fp32) are
    updated in place. Returns (output [B, C], v_first)."""
    B, C = x.shape
    H, N = att.n_head, att.head_size
    G = B * H
    xx = x_prev - x
    x_prev.copy_(x)
    xr, xw, xk, xv, xa, xg = torch.addcmul(x[:, None], xx[:, None], cst.mix).unbind(1)  # 6 x [B, C]
    r = _linear(att.receptance, xr)
    d = att.w0.view(C) + torch.tanh(xw @ att.w1) @ att.w2
    k = _linear(att.key, xk)
    v = _linear(att.value, xv)
    a = torch.sigmoid(att.a0.view(C) + (xa @ att.a1) @ att.a2)
    g = torch.sigmoid(xg @ att.g1) @ att.g2
    kk = F.normalize((k * att.k_k.view(C)).view(G, N), dim=-1, p=2.0, eps=1e-12)
    k = k * torch.addcmul(cst.one_m_ka, a, att.k_a.view(C))
    if att.layer_id == 0:
        v_first = v
    else:
        v = torch.lerp(v, v_first, torch.sigmoid(att.v0.view(C) + (xv @ att.v1) @ att.v2))
    decay = torch.exp(torch.sigmoid(d.float()).mul_(-DECAY_SCALE)).view(G, N)
    # WKV (fp32): S' = S diag(decay) + (S alpha) beta^T + v k^T, alpha = -kk, beta = kk * a, y = S' r.
    # With RV = [S alpha, v] [G, N, 2] and BK = [beta; k] [G, 2, N]: S' = S diag(decay) + RV BK,
    # so y = S (decay * r) + RV (BK r). One bmm reads the old S for both S alpha and S (decay r);
    # then S is updated in place (scale, one rank-2 batched GEMM) and y needs two tiny bmms.
    S = S.view(G, N, N)
    rf, kf, vf = r.float().view(G, N), k.float().view(G, N), v.float().view(G, N)
    kkf = kk.float()
    BK = torch.stack([(kk * a.view(G, N)).float(), kf], 1)                                   # [G, 2, N]
    both = torch.bmm(S, torch.stack([kkf.neg(), decay * rf], 2))                              # [G, N, 2]
    RV = torch.cat([both[:, :, :1], vf.view(G, N, 1)], 2)                                     # [G, N, 2]
    y = torch.baddbmm(both[:, :, 1:], RV, torch.bmm(BK, rf.view(G, N, 1)))                   # [G, N, 1]
    S.mul_(decay.view(G, 1, N))
    S.baddbmm_(RV, BK)
    y = att.ln_x(y.view(B, C).to(x.dtype))
    # bonus: per head (r . (k * r_k)) v
    bonus = (r * k).view(B, H, N).mul_(att.r_k).sum(-1, keepdim=True)
    y = torch.addcmul(y.view(B, H, N), bonus, v.view(B, H, N)).view(B, C)
    return _linear(att.output, y * g), v_first


def _channel_mix(ffn, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """ChannelMix of one token per row; x_prev [B, C] is updated in place."""
    h = torch.addcmul(x, x_prev - x, ffn.x_k.view(-1))
    x_prev.copy_(x)
    k = torch.relu_(_linear(ffn.key, h))
    return _linear(ffn.value, k.mul_(k))


class BatchDecoder:
    """Holds a batch's state and advances every row by one token per :meth:`step`.

    ``state`` (RWKV7State, batch B) is taken over and updated in place; :meth:`keep` drops rows.
    """

    def __init__(self, model, state):
        self.model = model
        self.state = state
        self.fast = isinstance(model, RWKV7)
        # Built once: the weights do not change while one generation runs.
        self.consts = [_consts(b.att) for b in model.blocks] if self.fast else None
        self._on_cpu = model_device(model).type == "cpu"
        self._compiled = None  # see compile()

    def compile(self, backend: str = "inductor") -> "BatchDecoder":
        """Run :meth:`step` through ``torch.compile`` from now on (one graph per batch size:
        dynamic=False; the first call compiles). The compiled step runs under ``no_grad`` instead
        of ``inference_mode``, and the state is copied into ordinary tensors once, here: compiled
        code cannot update inference tensors in place ("Cannot set version_counter"). Measured on
        CPU it does not pay (docs/cpu-profile.md: the compiled 0.1B step was 1.1-2.6x slower than
        eager after 64-106 s of compilation), so `rwkvtune generate` never does it;
        bench/bench_gpu.py measures it on a GPU."""
        if self._compiled is None:
            with torch.no_grad():  # a clone made outside inference_mode is an ordinary tensor
                self.state = self.state.clone()
            self._compiled = torch.compile(self._step_impl, backend=backend, dynamic=False)
        return self

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows are dropped and cost nothing afterwards)."""
        self.state = self.state.select(rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (LongTensor [B]); returns the next-token logits [B, V] in fp32."""
        if self._compiled is not None:
            with torch.no_grad():
                return self._compiled(tokens)
        if SplitChoice.decided or tokens.shape[0] != 1 or torch.get_num_threads() < 2 or not self._on_cpu:
            return self._step(tokens)
        timed = SplitChoice.before_step()  # the process's first one-row steps on CPU: see SplitChoice
        t = time.perf_counter()
        out = self._step(tokens)
        SplitChoice.after_step(time.perf_counter() - t if timed else None)
        return out

    @torch.inference_mode()
    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._step_impl(tokens)

    def _step_impl(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            out, self.state = self.model(tokens[:, None], state=self.state, return_state=True)
            return out[:, -1].float()
        m, s = self.model, self.state
        x = m.emb(tokens)
        v_first = None
        for i, block in enumerate(m.blocks):
            if i == 0:
                x = block.ln0(x)
            dx, v_first = _time_mix(block.att, self.consts[i], block.ln1(x), v_first, s.att_x_prev[i], s.wkv[i])
            x = x + dx
            x = x + _channel_mix(block.ffn, block.ln2(x), s.ffn_x_prev[i])
        return _linear(m.head, m.ln_out(x)).float()

