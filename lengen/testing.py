"""Helpers for testing lengen and plugins: tiny fake components.

``BigramLM`` is the smallest honest architecture (an embedding straight to logits); the
others are deliberately broken or unusual, to exercise the harness.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from lengen.api import ArchConfig, Architecture, BuildContext, Output, ParamGroup


class TinyConfig(ArchConfig):
    d_model: int = Field(16, gt=0)


class _Bigram(nn.Module):
    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, state=None):
        return self.out(self.embed(input_ids)), None


class BigramLM(Architecture):
    """Fake: predicts from the current token only (stateless)."""

    Config = TinyConfig

    def build(self, config, ctx: BuildContext):
        return _Bigram(ctx.vocab_size, config.d_model)


class _Decay(nn.Module):
    """h_t = a * h_{t-1} + (1 - a) * e(x_t); logits = out(h_t). State = h."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.logit_a = nn.Parameter(torch.zeros(d))
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, state=None):
        e = self.embed(input_ids)
        a = torch.sigmoid(self.logit_a)
        h = state if state is not None else torch.zeros_like(e[:, 0])
        hs = []
        for t in range(e.shape[1]):
            h = a * h + (1 - a) * e[:, t]
            hs.append(h)
        return self.out(torch.stack(hs, 1)), h


class DecayLM(Architecture):
    """Fake: an exponential-moving-average recurrent model (stateful, trains with state passing)."""

    Config = TinyConfig
    stateful = True
    train_state_passing = True

    def build(self, config, ctx: BuildContext):
        return _Decay(ctx.vocab_size, config.d_model)


class _TwoSpeed(_Bigram):
    def forward(self, input_ids, state=None):
        logits, _ = super().forward(input_ids)
        aux = (self.embed.weight ** 2).mean() * 1e-3
        return Output(logits, None, aux_losses={"l2": aux}, stats={"flops": torch.full(input_ids.shape, 2.0)})


class TwoSpeedLM(Architecture):
    """Fake: embedding updated every step, output layer every 4 steps at lr / 4; reports an
    auxiliary loss and a per-token statistic."""

    Config = TinyConfig

    def build(self, config, ctx: BuildContext):
        return _TwoSpeed(ctx.vocab_size, config.d_model)

    def param_groups(self, model, config):
        return [ParamGroup([model.embed.weight], name="fast"),
                ParamGroup(list(model.out.parameters()), name="slow", lr_scale=0.25, update_every=4)]


class _NaN(_Bigram):
    def forward(self, input_ids, state=None):
        logits, _ = super().forward(input_ids)
        return logits * float("nan"), None


class NaNLM(Architecture):
    """Fake: its outputs are NaN (a diverged model)."""

    Config = TinyConfig

    def build(self, config, ctx: BuildContext):
        return _NaN(ctx.vocab_size, config.d_model)


class _ContextLength(nn.Module):
    """Logit 0 = 0.01 x (tokens seen so far in the stream, the current one included)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, state=None):
        B, T = input_ids.shape
        seen = (state if state is not None else torch.zeros(B)) [:, None] + torch.arange(1, T + 1)[None, :]
        logits = torch.zeros(B, T, self.vocab)
        logits[..., 0] = 0.01 * seen + self.dummy
        return logits, seen[:, -1]


class ContextLengthLM(Architecture):
    """Fake: reports through its loss how much context each prediction saw. On a stream of
    token 0, NLL = log(1 + (V - 1) exp(-0.01 c)) for context c; :func:`context_from_nll`
    inverts it."""

    Config = TinyConfig
    stateful = True

    def build(self, config, ctx: BuildContext):
        return _ContextLength(ctx.vocab_size)


def context_from_nll(nll, vocab: int):
    """The context length a :class:`ContextLengthLM` prediction saw, from its NLL."""
    import numpy as np

    return np.rint(-100 * np.log(np.expm1(nll) / (vocab - 1))).astype(int)
