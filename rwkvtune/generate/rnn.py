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

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.generate.decoding import rows_linear
from rwkvtune.models.rwkv7.model import DECAY_SCALE, RWKV7


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``; a plain bias-free nn.Linear takes the few-rows product (the decode-prepared
    subclass does so itself; LoRA-wrapped layers run as they are)."""
    if type(mod) is nn.Linear and mod.bias is None:
        return rows_linear(x, mod.weight)
    return mod(x)


def _time_mix(att, x: torch.Tensor, v_first, x_prev: torch.Tensor, S: torch.Tensor):
    """TimeMix of one token per row: x [B, C]; x_prev [B, C] and S [B, H, N, N] (fp32) are
    updated in place. Returns (output [B, C], v_first)."""
    B, C = x.shape
    H, N = att.n_head, att.head_size
    xx = x_prev - x
    x_prev.copy_(x)
    xr, xw, xk = (torch.addcmul(x, xx, p.view(C)) for p in (att.x_r, att.x_w, att.x_k))
    xv, xa, xg = (torch.addcmul(x, xx, p.view(C)) for p in (att.x_v, att.x_a, att.x_g))
    r = _linear(att.receptance, xr)
    d = att.w0.view(C) + torch.tanh(xw @ att.w1) @ att.w2
    k = _linear(att.key, xk)
    v = _linear(att.value, xv)
    a = torch.sigmoid(att.a0.view(C) + (xa @ att.a1) @ att.a2)
    g = torch.sigmoid(xg @ att.g1) @ att.g2
    kk = F.normalize((k * att.k_k.view(C)).view(B, H, N), dim=-1, p=2.0, eps=1e-12)
    k = k * (1 + (a - 1) * att.k_a.view(C))
    if att.layer_id == 0:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(att.v0.view(C) + (xv @ att.v1) @ att.v2)
    decay = torch.exp(-DECAY_SCALE * torch.sigmoid(d.float()))
    # WKV (fp32): S' = S diag(decay) + (S alpha) beta^T + v k^T, alpha = -kk, beta = kk * a, y = S' r.
    # y is taken from the old S: S' r = S (decay * r) + (S alpha)(beta . r) + v (k . r), so one
    # bmm reads S for both vectors; then S is updated in place (scale, one rank-2 batched GEMM).
    G = B * H
    S = S.view(G, N, N)
    rf, kf, vf = r.float().view(G, N), k.float().view(G, N), v.float().view(G, N)
    beta = (kk * a.view(B, H, N)).float().view(G, N)
    both = torch.bmm(S, torch.stack([(-kk).float().view(G, N), decay.view(G, N) * rf], 2))  # [G, N, 2]
    removal = both[:, :, :1]  # S alpha
    y = both[:, :, 1] + removal[:, :, 0] * (beta * rf).sum(-1, keepdim=True) + vf * (kf * rf).sum(-1, keepdim=True)
    S.mul_(decay.view(G, 1, N))
    S.baddbmm_(torch.cat([removal, vf.view(G, N, 1)], 2), torch.stack([beta, kf], 1))  # [G, N, 2] @ [G, 2, N]
    y = y.view(B, C).to(x.dtype)
    y = att.ln_x(y)
    y = y + ((r * k).view(B, H, N) * att.r_k).sum(-1, keepdim=True).mul(v.view(B, H, N)).view(B, C)
    return _linear(att.output, y * g), v_first


def _channel_mix(ffn, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """ChannelMix of one token per row; x_prev [B, C] is updated in place."""
    h = torch.addcmul(x, x_prev - x, ffn.x_k.view(-1))
    x_prev.copy_(x)
    return _linear(ffn.value, torch.relu(_linear(ffn.key, h)) ** 2)


class BatchDecoder:
    """Holds a batch's state and advances every row by one token per :meth:`step`.

    ``state`` (RWKV7State, batch B) is taken over and updated in place; :meth:`keep` drops rows.
    """

    def __init__(self, model, state):
        self.model = model
        self.state = state
        self.fast = isinstance(model, RWKV7)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows are dropped and cost nothing afterwards)."""
        self.state = self.state.select(rows)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (LongTensor [B]); returns the next-token logits [B, V] in fp32."""
        if not self.fast:
            out, self.state = self.model(tokens[:, None], state=self.state, return_state=True)
            return out[:, -1].float()
        m, s = self.model, self.state
        x = m.emb(tokens)
        v_first = None
        for i, block in enumerate(m.blocks):
            if i == 0:
                x = block.ln0(x)
            dx, v_first = _time_mix(block.att, block.ln1(x), v_first, s.att_x_prev[i], s.wkv[i])
            x = x + dx
            x = x + _channel_mix(block.ffn, block.ln2(x), s.ffn_x_prev[i])
        return _linear(m.head, m.ln_out(x)).float()

