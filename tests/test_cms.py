"""The nested CMS-LSTM plugin: shapes, the level schedule through the harness, the surprise
term, state passing, the seed's grouping; and the bpc metric."""

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import lengen.train as T
from lengen.api import BuildContext, MetricContext, Scores
from lengen.suites import TrainSpec
from lengen.testing import ArchitectureContract
from lengen_cms.model import CMS, CMSConfig

V, W = 29, 8
TOKENS = np.random.default_rng(0).integers(0, V, 4000)
SMALL = dict(d_model=12, hidden=16, d_ff=24)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and immune to a busy machine (two threads that wait
    on each other take 100x longer when other processes hold the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(seed=0, **cfg):
    config = CMSConfig(**{**SMALL, **cfg})
    torch.manual_seed(seed)
    return CMS().build(config, BuildContext(vocab_size=V, window=W)), config


def spec(**kw):
    base = dict(steps=8, batch_size=3, lr=1e-2, warmup=2, min_lr_ratio=0.1, clip=0.0, state_passing=True,
                doc_policy="packed")
    base.update(kw)
    return TrainSpec(**base)


def train(model, config, s, **kw):
    return T.train(model, CMS(), config, TOKENS, s, window=W, seed=0, accelerator=Accelerator(cpu=True), **kw)


class TestCMSContract(ArchitectureContract):
    """Causality, streaming in chunks == one pass, state not in buffers, ... (lengen check)."""

    arch = CMS()
    config = SMALL


def test_seed_preset_has_the_seeds_parameter_count():
    model = CMS().build(CMSConfig(preset="seed"), BuildContext(vocab_size=283, window=512))
    assert T.count_params(model) == 1_197_339
    assert [sum(p.numel() for p in level) for level in model.levels()] == [72448 + 526336 + 72731, 262912, 262912]


def test_registered_ablations_differ_only_in_their_defaults():
    from lengen.plugins import PluginHost

    archs = PluginHost().architectures
    assert archs.get("cms-lstm").defaults == {}
    assert archs.get("cms-lstm-flat").defaults == {"periods": [1, 1, 1]}
    assert archs.get("cms-lstm-nosurprise").defaults == {"surprise": "off"}
    flat = CMS().param_groups(*build(periods=[1, 1, 1]))
    assert {(g.update_every, g.lr_scale) for g in flat} == {(1, 1.0)}


def recording_adamw(monkeypatch):
    seen = []  # per optimizer step: (optimizer, {param id: grad}, [(name, lr)], {param id: value before})

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            ps = [p for g in self.param_groups for p in g["params"]]
            seen.append((self, {id(p): p.grad.clone() for p in ps}, [(g["name"], g["lr"]) for g in self.param_groups],
                         {id(p): p.detach().clone() for p in ps}))
            return super().step(closure)

    monkeypatch.setattr(T, "adamw", lambda params, **kw: Recording(params, **kw))
    return seen


def test_levels_change_exactly_on_their_steps_and_adam_counts_floor_t_over_period(monkeypatch):
    seen = recording_adamw(monkeypatch)
    model, config = build(periods=[1, 3, 8])
    levels = model.levels()
    snaps = [[torch.cat([p.detach().flatten() for p in lv]) for lv in levels]]
    with pytest.warns(UserWarning, match=r"level3 \(4 of 8 steps\)"):
        res = train(model, config, spec(steps=20),
                    on_step=lambda step, info: snaps.append([torch.cat([p.detach().flatten() for p in lv])
                                                             for lv in levels]))
    for l, period in enumerate(config.periods):
        changed = [t for t in range(1, 21) if not torch.equal(snaps[t - 1][l], snaps[t][l])]
        assert changed == [t for t in range(1, 21) if t % period == 0], f"level {l + 1}"
        opt = next(x[0] for x in seen if id(levels[l][0]) in x[1])
        assert {int(opt.state[p]["step"]) for p in levels[l]} == {20 // period}
    assert res.pending == [{"group": g, "update_every": 3, "pending_steps": 2} for g in ("level2", "level2.bias")] \
        + [{"group": g, "update_every": 8, "pending_steps": 4} for g in ("level3", "level3.bias")]


def test_level2_update_is_one_adam_step_on_the_sum_of_16_gradients_and_every_lr_is_exact(monkeypatch):
    seen = recording_adamw(monkeypatch)
    model, config = build(periods=[1, 16, 256])
    w = model.ffns[0].up.weight
    per_step, values = [], [w.detach().clone()]
    w.register_hook(lambda g: per_step.append(g.clone()))  # every backward's gradient (LM + surprise)
    s = spec(steps=16, warmup=4)
    with pytest.warns(UserWarning, match="level3"):
        res = train(model, config, s, on_step=lambda step, info: values.append(w.detach().clone()))
    assert len(per_step) == 16 and all(torch.equal(values[0], v) for v in values[:16])
    (opt, grads, lrs, before), = [x for x in seen if id(w) in x[1]]
    torch.testing.assert_close(grads[id(w)], torch.stack(per_step).sum(0))
    assert opt.state[w]["step"] == 1
    ref = before[id(w)].clone().requires_grad_(True)
    adam = torch.optim.AdamW([ref], lr=s.lr / 16 * T.lr_factor(15, s), betas=tuple(s.betas),
                             weight_decay=s.weight_decay)
    ref.grad = torch.stack(per_step).sum(0)
    adam.step()
    torch.testing.assert_close(values[16], ref.detach())
    # every group's lr at every one of its steps: lr x 1 / period x the schedule's factor
    steps_of = {}
    for _opt, _g, group_lrs, _b in seen:
        for name, lr in group_lrs:
            steps_of.setdefault(name, []).append(lr)
    assert sorted(steps_of) == ["level1", "level1.bias", "level2", "level2.bias"]
    for name in ("level1", "level1.bias"):
        assert steps_of[name] == [pytest.approx(s.lr * T.lr_factor(t, s)) for t in range(16)]
    for name in ("level2", "level2.bias"):
        assert steps_of[name] == [pytest.approx(s.lr / 16 * T.lr_factor(15, s))]
    assert {g["name"]: g["lr_scale"] for g in res.groups}["level3"] == 1 / 256


def test_surprise_target_is_a_constant_per_token_gradient():
    model, config = build()
    x = torch.from_numpy(TOKENS[:2 * 13].reshape(2, 13))
    out = model(x[:, :-1])
    nll = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), x[:, 1:].reshape(-1),
                                            reduction="none").view(2, 12)
    losses = CMS().training_losses(model, out, x[:, 1:], nll)
    assert set(losses) == {"surprise.level1", "surprise.level2"}
    y1, y2 = out.internals["levels"][:2]
    g1, g2 = torch.autograd.grad(nll.sum(), [y1, y2], retain_graph=True)
    want = 0.05 * ((y1 - g1) ** 2).mean() + 0.01 * ((y2 - g2) ** 2).mean()
    torch.testing.assert_close(losses["surprise.level1"] + losses["surprise.level2"], want)
    # no gradient path through the target: the term's parameter gradient is that of MSE(y, constant)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(sum(losses.values()), params, retain_graph=True, allow_unused=True)
    ref = torch.autograd.grad(want, params, retain_graph=True, allow_unused=True)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-7))
    # per token: a row's target does not depend on the other rows ("mean": it shrinks with the batch)
    one = model(x[:1, :-1])
    nll1 = torch.nn.functional.cross_entropy(one.logits.reshape(-1, V), x[:1, 1:].reshape(-1), reduction="none")
    g1_alone, = torch.autograd.grad(nll1.sum(), one.internals["levels"][0])
    torch.testing.assert_close(g1_alone[0], g1[0])
    g1_mean, = torch.autograd.grad(nll.mean(), y1, retain_graph=True)
    torch.testing.assert_close(g1_mean, g1 / nll.numel())


def test_surprise_modes_and_off():
    model, _ = build()
    x = torch.from_numpy(TOKENS[:26].reshape(2, 13))
    out = model(x[:, :-1])
    nll = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
    y1 = out.internals["levels"][0]
    model.config = CMSConfig(**SMALL, surprise="mean", surprise_weights=[1.0])
    g, = torch.autograd.grad(nll.mean(), y1, retain_graph=True)
    torch.testing.assert_close(CMS().training_losses(model, out, None, nll)["surprise.level1"], ((y1 - g) ** 2).mean())
    model.config = CMSConfig(**SMALL, surprise="off")
    assert CMS().training_losses(model, out, None, nll) == {}


def test_training_windows_with_carried_state_equal_one_unrolled_pass_per_row():
    """Three training steps with state passing feed each row consecutive windows of its own
    stream; with no level updated yet (periods 100), the logits they produced equal one pass
    over each row's 3W tokens, row by row, and perturbing one row leaves the others alone."""
    model, config = build(periods=[100, 100, 100])
    seen = []
    forward = model.forward
    model.forward = lambda ids, state=None: seen.append(out := forward(ids, state)) or out
    with pytest.warns(UserWarning, match="unapplied"):
        train(model, config, spec(steps=3))
    model.forward = forward
    lane = len(TOKENS) // 3
    streams = torch.from_numpy(np.stack([TOKENS[r * lane: r * lane + 3 * W] for r in range(3)]))
    with torch.no_grad():
        whole = model(streams).logits
        windows = torch.cat([o.logits.detach() for o in seen], 1)
        torch.testing.assert_close(windows, whole, atol=1e-5, rtol=1e-5)
        for r in range(3):
            torch.testing.assert_close(model(streams[r:r + 1]).logits[0], whole[r], atol=1e-5, rtol=1e-5)
        other = streams.clone()
        other[1] = (other[1] + 1) % V
        moved = model(other).logits
        assert torch.equal(moved[0], whole[0]) and torch.equal(moved[2], whole[2])
        assert not torch.allclose(moved[1], whole[1])


def test_embedding_and_head_train_from_the_first_step():
    model, config = build(preset="seed", d_model=None, hidden=None, d_ff=None)  # the default preset's shapes
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="unapplied"):
        train(model, config, spec(steps=1))
    after = model.state_dict()
    for k in ("embed.weight", "head.weight", "head.bias", "lstm.weight_hh_l0"):
        assert not torch.equal(before[k], after[k]), k
    assert torch.equal(before["ffns.0.up.weight"], after["ffns.0.up.weight"])


def test_seed_exact_freezes_embedding_and_head_and_skips_step_0(monkeypatch):
    """The seed's grouping: embedding and head in no optimizer; 0-indexed schedule, so level 1
    first moves at step 2 (1-based) with two summed gradients, level 2 (period 4) at step 5
    with five."""
    seen = recording_adamw(monkeypatch)
    model, config = build(periods=[1, 4], seed_exact=True)
    assert not model.embed.weight.requires_grad and not model.head.weight.requires_grad
    w1, w2 = model.lstm.weight_ih_l0, model.ffns[0].up.weight
    grads2, vals = [], [(w1.detach().clone(), w2.detach().clone(), model.embed.weight.detach().clone())]
    w2.register_hook(lambda g: grads2.append(g.clone()))
    with pytest.warns(UserWarning, match="level2"):
        res = train(model, config, spec(steps=7),
                    on_step=lambda step, info: vals.append((w1.detach().clone(), w2.detach().clone(),
                                                            model.embed.weight.detach().clone())))
    moved1 = [t for t in range(1, 8) if not torch.equal(vals[t - 1][0], vals[t][0])]
    moved2 = [t for t in range(1, 8) if not torch.equal(vals[t - 1][1], vals[t][1])]
    assert moved1 == [2, 3, 4, 5, 6, 7] and moved2 == [5]
    assert all(torch.equal(vals[0][2], v[2]) for v in vals)
    (_opt, grads, _lrs, _before), = [x for x in seen if id(w2) in x[1]]
    torch.testing.assert_close(grads[id(w2)], torch.stack(grads2[:5]).sum(0))
    assert res.pending == [{"group": g, "update_every": 4, "pending_steps": 2} for g in ("level2", "level2.bias")]
    assert {g["name"]: g["offset"] for g in res.groups}["level1"] == 1


def test_config_errors():
    with pytest.raises(ValueError, match="periods must be >= 1"):
        CMSConfig(periods=[1, 0])
    with pytest.raises(ValueError, match="surprise_weights has 3 entries for 2 levels"):
        CMSConfig(periods=[1, 16], surprise_weights=[0.1, 0.1, 0.1])


def test_a_group_schedule_must_be_positive():
    from lengen.api import ParamGroup
    from lengen.errors import ConfigError

    class Bad(CMS):
        def param_groups(self, model, config):
            return [ParamGroup(list(model.parameters()), name="all", update_every=2, offset=-1)]

    model, config = build()
    with pytest.raises(ConfigError, match="param group 'all' needs an integer update_every >= 1 and an offset >= 0"):
        T.train(model, Bad(), config, TOKENS, spec(steps=1), window=W, seed=0, accelerator=Accelerator(cpu=True))


def test_flops_per_token_counts_the_matrix_products():
    model, config = build(preset="seed", d_model=None, hidden=None, d_ff=None)
    parts = CMS().flops_per_token(model, config, 64)
    assert parts == {"lstm": 2.0 * 4 * 256 * 512, "ffn": 2 * 2.0 * 2 * 256 * 512, "head": 2.0 * 256 * V}


# ---------------------------------------------------------------------------------------
# bpc


def bpc_inputs(kind, sep=None, n=6, length=40, seed=0):
    from lengen.api import Corpus, Split

    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, 10, (n, length + 1))
    if sep is not None:
        seqs[:, 5] = sep
    corpus = Corpus(Split(np.zeros(3, int), np.zeros(1, int)), Split(np.zeros(3, int), np.zeros(1, int)), 11, "f",
                    tokenizer={"kind": kind, "separator_id": sep})
    nll = rng.random((n, length)) * 3
    return corpus, seqs, nll


def test_bpc_is_log2_ppl_at_character_level_with_the_same_interval():
    from lengen_metrics.core import BitsPerCharacter, PositionPerplexity

    corpus, seqs, nll = bpc_inputs("char")
    m = BitsPerCharacter()
    ann = m.annotate(corpus, seqs, m.Config())
    scores = Scores(nll, nll < 1, {"text_units": ann["text_units"][:, 1:]})
    ctx = MetricContext(window=8, positions=(1, 2, 5), bucket=4, bootstrap=200)
    bpc = m.compute(scores, m.Config(), ctx)
    ppl = PositionPerplexity().compute(scores, PositionPerplexity.Config(), ctx)
    for key in ("@1W", "@2W", "@5W", ""):
        b, p = bpc[f"bpc{key}"], ppl[f"ppl{key}"]
        assert b.value == pytest.approx(math.log2(p.value))
        assert (b.ci_low, b.ci_high) == (pytest.approx(math.log2(p.ci_low)), pytest.approx(math.log2(p.ci_high)))


def test_bpc_counts_no_character_for_the_separator_and_skips_other_tokenizers():
    from lengen_metrics.core import BitsPerCharacter

    m = BitsPerCharacter()
    corpus, seqs, nll = bpc_inputs("byte", sep=10)
    units = m.annotate(corpus, seqs, m.Config())["text_units"][:, 1:]
    assert units[:, 4].sum() == 0 and units.sum() == nll.size - len(nll)
    out = m.compute(Scores(nll, nll < 1, {"text_units": units}), m.Config(),
                    MetricContext(window=8, positions=(1,), bucket=8, bootstrap=0))
    assert out["bpc@1W"].value == pytest.approx(nll[:, :8].sum() / math.log(2) / (7 * len(nll)))
    assert m.annotate(bpc_inputs("bpe")[0], seqs, m.Config()) == {}
