"""TTT: a language model whose sequence layers learn at test time (TTT-Linear, TTT-MLP).

After Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States". Every block is pre-norm: [optional causal depthwise conv] -> TTT layer -> SwiGLU
MLP, with RMSNorm, tied embedding and head, no dropout.

The TTT layer, per head (head dimension d):
- projections XQ, XK, XV of the block's normalized input; RoPE (on pairs of adjacent
  dimensions, as the reference's JAX original) on XQ and XK with positions *modulo the
  mini-batch size K*, so the layer carries no absolute position;
- a fast inner model f with weights carried in the state: linear ``x W1 + b1`` or an MLP
  ``gelu(x W1 + b1) W2 + b2`` (hidden 4d), initialized from learned slow weights;
- the inner loss of token j is ``0.5 || LN(f(XK_j)) - (XV_j - XK_j) ||^2``, LN with a
  per-head learned weight and bias;
- inner learning rate of token j: ``base_lr * sigmoid(x_j . w_h + b_h) / d``; token i of a
  mini-batch is scaled by ``s_i = max(0, 1 / (i + 1) + offset_i)`` (``offset`` learned);
- mini-batch gradient descent: the weights at the start of mini-batch n are W_n; token i of
  it reads with ``W_n - s_i sum_{j <= i} lr_j grad_j(W_n)`` (all gradients taken at W_n), and
  the next mini-batch starts from ``W_{n+1} = W_n - s_{K-1} sum_j lr_j grad_j(W_n)``;
- output ``Z = XQ + LN(f'(XQ))`` with f' the weights token i reads with, then a LayerNorm
  over the heads (post-norm), an optional GELU gate and the output projection.

How it is computed (the *dual form*). The inner gradients are closed-form: for the linear
model grad_j(W) = XK_j^T g_j and grad_j(b) = g_j, with g_j the gradient of the loss with
respect to f(XK_j), through the LayerNorm (which is a LayerNorm backward: one fused op). So
every weight the layer ever uses is the initial weight minus a weighted sum of outer
products XK_j^T g_j, and applying it to a vector x only needs the dot products x . XK_j: no
per-token weight is materialized. For a block of tokens (``block``: the head dimension by default, at most 64; cut into
mini-batches of K) starting from weights (W, b), with ``lg_j = lr_j g_j``:

    f(XK_t) at W_n     = XK_t W + b - sum_{j in earlier mini-batches} s_{K-1} (XK_t . XK_j + 1) lg_j
    f'(XQ_t)           = XQ_t W + b - sum_{j <= t} m_tj (XQ_t . XK_j + 1) lg_j
    W after the block  = W - s_{K-1} sum_j XK_j^T lg_j,     b after = b - s_{K-1} sum_j lg_j

with ``m_tj = s_{i(t)}`` inside t's mini-batch and ``s_{K-1}`` for earlier ones. The only
sequential part is g of mini-batch n, which needs f(XK) at W_n and hence the g of the
mini-batches before it: one small matrix product and two fused LayerNorm ops per mini-batch.
Everything else is a few batched matrix products per block, like attention over the block.
Blocks are chained through (W, b), so the cost per token is flat in the sequence length.
For TTT-MLP the first layer works the same way with ``g1 = (g2 W2^T) * gelu'(z1)``; the
second layer's weights are carried explicitly through the mini-batches of a block (its
input, the hidden activation, is only known there), and the queries read it in dual form.
A block is one ``torch.autograd.Function`` with a hand-written backward (a reverse scan over
the mini-batches), checked against autograd through a naive token-by-token definition in the
tests; eager autograd through the same computation is 1.5-2x slower on CPU. On CPU the two
blocks' forward and backward run as compiled kernels (``blocks.cpp``, loaded by
``kernels.py``) that compute the same thing one (sequence, head) at a time in cache, and so do
the ``QKV`` and ``Readout`` glue functions (``glue.cpp``); the torch code here is their
reference and the GPU path.

State, per layer: the fast weights at the last mini-batch boundary; the keys, targets and
learning rates of the pending (incomplete) mini-batch, whose tokens are folded into the
next call; the causal conv's last ``kernel - 1`` inputs; and the absolute position. So
feeding a stream in chunks of any size gives the same logits as one pass, and the state
is a pytree of tensors that training with state passing can carry (and detach) across
windows. Nothing is updated in place, so gradients flow through the fast-weight updates
within a window.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lengen.api import ArchConfig, Architecture, BuildContext, ParamGroup
from lengen.nn import RMSNorm, SwiGLU, init_weights, swiglu_hidden

from .kernels import cpu_kernels

# d_model, n_layers, n_heads, d_ff (None: 8/3 x d_model). 125m .. 1b are the reference's
# presets (the seeds ran 125m with d_ff = 3072: set d_ff to override).
PRESETS = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, d_ff=None),
    "bench": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2736),
    "760m": dict(d_model=1536, n_layers=24, n_heads=16, d_ff=4096),
    "1b": dict(d_model=2048, n_layers=24, n_heads=32, d_ff=5504),
}
INNER_LN_EPS = 1e-6


class TTTConfig(ArchConfig):
    preset: Literal["tiny", "bench", "125m", "350m", "760m", "1b"] = Field(
        "tiny", description="size preset; d_model, n_layers, n_heads, d_ff given explicitly override it")
    d_model: int | None = Field(None, gt=0, description="hidden size (default: the preset's)")
    n_layers: int | None = Field(None, gt=0, description="blocks (default: the preset's)")
    n_heads: int | None = Field(None, gt=0, description="TTT heads (default: the preset's)")
    d_ff: int | None = Field(None, gt=0, description="SwiGLU hidden size (default: the preset's, else 8/3 x d_model)")
    inner: Literal["linear", "mlp"] = Field("linear", description="inner model: TTT-Linear or TTT-MLP")
    mini_batch: int = Field(16, gt=0, description="K: tokens per inner gradient step")
    base_lr: float | None = Field(None, gt=0, description="inner base learning rate (default 1.0 linear, 0.1 mlp)")
    mlp_expansion: int = Field(4, gt=0, description="hidden width of the inner MLP in multiples of the head dim")
    pre_conv: bool = Field(False, description="causal depthwise conv (with its own RMSNorm) before each TTT layer")
    conv_kernel: int = Field(4, ge=2, description="pre_conv kernel size")
    use_gate: bool = Field(False, description="GELU(x W_g) gate on the TTT layer's output")
    rope_base: float = Field(10000.0, gt=0)
    block: int | None = Field(None, gt=0, description="tokens per dual-form block, rounded up to a multiple of "
                              "mini_batch; bounds the per-token cost at any length (default: the head dimension, "
                              "between mini_batch and 64: the [block x block] products then cost about what the "
                              "[head_dim x head_dim] ones do)")

    def size(self) -> dict:
        """The preset's sizes with explicit keys applied."""
        out = dict(PRESETS[self.preset])
        for key in out:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["d_ff"] = out["d_ff"] or swiglu_hidden(out["d_model"])
        return out


# ---------------------------------------------------------------------------------------
# the inner model's closed-form pieces


def _ln_backward(grad_out, z, mean, rstd):
    """``rstd * (grad_out - mean(grad_out) - zh * mean(grad_out * zh))`` over the last dim,
    ``zh = (z - mean) * rstd``: the backward of a LayerNorm without affine (one fused op)."""
    return torch.ops.aten.native_layer_norm_backward(
        grad_out, z, [z.shape[-1]], mean, rstd, None, None, [True, False, False])[0]


def ln_l2_forward(z, gamma2, bt, eps: float = INNER_LN_EPS):
    """Gradient w.r.t. ``z`` of the inner loss ``0.5 || gamma * LN(z) + beta - target ||^2``
    (LN over the last dim), given ``gamma2 = gamma ** 2`` and ``bt = (beta - target) * gamma``:
    it is a LayerNorm backward with output gradient ``gamma * (gamma * LN(z) + beta - target)``.
    Returns ``(grad, zh, mean, rstd)``, ``zh`` the normalized ``z``."""
    zh, mean, rstd = torch.native_layer_norm(z, [z.shape[-1]], None, None, eps)
    return _ln_backward(torch.addcmul(bt, zh, gamma2), z, mean, rstd), zh, mean, rstd


def ln_l2_vjp(dgrad, grad, z, zh, mean, rstd, bt, gamma2, out=None):
    """Vector-Jacobian product of ``ln_l2_forward``: ``dgrad`` -> ``(dz, dbt)`` (written into
    ``out`` if given); the gradient of gamma2 is ``sum(dbt * zh)`` over the rows."""
    inv_d = 1.0 / z.shape[-1]
    gi = torch.addcmul(bt, zh, gamma2)
    dbt = _ln_backward(dgrad, z, mean, rstd)
    m2 = (gi * zh).sum(-1, keepdim=True)
    uz = (dgrad * zh).sum(-1, keepdim=True).mul_(rstd)
    dzh = (dbt * gamma2).addcmul_(dgrad * rstd, m2, value=-inv_d).addcmul_(gi, uz, value=-inv_d)
    c = (dgrad * grad).sum(-1, keepdim=True).mul_(rstd)
    if out is None:
        return _ln_backward(dzh, z, mean, rstd).addcmul_(zh, c, value=-inv_d), dbt
    torch.addcmul(_ln_backward(dzh, z, mean, rstd), zh, c, value=-inv_d, out=out[0])
    out[1].copy_(dbt)
    return out


GELU_C, GELU_A = math.sqrt(2.0 / math.pi), 0.044715


def gelu(z, with_grad: bool = False):
    """The tanh-approximated GELU, ``0.5 z (1 + tanh(u))`` with ``u = c (z + a z^3)``, computed
    as ``z * sigmoid(2u)`` (the same function; tanh is several times slower than sigmoid on
    CPU). ``with_grad``: also its derivative and ``sigmoid(2u)`` (for ``gelu_second``)."""
    z2 = z * z
    sg = torch.sigmoid(torch.mul(z2, 2 * GELU_C * GELU_A).add_(2 * GELU_C).mul_(z))
    y = z * sg
    if not with_grad:
        return y
    up = torch.mul(z2, 3 * GELU_C * GELU_A).add_(GELU_C)  # du / dz
    return y, torch.addcmul(sg, sg * (1 - sg) * up, z, value=2), sg


def gelu_second(z, sg):
    """Second derivative of the GELU at ``z``, given ``sg = sigmoid(2u)`` from ``gelu``:
    ``(1 - t^2) (u' + 3 a c z^2 - z t u'^2)`` with ``t = tanh(u) = 2 sg - 1``."""
    z2 = z * z
    up = torch.mul(z2, 3 * GELU_C * GELU_A).add_(GELU_C)
    t = 2 * sg - 1
    return (1 - t * t) * torch.add(up, z2, alpha=3 * GELU_C * GELU_A).sub_(z * t * up * up)


@functools.lru_cache(maxsize=32)
def block_masks(S: int, K: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """For a block of S tokens cut into mini-batches of K: ``same[t, j]`` (j <= t in t's
    mini-batch) and ``earlier[t, j]`` (j in an earlier mini-batch), as floats."""
    idx = torch.arange(S, device=device)
    mb = idx // K
    same = (mb[:, None] == mb[None, :]) & (idx[None, :] <= idx[:, None])
    earlier = mb[None, :] < mb[:, None]
    return same.to(dtype), earlier.to(dtype)


@functools.lru_cache(maxsize=32)
def coefficient_basis(S: int, K: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """``[2S * S, K]``: ``(basis @ s).view(2S, S)`` stacks ``mq`` (the token scale with which
    query t reads key j's gradient: s_{i(t)} in its own mini-batch, s_{K-1} for earlier ones, 0
    after t) on ``mk`` (the earlier-mini-batch part, with which the keys of a mini-batch see
    the steps taken before it). Its transpose maps a gradient w.r.t. the masks to one w.r.t. s."""
    same, earlier = block_masks(S, K, device, dtype)
    basis = torch.zeros(2, S, S, K, device=device, dtype=dtype)
    pos = torch.arange(S, device=device) % K
    basis[0].scatter_(2, pos[:, None, None].expand(S, S, 1), same[..., None])
    basis[0, :, :, K - 1] += earlier
    basis[1, :, :, K - 1] = earlier
    return basis.view(2 * S * S, K)


def coefficient_masks(s, S: int, K: int):
    """``mqk`` [2S, S] (see ``coefficient_basis``) for token scales ``s``."""
    return (coefficient_basis(S, K, s.device, s.dtype) @ s).view(2 * S, S)


def _step_grad(x, dW, db):
    """``x dW + db`` [N, full, h]: the gradient from the weights after the block (``dW``,
    ``db``; either may be None) reaching each full mini-batch token's step ``lr_j g_j``, per
    unit of the token scale (the step is ``W - s x^T lg``)."""
    t = x @ dW if dW is not None else 0
    return t + db if db is not None else t


def dual_backward(dR, qx, W, LG, gram, mqk):
    """Backward of the dual form's first-layer read-out ``R = qx W + b - ((gram + 1) * m) @ LG``
    (``gram = qx . XK``, ``XK`` the second half of ``qx``; ``m`` the coefficient masks ``mqk``)
    given ``dR``: returns ``d qx`` (queries and keys), ``dW``, ``db`` and ``dm`` (summed over the
    batch, [2S, S]). The gradient reaching ``LG`` is left to the caller's scan."""
    S = qx.shape[1] // 2
    x = qx[:, S:]
    dqx = torch.bmm(dR, W.transpose(1, 2))
    dW = torch.bmm(qx.transpose(1, 2), dR)
    db = dR.sum(1, keepdim=True)
    p = torch.bmm(dR, LG.transpose(1, 2))  # d loss / d a = -(dR LG^T)
    dgram = p * mqk
    dqx = torch.baddbmm(dqx, dgram, x, alpha=-1)
    dqx[:, S:] -= torch.bmm(dgram.transpose(1, 2), qx)
    dm = torch.addcmul(p, p, gram).sum(0).neg_()
    return dqx, dW, db, dm


class LinearBlock(torch.autograd.Function):
    """One dual-form block of TTT-Linear, with a hand-written backward.

    ``qx`` [N, 2S, d] (N = batch x heads): the block's S queries, then its S keys;
    ``bt`` = (beta - target) * gamma [N, S, d]; ``lr`` [N, S]; ``s`` [K] token scales;
    ``gamma2`` [N, 1, d]; ``W`` [N, d, d], ``b`` [N, 1, d]: the weights at the block's start.
    Returns the inner outputs before the LayerNorm [N, S, d] and the weights after the
    block's full mini-batches. The lr_j of the dual form is folded into the gradients,
    ``lg_j = lr_j g_j``, so the [S, S] coefficient matrices carry only the token scales.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # the inner loop in fp32
    def forward(ctx, qx, bt, lr, s, gamma2, W, b, K: int):
        N, S2, d = qx.shape
        S = S2 // 2
        full = (S // K) * K
        x = qx[:, S:]
        mqk = coefficient_masks(s, S, K)
        ext = cpu_kernels(qx)
        ctx.ext, ctx.K = ext, K
        ctx.set_materialize_grads(False)  # unused outputs (the weights after the block) come back as None
        if ext is not None:  # the same computation, one (sequence, head) at a time in cache: kernels.py
            args = [t.contiguous() for t in (qx, bt, lr, mqk)], [t.contiguous() for t in (gamma2, W, b)]
            out, W1, b1, *saved = ext.forward(*args[0], float(s[K - 1]), *args[1], K, INNER_LN_EPS)
            ctx.save_for_backward(*args[0], s, args[1][0], args[1][1], *saved)
            return out, W1, b1
        base = torch.baddbmm(b, qx, W)  # f(XQ), f(XK) at the block's start
        gram = torch.bmm(qx, x.transpose(1, 2))  # XQ . XK, XK . XK
        a = torch.addcmul(mqk, gram, mqk)  # (gram + 1) * token scales
        ak = a[:, S:]
        # the scan: inner gradients of mini-batch n, at the weights it starts from
        LG = torch.empty_like(bt)
        saved = []  # per mini-batch: z, g, zh, mean, rstd (contiguous, as the fused LN ops need)
        for i in range(0, S, K):
            e = min(S, i + K)
            z = base[:, S + i:S + e]
            z = torch.baddbmm(z, ak[:, i:e, :i], LG[:, :i], alpha=-1) if i else z.contiguous()
            out = ln_l2_forward(z, gamma2, bt[:, i:e])
            torch.mul(out[0], lr[:, i:e, None], out=LG[:, i:e])
            saved += (z, *out)
        out = torch.baddbmm(base[:, :S], a[:, :S], LG, alpha=-1)
        if full:  # the full step, with the last token's scale
            step = LG[:, :full] * s[K - 1]
            W1 = torch.baddbmm(W, x[:, :full].transpose(1, 2), step, alpha=-1)
            b1 = b - step.sum(1, keepdim=True)
        else:
            W1, b1 = W.clone(), b.clone()
        ctx.K = K
        ctx.save_for_backward(qx, bt, lr, s, gamma2, W, LG, gram, a, mqk, *saved)
        return out, W1, b1

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout, dW1, db1):
        if ctx.ext is not None:
            qx, bt, lr, mqk, s, gamma2, W, *saved = ctx.saved_tensors
            dout = torch.zeros_like(bt) if dout is None else dout.contiguous()
            dqx, dbt, dlr, dm_s, dgamma2, dW, db = ctx.ext.backward(
                dout, dW1, db1, qx, bt, lr, mqk, float(s[ctx.K - 1]), gamma2, W, *saved, ctx.K)
            return dqx, dbt, dlr, dm_s, dgamma2, dW, db, None
        qx, bt, lr, s, gamma2, W, LG, gram, a, mqk, *saved = ctx.saved_tensors
        K = ctx.K
        N, S2, d = qx.shape
        S = S2 // 2
        full = (S // K) * K
        x, ak = qx[:, S:], a[:, S:]
        s_last = s[K - 1]
        # dR = d loss / d base: the query outputs' gradient, then the keys' (filled by the scan)
        dR = torch.empty_like(qx)
        dR[:, :S] = 0 if dout is None else dout
        # gradient reaching lg directly: through the query outputs and the final weights
        dLG = torch.bmm(a[:, :S].transpose(1, 2), dR[:, :S]).neg_()
        t = None
        if full and (dW1 is not None or db1 is not None):
            t = _step_grad(x[:, :full], dW1, db1)
            dLG[:, :full] -= t * s_last
        # reverse scan: the keys of a mini-batch also feed the inner gradients of later ones
        dbt = torch.empty_like(bt)
        starts = list(range(0, S, K))
        for n in reversed(range(len(starts))):
            i = starts[n]
            e = min(S, i + K)
            z, g, zh, mean, rstd = saved[5 * n:5 * n + 5]
            dlg = dLG[:, i:e]
            if e < S:
                dlg = torch.baddbmm(dlg, ak[:, e:, i:e].transpose(1, 2), dR[:, S + e:], alpha=-1)
                dLG[:, i:e] = dlg
            ln_l2_vjp(dlg * lr[:, i:e, None], g, z, zh, mean, rstd, bt[:, i:e], gamma2,
                      out=(dR[:, S + i:S + e], dbt[:, i:e]))
        G, ZH = (torch.cat(saved[k::5], 1) for k in (1, 2))
        dlr = (dLG * G).sum(-1)
        dgamma2 = (dbt * ZH).sum(1, keepdim=True)
        dqx, dW, db, dm = dual_backward(dR, qx, W, LG, gram, mqk)
        ds = coefficient_basis(S, K, s.device, s.dtype).T @ dm.view(-1)
        if t is not None:
            if dW1 is not None:
                dqx[:, S:S + full] -= s_last * torch.bmm(LG[:, :full], dW1.transpose(1, 2))
            ds[K - 1] -= (t * LG[:, :full]).sum()
        if dW1 is not None:
            dW = dW + dW1
        if db1 is not None:
            db = db + db1
        return dqx, dbt, dlr, ds, dgamma2, dW, db, None


class MLPBlock(torch.autograd.Function):
    """One dual-form block of TTT-MLP, with a hand-written backward.

    As ``LinearBlock``, for ``f(x) = gelu(x W1 + b1) W2 + b2`` (W1 [N, d, h], W2 [N, h, d]).
    The first layer is in dual form across the block's mini-batches, the second layer's
    weights are carried explicitly through them (its input is only known in the scan); the
    queries read both layers in dual form from the block's starting weights.
    Returns the inner outputs and (W1, b1, W2, b2) after the block's full mini-batches.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, qx, bt, lr, s, gamma2, W1, b1, W2, b2, K: int):
        N, S2, d = qx.shape
        S = S2 // 2
        full = (S // K) * K
        x = qx[:, S:]
        s_last = s[K - 1]
        mqk = coefficient_masks(s, S, K)
        ext = cpu_kernels(qx)
        ctx.ext, ctx.K = ext, K
        ctx.set_materialize_grads(False)  # unused outputs (the weights after the block) come back as None
        if ext is not None:  # the same computation, one (sequence, head) at a time in cache: kernels.py
            args = [t.contiguous() for t in (qx, bt, lr, mqk, gamma2, W1, b1, W2, b2)]
            out, W1n, b1n, W2n, b2n, *saved = ext.mlp_forward(*args[:4], float(s_last), *args[4:], K, INNER_LN_EPS)
            ctx.save_for_backward(*args[:4], s, args[4], args[5], args[7], *saved)
            return out, W1n, b1n, W2n, b2n
        mq = mqk[:S]
        base = torch.baddbmm(b1, qx, W1)  # first layer at the block's start, [N, 2S, h]
        gram = torch.bmm(qx, x.transpose(1, 2))
        a = torch.addcmul(mqk, gram, mqk)
        LG1 = qx.new_empty(N, S, W1.shape[-1])
        LG2, X2 = torch.empty_like(bt), torch.empty_like(LG1)
        W2n, b2n = W2, b2
        saved = []  # per mini-batch: z1, z2, g2, zh, mean, rstd, hh, W2n (contiguous)
        for i in range(0, S, K):
            e = min(S, i + K)
            z1 = base[:, S + i:S + e]
            z1 = torch.baddbmm(z1, a[:, S + i:S + e, :i], LG1[:, :i], alpha=-1) if i else z1.contiguous()
            x2, dx2, sg = gelu(z1, with_grad=True)
            X2[:, i:e] = x2
            z2 = torch.baddbmm(b2n, x2, W2n)
            g2, zh, mean, rstd = ln_l2_forward(z2, gamma2, bt[:, i:e])
            hh = torch.bmm(g2, W2n.transpose(1, 2))  # g2 back through the second layer
            lr_n = lr[:, i:e, None]
            torch.mul(hh * dx2, lr_n, out=LG1[:, i:e])
            lg2 = g2 * lr_n
            LG2[:, i:e] = lg2
            saved.append((z1, sg, dx2, z2, g2, zh, mean, rstd, hh, W2n))
            if e - i == K:  # a full mini-batch moves the second layer
                step = lg2 * s_last
                W2n = torch.baddbmm(W2n, x2.transpose(1, 2), step, alpha=-1)
                b2n = b2n - step.sum(1, keepdim=True)
        z1q = torch.baddbmm(base[:, :S], a[:, :S], LG1, alpha=-1)
        if any(ctx.needs_input_grad):  # keep gelu'(z1q) rather than recompute it in the backward
            x2q, z1q, _ = gelu(z1q, with_grad=True)
        else:
            x2q = gelu(z1q)
        gram2 = torch.bmm(x2q, X2.transpose(1, 2))
        a2 = torch.addcmul(mq, gram2, mq)
        out = torch.baddbmm(torch.baddbmm(b2, x2q, W2), a2, LG2, alpha=-1)
        if full:
            step = LG1[:, :full] * s_last
            W1n = torch.baddbmm(W1, x[:, :full].transpose(1, 2), step, alpha=-1)
            b1n = b1 - step.sum(1, keepdim=True)
        else:
            W1n, b1n = W1.clone(), b1.clone()
        if W2n is W2:
            W2n, b2n = W2.clone(), b2.clone()
        ctx.K = K
        ctx.save_for_backward(qx, bt, lr, s, gamma2, W1, W2, LG1, LG2, X2, gram, a, mqk, z1q, x2q, gram2, a2,  # z1q: gelu'
                              *(t for blk in saved for t in blk))
        return out, W1n, b1n, W2n, b2n

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout, dW1e, db1e, dW2e, db2e):
        if ctx.ext is not None:
            qx, bt, lr, mqk, s, gamma2, W1, W2, *saved = ctx.saved_tensors
            dout = torch.zeros_like(bt) if dout is None else dout.contiguous()
            grads = ctx.ext.mlp_backward([dout, dW1e, db1e, dW2e, db2e], qx, bt, lr, mqk, float(s[ctx.K - 1]), gamma2,
                                         W1, W2, saved, ctx.K)
            return *grads, None
        qx, bt, lr, s, gamma2, W1, W2, LG1, LG2, X2, gram, a, mqk, dgelu_q, x2q, gram2, a2, *flat = ctx.saved_tensors
        saved = [flat[k:k + 10] for k in range(0, len(flat), 10)]
        K = ctx.K
        N, S2, d = qx.shape
        S = S2 // 2
        full = (S // K) * K
        x = qx[:, S:]
        s_last = s[K - 1]
        mq = mqk[:S]
        if dout is None:
            dout = torch.zeros_like(bt)
        # queries, second layer: out = x2q W2 + b2 - ((x2q X2^T + 1) * mq) @ LG2
        dx2q = torch.bmm(dout, W2.transpose(1, 2))
        dW2 = torch.bmm(x2q.transpose(1, 2), dout)
        db2 = dout.sum(1, keepdim=True)
        dLG2 = torch.bmm(a2.transpose(1, 2), dout).neg_()
        p2 = torch.bmm(dout, LG2.transpose(1, 2))
        dgram2 = p2 * mq
        dx2q = torch.baddbmm(dx2q, dgram2, X2, alpha=-1)
        dX2 = torch.bmm(dgram2.transpose(1, 2), x2q).neg_()  # keys' hidden activations
        dmq = torch.addcmul(p2, p2, gram2).sum(0).neg_()
        # queries, first layer: z1q = base_q - a_q @ LG1
        dz1q = dx2q.mul_(dgelu_q)
        dLG1 = torch.bmm(a[:, :S].transpose(1, 2), dz1q).neg_()
        ds_last = qx.new_zeros(())
        t1 = None
        if full and (dW1e is not None or db1e is not None):
            t1 = _step_grad(x[:, :full], dW1e, db1e)
            dLG1[:, :full] -= s_last * t1
            ds_last = ds_last - (t1 * LG1[:, :full]).sum()
        # reverse scan
        dW2c = dW2e.clone() if dW2e is not None else torch.zeros_like(W2)  # accumulated in place
        db2c = db2e.clone() if db2e is not None else torch.zeros_like(db2)
        dbase = qx.new_empty(N, S2, LG1.shape[-1])
        dbase[:, :S] = dz1q
        dbt = torch.empty_like(bt)
        dlr = torch.empty_like(lr)
        dgamma2 = torch.zeros_like(gamma2)
        for n, i in reversed(list(enumerate(range(0, S, K)))):
            e = min(S, i + K)
            z1, sg, d1, z2, g2, zh, mean, rstd, hh, W2n = saved[n]
            x2, lg2, lr_n = X2[:, i:e], LG2[:, i:e], lr[:, i:e, None]
            dx2, dlg2 = dX2[:, i:e], dLG2[:, i:e]
            if e - i == K:  # W2_{n+1} = W2_n - s x2^T lg2, b2_{n+1} = b2_n - s sum(lg2)
                dx2 = torch.baddbmm(dx2, lg2 * s_last, dW2c.transpose(1, 2), alpha=-1)
                t2 = torch.baddbmm(db2c, x2, dW2c)
                dlg2 = dlg2 - s_last * t2
                ds_last = ds_last - (t2 * lg2).sum()
            dlg1 = dLG1[:, i:e]
            if e < S:
                dlg1 = torch.baddbmm(dlg1, a[:, S + e:, i:e].transpose(1, 2), dbase[:, S + e:], alpha=-1)
            g1 = hh * d1
            dlr[:, i:e] = (dlg1 * g1).sum(-1) + (dlg2 * g2).sum(-1)
            dg1 = dlg1 * lr_n
            dhh = dg1 * d1
            dg2 = torch.baddbmm(dlg2 * lr_n, dhh, W2n)
            dW2c.baddbmm_(dhh.transpose(1, 2), g2)
            dz2, dbt_n = ln_l2_vjp(dg2, g2, z2, zh, mean, rstd, bt[:, i:e], gamma2)
            dbt[:, i:e] = dbt_n
            dgamma2 += (dbt_n * zh).sum(1, keepdim=True)
            dx2 = torch.baddbmm(dx2, dz2, W2n.transpose(1, 2))
            dW2c.baddbmm_(x2.transpose(1, 2), dz2)
            db2c += dz2.sum(1, keepdim=True)
            dbase[:, S + i:S + e] = torch.addcmul(dx2 * d1, dg1 * hh, gelu_second(z1, sg))
        dW2 = dW2 + dW2c
        db2 = db2 + db2c
        # first layer: base = qx W1 + b1, a = (gram + 1) * m used as - a @ LG1
        dqx, dW1, db1, dm = dual_backward(dbase, qx, W1, LG1, gram, mqk)
        dm[:S] += dmq
        ds = coefficient_basis(S, K, s.device, s.dtype).T @ dm.view(-1)
        if t1 is not None and dW1e is not None:
            dqx[:, S:S + full] -= s_last * torch.bmm(LG1[:, :full], dW1e.transpose(1, 2))
        ds[K - 1] += ds_last
        if dW1e is not None:
            dW1 = dW1 + dW1e
        if db1e is not None:
            db1 = db1 + db1e
        return dqx, dbt, dlr, ds, dgamma2, dW1, db1, dW2, db2, None


class QKV(torch.autograd.Function):
    """From the projection ``P`` [B, T, 3D + H] (XQ, XK, XV, then the per-head learning-rate
    logits) to what the dual form reads, in one pass each way: ``qx`` [B, H, 2, T, d] (RoPE'd
    queries then keys, contiguous), a copy of the queries ``q`` [B, H, T, d] (the layer's
    residual), the target ``tgt = XV - XK`` and the inner learning rates
    ``lr = scale * sigmoid(logit + lr_bias)`` [B, H, T]. ``rot`` [T, d / 2]: the complex
    rotation of each position. The backward writes the gradient straight into the
    projection's layout (autograd through the split, the transposes and the rotation makes
    three more copies of the projection and a concatenation)."""

    @staticmethod
    def forward(ctx, P, rot, lr_bias, H: int, scale: float):
        B, T, width = P.shape
        d = (width - H) // (3 * H)
        ctx.set_materialize_grads(False)
        ctx.ext = ext = cpu_kernels(P)
        ctx.scale, ctx.shape = scale, (B, T, H, d)
        if ext is not None:  # the same in one pass over the rows (glue.cpp)
            rot = torch.view_as_real(rot).to(P.dtype).contiguous()
            qx, q, tgt, lr, sig = ext.qkv_forward(P.contiguous(), rot, lr_bias.to(P.dtype).contiguous(), H, scale)
            ctx.save_for_backward(rot, sig)
            return qx, q, tgt, lr
        Pv = P[..., :3 * H * d].view(B, T, 3, H, d)
        src = Pv[:, :, :2].permute(0, 3, 2, 1, 4)  # [B, H, 2, T, d], strided
        qx = P.new_empty(B, H, 2, T, d)
        torch.mul(torch.view_as_complex(src.unflatten(-1, (d // 2, 2))), rot,
                  out=torch.view_as_complex(qx.view(B, H, 2, T, d // 2, 2)))
        tgt = torch.sub(Pv[:, :, 2].transpose(1, 2), qx[:, :, 1])
        sig = torch.sigmoid(P[..., 3 * H * d:] + lr_bias).transpose(1, 2)  # [B, H, T]
        ctx.save_for_backward(rot, sig)
        return qx, qx[:, :, 0].clone(), tgt, sig * scale

    @staticmethod
    def backward(ctx, dqx, dq, dtgt, dlr):
        rot, sig = ctx.saved_tensors
        if ctx.ext is not None:
            dP, dlr_bias = ctx.ext.qkv_backward(dqx, dq, dtgt, dlr, rot, sig, ctx.scale, ctx.shape[2])
            return dP, None, dlr_bias, None, None
        B, T, H, d = ctx.shape
        g = dqx.clone() if dqx is not None else sig.new_zeros(B, H, 2, T, d)
        if dq is not None:
            g[:, :, 0] += dq
        if dtgt is not None:
            g[:, :, 1] -= dtgt
        dP = g.new_empty(B, T, 3 * H * d + H)
        dPv = dP[..., :3 * H * d].view(B, T, 3, H, d)
        torch.mul(torch.view_as_complex(g.view(B, H, 2, T, d // 2, 2)), rot.conj(),
                  out=torch.view_as_complex(dPv[:, :, :2].permute(0, 3, 2, 1, 4).unflatten(-1, (d // 2, 2))))
        if dtgt is not None:
            dPv[:, :, 2].copy_(dtgt.transpose(1, 2))
        else:
            dPv[:, :, 2].zero_()
        dlogit = (sig * (1 - sig)).mul_(dlr * ctx.scale) if dlr is not None else torch.zeros_like(sig)
        dP[..., 3 * H * d:].copy_(dlogit.transpose(1, 2))
        return dP, None, dlogit.sum((0, 2)), None, None


class Readout(torch.autograd.Function):
    """The layer's output before the gate: ``post_norm(concat_heads(LN(z) * w + b + q))`` with
    the inner LayerNorm's per-head ``w``, ``b`` [H, 1, d] and the post-norm's ``pw``, ``pb``
    [D]; ``z``, ``q`` [B, H, T, d] -> [B, T, D]. One function so that the backward is two fused
    LayerNorm backwards and no copies (autograd adds a concatenation and two copies)."""

    @staticmethod
    def forward(ctx, z, q, w, b, pw, pb, eps: float, post_eps: float):
        B, H, T, d = z.shape
        ctx.ext = ext = cpu_kernels(z)
        if ext is not None:  # the same in one pass over the rows (glue.cpp)
            z, q, w, b, pw, pb = (t.contiguous() for t in (z, q, w, b, pw, pb))
            out, y, mean, rstd, pmean, prstd = ext.readout_forward(z, q, w, b, pw, pb, eps, post_eps)
            ctx.save_for_backward(z, w, pw, y, mean, rstd, pmean, prstd)
            return out
        zh, mean, rstd = torch.native_layer_norm(z, [d], None, None, eps)
        y = torch.empty(B, T, H, d, dtype=z.dtype, device=z.device)
        torch.add(torch.addcmul(b, zh, w), q, out=y.permute(0, 2, 1, 3))
        y = y.view(B, T, H * d)
        out, pmean, prstd = torch.native_layer_norm(y, [H * d], pw, pb, post_eps)
        ctx.save_for_backward(z, mean, rstd, zh, w, y, pmean, prstd, pw, pb)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.ext is not None:
            dz, dq, dw, db, dpw, dpb = ctx.ext.readout_backward(dout, *ctx.saved_tensors)
            return dz, dq, dw, db, dpw, dpb, None, None
        z, mean, rstd, zh, w, y, pmean, prstd, pw, pb = ctx.saved_tensors
        B, H, T, d = z.shape
        dy, dpw, dpb = torch.ops.aten.native_layer_norm_backward(
            dout.contiguous(), y, [H * d], pmean, prstd, pw, pb, [True, True, True])
        dq = dy.view(B, T, H, d).transpose(1, 2)  # [B, H, T, d] (strided)
        db = dq.sum((0, 2)).unsqueeze(1)
        dw = (dq * zh).sum((0, 2)).unsqueeze(1)
        dz = _ln_backward(dq * w, z, mean, rstd)
        return dz, dq, dw, db, dpw, dpb, None, None


class TTTLayer(nn.Module):
    def __init__(self, cfg: TTTConfig, size: dict):
        super().__init__()
        D, H = size["d_model"], size["n_heads"]
        if D % H:
            raise ValueError(f"d_model {D} is not divisible by n_heads {H}")
        self.H, self.d, self.K = H, D // H, cfg.mini_batch
        if self.d % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.d}")
        block = cfg.block if cfg.block is not None else min(64, max(cfg.mini_batch, D // H))
        self.block = -(-block // cfg.mini_batch) * cfg.mini_batch
        self.inner = cfg.inner
        self.base_lr = cfg.base_lr if cfg.base_lr is not None else (1.0 if cfg.inner == "linear" else 0.1)
        d = self.d
        # XQ, XK, XV and the per-head inner learning-rate gate x . w_h in one projection
        self.qkv = nn.Linear(D, 3 * D + H, bias=False)
        self.lr_bias = nn.Parameter(torch.zeros(H))
        self.o_proj = nn.Linear(D, D, bias=False)
        self.gate = nn.Linear(D, D, bias=False) if cfg.use_gate else None
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        angles = torch.arange(self.K, dtype=torch.float32)[:, None] * inv_freq  # positions mod K
        self.register_buffer("rope_rot", torch.polar(torch.ones_like(angles), angles), persistent=False)
        self.register_buffer("token_scale", 1.0 / torch.arange(1, self.K + 1, dtype=torch.float32), persistent=False)
        self.token_offset = nn.Parameter(torch.zeros(self.K))
        self.ln_weight = nn.Parameter(torch.ones(H, 1, d))
        self.ln_bias = nn.Parameter(torch.zeros(H, 1, d))
        if cfg.inner == "linear":
            self.W1 = nn.Parameter(torch.randn(H, d, d) * 0.02)
            self.b1 = nn.Parameter(torch.zeros(H, 1, d))
        else:
            h = cfg.mlp_expansion * d
            self.W1 = nn.Parameter(torch.randn(H, d, h) * 0.02)
            self.b1 = nn.Parameter(torch.zeros(H, 1, h))
            self.W2 = nn.Parameter(torch.randn(H, h, d) * 0.02)
            self.b2 = nn.Parameter(torch.zeros(H, 1, d))
        self.post_norm = nn.LayerNorm(D, eps=1e-6)

    def fast_names(self):
        return ("W1", "b1") if self.inner == "linear" else ("W1", "b1", "W2", "b2")

    def forward(self, x, state, pos: int):
        """x [B, T, D] (normalized) -> [B, T, D], the layer's new state."""
        B, T, D = x.shape
        H, d, K = self.H, self.d, self.K
        N = B * H
        idx = torch.arange(pos, pos + T, device=x.device) % K
        qk, q, tgt, lr = QKV.apply(self.qkv(x), self.rope_rot[idx], self.lr_bias, H, self.base_lr / d)
        k = qk[:, :, 1]
        p = pos % K  # tokens of the pending mini-batch already seen
        if state is None:
            fast = [getattr(self, n).expand(B, *getattr(self, n).shape) for n in self.fast_names()]
        else:
            fast = [state[n] for n in self.fast_names()]
            if p:
                k = torch.cat([state["k"], k], 2)
                tgt = torch.cat([state["tgt"], tgt], 2)
                lr = torch.cat([state["lr"], lr], 2)
        S = p + T
        fast = [w.reshape(N, *w.shape[2:]) for w in fast]
        bt = ((self.ln_bias - tgt) * self.ln_weight).reshape(N, S, d)
        lr_ = lr.reshape(N, S)
        gamma2 = (self.ln_weight * self.ln_weight).expand(B, H, 1, d).reshape(N, 1, d)
        s = torch.clamp_min(self.token_scale + self.token_offset, 0.0)
        if not p and S <= self.block:  # the common case: one block, queries then keys, no copy
            spans, qx = [(0, S)], [qk.reshape(N, 2 * S, d)]
        else:  # queries aligned with keys (pending rows are dropped), in blocks
            qs = F.pad(q, (0, 0, p, 0)).reshape(N, S, d)
            ks = k.reshape(N, S, d)
            spans = [(a, min(S, a + self.block)) for a in range(0, S, self.block)]
            qx = [torch.cat([qs[:, a:e], ks[:, a:e]], 1) for a, e in spans]
        block = LinearBlock if self.inner == "linear" else MLPBlock
        outs = []
        for (a, e), qx_blk in zip(spans, qx):
            if len(spans) > 1:
                z, *fast = block.apply(qx_blk, bt[:, a:e], lr_[:, a:e], s, gamma2, *fast, K)
            else:  # no slicing: even a full-range slice costs a zero-fill and a copy in the backward
                z, *fast = block.apply(qx_blk, bt, lr_, s, gamma2, *fast, K)
            outs.append(z)
        z = (torch.cat(outs, 1) if len(outs) > 1 else outs[0]).view(B, H, S, d)
        if p:
            z = z[:, :, p:]
        y = Readout.apply(z, q, self.ln_weight, self.ln_bias, self.post_norm.weight, self.post_norm.bias,
                          INNER_LN_EPS, self.post_norm.eps)
        if self.gate is not None:
            y = gelu(self.gate(x)) * y
        full = (S // K) * K
        new_state = {n: w.view(B, H, *w.shape[1:]) for n, w in zip(self.fast_names(), fast)}
        new_state.update(k=k[:, :, full:], tgt=tgt[:, :, full:], lr=lr[:, :, full:])
        return self.o_proj(y), new_state


class CausalConv(nn.Module):
    """RMSNorm then a causal depthwise conv; the state is the last ``kernel - 1`` normed inputs."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=True)
        self.kernel = kernel

    def forward(self, x, tail):
        h = self.norm(x)
        if tail is None:
            tail = h.new_zeros(h.shape[0], self.kernel - 1, h.shape[2])
        h = torch.cat([tail, h], 1)
        y = F.conv1d(h.transpose(1, 2), self.conv.weight, self.conv.bias, groups=h.shape[2])
        return y.transpose(1, 2), h[:, h.shape[1] - (self.kernel - 1):]


class Block(nn.Module):
    def __init__(self, cfg: TTTConfig, size: dict, layer: type | None = None):
        super().__init__()
        self.conv = CausalConv(size["d_model"], cfg.conv_kernel) if cfg.pre_conv else None
        self.seq_norm = RMSNorm(size["d_model"])
        self.ttt = (layer or TTTLayer)(cfg, size)
        self.ffn_norm = RMSNorm(size["d_model"])
        self.mlp = SwiGLU(size["d_model"], size["d_ff"])

    def forward(self, x, state, pos: int):
        tail = None
        if self.conv is not None:
            c, tail = self.conv(x, state["conv"] if state is not None else None)
            x = x + c
        h, state = self.ttt(self.seq_norm(x), state, pos)
        if tail is not None:
            state["conv"] = tail
        x = x + h
        x = x + self.mlp(self.ffn_norm(x))
        return x, state


class TTTLM(nn.Module):
    def __init__(self, cfg: TTTConfig, vocab_size: int):
        super().__init__()
        size = cfg.size()
        self.embed = nn.Embedding(vocab_size, size["d_model"])
        self.blocks = nn.ModuleList(Block(cfg, size) for _ in range(size["n_layers"]))
        self.norm = RMSNorm(size["d_model"])
        self.head = nn.Linear(size["d_model"], vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        init_weights(self)  # linear and embedding weights N(0, 0.02), as the reference

    def forward(self, input_ids: torch.Tensor, state=None):
        """``input_ids`` [B, T] -> logits [B, T, vocab], state {pos, layers}."""
        pos = state["pos"] if state is not None else 0
        layers = state["layers"] if state is not None else [None] * len(self.blocks)
        x = self.embed(input_ids)
        new_layers = []
        for block, st in zip(self.blocks, layers):
            x, st = block(x, st, pos)
            new_layers.append(st)
        return self.head(self.norm(x)), {"pos": pos + input_ids.shape[1], "layers": new_layers}


class TTT(Architecture):
    """TTT-Linear / TTT-MLP language model (dual form, exact streaming, trains with state passing)."""

    Config = TTTConfig
    version = "1"
    stateful = True
    train_state_passing = True
    grad_in_eval = False  # the inner gradients are closed-form

    def build(self, config: TTTConfig, ctx: BuildContext) -> TTTLM:
        return TTTLM(config, ctx.vocab_size)

    def param_groups(self, model, config: TTTConfig) -> list[ParamGroup]:
        """Weight decay on the projection, embedding, conv and initial fast-weight matrices;
        none on norms, biases, token scales (the per-head vectors are stored as [H, 1, d],
        which the harness's dim >= 2 rule would decay)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():  # the tied head is listed once
            leaf = name.rsplit(".", 1)[-1]
            (decay if leaf in ("weight", "W1", "W2") and "norm" not in name else no_decay).append(p)
        return [ParamGroup(decay, name="decay"), ParamGroup(no_decay, name="no_decay", weight_decay=0.0)]

    def flops_per_token(self, model: TTTLM, config: TTTConfig, seq_len: int) -> dict:
        """Analytic: the FLOP counter cannot see the compiled CPU kernels. ``inner_loop``: the
        dual-form blocks' products as the torch code computes them (the kernels skip some of
        the causal zeros, so they do a little less), blocks of ``block`` tokens (evaluation
        chunks that are multiples of it); ``rest``: projections, gate, conv, SwiGLU and head."""
        layer = model.blocks[0].ttt
        H, d, K = layer.H, layer.d, layer.K
        h = layer.W1.shape[-1]
        inner = 0
        for a in range(0, seq_len, layer.block):
            S = min(layer.block, seq_len - a)
            inner += H * block_flops(S, K, d, h, config.inner)
        return {"inner_loop": len(model.blocks) * inner / seq_len,
                "rest": float(rest_flops(config, model.head.weight.shape[0]))}


def block_flops(S: int, K: int, d: int, h: int, inner: str) -> int:
    """Matrix-multiply FLOPs of one head's dual-form block of S tokens (``LinearBlock`` /
    ``MLPBlock``'s torch code; the [2S x S] coefficient masks, a matrix-vector product per
    call, are not counted, as the FLOP counter does not count them)."""
    full = S // K * K
    sizes = [min(K, S - i) for i in range(0, S, K)]  # the mini-batches
    if inner == "linear":
        scan = sum(2 * k * i * K * d for i, k in enumerate(sizes))  # the keys read the earlier mini-batches' steps
        return 4 * S * d * d + 4 * S * S * d + scan + 2 * S * S * d + 2 * full * d * d
    scan = sum(2 * k * i * K * h + 4 * k * h * d + (2 * K * h * d if k == K else 0) for i, k in enumerate(sizes))
    return 4 * S * d * h + 4 * S * S * d + scan + 4 * S * S * h + 2 * S * h * d + 2 * S * S * d + 2 * full * d * h


def rest_flops(cfg: TTTConfig, vocab: int) -> int:
    """Per token, every product outside the inner loop: the projections, gate, conv, SwiGLU
    of each block, and the head."""
    size = cfg.size()
    D, H = size["d_model"], size["n_heads"]
    layer = 2 * D * (3 * D + H) + 2 * D * D + 6 * D * size["d_ff"]
    layer += 2 * D * D if cfg.use_gate else 0
    layer += 2 * D * cfg.conv_kernel if cfg.pre_conv else 0
    return size["n_layers"] * layer + 2 * D * vocab
