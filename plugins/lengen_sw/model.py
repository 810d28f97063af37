"""Sliding-window attention transformer.

A decoder-only transformer (pre-norm RMSNorm, RoPE, SwiGLU, tied embeddings, no dropout)
whose causal attention sees only the last ``window`` tokens, the current one included, as in
Longformer's local attention or Mistral. No attention-sink tokens are kept.

At training length L = W this is ordinary causal attention. Longer inputs are processed in
query blocks of W tokens, each attending to the keys of its own and the previous block
under a band mask, so a pass over L tokens costs O(L x W) time and never builds an L x L
matrix. The state is a rolling cache of the last W - 1 keys and values of every layer plus
the absolute position, so feeding a stream in chunks of any size gives the same logits as
one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lengen.api import ArchConfig, Architecture, BuildContext
from lengen.nn import RMSNorm, Rotary, SwiGLU, init_weights, scale_residual_projections, swiglu_hidden


class SWConfig(ArchConfig):
    d_model: int = Field(128, gt=0, description="hidden size")
    n_layers: int = Field(2, gt=0, description="transformer blocks")
    n_heads: int = Field(4, gt=0, description="attention heads")
    d_ff: int | None = Field(None, gt=0, description="SwiGLU hidden size (default 8/3 x d_model)")
    window: int | None = Field(None, gt=0, description="attention window (default: the benchmark's W)")
    rope_base: float = Field(10000.0, gt=0)


def band_mask(n_query: int, n_key: int, offset: int, window: int, device=None) -> torch.Tensor:
    """Boolean mask ``[n_query, n_key]``: query ``i`` (absolute ``offset + i`` in key
    coordinates) may see key ``j`` iff ``0 <= offset + i - j < window``."""
    q = torch.arange(n_query, device=device)[:, None] + offset
    k = torch.arange(n_key, device=device)[None, :]
    return (q - k >= 0) & (q - k < window)


class Attention(nn.Module):
    def __init__(self, cfg: SWConfig, window: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.window = window
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk, v = qkv.split([2, 1])  # (split, not indexing: its backward is one concatenation)
        q, k = Rotary.apply(qk, cos, sin)  # queries and keys rotated in one go
        v = v.squeeze(0)
        if cache is not None:  # keys/values of up to W - 1 earlier tokens
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        past = k.shape[2] - T
        W = self.window
        if past == 0 and T <= W:  # training at L = W: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T <= W:  # a short chunk after cached keys: one band-masked block
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, past + T, past, W, q.device))
        else:
            y = self._blocked(q, k, v, past)
        new_cache = (k[:, :, -(W - 1):], v[:, :, -(W - 1):]) if W > 1 else (k[:, :, :0], v[:, :, :0])
        return self.proj(y.transpose(1, 2).reshape(B, T, D)), new_cache

    def _blocked(self, q, k, v, past):
        """Local attention in query blocks of W: block b sees keys [start - W, start + W)."""
        B, H, T, hd = q.shape
        W = self.window
        nb = -(-T // W)
        pad_q = nb * W - T
        if pad_q:
            q = F.pad(q, (0, 0, 0, pad_q))
        # key buffer indexed so that block b's keys are kp[past + bW : past + bW + 2W]
        kp = F.pad(k, (0, 0, W, pad_q))
        vp = F.pad(v, (0, 0, W, pad_q))
        kb = kp[:, :, past:].unfold(2, 2 * W, W)[:, :, :nb].transpose(-1, -2)  # [B,H,nb,2W,hd]
        vb = vp[:, :, past:].unfold(2, 2 * W, W)[:, :, :nb].transpose(-1, -2)
        qb = q.view(B, H, nb, W, hd)
        mask = band_mask(W, 2 * W, W, W, device=q.device).expand(nb, W, 2 * W).clone()
        # keys left of the real sequence (the W padding slots) are invisible
        key_index = torch.arange(nb, device=q.device)[:, None] * W + past + torch.arange(2 * W, device=q.device)
        mask &= (key_index >= W)[:, None, :]
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        return y.reshape(B, H, nb * W, hd)[:, :, :T]


class Block(nn.Module):
    def __init__(self, cfg: SWConfig, window: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, window)
        self.norm2 = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff or swiglu_hidden(cfg.d_model))

    def forward(self, x, cos, sin, cache):
        a, cache = self.attn(self.norm1(x), cos, sin, cache)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, cache


class SlidingWindowLM(nn.Module):
    def __init__(self, cfg: SWConfig, vocab_size: int, window: int):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        self.window = window
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg, window) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        init_weights(self)
        scale_residual_projections(self, ("attn.proj.weight", "mlp.down.weight"), cfg.n_layers)

    def forward(self, input_ids: torch.Tensor, state=None):
        """``input_ids`` [B, T] -> logits [B, T, vocab], state {pos, caches}."""
        pos = state["pos"] if state is not None else 0
        caches = state["kv"] if state is not None else [None] * len(self.blocks)
        T = input_ids.shape[1]
        cos, sin = self.rotary.cos_sin(torch.arange(pos, pos + T, device=input_ids.device))
        x = self.embed(input_ids)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block(x, cos, sin, cache)
            new_caches.append(cache)
        logits = self.head(self.norm(x))
        return logits, {"pos": pos + T, "kv": new_caches}


class SlidingWindow(Architecture):
    """Sliding-window attention transformer (RoPE, SwiGLU), O(L x W) at any length."""

    Config = SWConfig
    version = "1"
    stateful = True  # the rolling KV cache: streaming in chunks equals one pass

    def build(self, config: SWConfig, ctx: BuildContext) -> SlidingWindowLM:
        return SlidingWindowLM(config, ctx.vocab_size, config.window or ctx.window)
