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


class SharpConfig(TinyConfig):
    sharpness: float = Field(1.0, gt=0, description="logits are multiplied by this at evaluation only")
    sharpnesses: list[float] = Field([], description="evaluate the trained weights at each of these")


class _Sharp(_Bigram):
    def __init__(self, vocab: int, d: int, sharpness: float):
        super().__init__(vocab, d)
        self.sharpness, self.offset = sharpness, 0.0

    def forward(self, input_ids, state=None):
        logits, _ = super().forward(input_ids)
        if not self.training:
            logits = logits * self.sharpness + self.offset
        return Output(logits, None, stats={"sharpness": torch.full(input_ids.shape, self.sharpness)})


class SharpLM(Architecture):
    """Fake: a bigram model evaluated at several logit sharpnesses (variants of one training,
    each calibrated on training-split sequences)."""

    Config = SharpConfig

    def build(self, config, ctx: BuildContext):
        return _Sharp(ctx.vocab_size, config.d_model, config.sharpness)

    def variants(self, config):
        return {f"x{s:g}": {"sharpness": s} for s in config.sharpnesses} or None

    def calibrate(self, model, config, sequences, device):
        model.offset = 0.0  # something evaluation needs, set from data it never sees
        return {"sequences": int(sequences.shape[0]), "length": int(sequences.shape[1]),
                "mean_token": float(sequences.mean())}


class SlowDecayLM(DecayLM):
    """Fake: the stateful DecayLM (trains with state passing) whose output layer is a slow
    group (every 4 steps, lr / 4): resume and data-parallel tests cover both at once."""

    def param_groups(self, model, config):
        return [ParamGroup([model.embed.weight, model.logit_a], name="fast"),
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


# ---------------------------------------------------------------------------------------
# deliberately broken architectures (the conformance kit must catch each)


class _Leaky(_Bigram):
    """Adds the embedding of the NEXT token: a perfect-looking cheat."""

    def forward(self, input_ids, state=None):
        e = self.embed(input_ids)
        nxt = torch.cat([e[:, 1:], torch.zeros_like(e[:, :1])], 1)
        return self.out(e + nxt), None


class LeakyLM(Architecture):
    """Broken: peeks at token t + 1."""

    Config = TinyConfig

    def build(self, config, ctx: BuildContext):
        return _Leaky(ctx.vocab_size, config.d_model)


class _Forgetful(_Decay):
    """Returns a state that loses the running average: streaming differs from one pass."""

    def forward(self, input_ids, state=None):
        logits, h = super().forward(input_ids, state)
        return logits, torch.zeros_like(h)


class ForgetfulLM(DecayLM):
    """Broken: stateful, but its state does not carry the context."""

    def build(self, config, ctx: BuildContext):
        return _Forgetful(ctx.vocab_size, config.d_model)


class _Buffered(_Decay):
    """Keeps its running average in a registered buffer instead of returning it."""

    def __init__(self, vocab: int, d: int):
        super().__init__(vocab, d)
        self.register_buffer("h", torch.zeros(d))

    def forward(self, input_ids, state=None):
        logits, h = super().forward(input_ids, self.h.expand(input_ids.shape[0], -1))
        self.h.copy_(h.detach().mean(0))
        return logits, None


class BufferedLM(DecayLM):
    """Broken: carries its state in a registered buffer."""

    def build(self, config, ctx: BuildContext):
        return _Buffered(ctx.vocab_size, config.d_model)


class _Noisy(_Bigram):
    def forward(self, input_ids, state=None):
        logits, _ = super().forward(input_ids)
        return logits + 0.01 * torch.randn_like(logits), None


class NoisyLM(Architecture):
    """Broken: random noise in the forward pass (non-deterministic)."""

    Config = TinyConfig

    def build(self, config, ctx: BuildContext):
        return _Noisy(ctx.vocab_size, config.d_model)


# ---------------------------------------------------------------------------------------
# contract classes for a plugin's own test suite


class ArchitectureContract:
    """Subclass in your tests (name the subclass ``Test...``) and set ``arch`` and
    ``config``; pytest then runs every conformance check as a test::

        class TestMyArch(ArchitectureContract):
            arch = MyArch()
            config = {"d_model": 32}
    """

    arch: Architecture = None
    config: dict = {}
    window: int = 16
    vocab_size: int = 64

    def subject(self):
        from lengen.checks import ArchSubject

        if self.arch is None:
            raise AssertionError("set `arch = YourArchitecture()` on the contract subclass")
        arch = self.arch() if isinstance(self.arch, type) else self.arch
        return ArchSubject(arch, arch.Config(**self.config), window=self.window, vocab_size=self.vocab_size)

    def _check(self, name):
        import pytest

        from lengen.checks import check_architecture

        (res,) = check_architecture(self.subject(), only=[name])
        if res.passed is None:
            pytest.skip(res.reason)
        assert res.passed, f"{name}: {res.reason}"

    def test_output_shape(self):
        self._check("output shape")

    def test_causality(self):
        self._check("causality")

    def test_state_equivalence(self):
        self._check("state equivalence")

    def test_window_equivalence(self):
        self._check("window equivalence")

    def test_determinism(self):
        self._check("determinism")

    def test_finite_at_20W(self):
        self._check("finite at 20 x W")

    def test_state_not_in_buffers(self):
        self._check("state not in buffers")

    def test_config_rejects_unknown_keys(self):
        self._check("config rejects unknown keys")


class DatasetContract:
    """Subclass with ``dataset`` and ``config`` (and optionally ``data_dir``)."""

    dataset = None
    config: dict = {}
    window: int = 16
    eval_length: int = 64
    data_dir = None

    def _results(self, tmp_path):
        from lengen.api import DataContext
        from lengen.checks import check_dataset

        ds = self.dataset() if isinstance(self.dataset, type) else self.dataset
        ctx = DataContext(seed=0, window=self.window, eval_length=self.eval_length, eval_sequences=4,
                          train_tokens=20 * self.window, cache_dir=tmp_path, data_dir=self.data_dir)
        return check_dataset(ds, ds.Config(**self.config), ctx)

    def test_dataset_checks(self, tmp_path):
        for res in self._results(tmp_path):
            assert res.passed is not False, f"{res.name}: {res.reason}"


class MetricContract:
    """Subclass with ``metric`` (and optionally ``config``)."""

    metric = None
    config: dict = {}

    def test_metric_checks(self):
        from lengen.checks import check_metric

        m = self.metric() if isinstance(self.metric, type) else self.metric
        for res in check_metric(m, m.Config(**self.config)):
            assert res.passed is not False, f"{res.name}: {res.reason}"
