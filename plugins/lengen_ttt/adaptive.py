"""Adaptive TTT: how many inner gradient steps each mini-batch gets (after seed 004, "PonderTTT").

The layer is lengen's TTT layer (``model.py``: the same parameters, TTT-Linear or TTT-MLP),
run one mini-batch of K tokens at a time. For mini-batch b, starting from fast weights W_b:

- *read*: every token of b reads its output in the one-step dual form, exactly as in ``ttt``:
  token i reads ``W_b - s_i sum_{j <= i} lr_j grad_j(W_b)``;
- *update*: ``W_{b+1}`` is k_b gradient steps from W_b on b's inner loss, each step taking the
  gradients of all K tokens at the current iterate (``W - s_{K-1} sum_j lr_j grad_j(W)``,
  the same inner learning rates). k_b = 1 is ``ttt``'s update, so with every k = 1 the model
  is ``ttt``. Per-token k is not defined: in the dual form the tokens of a mini-batch share
  the weights they start from, so k is a property of the mini-batch.

k_b only changes what the tokens *after* b read, so it may depend on anything computed from
mini-batch b itself and the model stays causal. The update is applied lazily, when the
first token of b + 1 arrives (the last mini-batch of a stream is never updated: nothing
reads it). The policies that choose k_b from ``choices`` (default 1, 2, 4):

- ``fixed``: every mini-batch gets ``k``;
- ``adaptive``: a signal of mini-batch b against thresholds. ``inner_loss`` (default): the
  layer's own inner loss on b at W_b, already computed by the read (no extra products), so
  each layer chooses for itself while it runs over a whole call; ``entropy``: the mean
  predictive entropy of the model over b's tokens (the seed's signal: then the whole stack
  advances one mini-batch at a time, and k_b is shared by all layers). The thresholds are
  percentiles of the signal on calibration sequences from the training split, set by
  ``AdaptiveTTT.calibrate`` before evaluation and frozen, aiming at the target ``mix``;
- ``random``: k drawn at random with the mix the adaptive policy reached on the calibration
  split (the same mean k): the control that says whether the signal matters. The draw is a
  hash of the mini-batch's tokens, its index and the layer, so evaluation is deterministic
  and streams in chunks exactly;
- ``oracle``: hindsight, using the labels. When mini-batch b + 1 arrives, each choice of k_b
  is tried (all layers together) and the next-token loss of b + 1's predictions whose
  labels lie in b + 1 is measured; the benefit of the most steps over the fewest, against
  thresholds calibrated to the same mix, picks k_b. Its logits depend on the tokens of its
  own mini-batch: an upper bound, not a causal model. Its search (every choice's stack pass)
  is not counted in its FLOPs, only the k it picks.

Training draws k per mini-batch, stream and layer uniformly from ``choices`` (``train_k``), so
the model is at home with any k, and every policy is evaluated on those same weights
(``AdaptiveTTT.variants``). ``train_k = n`` trains a fixed-n model instead.

Per-token statistics (``Output.stats``): ``k``, the steps that produced the weights a token
reads (0 for the first mini-batch of a stream, which reads the initial weights), per layer
``k_l<i>`` and its signal ``signal_l<i>`` (``inner_loss``), ``signal`` (the mean over layers),
and ``inner_flops``, the inner loop's FLOPs charged to the token: its read, plus the update it
reads spread over its mini-batch. Each mini-batch's K tokens carry the same values.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from lengen.api import Architecture, BuildContext, Output, ParamGroup
from lengen.nn import RMSNorm, init_weights

from .model import INNER_LN_EPS, QKV, Block, Readout, TTTConfig, TTTLayer, gelu, rest_flops

EVALUATE = ("fixed-1", "fixed-2", "fixed-4", "adaptive", "random", "oracle")


class AdaptiveTTTConfig(TTTConfig):
    policy: Literal["fixed", "adaptive", "random", "oracle"] = Field(
        "adaptive", description="how evaluation chooses k (variants override it): fixed, adaptive, random, oracle")
    k: int = Field(1, ge=1, le=64, description="fixed policy: inner steps of every mini-batch")
    choices: tuple[int, ...] = Field((1, 2, 4), description="the inner steps a mini-batch can get, ascending")
    signal: Literal["inner_loss", "entropy"] = Field(
        "inner_loss", description="adaptive policy: the layer's inner loss on the mini-batch, or the model's "
                                  "predictive entropy over its tokens")
    mix: tuple[float, ...] = Field((0.3, 0.4, 0.3), description="target share of each choice (adaptive thresholds, "
                                                                "random draws, oracle thresholds)")
    curve: tuple[tuple[float, ...], ...] = Field(
        ((0.6, 0.3, 0.1), (0.1, 0.3, 0.6)),
        description="further target mixes at which the adaptive and random variants are also evaluated (the Pareto curve)")
    train_k: Literal["uniform"] | int = Field(
        "uniform", description="training: k drawn uniformly from choices per mini-batch, stream and layer, or a fixed k")
    evaluate: tuple[str, ...] = Field(
        EVALUATE, description="variants evaluated on the trained weights: fixed-<k>, adaptive, random, oracle "
                              "(adaptive and random also at each mix of curve); empty: the config's own policy")
    thresholds: tuple[tuple[float, ...], ...] | None = Field(
        None, description="explicit signal thresholds (one row for all layers, or one per layer); default: "
                          "calibrated before evaluation")
    calibration_rounds: int = Field(6, ge=1, le=20, description="most calibration passes that re-fit the "
                                                                "thresholds under the policy they give")
    seed: int = Field(0, ge=0, description="random policy: seed of the draws")

    @field_validator("block")
    @classmethod
    def _no_block(cls, v):
        if v is not None:
            raise ValueError("adaptive-ttt reads one mini-batch at a time; block does not apply")
        return v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v):
        if len(v) < 2 or any(c < 1 for c in v) or list(v) != sorted(set(v)):
            raise ValueError("choices must be at least two distinct step counts >= 1, ascending")
        return v

    @field_validator("train_k")
    @classmethod
    def _train_k(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("train_k must be 'uniform' or a number of steps >= 1")
        return v

    @field_validator("evaluate")
    @classmethod
    def _evaluate(cls, v):
        for name in v:
            if name not in ("adaptive", "random", "oracle") and not (
                    name.startswith("fixed-") and name[6:].isdigit() and int(name[6:]) >= 1):
                raise ValueError(f"unknown variant {name!r}: use fixed-<k>, adaptive, random or oracle")
        return v

    @model_validator(mode="after")
    def _mixes(self):
        for m in (self.mix, *self.curve):
            if len(m) != len(self.choices) or min(m) < 0 or abs(sum(m) - 1) > 1e-6:
                raise ValueError(f"a mix must give one share per choice {list(self.choices)}, each >= 0, summing "
                                 f"to 1: got {list(m)}")
        for row in self.thresholds or ():
            if len(row) != len(self.choices) - 1 or list(row) != sorted(row):
                raise ValueError(f"thresholds: each row needs {len(self.choices) - 1} ascending values")
        if self.thresholds is not None and len(self.thresholds) not in (1, self.size()["n_layers"]):
            raise ValueError("thresholds: give one row for all layers or one per layer")
        return self


def mix_label(mix) -> str:
    """``(0.3, 0.4, 0.3)`` -> ``"30-40-30"``."""
    return "-".join(f"{100 * m:g}" for m in mix)


# ---------------------------------------------------------------------------------------
# the inner model, one mini-batch at a time (fast weights flattened to N = batch x heads rows)


def inner_loss_grad(z, gamma, beta, target):
    """Per token: the gradient with respect to ``z`` of the inner loss
    ``0.5 || gamma * LN(z) + beta - target ||^2`` (LN over the last dim, no affine), and the loss."""
    zc = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + INNER_LN_EPS)
    zh = zc * rstd
    r = gamma * zh + beta - target
    gy = gamma * r
    g = rstd * (gy - gy.mean(-1, keepdim=True) - zh * (gy * zh).mean(-1, keepdim=True))
    return g, 0.5 * r.pow(2).sum(-1)


def key_gradients(fast, xk, tgt, lr, gamma, beta):
    """The keys' inner gradients at ``fast``, times their learning rates, with respect to the
    output of each layer of f (``lgs``); f's hidden activation of the keys (MLP, else None);
    each key's inner loss [N, S]."""
    if len(fast) == 2:
        W, b = fast
        g, loss = inner_loss_grad(torch.baddbmm(b, xk, W), gamma, beta, tgt)
        return [g * lr], None, loss
    W1, b1, W2, b2 = fast
    x2, dx2, _ = gelu(torch.baddbmm(b1, xk, W1), with_grad=True)
    g2, loss = inner_loss_grad(torch.baddbmm(b2, x2, W2), gamma, beta, tgt)
    g1 = torch.bmm(g2, W2.transpose(1, 2)) * dx2
    return [g1 * lr, g2 * lr], x2, loss


def inner_step(fast, xk, x2, lgs, s):
    """One gradient step of every layer of f: ``W - s x^T lg``, ``b - s sum_j lg_j``."""
    out = []
    for i, (x, lg) in enumerate(zip([xk] if x2 is None else [xk, x2], lgs)):
        W, b = fast[2 * i], fast[2 * i + 1]
        out += [W - s * torch.bmm(x.transpose(1, 2), lg), b - s * lg.sum(1, keepdim=True)]
    return out


def query_outputs(fast, xq, xk, x2, lgs, scale):
    """The dual form within one mini-batch: query t reads the start weights minus the steps of
    the keys j <= t, scaled by its token scale (``scale`` [T, S], zero for later keys)."""
    coef = (torch.bmm(xq, xk.transpose(1, 2)) + 1) * scale
    if len(fast) == 2:
        W, b = fast
        return torch.baddbmm(b, xq, W) - torch.bmm(coef, lgs[0])
    W1, b1, W2, b2 = fast
    x2q = gelu(torch.baddbmm(b1, xq, W1) - torch.bmm(coef, lgs[0]))
    coef2 = (torch.bmm(x2q, x2.transpose(1, 2)) + 1) * scale
    return torch.baddbmm(b2, x2q, W2) - torch.bmm(coef2, lgs[1])


class AdaptiveLayer(TTTLayer):
    """lengen's TTT layer (the same parameters) run one mini-batch at a time, with k-step updates.

    Its state: ``fast`` (the weights the current mini-batch reads, [B, H, ...]); ``k``, ``tgt``,
    ``lr``: keys, targets and learning rates of the current mini-batch's tokens so far (when a
    call ends inside it); ``done``: the last complete mini-batch, whose update waits for the
    next token, with its ``signal`` and, once decided, ``next_k``; ``read_k``, ``read_signal``:
    the steps and signal of the update that produced ``fast``; ``conv``: the conv's tail."""

    def fresh(self, B: int, device) -> dict:
        """The state at a stream's start: ``fast`` None stands for the learned initial weights."""
        return {"fast": None, "read_k": torch.zeros(B, dtype=torch.long, device=device),
                "read_signal": torch.zeros(B, device=device)}

    def fast_weights(self, st: dict, B: int) -> list:
        """The fast weights of ``st`` flattened to [B x heads, ...], in fp32."""
        if st["fast"] is None:
            return [getattr(self, n).float().repeat(B, 1, 1) for n in self.fast_names()]
        return [self.flat(w).float() for w in st["fast"]]

    def scales(self):
        return torch.clamp_min(self.token_scale + self.token_offset, 0.0)

    @staticmethod
    def flat(t):
        return t.reshape(-1, *t.shape[2:])

    def affine(self, B: int):
        return [self.flat(t.expand(B, self.H, 1, self.d)).float() for t in (self.ln_weight, self.ln_bias)]

    def forward(self, x, st: dict, pos: int, choose=None):
        """x [B, T, D] (normalized): tokens ``pos .. pos + T - 1``. ``choose(signal, b) -> k``
        decides the k of each mini-batch this call completes (b: its index in the stream); with
        None, the caller sets ``st["next_k"]``. Returns the output, the state, and per token the
        k and signal of the update it reads ([B, T]) with the decisions made ``[(signal, k)]``."""
        B, T, _ = x.shape
        H, d, K = self.H, self.d, self.K
        idx = torch.arange(pos, pos + T, device=x.device) % K
        qk, q, tgt, lr = QKV.apply(self.qkv(x), self.rope_rot[idx], self.lr_bias, H, self.base_lr / d)
        zs, ks, signals, decisions = [], [], [], []
        a = 0
        while a < T:  # one mini-batch (or the part of it in this call) at a time
            p = (pos + a) % K
            e = min(T, a + K - p)
            if p == 0 and "done" in st:  # a new mini-batch: the last one's update first
                st = self.update(st, st["next_k"])
            z, st = self.read(qk[:, :, :, a:e], tgt[:, :, a:e], lr[:, :, a:e], st, p)
            zs.append(z)
            ks.append(st["read_k"][:, None].expand(B, e - a))
            signals.append(st["read_signal"][:, None].expand(B, e - a))
            if p + e - a == K and choose is not None:  # complete: its k, applied when the next one starts
                st["next_k"] = choose(st["signal"], (pos + a) // K)
                decisions.append((st["signal"], st["next_k"]))
            a = e
        z = torch.cat(zs, 2) if len(zs) > 1 else zs[0]
        y = Readout.apply(z.to(q.dtype), q, self.ln_weight, self.ln_bias, self.post_norm.weight, self.post_norm.bias,
                          INNER_LN_EPS, self.post_norm.eps)
        if self.gate is not None:
            y = gelu(self.gate(x)) * y
        return self.o_proj(y), st, {"k": torch.cat(ks, 1), "signal": torch.cat(signals, 1), "decisions": decisions}

    def read(self, qk, tgt, lr, st: dict, p: int):
        """The dual-form read of T tokens inside one mini-batch, ``p`` of whose tokens came before
        (their keys are in the state): the inner outputs [B, H, T, d] and the state with these
        tokens' keys added (moved to ``done``, with the inner loss as ``signal``, when they
        complete the mini-batch)."""
        B, H, _, T, d = qk.shape
        xq, xk = qk[:, :, 0], qk[:, :, 1]
        if p:
            xk, tgt, lr = (torch.cat([st[n], t], 2) for n, t in (("k", xk), ("tgt", tgt), ("lr", lr)))
        S = p + T
        with torch.autocast(qk.device.type, enabled=False):  # the inner loop in fp32
            fast = self.fast_weights(st, B)
            xk_ = self.flat(xk).float()
            lgs, x2, loss = key_gradients(fast, xk_, self.flat(tgt).float(), self.flat(lr).float()[..., None],
                                          *self.affine(B))
            i = torch.arange(p, S, device=qk.device)
            scale = self.scales()[i, None] * (torch.arange(S, device=qk.device)[None, :] <= i[:, None])
            z = query_outputs(fast, self.flat(xq).float(), xk_, x2, lgs, scale)
        st = {n: v for n, v in st.items() if n not in ("k", "tgt", "lr")}
        if S < self.K:
            st.update(k=xk, tgt=tgt, lr=lr)
        else:  # complete: keep what its update needs (the first step's gradients are these)
            unflat = lambda t: t.view(B, H, *t.shape[1:])  # noqa: E731
            st["done"] = {"xk": xk, "tgt": tgt, "lr": lr, "lgs": [unflat(g) for g in lgs],
                          **({"x2": unflat(x2)} if x2 is not None else {})}
            st["signal"] = loss.view(B, H * S).mean(1) / d
        return z.view(B, H, T, d), st

    def first_step(self, st: dict) -> list:
        """The weights after one step on the finished mini-batch (its gradients are kept)."""
        done = st["done"]
        with torch.autocast(done["xk"].device.type, enabled=False):
            x2 = self.flat(done["x2"]) if "x2" in done else None
            fast = inner_step(self.fast_weights(st, done["xk"].shape[0]), self.flat(done["xk"]).float(), x2,
                              [self.flat(g) for g in done["lgs"]], self.scales()[-1])
        return [w.view(-1, self.H, *w.shape[1:]) for w in fast]

    def extra_step(self, fast: list, done: dict) -> list:
        """One more step from ``fast`` [B', H, ...] on the finished mini-batch ``done`` (its rows)."""
        B = fast[0].shape[0]
        with torch.autocast(fast[0].device.type, enabled=False):
            w = [self.flat(t) for t in fast]
            xk = self.flat(done["xk"]).float()
            lgs, x2, _ = key_gradients(w, xk, self.flat(done["tgt"]).float(),
                                       self.flat(done["lr"]).float()[..., None], *self.affine(B))
            fast = inner_step(w, xk, x2, lgs, self.scales()[-1])
        return [t.view(B, self.H, *t.shape[1:]) for t in fast]

    def update(self, st: dict, k) -> dict:
        """Apply the finished mini-batch's update with k [B] steps per stream."""
        fast = self.first_step(st)
        for j in range(2, int(k.max()) + 1):
            rows = (k >= j).nonzero()[:, 0]
            if len(rows) == len(k):
                fast = self.extra_step(fast, st["done"])
            else:
                sub = self.extra_step([w[rows] for w in fast], {n: st["done"][n][rows] for n in ("xk", "tgt", "lr")})
                fast = [w.index_copy(0, rows, s) for w, s in zip(fast, sub)]
        return self.applied(st, fast, k)

    @staticmethod
    def applied(st: dict, fast: list, k) -> dict:
        out = {n: v for n, v in st.items() if n not in ("done", "signal", "next_k")}
        out.update(fast=fast, read_k=k, read_signal=st["signal"])
        return out


class AdaptiveBlock(Block):
    """``model.Block`` with the adaptive layer (the same parameter names)."""

    def __init__(self, cfg: AdaptiveTTTConfig, size: dict):
        super().__init__(cfg, size, layer=AdaptiveLayer)

    def forward(self, x, st: dict, pos: int, choose=None):
        if self.conv is not None:
            c, tail = self.conv(x, st.get("conv"))
            x = x + c
        h, st, info = self.ttt(self.seq_norm(x), st, pos, choose)
        if self.conv is not None:
            st["conv"] = tail
        x = x + h
        return x + self.mlp(self.ffn_norm(x)), st, info


def _pick(trees, pick):
    """Row i of the result from ``trees[pick[i]]`` (nests of tuples, lists, dicts and tensors
    whose first dimension is the stream; other leaves are equal in every tree)."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(trees)[pick, torch.arange(len(pick), device=pick.device)]
    if isinstance(first, dict):
        return {n: _pick([t[n] for t in trees], pick) for n in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_pick(list(ts), pick) for ts in zip(*trees))
    return first


HASH_M = 2 ** 31 - 1


def _uniform(h, b: int, layer: int, seed: int):
    """A uniform number in [0, 1) per stream from its mini-batch hash ``h``, the mini-batch
    index, the layer and the seed (MINSTD steps with xor-shifts)."""
    v = (h + (b * 7919 + layer * 104729 + seed * 1299709 + 1)) % HASH_M
    for _ in range(4):
        v = (v * 48271) % HASH_M
        v = (v ^ (v >> 11)) % HASH_M
    return v.double() / HASH_M


class AdaptiveTTTLM(nn.Module):
    """``model.TTTLM`` (the same parameters) whose TTT layers choose each mini-batch's k.

    With a signal of the layer's own (``inner_loss``) each layer runs over the whole call,
    one mini-batch at a time inside it. The ``entropy`` signal and the ``oracle`` need the
    model's output for a mini-batch before any layer's update after it, so then the whole
    stack advances one mini-batch at a time (at evaluation; training draws k)."""

    def __init__(self, cfg: AdaptiveTTTConfig, vocab_size: int, window: int):
        super().__init__()
        size = cfg.size()
        self.cfg, self.window = cfg, window
        self.embed = nn.Embedding(vocab_size, size["d_model"])
        self.blocks = nn.ModuleList(AdaptiveBlock(cfg, size) for _ in range(size["n_layers"]))
        self.norm = RMSNorm(size["d_model"])
        self.head = nn.Linear(size["d_model"], vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        init_weights(self)
        self.K = cfg.mini_batch
        self.choices = torch.tensor(cfg.choices)
        # what evaluation needs and calibration sets: plain attributes, not weights or buffers
        self.policy = cfg.policy
        n = len(self.blocks)
        self.thresholds = torch.tensor(cfg.thresholds).expand(n, -1).clone() if cfg.thresholds else None
        self.draw_mix = torch.tensor(cfg.mix, dtype=torch.float64).expand(n, -1).clone()
        self.k_tally = None  # per mini-batch index: sum over evaluated streams of k per layer, and the count
        self.hash_coef = torch.tensor([(j + 1) * 2654435761 % (1 << 20) | 1 for j in range(self.K)])

    def forward(self, input_ids, state=None):
        """``input_ids`` [B, T] -> ``Output``: logits [B, T, vocab], the state, per-token stats."""
        B, T = input_ids.shape
        if state is None:
            state = {"pos": 0, "layers": [blk.ttt.fresh(B, input_ids.device) for blk in self.blocks],
                     "stream": {"entropy": torch.zeros(B, device=input_ids.device),
                                "hash": torch.zeros(B, dtype=torch.long, device=input_ids.device)}}
        pos, layers, stream = state["pos"], state["layers"], state["stream"]
        x = self.embed(input_ids)
        if not self.training and (self.cfg.signal == "entropy" or self.policy == "oracle"):
            logits, layers, stream, infos = self.forward_synchronous(x, input_ids, layers, stream, pos)
        else:
            hashes, stream = self.hashes(input_ids, stream, pos)
            logits, layers, infos = self.stack(x, layers, pos, hashes)
        stats = self.token_stats(infos, pos) if not self.training else {}
        decisions = [{"signal": torch.stack([d[0] for d in ds], 1).detach(), "k": torch.stack([d[1] for d in ds], 1)}
                     for ds in zip(*[info["decisions"] for info in infos])]
        return Output(logits, {"pos": pos + T, "layers": layers, "stream": stream}, stats=stats,
                      internals={"decisions": decisions})

    def forward_synchronous(self, x, ids, layers, stream, pos):
        """The whole stack one mini-batch at a time: each mini-batch's k is decided from the
        model's output over it (entropy), or from the next one's (oracle)."""
        B, T = ids.shape
        K = self.K
        logits, infos, a = [], [], 0
        while a < T:
            t0, p = pos + a, (pos + a) % K
            e = min(T, a + K - p)
            if p == 0 and "done" in layers[0] and self.policy == "oracle":
                out, layers, info = self.oracle_update(x[:, a:e], ids[:, a:e], layers, t0)
            else:
                out, layers, info = self.stack(x[:, a:e], layers, t0)
            hashes, stream = self.hashes(ids[:, a:e], stream, t0)
            if self.cfg.signal == "entropy":
                logp = F.log_softmax(out.float(), -1)
                stream = {**stream, "entropy": stream["entropy"] - (logp.exp() * logp).sum(-1).sum(1)}
            if p + e - a == K:  # complete: its k (the oracle's: when the next mini-batch arrives)
                if self.cfg.signal == "entropy":
                    layers = [{**st, "signal": stream["entropy"] / K} for st in layers]
                stream = {**stream, "entropy": torch.zeros_like(stream["entropy"])}
                if self.policy != "oracle":
                    layers = [dict(st) for st in layers]
                    for l, (st, inf) in enumerate(zip(layers, info)):
                        st["next_k"] = self.choose(st["signal"], t0 // K, l, hashes)
                        inf["decisions"] = inf["decisions"] + [(st["signal"], st["next_k"])]
            if self.policy == "oracle":  # the hindsight benefit behind the k each token reads
                for st, inf in zip(layers, info):
                    inf["benefit"] = st.get("read_benefit", torch.zeros(B, device=ids.device))[:, None].expand(B, e - a)
            logits.append(out)
            infos.append(info)
            a = e
        merged = [{"k": torch.cat([i[l]["k"] for i in infos], 1), "signal": torch.cat([i[l]["signal"] for i in infos], 1),
                   "decisions": [d for i in infos for d in i[l]["decisions"]],
                   **({"benefit": torch.cat([i[l]["benefit"] for i in infos], 1)} if self.policy == "oracle" else {})}
                  for l in range(len(self.blocks))]
        return torch.cat(logits, 1), layers, stream, merged

    def stack(self, x, layers, pos, hashes=None):
        """Every block over ``x``; with ``hashes``, each layer chooses its own k (as each of its
        mini-batches completes), else the caller decides them."""
        new, infos = [], []
        for l, (blk, st) in enumerate(zip(self.blocks, layers)):
            choose = None if hashes is None else (lambda signal, b, l=l: self.choose(signal, b, l, hashes))
            x, st, info = blk(x, st, pos, choose)
            new.append(st)
            infos.append(info)
        return self.head(self.norm(x)), new, infos

    def hashes(self, ids, stream, pos):
        """Each stream's running hash of its current mini-batch's tokens (random draws): ``{b:
        hash}`` for every mini-batch b these tokens complete, and the stream state after them."""
        h, out = stream["hash"], {}
        coef = self.hash_coef.to(ids.device)
        a, T = 0, ids.shape[1]
        while a < T:
            p = (pos + a) % self.K
            e = min(T, a + self.K - p)
            h = (h + ((ids[:, a:e] + 1) * coef[p:p + e - a]).sum(1)) % HASH_M
            if p + e - a == self.K:
                out[(pos + a) // self.K], h = h, torch.zeros_like(h)
            a = e
        return out, {**stream, "hash": h}

    def choose(self, signal, b: int, layer: int, hashes: dict):
        """k [B] of mini-batch b at ``layer``, from its ``signal`` [B] (not for the oracle)."""
        choices = self.choices.to(signal.device)
        B = signal.shape[0]
        if self.training:
            if self.cfg.train_k == "uniform":
                return choices[torch.randint(len(choices), (B,), device=signal.device)]
            return torch.full((B,), self.cfg.train_k, device=signal.device)
        if self.policy == "fixed":
            return torch.full((B,), self.cfg.k, device=signal.device)
        if self.policy == "adaptive":
            if self.thresholds is None:  # never calibrated: the middle choice
                return torch.full((B,), int(choices[len(choices) // 2]), device=signal.device)
            return choices[torch.bucketize(signal.contiguous(), self.thresholds[layer].to(signal), right=True)]
        # random, at the calibrated mix; with the entropy signal one k for all layers, as adaptive's
        u = _uniform(hashes[b], b, 0 if self.cfg.signal == "entropy" else layer, self.cfg.seed)
        return choices[torch.bucketize(u, self.draw_mix[layer].cumsum(0)[:-1].to(u.device), right=True)]

    def oracle_update(self, x, ids, layers, pos):
        """Hindsight: the finished mini-batch's update with each choice of k (all layers alike),
        each followed by this mini-batch's stack pass; the benefit of the most steps over the
        fewest on this mini-batch's next-token losses (labels inside it) picks k per stream."""
        B = ids.shape[0]
        fast = [blk.ttt.first_step(st) for blk, st in zip(self.blocks, layers)]
        steps, cands, losses = 1, [], []
        for c in self.cfg.choices:
            while steps < c:
                fast = [blk.ttt.extra_step(f, st["done"]) for blk, f, st in zip(self.blocks, fast, layers)]
                steps += 1
            k = torch.full((B,), c, dtype=torch.long, device=ids.device)
            out, new, info = self.stack(x, [blk.ttt.applied(st, f, k) for blk, f, st in zip(self.blocks, fast, layers)],
                                        pos)
            cands.append((out, new, info))
            if ids.shape[1] > 1:
                losses.append(F.cross_entropy(out[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").mean(1))
            else:
                losses.append(torch.zeros(B, device=ids.device))
        losses = torch.stack(losses, 1)
        benefit = losses[:, 0] - losses[:, -1]
        if self.thresholds is not None:
            pick = torch.bucketize(benefit.contiguous(), self.thresholds[0].to(benefit), right=True)
        else:  # never calibrated: the best choice
            pick = losses.argmin(1)
        out, layers, info = _pick(cands, pick)
        k = self.choices.to(ids.device)[pick]
        layers = [{**st, "read_benefit": benefit} for st in layers]
        for inf in info:
            inf["decisions"] = [(benefit, k)]
        return out, layers, info

    # -- what is recorded ---------------------------------------------------------------

    def token_stats(self, infos, pos: int) -> dict:
        """Per token [B, T]: ``k`` (mean over layers), ``signal``, ``inner_flops`` and, with a
        per-layer signal, ``k_l<i>`` and ``signal_l<i>``; ``benefit`` (oracle). Also tallies k
        by mini-batch index for ``flops_per_token``."""
        k = torch.stack([i["k"] for i in infos], 0).float()  # [layers, B, T]
        sig = torch.stack([i["signal"] for i in infos], 0).float()
        f = adaptive_inner_flops(self.cfg)
        steps = torch.where(k > 0, f["first"] + (k - 1) * f["extra"], 0.0) / self.K
        out = {"k": k.mean(0), "signal": sig.mean(0), "inner_flops": len(infos) * f["read"] + steps.sum(0)}
        if self.cfg.signal == "inner_loss":
            for l in range(len(infos)):
                out[f"k_l{l}"], out[f"signal_l{l}"] = k[l], sig[l]
        if "benefit" in infos[0]:
            out["benefit"] = infos[0]["benefit"]
        starts = [j for j in range(k.shape[2]) if (pos + j) % self.K == 0]
        if starts:
            self.tally([(pos + j) // self.K for j in starts], k[:, :, starts].sum(1).T.double().cpu().numpy(),
                       k.shape[1])
        return out

    def tally(self, index: list, k_sums, rows: int) -> None:
        """Add the k per layer summed over ``rows`` streams at mini-batch indices ``index``."""
        t = self.k_tally if self.k_tally is not None else {"sum": np.zeros((0, len(self.blocks))), "rows": np.zeros(0)}
        if max(index) >= len(t["rows"]):
            grow = max(index) + 1 - len(t["rows"])
            t = {"sum": np.concatenate([t["sum"], np.zeros((grow, len(self.blocks)))]),
                 "rows": np.concatenate([t["rows"], np.zeros(grow)])}
        t["sum"][index] += k_sums
        t["rows"][index] += rows
        self.k_tally = t


# ---------------------------------------------------------------------------------------
# FLOPs (matrix-multiply FLOPs, 2 per multiply-add, forward)


def adaptive_inner_flops(cfg: AdaptiveTTTConfig) -> dict:
    """Inner-loop FLOPs of one layer: ``read`` per token (aligned mini-batches), ``first`` step
    and each ``extra`` step per mini-batch, counted from the products in ``key_gradients``,
    ``query_outputs`` and ``inner_step``."""
    size = cfg.size()
    H = size["n_heads"]
    d = size["d_model"] // H
    K = cfg.mini_batch
    if cfg.inner == "linear":
        return {"read": H * (4 * d * d + 4 * K * d), "first": H * 2 * K * d * d, "extra": H * 4 * K * d * d}
    h = cfg.mlp_expansion * d
    return {"read": H * (10 * d * h + 4 * K * (d + h)), "first": H * 4 * K * d * h, "extra": H * 10 * K * d * h}


def expected_k(model: AdaptiveTTTLM) -> np.ndarray:
    """Per layer: the mean k the policy aims at (before any evaluation is tallied)."""
    cfg = model.cfg
    n = len(model.blocks)
    if model.policy == "fixed":
        return np.full(n, float(cfg.k))
    return (model.draw_mix.numpy() * np.asarray(cfg.choices, float)).sum(1)


# ---------------------------------------------------------------------------------------
# the architecture


class AdaptiveTTT(Architecture):
    """TTT-Linear / TTT-MLP whose mini-batches get k inner steps chosen by a policy."""

    Config = AdaptiveTTTConfig
    version = "1"
    stateful = True
    train_state_passing = True

    def build(self, config: AdaptiveTTTConfig, ctx: BuildContext) -> AdaptiveTTTLM:
        return AdaptiveTTTLM(config, ctx.vocab_size, ctx.window)

    def param_groups(self, model, config) -> list[ParamGroup]:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            (decay if leaf in ("weight", "W1", "W2") and "norm" not in name else no_decay).append(p)
        return [ParamGroup(decay, name="decay"), ParamGroup(no_decay, name="no_decay", weight_decay=0.0)]

    def variants(self, config: AdaptiveTTTConfig) -> dict[str, dict] | None:
        out = {}
        for name in config.evaluate:
            if name.startswith("fixed-"):
                out[name] = {"policy": "fixed", "k": int(name[6:])}
            elif name == "oracle":
                out[name] = {"policy": "oracle"}
            else:
                out[name] = {"policy": name}
                for mix in config.curve:
                    out[f"{name}-{mix_label(mix)}"] = {"policy": name, "mix": mix}
        return out or None

    def calibrate(self, model: AdaptiveTTTLM, config: AdaptiveTTTConfig, sequences, device) -> dict:
        """Thresholds: percentiles of the signal on the calibration sequences, re-fitted under
        the policy they give (``calibrate_thresholds``). The random policy draws at the mix the
        adaptive policy reached on the same sequences with the same weights (computed once and
        shared by the two variants)."""
        out = {"policy": model.policy, "sequences": int(sequences.shape[0])}
        if model.policy != "fixed" and config.thresholds is None:
            policy = model.policy
            model.policy = "oracle" if policy == "oracle" else "adaptive"
            key = (policy == "oracle", _digest(model, sequences), config.signal, tuple(config.mix),
                   config.calibration_rounds)
            cache = self.__dict__.setdefault("_calibrated", {})
            if key not in cache:
                cache[key] = calibrate_thresholds(model, sequences, device, config.mix, config.calibration_rounds)
            else:
                model.thresholds = torch.tensor(cache[key]["thresholds"])
            out.update(cache[key])
            if policy == "random":
                model.draw_mix = torch.tensor(out["mix"], dtype=torch.float64)
            model.policy = policy
        if model.policy == "random":
            out["draw_mix"] = model.draw_mix.tolist()
        model.k_tally = None  # evaluation's tally starts now
        return out

    def flops_per_token(self, model: AdaptiveTTTLM, config: AdaptiveTTTConfig, seq_len: int) -> dict:
        """``inner_read`` (the dual-form read), ``inner_steps`` (the updates at the k evaluation
        used at each mini-batch index, tallied from the model's per-token k; before any
        evaluation, the k the policy aims at), ``probe`` (the entropy signal's elementwise
        work, 5 per vocabulary entry, for the adaptive policy, the one that reads it), ``rest``."""
        flops = adaptive_inner_flops(config)
        n = len(model.blocks)
        K = config.mini_batch
        vocab = model.head.weight.shape[0]
        t = model.k_tally
        steps = 0.0
        for b in range(1, -(-seq_len // K)):  # mini-batch b's tokens read the update of b - 1
            if t is not None and b < len(t["rows"]) and t["rows"][b] > 0:
                k = t["sum"][b] / t["rows"][b]
            else:
                k = expected_k(model)
            steps += float(np.sum(flops["first"] + (k - 1) * flops["extra"]))
        parts = {"inner_read": float(n * flops["read"]), "inner_steps": steps / seq_len,
                 "rest": float(rest_flops(config, vocab))}
        if config.signal == "entropy" and model.policy == "adaptive":  # the other policies read no signal
            parts["probe"] = 5.0 * vocab
        return parts


def calibrate_thresholds(model: AdaptiveTTTLM, sequences, device, mix, rounds: int, tolerance: float = 0.01) -> dict:
    """Percentile thresholds of each layer's signal (the oracle's: its hindsight benefit) for
    the target ``mix``. The signals depend on the k chosen before them, so the first pass
    draws k at random with the target mix, and each later pass re-fits the thresholds under
    the policy they give, until every layer's mix is within ``tolerance`` of the target (or
    ``rounds`` re-fits). Returns the thresholds, the mix reached and every pass's mix."""
    policy, draw_mix = model.policy, model.draw_mix
    model.policy, model.draw_mix = "random", torch.tensor(mix, dtype=torch.float64).expand(len(model.blocks), -1)
    signal, _ = decisions(model, sequences, device)
    model.policy, model.draw_mix = policy, draw_mix
    history = []
    for _ in range(rounds):
        model.thresholds = torch.tensor(np.quantile(signal, np.cumsum(mix)[:-1], axis=0).T.copy(), dtype=torch.float32)
        signal, k = decisions(model, sequences, device)
        shares = np.stack([(k == c).mean(0) for c in model.cfg.choices], 1)  # [layers, choices]
        history.append(shares.round(4).tolist())
        if np.abs(shares - np.asarray(mix)).max() <= tolerance:
            break
    return {"signal": "benefit" if policy == "oracle" else model.cfg.signal, "target_mix": list(mix),
            "thresholds": model.thresholds.tolist(), "mix": shares.tolist(), "passes": history}


def _digest(model, sequences) -> str:
    """Identifies trained weights and calibration sequences (variants share both)."""
    import hashlib

    h = hashlib.sha1(np.ascontiguousarray(sequences).tobytes())
    for t in model.state_dict().values():
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def decisions(model: AdaptiveTTTLM, sequences, device, batch: int = 16):
    """Every decision the model makes on ``sequences`` [N, L + 1] fed as evaluation feeds them
    (chunks of W): signals and k, each [decisions, layers]."""
    model.eval()
    x = torch.as_tensor(np.asarray(sequences)[:, :-1], dtype=torch.long)
    signal, ks = [], []
    for r in range(0, len(x), batch):
        rows, state = x[r:r + batch].to(device), None
        for a in range(0, rows.shape[1], model.window):
            out = model(rows[:, a:a + model.window], state)
            state = out.state
            for dec in out.internals["decisions"]:
                signal.append(dec["signal"].double().cpu().numpy())
                ks.append(dec["k"].cpu().numpy())
    return np.concatenate(signal), np.concatenate(ks)
