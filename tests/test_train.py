"""The training loop: schedules, parameter groups, state passing, divergence."""

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from lengen.errors import ConfigError, TrainingDivergedError
from lengen.suites import TrainSpec
from lengen.testing import BigramLM, DecayLM, NaNLM, TinyConfig, TwoSpeedLM
from lengen.api import BuildContext
from lengen.train import WindowBatches, lr_factor, train

TOKENS = np.random.default_rng(0).integers(0, 20, 5000)


def spec(**kw):
    base = dict(steps=8, batch_size=4, lr=1e-2, warmup=2, min_lr_ratio=0.1)
    base.update(kw)
    return TrainSpec(**base)


def test_lr_schedule_warmup_then_cosine():
    s = spec(steps=100, warmup=10)
    f = [lr_factor(i, s) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_random_windows_are_deterministic():
    a = WindowBatches(TOKENS, 16, 4, seed=1, state_passing=False)
    b = WindowBatches(TOKENS, 16, 4, seed=1, state_passing=False)
    for _ in range(3):
        (x, _), (y, _) = a.next(), b.next()
        assert torch.equal(x, y) and x.shape == (4, 17)


def test_state_passing_lanes_walk_contiguously():
    w = WindowBatches(TOKENS, 16, 4, seed=0, state_passing=True)
    lane = len(TOKENS) // 4
    x0, reset0 = w.next()
    x1, reset1 = w.next()
    assert reset0 and not reset1
    for r in range(4):
        assert torch.equal(x0[r], torch.from_numpy(TOKENS[r * lane: r * lane + 17]))
        assert torch.equal(x1[r], torch.from_numpy(TOKENS[r * lane + 16: r * lane + 33]))
        assert x1[r, 0] == x0[r, -1]  # the next window continues where the last one ended


def test_window_longer_than_data():
    with pytest.raises(ConfigError, match="fewer than one window"):
        WindowBatches(TOKENS[:10], 16, 4, seed=0, state_passing=False)


def run(arch, s, **kw):
    torch.manual_seed(0)
    model = arch.build(TinyConfig(), BuildContext(vocab_size=20, window=16))
    res = train(model, arch, TinyConfig(), TOKENS, s, window=16, seed=0, accelerator=Accelerator(cpu=True), **kw)
    return model, res


def test_training_reduces_loss_and_reports():
    _, res = run(BigramLM(), spec(steps=60))
    assert res.losses[0]["loss"] > res.final_loss
    assert res.tokens == 60 * 4 * 16 and res.tokens_per_s > 0
    assert not res.state_passing


def test_update_every_applies_slow_group_on_schedule():
    arch = TwoSpeedLM()
    snapshots = []
    model_holder = {}

    def on_step(step, info):
        m = model_holder["m"]
        snapshots.append((m.embed.weight.detach().clone(), m.out.weight.detach().clone()))
        assert "l2" in info  # auxiliary loss reported apart

    torch.manual_seed(0)
    model = arch.build(TinyConfig(), BuildContext(vocab_size=20, window=16))
    model_holder["m"] = model
    before = model.out.weight.detach().clone()
    res = train(model, arch, TinyConfig(), TOKENS, spec(steps=8), window=16, seed=0,
                accelerator=Accelerator(cpu=True), on_step=on_step)
    outs = [before] + [s[1] for s in snapshots]
    changed = [not torch.equal(outs[i], outs[i + 1]) for i in range(8)]
    assert changed == [False, False, False, True, False, False, False, True]
    embeds = [s[0] for s in snapshots]
    assert all(not torch.equal(embeds[i], embeds[i + 1]) for i in range(7))
    assert {g["name"]: g["update_every"] for g in res.groups} == {"fast": 1, "slow": 4}
    assert "l2" in res.losses[0]


def test_state_passing_is_used_and_recorded():
    _, res = run(DecayLM(), spec(steps=4, state_passing=True))
    assert res.state_passing
    _, res = run(BigramLM(), spec(steps=2, state_passing=True))
    assert not res.state_passing  # the architecture does not support it


def test_nan_loss_is_a_clear_error():
    with pytest.raises(TrainingDivergedError, match=r"the loss became nan at step 1 .*lower train.lr"):
        run(NaNLM(), spec(steps=3), label="nan-arch")


def test_seeded_training_is_deterministic():
    m1, r1 = run(BigramLM(), spec(steps=5))
    m2, r2 = run(BigramLM(), spec(steps=5))
    assert r1.final_loss == r2.final_loss
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_state_passing_resets_at_document_starts():
    W, D = 8, 3 * 8 + 1  # documents of 1 + 3W tokens
    docs = np.concatenate([np.full(D, d) for d in range(10)])  # token value = document id
    starts = np.arange(10) * D
    w = WindowBatches(docs, W, 2, seed=0, state_passing=True, doc_starts=starts)
    assert w.policy == "reset"
    seen = []
    for step in range(6):
        x, reset = w.next()
        assert reset == (step % 3 == 0)
        assert all(len(set(row.tolist())) == 1 for row in x)  # a window never crosses documents
        seen.append(x[:, 0].tolist())
    assert seen[0] == seen[1] == seen[2] and seen[3] != seen[0]  # 3 windows per document, then the next


def test_state_passing_packed_when_documents_differ():
    starts = np.array([0, 100, 250, 1000])
    w = WindowBatches(TOKENS, 16, 2, seed=0, state_passing=True, doc_starts=starts)
    assert w.policy == "packed"
    with pytest.raises(ConfigError, match="doc_policy = 'reset' needs"):
        WindowBatches(TOKENS, 16, 2, seed=0, state_passing=True, doc_starts=starts, doc_policy="reset")


def test_slow_group_applies_the_sum_of_its_gradients_in_one_adam_step_at_its_lr(monkeypatch):
    """A group with update_every = 4: its parameters change exactly on steps 4 and 8, its
    own optimizer steps twice (floor(8 / 4)), each update is one Adam step on the sum of the
    4 per-step gradients, and every group's lr is exact."""
    import lengen.train as T

    seen = []  # at every optimizer step: ({param id: grad}, [(lr_scale, lr)], {param id: value before})

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            ps = [p for g in self.param_groups for p in g["params"]]
            seen.append(({id(p): p.grad.clone() for p in ps}, [(g["lr_scale"], g["lr"]) for g in self.param_groups],
                         {id(p): p.detach().clone() for p in ps}, self))
            return super().step(closure)

    monkeypatch.setattr(T, "adamw", lambda params, **kw: Recording(params, **kw))
    arch = TwoSpeedLM()
    torch.manual_seed(0)
    model = arch.build(TinyConfig(), BuildContext(vocab_size=20, window=16))
    w = model.out.weight
    per_step, values = [], [w.detach().clone()]
    w.register_hook(lambda g: per_step.append(g.clone()))  # the slow weight's gradient of every backward
    s = spec(steps=8, clip=0.0, warmup=2)
    res = train(model, arch, TinyConfig(), TOKENS, s, window=16, seed=0, accelerator=Accelerator(cpu=True),
                on_step=lambda step, info: values.append(w.detach().clone()))
    changed = [not torch.equal(values[i], values[i + 1]) for i in range(8)]
    assert changed == [False, False, False, True, False, False, False, True]
    slow = [x for x in seen if id(w) in x[0]]
    fast = [x for x in seen if id(model.embed.weight) in x[0]]
    assert len(fast) == 8 and len(slow) == 2 and len(per_step) == 8
    assert slow[0][3].state[w]["step"] == 2  # Adam's step count: floor(8 / 4)
    assert fast[0][3].state[model.embed.weight]["step"] == 8
    for k, (grads, lrs, before, _opt) in enumerate(slow):
        torch.testing.assert_close(grads[id(w)], torch.stack(per_step[4 * k:4 * k + 4]).sum(0))
        assert lrs == [(0.25, pytest.approx(s.lr * 0.25 * lr_factor(4 * k + 3, s)))]
    for step, (_grads, lrs, _before, _opt) in enumerate(fast):
        assert lrs == [(1.0, pytest.approx(s.lr * lr_factor(step, s)))]
    # the first slow update is exactly one Adam step on the summed gradient
    ref = before = slow[0][2][id(w)].clone().requires_grad_(True)
    adam = torch.optim.AdamW([ref], lr=s.lr * 0.25 * lr_factor(3, s), betas=tuple(s.betas), weight_decay=s.weight_decay)
    ref.grad = torch.stack(per_step[:4]).sum(0)
    adam.step()
    torch.testing.assert_close(values[4], before.detach())
    assert res.pending == []


def test_pending_accumulation_at_the_end_is_reported():
    with pytest.warns(UserWarning, match=r"unapplied summed gradients of slow \(2 of 4 steps\)"):
        _, res = run(TwoSpeedLM(), spec(steps=10))
    assert res.pending == [{"group": "slow", "update_every": 4, "pending_steps": 2}]


def test_param_groups_must_cover_every_parameter_once():
    from lengen.api import ParamGroup

    class Partial(TwoSpeedLM):
        def param_groups(self, model, config):
            return [ParamGroup([model.embed.weight]), ParamGroup([model.embed.weight, model.out.weight])]

    with pytest.raises(ConfigError, match=r"param_groups must hold every trainable parameter exactly once, but they "
                                          r"leave out out.bias; list embed.weight more than once"):
        run(Partial(), spec(steps=1), label="partial seed 0")


def test_training_losses_get_the_targets_and_logs_stay_out_of_the_loss():
    """An architecture's training_losses sees the targets and the per-token NLL (with its
    graph); what it returns is added to the loss and logged; Output.logs are only logged."""
    from lengen.api import Output

    seen = {}

    class Surprised(BigramLM):
        def build(self, config, ctx):
            model = super().build(config, ctx)
            inner = model.forward

            def forward(input_ids, state=None):
                logits, _ = inner(input_ids)
                return Output(logits, None, logs={"logit_norm": logits.detach().norm()}, internals={"logits": logits})
            model.forward = forward
            return model

        def training_losses(self, model, output, targets, token_nll):
            g, = torch.autograd.grad(token_nll.sum(), output.internals["logits"], retain_graph=True)
            seen.update(targets=targets.shape, nll=token_nll.shape, requires_grad=g.requires_grad)
            return {"surprise": 0.1 * (output.internals["logits"] - g).pow(2).mean()}

    class Logged(Surprised):
        def training_losses(self, model, output, targets, token_nll):
            return {}

    _, res = run(Surprised(), spec(steps=3))
    assert seen == {"targets": (4, 16), "nll": (4, 16), "requires_grad": False}  # no second-order graph
    first = res.losses[0]
    assert first["surprise"] > 0 and first["logit_norm"] > 0 and "grad_norm.decay" in first
    _, logged = run(Logged(), spec(steps=3))
    _, plain = run(BigramLM(), spec(steps=3))
    # a logged value is not part of the loss: with only the log, training is the plain model's
    assert [x["loss"] for x in logged.losses] == [x["loss"] for x in plain.losses]
    # the auxiliary loss is: it changes what the model learns
    assert res.losses[-1]["loss"] != plain.losses[-1]["loss"]
