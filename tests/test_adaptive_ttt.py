"""Adaptive TTT: k = 1 is ttt, fixed-k against a naive k-step loop, causality with
data-dependent k (the conformance kit), the calibrated mix, analytic FLOPs against the FLOP
counter, and the report of a run."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lengen.api import BuildContext
from lengen.checks import ArchSubject, check_architecture
from lengen.measure import flops_per_token
from lengen_ttt.adaptive import AdaptiveTTT, AdaptiveTTTConfig, decisions
from lengen_ttt.model import TTT, TTTConfig

VOCAB = 50
SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mini_batch": 4}


def perturb(model):
    """Slow weights away from their initial values, so that every term of the layer is used
    and more inner steps change the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("token_offset"):
                p.add_(0.1 * torch.rand_like(p))  # the token scales stay positive: every step moves
            elif name.endswith(("ln_weight", "ln_bias", "b1", "b2", "lr_bias")):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith(("W1", "W2")):
                p.mul_(10)
    return model


def build(seed=0, window=16, **kw):
    torch.manual_seed(seed)
    cfg = AdaptiveTTTConfig(**{**SMALL, **kw})
    return perturb(AdaptiveTTT().build(cfg, BuildContext(vocab_size=VOCAB, window=window))).eval()


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_every_k_one_is_ttt(inner):
    """Fixed-1 (and adaptive with choices that all give 1 step... here: fixed k = 1) has
    exactly ttt's outputs with ttt's weights, in one pass and streamed."""
    kw = {**SMALL, "inner": inner, "pre_conv": True, "use_gate": True}
    torch.manual_seed(0)
    ttt = perturb(TTT().build(TTTConfig(**kw, block=8), BuildContext(vocab_size=VOCAB, window=16))).eval()
    ad = AdaptiveTTT().build(AdaptiveTTTConfig(**kw, policy="fixed", k=1), BuildContext(vocab_size=VOCAB, window=16))
    ad.load_state_dict(ttt.state_dict())  # the same parameter names
    ad.eval()
    x = torch.randint(0, VOCAB, (3, 27))
    with torch.no_grad():
        ref, _ = ttt(x)
        one = ad(x)
        state, parts = None, []
        for a in range(0, 27, 5):
            out = ad(x[:, a:a + 5], state)
            state, parts = out.state, parts + [out.logits]
    torch.testing.assert_close(one.logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-5, rtol=1e-5)
    assert (one.stats["k"][:, 4:] == 1).all() and (one.stats["k"][:, :4] == 0).all()
    ad.policy, ad.cfg = "fixed", ad.cfg.model_copy(update={"k": 4})
    with torch.no_grad():
        assert (ad(x).logits - ref).abs().max() > 1e-3  # more steps change the outputs: the test is not vacuous


# ---------------------------------------------------------------------------------------
# the naive definition: k plain gradient steps per mini-batch, gradients by autograd


def rope_pairs(x, K, base=10000.0):
    T, d = x.shape[-2:]
    angle = (torch.arange(T) % K)[:, None] * base ** (-torch.arange(0, d, 2) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], -1).flatten(-2)


def naive_layer(layer, x, k):
    """Outputs, and the fast weights after the last complete mini-batch: token i of mini-batch
    b reads ``W_b - s_i sum_{j <= i} lr_j grad_j(W_b)``; ``W_{b+1}`` is k steps
    ``W <- W - s_{K-1} sum_j lr_j grad_j(W)`` from W_b."""
    B, T, D = x.shape
    H, d, K = layer.H, layer.d, layer.K
    proj = x @ layer.qkv.weight.T
    q, key, v = proj[..., :3 * D].view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    lr = layer.base_lr * torch.sigmoid(proj[..., 3 * D:] + layer.lr_bias).transpose(1, 2) / d
    q, key = rope_pairs(q, K), rope_pairs(key, K)
    s = torch.clamp(1.0 / torch.arange(1, K + 1) + layer.token_offset, min=0.0)
    ln = lambda z: F.layer_norm(z, (d,), eps=1e-6) * layer.ln_weight + layer.ln_bias  # noqa: E731

    def f(t, w):
        if layer.inner == "linear":
            return t @ w[0] + w[1]
        return F.gelu(t @ w[0] + w[1], approximate="tanh") @ w[2] + w[3]

    def grads(w, j):  # d loss_j / d w
        loss = 0.5 * (ln(f(key[:, :, j:j + 1], w)) - (v - key)[:, :, j:j + 1]).pow(2).sum()
        return torch.autograd.grad(loss, w, create_graph=True)

    fast = [getattr(layer, n).expand(B, *getattr(layer, n).shape) for n in layer.fast_names()]
    outs = []
    for a in range(0, T, K):
        e = min(T, a + K)
        g = [grads(fast, j) for j in range(a, e)]
        for t in range(a, e):
            w_t = [w - s[t - a] * sum(lr[:, :, j, None, None] * g[j - a][n] for j in range(a, t + 1))
                   for n, w in enumerate(fast)]
            outs.append(q[:, :, t:t + 1] + ln(f(q[:, :, t:t + 1], w_t)))
        if e - a == K:
            for _ in range(k):
                g = [grads(fast, j) for j in range(a, e)]
                fast = [w - s[K - 1] * sum(lr[:, :, j, None, None] * g[j - a][n] for j in range(a, e))
                        for n, w in enumerate(fast)]
    y = layer.post_norm(torch.cat(outs, 2).transpose(1, 2).reshape(B, T, D))
    return layer.o_proj(y), fast


@pytest.mark.parametrize("inner,k", [("linear", 4), ("mlp", 2)])
def test_fixed_k_is_k_gradient_steps(inner, k):
    model = build(inner=inner, policy="fixed", k=k, n_layers=1)
    T = 2 * 4 + 2  # two complete mini-batches, the last one's update applied by the next token
    x = torch.randint(0, VOCAB, (2, T))
    out = model(x)
    h, ends = model.embed(x), []
    for block in model.blocks:
        y, fast = naive_layer(block.ttt, block.seq_norm(h), k)
        h = h + y
        h = h + block.mlp(block.ffn_norm(h))
        ends.append(fast)
    torch.testing.assert_close(out.logits, model.head(model.norm(h)), atol=1e-4, rtol=1e-4)
    for st, fast in zip(out.state["layers"], ends):
        for got, want in zip(st["fast"], fast):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (out.state["layers"][0]["read_k"] == k).all()
    _, one_step = naive_layer(model.blocks[0].ttt, model.blocks[0].seq_norm(model.embed(x)), 1)
    assert (one_step[0] - ends[0][0]).abs().max() > 1e-3  # k steps are not one: the test is not vacuous


# ---------------------------------------------------------------------------------------
# causality with data-dependent k, calibration


def spread_thresholds(model, n=4, length=64, vocab=64):
    """Thresholds at the 30th and 70th percentile of each layer's signal on random tokens."""
    seqs = np.random.default_rng(0).integers(0, vocab, (n, length + 1))
    signal, _ = decisions(model, seqs, "cpu")
    return [list(map(float, np.quantile(signal[:, l], [0.3, 0.7]))) for l in range(signal.shape[1])]


@pytest.mark.parametrize("signal,policy", [("inner_loss", "adaptive"), ("entropy", "adaptive"),
                                           ("inner_loss", "random")])
def test_conformance_with_data_dependent_k(signal, policy):
    """The conformance kit (what `lengen check` runs) passes with k varying by data."""
    kw = {**SMALL, "pre_conv": True, "policy": policy, "signal": signal}
    if policy == "adaptive":  # thresholds inside the signal's range for the kit's model
        kw["thresholds"] = spread_thresholds(ArchSubject(AdaptiveTTT(), AdaptiveTTTConfig(**kw)).build())
    subject = ArchSubject(AdaptiveTTT(), AdaptiveTTTConfig(**kw))
    with torch.no_grad():
        k = subject.build()(torch.randint(0, 64, (4, 64))).stats["k"][:, 4:]
    assert len(torch.unique(k)) >= 3  # k really depends on the data
    results = check_architecture(subject, only=None if policy == "adaptive" and signal == "inner_loss" else
                                 ["causality", "state equivalence", "determinism"])
    assert all(r.passed for r in results), {r.name: r.reason for r in results if not r.passed}


def test_oracle_looks_ahead_and_streams_in_aligned_chunks():
    """The oracle chooses k_b with mini-batch b + 1's labels: the causality check must catch it
    (an upper bound, not a model); fed in chunks of whole mini-batches it streams exactly."""
    model = build(policy="oracle", n_layers=1)
    x = torch.randint(0, VOCAB, (2, 18))
    with torch.no_grad():
        one = model(x).logits
        state, parts = None, []
        for a in range(0, 18, 8):
            out = model(x[:, a:a + 8], state)
            state, parts = out.state, parts + [out.logits]
    torch.testing.assert_close(torch.cat(parts, 1), one, atol=1e-5, rtol=1e-5)


    class Perturbed(ArchSubject):  # trained-like weights
        def build(self, seed=None):
            return perturb(super().build(seed))

    kw = {**SMALL, "n_layers": 1, "policy": "oracle"}  # thresholds on the hindsight benefit at which k varies
    kw["thresholds"] = spread_thresholds(Perturbed(AdaptiveTTT(), AdaptiveTTTConfig(**kw)).build())[:1]
    (res,) = check_architecture(Perturbed(AdaptiveTTT(), AdaptiveTTTConfig(**kw)), only=["causality"])
    assert res.passed is False and "sees the future" in res.reason


def test_calibrated_mix_is_the_target():
    """On the calibration sequences, the frozen thresholds give the target mix within 2
    points in every layer; random then draws at the mix adaptive reached."""
    seqs = np.random.default_rng(1).integers(0, VOCAB, (8, 65))
    arch = AdaptiveTTT()
    cfg = AdaptiveTTTConfig(**SMALL, mix=(0.3, 0.4, 0.3))
    model = build()
    out = arch.calibrate(model, cfg, seqs, "cpu")
    _, k = decisions(model, seqs, "cpu")  # again, with the frozen thresholds
    reached = np.stack([(k == c).mean(0) for c in (1, 2, 4)], 1)
    assert np.abs(reached - [0.3, 0.4, 0.3]).max() <= 0.02, out["passes"]
    np.testing.assert_allclose(out["mix"], reached)
    assert len(out["passes"]) > 1 and np.abs(np.asarray(out["passes"][0]) - [0.3, 0.4, 0.3]).max() > 0.02  # not vacuous
    rnd = build(policy="random")
    got = arch.calibrate(rnd, cfg.model_copy(update={"policy": "random"}), seqs, "cpu")
    assert got["draw_mix"] == out["mix"]  # shared with the adaptive variant's calibration
    _, k = decisions(rnd, seqs, "cpu")
    drawn = np.stack([(k == c).mean(0) for c in (1, 2, 4)], 1)
    assert np.abs(drawn - reached).max() <= 0.1, drawn  # 120 draws per layer


# ---------------------------------------------------------------------------------------
# FLOPs


def test_analytic_flops_equal_the_flop_counter(monkeypatch):
    """On the torch code path the counter sees every product: the analytic counts of ttt and
    of adaptive-ttt at fixed k agree with it within 5% (they agree exactly), TTT-Linear and
    TTT-MLP, fed in chunks as evaluation feeds them."""
    monkeypatch.setenv("LENGEN_TTT_KERNEL", "torch")
    kw = {"d_model": 32, "n_layers": 1, "n_heads": 2, "mini_batch": 4, "pre_conv": True, "use_gate": True}
    for inner in ("linear", "mlp"):
        cfg = TTTConfig(**kw, inner=inner, block=8)
        model = TTT().build(cfg, BuildContext(vocab_size=VOCAB, window=16))
        counted = flops_per_token(model, TTT(), 32, VOCAB, chunk=16)
        assert sum(TTT().flops_per_token(model, cfg, 32).values()) == pytest.approx(counted, rel=0.05)
    arch, steps = AdaptiveTTT(), {}
    for inner, k in (("linear", 1), ("linear", 4), ("mlp", 2)):
        cfg = AdaptiveTTTConfig(**kw, inner=inner, policy="fixed", k=k)
        model = arch.build(cfg, BuildContext(vocab_size=VOCAB, window=16))
        analytic = arch.flops_per_token(model, cfg, 32)
        assert sum(analytic.values()) == pytest.approx(flops_per_token(model, arch, 32, VOCAB, chunk=16), rel=0.05)
        steps[inner, k] = analytic["inner_steps"]
    assert steps["linear", 4] > 2 * steps["linear", 1] > 0


def test_data_dependent_flops_follow_the_per_token_k():
    """After an evaluation, the analytic inner-loop FLOPs at a length are the mean of the
    per-token inner_flops statistic over that many tokens (the same k)."""
    model = build(policy="random")
    arch = AdaptiveTTT()
    x = torch.randint(0, VOCAB, (6, 40))
    with torch.no_grad():
        stat = torch.cat([model(x[:, :16]).stats["inner_flops"] for _ in range(1)], 0)
        model.k_tally = None
        out = model(x)
    for L in (16, 40):
        parts = arch.flops_per_token(model, model.cfg, L)
        assert parts["inner_read"] + parts["inner_steps"] == pytest.approx(float(out.stats["inner_flops"][:, :L].mean()),
                                                                           rel=1e-5)
    assert stat.shape == (6, 16)


def test_only_the_adaptive_policy_pays_the_entropy_probe():
    """The entropy signal's probe is charged to the policy that reads it, not to fixed,
    random or oracle evaluated beside it."""
    arch = AdaptiveTTT()
    for policy, probed in (("adaptive", True), ("fixed", False), ("random", False), ("oracle", False)):
        model = build(policy=policy, signal="entropy")
        parts = arch.flops_per_token(model, model.cfg, 32)
        assert ("probe" in parts) is probed, policy
        if probed:
            assert parts["probe"] == 5.0 * VOCAB


# ---------------------------------------------------------------------------------------
# configuration and the report of a run


def test_variants_and_config_errors():
    from pydantic import ValidationError

    names = list(AdaptiveTTT().variants(AdaptiveTTTConfig()))
    assert names == ["fixed-1", "fixed-2", "fixed-4", "adaptive", "adaptive-60-30-10", "adaptive-10-30-60", "random",
                     "random-60-30-10", "random-10-30-60", "oracle"]
    for bad in ({"mix": (0.5, 0.5)}, {"choices": (2, 1, 4)}, {"evaluate": ("fixed-x",)}, {"block": 16},
                {"thresholds": ((1.0, 0.5),)}):
        with pytest.raises(ValidationError):
            AdaptiveTTTConfig(**bad)


def test_run_writes_the_report(tmp_path):
    """A tiny run: one training, every policy a record, and the report with the Pareto plot,
    the allocation histograms and the recovery ratio."""
    from click.testing import CliRunner

    from lengen.cli import make_cli
    from lengen.plugins import PluginHost

    suite = tmp_path / "b.toml"
    suite.write_text("""
[t]
dataset = "synthetic"
window = 16
archs = ["adaptive-ttt"]
[t.train]
steps = 2
batch_size = 2
[t.eval]
length = 2
positions = [1, 2]
modes = ["full"]
sequences = 4
batch_size = 2
calibration = 2
bootstrap = 20
[t.arch.adaptive]
d_model = 32
n_layers = 1
n_heads = 2
mini_batch = 4
evaluate = ["fixed-1", "fixed-4", "adaptive", "random", "oracle"]
curve = []
calibration_rounds = 1
""")
    cli = make_cli(PluginHost())
    res = CliRunner().invoke(cli, ["run", "-b", "t", "--benchmarks-file", str(suite), "--results", str(tmp_path),
                                   "--no-check", "--no-plot"])
    assert res.exit_code == 0, res.output
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    report = json.loads((run / "adaptive_adaptive-ttt_seed0_report.json").read_text())
    assert [v["variant"] for v in report["variants"]] == ["fixed-1", "fixed-4", "adaptive", "random", "oracle"]
    rows = {v["variant"]: v for v in report["variants"]}
    assert rows["fixed-1"]["flops_per_token"] < rows["adaptive"]["flops_per_token"] < rows["fixed-4"]["flops_per_token"]
    assert 0 < rows["fixed-4"]["inner_share"] < 1 and rows["fixed-4"]["k_mix"] == [0.0, 0.0, 1.0]
    assert {"adaptive_vs_fixed-4", "random_vs_fixed-4", "adaptive_vs_random", "recovery"} <= set(report["comparisons"])
    for plot in ("pareto", "allocation"):
        assert (run / f"adaptive_adaptive-ttt_seed0_{plot}.png").stat().st_size > 0
    assert "recovery ratio" in (run / "adaptive_adaptive-ttt_seed0_report.md").read_text()
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["adaptive-report", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "no adaptive-ttt variants" in res.output
