"""WKV-7: the RWKV-7 state recurrence (generalized delta rule), with interchangeable backends.

Math (per batch item and head; S is N x N, row i = value index, column j = key index)::

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T        y_t = S_t r_t

``w`` is the log-decay (w <= 0; the model's w = -0.606531*sigmoid(.), so w >= -0.61), ``a`` = -kk,
``b`` = kk*iclr.  Every backend computes in fp32 at least (fp64 for fp64 inputs), returns y in the
dtype of ``r`` and the final state in the math dtype, and back-propagates into r, w, k, v, a, b and
the initial state.

Backends
- ``reference``: one step per token.  The oracle, and the fastest choice for T == 1 (decoding).
- ``chunked``: pure PyTorch.  Within a chunk of L tokens every quantity that does not depend on the
  incoming state is computed for all chunks at once with matmuls; a Python loop over chunks (not
  tokens) carries the state.  With g = within-chunk inclusive cumsum of w and u_t = S_{t-1} a_t
  (the "removal" read-out), unrolling the recurrence inside a chunk gives::

      u_t = S_0 (a_t e^{g_{t-1}}) + sum_{s<t} [u_s b_s.(a_t e^{g_{t-1}-g_s}) + v_s k_s.(a_t e^{g_{t-1}-g_s})]
      y_t = S_0 (r_t e^{g_t})     + sum_{s<=t}[u_s b_s.(r_t e^{g_t-g_s})     + v_s k_s.(r_t e^{g_t-g_s})]
      S_L = S_0 diag(e^{g_L}) + sum_s [u_s (b_s e^{g_L-g_s})^T + v_s (k_s e^{g_L-g_s})^T]

  so U = (I - M_ab)^{-1} (A0 S_0^T + M_ak V) with L x L masked score matrices M (the WY form;
  the unit-lower-triangular inverse is built explicitly by block doubling: on CPU that is much
  faster than a batched triangular solve, and the backward reuses it).  e^{g_t - g_s} is factored
  as e^{g_t - c} e^{c - g_s} with c = g at the chunk middle, so each factor is at most
  e^{(L/2) max|w|} (e^10 for real models at L = 32).  It must stay finite: the chunk is halved for
  very negative w (limit e^60 in fp32, e^500 in fp64), and at L = 1 the log-decay is floored at
  -60 (fp32) / -500 (fp64), a per-step decay below 1e-26 that is already zero at fp32 precision.
  The backward is hand-derived (``_chunk_bwd``, checked against autograd of the reference in
  fp64): the same chunk loop run in reverse, everything else batched over chunks.  It saves
  about 1,060 floats per token and head at N = 64, L = 32 (26 MB per layer at T = 512, H = 12).
  Chunk size: 32 by default, measured at B=1, T=512, H=12, N=64 fp32 on 2 CPU cores (see
  bench/bench_wkv.py): about 10 ms forward and 30-40 ms forward+backward at L = 32; 16 is close,
  64 is slower.  Larger L means fewer loop steps and bigger matmuls but O(L) more intra-chunk
  work per token.
  Packed documents (``doc_start``): the chunks stay where they are (no padding per document); a
  start inside a chunk splits it into segments. Scores between tokens of different segments are
  masked out of M, decays of the state terms are measured from each token's segment start, only
  the chunk's first (carried) segment reads the carried state and only its last segment reaches
  the chunk's final state; later segments read the reset state through batched terms outside the
  loop. The loop and its reverse keep their shape; the backward adds the masks and the gradient of
  the segment-start decays (checked against the per-document reference in fp64).
- ``fla``: flash-linear-attention's Triton ``chunk_rwkv7`` (CUDA only, imported lazily); packed
  documents become fla's variable-length sequences (``cu_seqlens``, one flattened row).
- ``auto``: fla for CUDA tensors when importable, else reference for T == 1, else chunked.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["wkv7", "available_backends", "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 32
_EXP_LIMIT = {torch.float32: 60.0, torch.float64: 500.0}  # max |exponent| of one factored term
_NAMES = ("r", "w", "k", "v", "a", "b")


@functools.lru_cache(maxsize=None)
def _fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.lru_cache(maxsize=None)
def _fla_kernel():
    """fla's chunk_rwkv7 and its parameter names, or the import error as a string. Lazy: only
    called for CUDA inputs, so importing this module never imports fla or triton."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:  # ImportError, or triton failing to initialise
        return None, f"importing fla failed ({type(e).__name__}: {e})"
    return chunk_rwkv7, frozenset(inspect.signature(chunk_rwkv7).parameters)


def _no_autocast(device_type: str):
    """Autocast would run our matmuls in bf16; the recurrence must stay fp32, so switch it off."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        on = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def available_backends() -> list[str]:
    """Backends usable in this process ('fla' only with CUDA and fla-core installed)."""
    names = ["reference", "chunked"]
    if torch.cuda.is_available() and _fla_installed():
        names.append("fla")
    return names


# ----------------------------------------------------------------------------------- reference
def _wkv_reference(r, w, k, v, a, b, S, doc_start=None, S_reset=None):
    """Per-token loop; inputs [B, T, H, N] in math dtype, S [B, H, N, N]. Plain autograd.

    Heads are flattened into one batch of G = B*H and vectors kept as [G, 1, N] rows: bmm with a
    transposed row and addcmul are the cheapest CPU ops here (all reshapes are free when T == 1).
    doc_start [B, T] bool: before such a token the state is replaced by S_reset (zeros when None).
    """
    B, T, H, N = r.shape
    G = B * H
    r, w, k, v, a, b = (x.transpose(1, 2).reshape(G, T, N) for x in (r, w, k, v, a, b))
    d = torch.exp(w)
    S = S.reshape(G, N, N)
    if doc_start is not None:
        starts = doc_start.repeat_interleave(H, 0)                      # [G, T]
        Sr = torch.zeros_like(S) if S_reset is None else S_reset.reshape(G, N, N)
    ys = []
    for t in range(T):
        if doc_start is not None:
            S = torch.where(starts[:, t, None, None], Sr, S)
        rt, dt, kt, vt, at, bt = (x[:, t:t + 1] for x in (r, d, k, v, a, b)) if T > 1 else (r, d, k, v, a, b)
        sa = torch.bmm(S, at.mT)                                          # S a: [G, N, 1]
        S = torch.addcmul(torch.addcmul(S * dt, sa, bt), vt.mT, kt)       # decay, removal, kv
        ys.append(torch.bmm(S, rt.mT))                                    # S r: [G, N, 1]
    y = (ys[0] if T == 1 else torch.cat(ys, 2)) if T else r.new_zeros(G, N, 0)   # [G, N, T]
    return y.view(B, H, N, T).permute(0, 3, 1, 2), S.view(B, H, N, N)


# ------------------------------------------------------------------------------------- chunked
# Layout inside: [C, G, ...] (chunk-major, so one chunk's slice is contiguous), G = B*H.
# AR = stack(a, r) and BK = stack(b, k): [C, G, 2, L, N], viewed as [C, G, 2L, N] so that the
# four L x L score matrices come out of ONE matmul as blocks of a 2L x 2L matrix:
#   [[M_ab, M_ak], [M_rb, M_rk]] = [a~; r~] [b^; k^]^T   (masked: strict lower for the a rows).
class _Seg(NamedTuple):
    """Document boundaries inside each chunk ([C, G, ...]), for packed sequences.

    A document start at position p of a chunk replaces the state before p by the reset state
    S_r (zeros, or the trained initial state). Positions before the chunk's first start belong to
    the carried segment (its state comes from the previous chunk); every later segment starts
    from S_r. Within a chunk this means: intra-chunk scores only between tokens of the same
    segment (``mask``), each token's decay measured from its segment's start (``pidx``), only the
    carried segment reads the carried state (``f``), only the last segment reaches the chunk's
    final state (``lastm``), and the carried state survives the chunk only without a start in it
    (``carry``)."""

    mask: Tensor    # [C, G, 2L, 2L] bool: causal and same segment
    f: Tensor       # [C, G, L, 1]   1.0 on the carried segment
    lastm: Tensor   # [C, G, 1, L, 1] 1.0 on the chunk's last segment
    carry: Tensor   # [C, G, 1, 1]   1.0 when the chunk holds no start
    pidx: Tensor    # [C, G, L, 1]   position of each token's segment start (0 for the carried one)


def _segments(starts, L, dtype):
    """starts: [C, G, L] bool (True = a document begins at this token)."""
    sid = torch.cumsum(starts.to(torch.int32), -1)                        # segment number in the chunk
    mask = _mask(L, starts.device) & (sid[..., :, None] == sid[..., None, :]).repeat(1, 1, 2, 2)
    f = (sid == 0)[..., None].to(dtype)
    lastm = (sid == sid[..., -1:])[:, :, None, :, None].to(dtype)
    carry = (sid[..., -1] == 0)[..., None, None].to(dtype)
    pos = torch.arange(L, device=starts.device)
    pidx = torch.cummax(torch.where(starts, pos, 0), -1).values[..., None]
    return _Seg(mask, f, lastm, carry, pidx)


def _factors(AR, w, BK, L, pidx=None):
    """Decay-weighted inputs, every exponent bounded (see the module docstring).

    Q = [a e^{ge-c}; r e^{gi-c}], KB = [b; k] e^{c-gi}: the factored intra-chunk terms;
    Q0 = Q O = [a e^{ge}; r e^{gi}] (decay from the chunk start) and BKl = KB e^{gl-c} =
    [b; k] e^{gl-gi} (decay to the chunk end) are derived with per-chunk scalars, which is safe
    because |c| and |gl - c| obey the same bound.  gi/ge: inclusive/exclusive cumsum of w,
    c = gi[L/2 - 1] = ge[L/2] (the chunk middle), gl = gi[L - 1] (the chunk end).
    O = e^{c}, or with document starts (``pidx``) O_t = e^{c - ge[p(t)]}: decay measured from the
    start p(t) of t's segment (bounded like e^{c - gi}); ek = e^{gl - ge[p(L-1)]} likewise.
    """
    C, G, _, _, N = AR.shape
    gi = torch.cumsum(w, dim=-2)
    c = gi[:, :, L // 2 - 1: L // 2] if L > 1 else torch.zeros_like(gi[:, :, :1])
    gl = gi[:, :, -1:]
    EQ = AR.new_empty(C, G, 2, L, N)
    torch.sub(gi, c, out=EQ[:, :, 1])
    EQ[:, :, 1].exp_()                                   # e^{gi-c}: what r_t sees (S_t)
    EQ[:, :, 0, 1:] = EQ[:, :, 1, :-1]                    # e^{ge-c}, ge_t = gi_{t-1}: a_t sees S_{t-1}
    torch.exp(-c, out=EQ[:, :, 0, :1])
    E3 = torch.reciprocal(EQ[:, :, 1:2])                 # e^{c-gi}, bounded like e^{gi-c}
    sc = torch.exp(torch.stack([c, gl - c, gl], 2))     # [C, G, 3, 1, N]: e^c, e^{gl-c}, e^{gl}
    ec, egl, ek = sc[:, :, 0:1], sc[:, :, 1:2], sc[:, :, 2]
    if pidx is not None:
        ge = torch.nn.functional.pad(gi[:, :, :-1], (0, 0, 1, 0))      # exclusive cumsum
        gep = torch.gather(ge, 2, pidx.expand(C, G, L, N))
        ec = torch.exp(c - gep).unsqueeze(2)                           # O: [C, G, 1, L, N]
        ek = egl.squeeze(2) * ec[:, :, 0, -1:]                         # e^{gl - ge[p(L-1)]}
    Q, KB = AR * EQ, BK * E3
    return Q, Q * ec, KB, KB * egl, EQ, E3, ec, egl, ek


def _mask(L, device):
    i = torch.arange(2 * L, device=device)
    qi, kj = (i % L)[:, None], (i % L)[None, :]
    return torch.where(i[:, None] < L, kj < qi, kj <= qi)  # a rows: s < t; r rows: s <= t


def _unit_lower_inv(M):
    """(I - M)^{-1} for strictly lower-triangular M [..., L, L].

    Doubling the diagonal block size: inv([[A, 0], [-X, D]]) = [[A^-1, 0], [D^-1 X A^-1, D^-1]].
    log2(L) batched steps; much faster on CPU than a batched triangular solve of many small
    systems, and the explicit inverse is reused by the backward pass.
    """
    L0 = M.shape[-1]
    L = 1 << (L0 - 1).bit_length()                        # pad to a power of two with zeros
    if L != L0:
        M = torch.nn.functional.pad(M, (0, L - L0, 0, L - L0))
    P = torch.eye(L, dtype=M.dtype, device=M.device).expand(M.shape).contiguous()
    s = 1
    while s < L:
        nb = L // (2 * s)
        Pb, Mb = (torch.diagonal(X.view(*X.shape[:-2], nb, 2 * s, nb, 2 * s), dim1=-4, dim2=-2)
                  .movedim(-1, -3) for X in (P, M))          # views of the 2s x 2s diagonal blocks
        X = Mb[..., s:, :s]
        Pb[..., s:, :s] = X if s == 1 else Pb[..., s:, s:] @ X @ Pb[..., :s, :s]
        s *= 2
    return P if L == L0 else P[..., :L0, :L0]


class _ChunkSaved(NamedTuple):
    """What the chunked forward keeps for its backward ([C, G, ...]: chunk, head-batch)."""

    Q: Tensor      # [C, G, 2L, N]  [a e^{ge-c}; r e^{gi-c}]
    KB: Tensor     # [C, G, 2L, N]  [b; k] e^{c-gi}
    EQ: Tensor     # [C, G, 2, L, N] e^{ge-c}, e^{gi-c}
    E3: Tensor     # [C, G, 1, L, N] e^{c-gi}
    ec: Tensor     # [C, G, 1, 1, N] e^{c}
    egl: Tensor    # [C, G, 1, 1, N] e^{gl-c}
    ek: Tensor     # [C, G, 1, N]    e^{gl}: decay over the whole chunk
    M: Tensor      # [C, G, 2L, 2L] masked score blocks [[M_ab, M_ak], [M_rb, M_rk]]
    P: Tensor      # [C, G, L, L]   (I - M_ab)^{-1}
    Wm: Tensor     # [C, G, L, N]   P a0
    U1: Tensor     # [C, G, L, N]   P M_ak v
    UV: Tensor     # [C, G, 2L, N]  [U; v]
    Stst: Tensor   # [C, G, N, N]   S^T entering each chunk


def _chunk_fwd(AR, w, BK, v, S0, L, seg: _Seg | None = None, Sr=None):
    """Internally the state is kept key-major (St = S^T) so the big matmuls need no transposes.

    With ``seg`` (document starts, see :class:`_Seg`) the same loop runs on masked tensors: the
    carried state reaches only the carried segment (W f, ek carry) and the reset state ``Sr``
    [G, N, N] (None = zeros) every later segment, through batched terms outside the loop."""
    C, G, _, _, N = AR.shape
    Q, Q0, KB, BKl, EQ, E3, ec, egl, ek = _factors(AR, w, BK, L, None if seg is None else seg.pidx)
    if seg is not None:
        BKl = BKl * seg.lastm                             # only the last segment reaches the chunk end
    Q, Q0, KB, BKl = (x.view(C, G, 2 * L, N) for x in (Q, Q0, KB, BKl))
    # Masked-out entries may overflow (inf/nan); masked_fill_ overwrites them.
    M = (Q @ KB.mT).masked_fill_(~(_mask(L, AR.device) if seg is None else seg.mask), 0.0)
    Mab, Mak, Mr = M[..., :L, :L], M[..., :L, L:], M[..., L:, :]
    # WY form: W = (I - M_ab)^{-1} a0, U1 = (I - M_ab)^{-1} M_ak v;  per chunk U = U1 + W S^T.
    P = _unit_lower_inv(Mab)
    Wm, U1 = P @ Q0[..., :L, :], P @ (Mak @ v)
    ekc = ek.mT                                           # decay of key rows: [C, G, N, 1]
    Wl, U1l, R0, Srt, ekr = Wm, U1, Q0[..., L:, :], None, None
    if seg is not None:
        # P is block-diagonal over segments, so (P a0) f = P (a0 f): W's rows split by segment.
        Wl, R0, ekc = Wm * seg.f, R0 * seg.f, ekc * seg.carry
        if Sr is not None:
            Srt, fi = Sr.mT, 1.0 - seg.f
            U1l = U1 + (Wm * fi) @ Srt
            ekr = ek.mT * (1.0 - seg.carry)               # S_r decayed from the last segment's start
    UV = torch.cat([torch.empty_like(v), v], -2)          # [C, G, 2L, N] = [U; v]
    Stst = AR.new_empty(C, G, N, N)                       # S^T entering each chunk
    Stst[0] = S0.mT
    Sf = AR.new_empty(G, N, N)
    for ci in range(C):
        St = Stst[ci]
        torch.baddbmm(U1l[ci], Wl[ci], St, out=UV[ci, :, :L])
        Sn = Stst[ci + 1] if ci + 1 < C else Sf
        torch.mul(St, ekc[ci], out=Sn)                    # decay, then rank-2L update
        if ekr is not None:
            Sn.addcmul_(Srt, ekr[ci])
        Sn.baddbmm_(BKl[ci].mT, UV[ci])
    y = R0 @ Stst + Mr @ UV
    if Srt is not None:
        y = y + (Q0[..., L:, :] * fi) @ Srt
    return y, Sf.mT.contiguous(), _ChunkSaved(Q, KB, EQ, E3, ec, egl, ek, M, P, Wm, U1, UV, Stst)


def _chunk_bwd(v, L, saved: _ChunkSaved, dy, dSf, seg: _Seg | None = None, Sr=None):
    """Hand-derived reverse of _chunk_fwd: the chunk loop runs backwards over dS^T.
    Returns (dAR, dw, dBK, dv, dS0, dSr); dSr is None without ``seg`` and ``Sr``."""
    Q, KB, EQ, E3, ec, egl, ek, M, P, Wm, U1, UV, Stst = saved
    C, G, _, N = v.shape
    sh = (C, G, 2, L, N)
    BKl = KB.view(sh) * egl
    if seg is not None:
        BKl = BKl * seg.lastm
    Q0, BKl = (Q.view(sh) * ec).view(C, G, 2 * L, N), BKl.view(C, G, 2 * L, N)
    Mak, Mr = M[..., :L, L:], M[..., L:, :]
    ekc, Wl, R0, Srt, dSrt = ek.mT, Wm, Q0[..., L:, :], None, None
    if seg is not None:
        Wl, R0, ekc = Wm * seg.f, R0 * seg.f, ekc * seg.carry
        if Sr is not None:
            Srt, fi, ekr = Sr.mT, 1.0 - seg.f, ek.mT * (1.0 - seg.carry)
    # y = r0 S^T + [M_rb M_rk] [U; v]  (+ r0 S_r^T on the segments after a start)
    dR0, dSty = dy @ Stst.mT, R0.mT @ dy
    if seg is not None:
        dR0 = dR0 * seg.f
        if Srt is not None:
            dR0 = dR0 + (dy @ Sr) * fi
            dSrt = ((Q0[..., L:, :] * fi).mT @ dy).sum(0)
    dMr, dUVy = dy @ UV.mT, Mr.mT @ dy
    # Reverse loop. S'^T = S^T*ek + BKl^T [U; v],  U = U1 + W S^T.  dSn[ci] = d(S^T after ci).
    dSn, dU = torch.empty_like(Stst), torch.empty_like(v)
    dSn[-1] = dSf.mT
    dS0 = v.new_empty(G, N, N)
    for ci in range(C - 1, -1, -1):
        g = dSn[ci]
        torch.baddbmm(dUVy[ci, :, :L], BKl[ci, :, :L], g, out=dU[ci])
        prev = dSn[ci - 1] if ci > 0 else dS0
        torch.addcmul(dSty[ci], g, ekc[ci], out=prev)
        prev.baddbmm_(Wl[ci].mT, dU[ci])
    dBKl = UV @ dSn.mT                                    # [d bl; d kl]
    dek = (dSn * Stst).sum(-1)
    dWm = dU @ Stst.mT
    if seg is not None:
        dek, dWm = dek * seg.carry[..., 0], dWm * seg.f
        if Srt is not None:
            dek = dek + (dSn * Srt).sum(-1) * (1.0 - seg.carry[..., 0])
            dSrt = dSrt + (dSn * ekr).sum(0)
            dWm = dWm + (dU @ Sr) * fi
            dSrt = dSrt + ((Wm * fi).mT @ dU).sum(0)
    dek = dek.unsqueeze(-2)
    dv = dUVy[..., L:, :] + BKl[..., L:, :] @ dSn
    # [W | U1] = P [a0 | M_ak v], P = T^{-1}, T = I - M_ab:  dR = P^T dX,  dM_ab = dR X^T.
    dA0, dMv = P.mT @ dWm, P.mT @ dU
    dv = dv + Mak.mT @ dMv
    dM = torch.cat([torch.cat([dA0 @ Wm.mT + dMv @ U1.mT, dMv @ v.mT], -1), dMr], -2)
    dM.masked_fill_(~(_mask(L, v.device) if seg is None else seg.mask), 0.0)
    dQ, dKB = dM @ KB, dM.mT @ Q
    dQ0 = torch.cat([dA0, dR0], -2)
    dQ, dKB, dQ0, dBKl = dQ.view(sh), dKB.view(sh), dQ0.view(sh), dBKl.view(sh)
    Q, Q0, KB, BKl = Q.view(sh), Q0.view(sh), KB.view(sh), BKl.view(sh)
    # Through the factors: Q = AR e^{GEI-c}, Q0 = Q O, KB = BK e^{c-gi}, BKl = KB e^{gl-c} (lastm).
    # O = e^{c - ge[p(t)]} (p = 0, ge[0] = 0 without starts); ek = e^{gl-c} O[L-1].
    dBKe = dBKl * egl if seg is None else dBKl * (egl * seg.lastm)
    dQt, dKBt = torch.addcmul(dQ, dQ0, ec), dKB + dBKe
    dAR, dBK = dQt * EQ, dKBt * E3
    gq, tk = dQt * Q, dKBt * KB                           # d/d(GEI - c), -d/d(gi - c)
    gO = (dQ0 * Q0).sum(2)                                # d/d log O: [C, G, L, N]
    sl = (dBKl * BKl).sum((2, 3))
    de = (dek * ek).squeeze(-2)                           # d/d log ek
    gO[:, :, -1] += de
    cgrad = tk.sum((2, 3)) - gq.sum((2, 3)) + gO.sum(2) - de - sl
    g_ge = gq[:, :, 0]
    if seg is not None:                                   # log O_t = c - ge[p(t)]
        g_ge = g_ge.scatter_add(2, seg.pidx.expand(C, G, L, N), -gO)
    g_gi = gq[:, :, 1] + g_ge - tk.sum(2)
    g_gi[:, :, -1] += sl + de                                   # gl = gi[-1]
    if L > 1:                                                   # c = gi[L//2 - 1]
        g_gi[:, :, L // 2 - 1] += cgrad
    dw = torch.flip(torch.cumsum(torch.flip(g_gi, [-2]), -2), [-2]) - g_ge
    return dAR, dw, dBK, dv, dS0.mT, None if dSrt is None else dSrt.mT


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, AR, w, BK, v, S0, Sr, seg, L):
        y, Sf, saved = _chunk_fwd(AR, w, BK, v, S0, L, seg, Sr)
        ctx.save_for_backward(v, Sr, *saved)
        ctx.L, ctx.seg = L, seg
        return y, Sf

    @staticmethod
    def backward(ctx, dy, dSf):
        v, Sr, *tensors = ctx.saved_tensors
        saved = _ChunkSaved(*tensors)
        dy = torch.zeros_like(v) if dy is None else dy.contiguous()
        dSf = torch.zeros_like(saved.Stst[0]) if dSf is None else dSf
        with _no_autocast(v.device.type):
            dAR, dw, dBK, dv, dS0, dSr = _chunk_bwd(v, ctx.L, saved, dy, dSf, ctx.seg, Sr)
        return dAR, dw, dBK, dv, dS0, dSr, None, None


def _wkv_chunked(r, w, k, v, a, b, S, L, w_bound=None, doc_start=None, S_reset=None):
    B, T, H, N = r.shape
    # Keep every factored exponential finite: halve the chunk for very negative w, then clamp w.
    # The largest |w| is measured only when the caller does not know a bound: measuring it copies a
    # value to the host, which on an accelerator stalls the stream every call.
    lim = _EXP_LIMIT[r.dtype]
    m = float(w.detach().abs().max()) if w_bound is None else float(w_bound)   # (w > 0 is bounded too)
    while L > 1 and (L - L // 2) * m > lim:
        L //= 2
    bound = lim / (L - L // 2)
    if m > bound:
        w = w.clamp(-bound, bound)
    C = -(-T // L)
    pad = C * L - T

    def chunks(x):  # [B, T, H, N] -> [C, B*H, L, N]; zero padding leaves the state unchanged
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.reshape(B, C, L, H, N).permute(1, 0, 3, 2, 4)

    G = B * H
    seg, Sr = None, None
    if doc_start is not None:  # padding continues the last segment (no start): state unchanged
        st = torch.nn.functional.pad(doc_start, (0, pad)) if pad else doc_start
        seg = _segments(st.reshape(B, C, 1, L).expand(B, C, H, L).transpose(0, 1).reshape(C, G, L), L, r.dtype)
        Sr = None if S_reset is None else S_reset.reshape(G, N, N).contiguous()
    AR = torch.stack([chunks(a), chunks(r)], 3).reshape(C, G, 2, L, N)
    BK = torch.stack([chunks(b), chunks(k)], 3).reshape(C, G, 2, L, N)
    wc, vc = chunks(w).reshape(C, G, L, N), chunks(v).reshape(C, G, L, N)
    y, Sf = _Chunked.apply(AR, wc, BK, vc, S.reshape(G, N, N).contiguous(), Sr, seg, L)
    y = y.view(C, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, C * L, H, N)
    return y[:, :T], Sf.view(B, H, N, N)


# ----------------------------------------------------------------------------------------- fla
def _wkv_fla(r, w, k, v, a, b, S, doc_start=None, S_reset=None):
    """Adapter to fla's chunk_rwkv7: same [B, T, H, N] inputs (head_first=False), log-decay w,
    scale 1.0, but a key-major state [B, H, K, V] = our S transposed.

    With ``doc_start`` the batch is flattened to one row of B*T tokens and every document (and
    every row start) becomes one of fla's variable-length sequences (``cu_seqlens``), each with its
    own initial state: the row's carried state for a row's first piece that starts no document, the
    reset state otherwise. The row's final state is its last sequence's."""
    fn, params = _fla_kernel()
    dt = r.dtype
    B, T, H, N = r.shape
    flat = doc_start is not None
    if flat and "cu_seqlens" not in params:
        raise ValueError("wkv7: this fla-core's chunk_rwkv7 takes no cu_seqlens, so packed documents "
                         "cannot be reset there; upgrade fla-core or use backend 'chunked'")
    kw = {n: (x.reshape(1, B * T, H, N) if flat else x).to(dt).contiguous()
          for n, x in zip(("r", "k", "v", "a", "b"), (r, k, v, a, b))}
    # fla versions that also accept `log_w` use `w` for a raw logit (log_w = -exp(w)); the
    # others (0.6.0) take the log-decay as `w`.  We always hold the log-decay.
    kw["log_w" if "log_w" in params else "w"] = (w.reshape(1, B * T, H, N) if flat else w).to(dt).contiguous()
    init = S.float()
    if flat:
        begins = doc_start.clone()
        begins[:, 0] = True                                           # every row starts a sequence
        pos = begins.reshape(-1).nonzero().squeeze(1)                 # (one host sync per call)
        row = torch.div(pos, T, rounding_mode="floor")
        carried = (pos % T == 0) & ~doc_start[:, 0][row]
        reset = init.new_zeros(B, H, N, N) if S_reset is None else S_reset.float()
        init = torch.where(carried[:, None, None, None], init[row], reset[row])
        kw["cu_seqlens"] = torch.cat([pos, pos.new_tensor([B * T])])
        last = torch.cat([(row[1:] != row[:-1]).nonzero().squeeze(1), row.new_tensor([len(row) - 1])])
    kw.update(scale=1.0, initial_state=init.mT.contiguous(), output_final_state=True)
    if "head_first" in params:
        kw["head_first"] = False
    out = fn(**kw)
    if flat:
        return out[0].reshape(B, T, H, N), out[1][last].mT.float()
    return out[0], out[1].mT.float()


# ------------------------------------------------------------------------------------- dispatch
def _check(tensors, state):
    r = tensors[0]
    shape, dev = getattr(r, "shape", ()), getattr(r, "device", None)
    fast_ok = len(shape) == 4 and all(isinstance(x, Tensor) and x.shape == shape and x.device == dev
                                      and x.is_floating_point() for x in tensors)
    for name, x in zip(_NAMES, tensors if not fast_ok else ()):  # slow path only to explain
        if not isinstance(x, Tensor) or x.dim() != 4:
            found = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"wkv7: {name} must be a 4-D tensor [B, T, H, N], found {found}")
        if x.shape != shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)} but r has {tuple(shape)}; "
                             "r, w, k, v, a, b must all be [B, T, H, N]")
        if not x.is_floating_point():
            raise ValueError(f"wkv7: {name} must be a float tensor, found {x.dtype}")
        if x.device != dev:
            raise ValueError(f"wkv7: {name} is on {x.device} but r is on {dev}")
    if state is not None:
        _check_state(state, r, "state")


def _check_state(state, r, name):
    B, _, H, N = r.shape
    if not isinstance(state, Tensor) or tuple(state.shape) != (B, H, N, N):
        found = list(state.shape) if isinstance(state, Tensor) else type(state).__name__
        raise ValueError(f"wkv7: {name} must have shape [B, H, N, N] = {[B, H, N, N]}, found {found}")
    if state.device != r.device:
        raise ValueError(f"wkv7: {name} is on {state.device} but r is on {r.device}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"wkv7: {name} must be float32 (or float64), found {state.dtype}")


def _check_doc_start(doc_start, reset_state, r):
    B, T, H, N = r.shape
    if not isinstance(doc_start, Tensor) or doc_start.dtype != torch.bool or tuple(doc_start.shape) != (B, T):
        found = (f"{doc_start.dtype} {list(doc_start.shape)}" if isinstance(doc_start, Tensor)
                 else type(doc_start).__name__)
        raise ValueError(f"wkv7: doc_start must be a bool tensor [B, T] = {[B, T]} (True where a document "
                         f"starts), found {found}")
    if doc_start.device != r.device:
        raise ValueError(f"wkv7: doc_start is on {doc_start.device} but r is on {r.device}")
    if reset_state is not None:
        _check_state(reset_state, r, "reset_state")


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
         *, backend: str = "auto", chunk_size: int | None = None, w_bound: float | None = None,
         doc_start: Tensor | None = None, reset_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run WKV-7 over a sequence.

    r, w, k, v, a, b: [B, T, H, N] (w = log-decay <= 0, a = -kk, b = kk*iclr), any float dtype.
    state: [B, H, N, N] float32 (float64 with float64 inputs), S[..., value, key]; None = zeros.
    backend: "auto", "reference", "chunked" or "fla"; chunk_size: for "chunked" (default 32).
    w_bound: a known bound on |w| (the model's is 0.606531), which spares "chunked" measuring it.
    doc_start: [B, T] bool, packed documents: before each True position the state is replaced by
    ``reset_state`` ([B, H, N, N], like ``state``; None = zeros), exactly as if that document ran
    alone from that state. ``state`` is what position 0 continues from when it starts no document.
    Returns (y [B, T, H, N] in r's dtype, final state [B, H, N, N] fp32, fp64 for fp64 inputs).
    """
    tensors = (r, w, k, v, a, b)
    _check(tensors, state)
    B, T, H, N = r.shape
    if doc_start is not None:
        _check_doc_start(doc_start, reset_state, r)
    elif reset_state is not None:
        raise ValueError("wkv7: reset_state is the state each document of doc_start starts from; "
                         "pass doc_start with it")
    f64 = any(x.dtype == torch.float64 for x in tensors)
    if any(x is not None and x.dtype == torch.float64 for x in (state, reset_state)) and not f64:
        raise ValueError("wkv7: a float64 state needs float64 inputs; pass a float32 state "
                         "(or cast the inputs to float64)")
    mdt = torch.float64 if f64 else torch.float32
    cuda = r.is_cuda
    if backend == "auto":
        use_fla = cuda and not f64 and _fla_installed() and _fla_kernel()[0] is not None and (
            doc_start is None or "cu_seqlens" in _fla_kernel()[1])
        backend = "fla" if use_fla else ("reference" if T <= 1 else "chunked")
    elif backend not in ("reference", "chunked", "fla"):
        raise ValueError(f"wkv7: unknown backend {backend!r}; available here: {available_backends()} "
                         "(or 'auto' to pick the fastest)")
    if backend == "fla":
        why = ("inputs are on " + str(r.device) if not cuda else "inputs are float64" if f64 else
               "package fla-core is not installed" if not _fla_installed() else _fla_kernel()[1])
        if not cuda or f64 or not _fla_installed() or _fla_kernel()[0] is None:
            raise ValueError(f"wkv7: backend 'fla' needs CUDA bf16/fp16/fp32 inputs and fla-core "
                             f"(pip install 'rwkvtune[gpu]'), but {why}; available here: "
                             f"{available_backends()} (use backend='auto')")
        S = state if state is not None else r.new_zeros(B, H, N, N, dtype=torch.float32)
        y, Sf = _wkv_fla(r, w, k, v, a, b, S, doc_start, reset_state)
        return (y if y.dtype == r.dtype else y.to(r.dtype)), Sf
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"wkv7: chunk_size must be a positive integer, found {chunk_size!r}")
    xs = [x if x.dtype == mdt else x.to(mdt) for x in tensors]
    S = state if state is not None and state.dtype == mdt else (
        state.to(mdt) if state is not None else r.new_zeros(B, H, N, N, dtype=mdt))
    Sr = reset_state if reset_state is None or reset_state.dtype == mdt else reset_state.to(mdt)
    with _no_autocast(r.device.type):
        if backend == "reference" or T == 0:
            y, Sf = _wkv_reference(*xs, S, doc_start, Sr)
        else:
            y, Sf = _wkv_chunked(*xs, S, chunk_size or DEFAULT_CHUNK_SIZE, w_bound, doc_start, Sr)
    return (y if y.dtype == r.dtype else y.to(r.dtype)), Sf
