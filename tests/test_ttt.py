"""TTT-Linear and TTT-MLP: the dual form against a naive primal definition, causality,
exact streaming, truncated backprop with state passing, determinism, registration."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lengen.api import BuildContext
from lengen.testing import ArchitectureContract
from lengen.train import detach_state
from lengen_ttt.model import TTT, TTTConfig

VOCAB = 50


def build(inner="linear", window=16, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mini_batch": 4, "block": 8, **kw}
    model = TTT().build(TTTConfig(inner=inner, **kw), BuildContext(vocab_size=VOCAB, window=window))
    # move the slow weights away from their (zero / one) initial values so that every term
    # of the layer (biases, LN affine, token offsets, lr gate) is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_weight", "ln_bias", "b1", "b2", "token_offset", "lr_bias")):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith(("W1", "W2")):
                p.mul_(10)  # inner weights large enough that the inner loss is non-trivial
    return model


# ---------------------------------------------------------------------------------------
# the naive definition: token by token, weights materialized, gradients by autograd


def rope_pairs(x, K, base=10000.0):
    """RoPE on pairs of adjacent dimensions (2i, 2i + 1), positions modulo K."""
    T, d = x.shape[-2:]
    angle = (torch.arange(T) % K)[:, None] * base ** (-torch.arange(0, d, 2) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], -1).flatten(-2)


def inner_forward(x, fast, inner):
    if inner == "linear":
        W1, b1 = fast
        return x @ W1 + b1
    W1, b1, W2, b2 = fast
    return F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2


def naive_ttt_layer(layer, x, cut_at=None):
    """The TTT layer, primal form: for each token t (index i in its mini-batch), weights
    ``W_b - s_i sum_{j <= t} lr_j grad_j(W_b)``; after a full mini-batch ``W_b`` takes the step
    with ``s_{K-1}``. ``cut_at`` (a training-window boundary): the tokens before it and the
    fast weights at the last mini-batch boundary before it are constants."""
    B, T, D = x.shape
    H, d, K = layer.H, layer.d, layer.K
    proj = x @ layer.qkv.weight.T
    q, k, v = proj[..., :3 * D].view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    lr = layer.base_lr * torch.sigmoid(proj[..., 3 * D:] + layer.lr_bias).transpose(1, 2) / d  # [B, H, T]
    q, k = rope_pairs(q, K), rope_pairs(k, K)
    if cut_at is not None:
        k, v, lr = (torch.cat([t[:, :, :cut_at].detach(), t[:, :, cut_at:]], 2) for t in (k, v, lr))
    s = torch.clamp(1.0 / torch.arange(1, K + 1) + layer.token_offset, min=0.0)
    ln = lambda z: F.layer_norm(z, (d,), eps=1e-6) * layer.ln_weight + layer.ln_bias  # noqa: E731
    fast = [getattr(layer, n).expand(B, *getattr(layer, n).shape) for n in layer.fast_names()]
    outs = []
    for a in range(0, T, K):
        if cut_at is not None and a == cut_at // K * K:
            fast = [w.detach().requires_grad_() for w in fast]
        e = min(T, a + K)
        grads = []  # per token j of the mini-batch: d loss_j / d fast, at the boundary weights
        for j in range(a, e):
            loss = 0.5 * (ln(inner_forward(k[:, :, j:j + 1], fast, layer.inner)) - (v - k)[:, :, j:j + 1]).pow(2).sum()
            grads.append(torch.autograd.grad(loss, fast, create_graph=True))
        for t in range(a, e):
            i = t - a
            w_t = [w - s[i] * sum(lr[:, :, j, None, None] * grads[j - a][n] for j in range(a, t + 1))
                   for n, w in enumerate(fast)]
            outs.append(q[:, :, t:t + 1] + ln(inner_forward(q[:, :, t:t + 1], w_t, layer.inner)))
        if e - a == K:
            fast = [w - s[K - 1] * sum(lr[:, :, j, None, None] * grads[j - a][n] for j in range(a, e))
                    for n, w in enumerate(fast)]
    z = torch.cat(outs, 2).transpose(1, 2).reshape(B, T, D)
    y = layer.post_norm(z)
    if layer.gate is not None:
        y = F.gelu(layer.gate(x), approximate="tanh") * y
    return layer.o_proj(y)


def naive_forward(model, ids, cut_at=None):
    """The whole LM with the naive TTT layer; ``cut_at`` blocks every path from tokens before
    it to later positions (fast weights and the conv's inputs), as a training-window boundary."""
    x = model.embed(ids)
    for block in model.blocks:
        if block.conv is not None:
            h = block.conv.norm(x)
            if cut_at is not None:
                h = torch.cat([h[:, :cut_at].detach(), h[:, cut_at:]], 1)
            kernel = block.conv.kernel
            c = F.conv1d(F.pad(h.transpose(1, 2), (kernel - 1, 0)), block.conv.conv.weight, block.conv.conv.bias,
                         groups=h.shape[2]).transpose(1, 2)
            if cut_at is not None:  # positions after the cut see the cut's inputs only as constants
                x = torch.cat([x[:, :cut_at] + c[:, :cut_at].detach(), x[:, cut_at:] + c[:, cut_at:]], 1)
            else:
                x = x + c
        x = x + naive_ttt_layer(block.ttt, block.seq_norm(x), cut_at)
        x = x + block.mlp(block.ffn_norm(x))
    return model.head(model.norm(x))


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("extra", [{}, {"pre_conv": True, "use_gate": True}])
def test_dual_form_equals_naive_primal(inner, extra):
    model = build(inner, **extra)
    x = torch.randint(0, VOCAB, (2, 8 * 3 + 2))  # several dual-form blocks and a short last mini-batch
    fast, _ = model(x)
    ref = naive_forward(model, x)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    # the inner learning actually matters at these weights (the test is not vacuous)
    with torch.no_grad():
        for block in model.blocks:
            block.ttt.lr_bias.fill_(-30.0)  # inner lr ~ 0
        frozen, _ = model(x)
    assert (frozen - fast).abs().max() > 1e-3  # 50x the tolerance above


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("kernel", ["torch", "auto"])  # the batched torch code, and the CPU kernels if they build
def test_gradients_equal_naive_primal(inner, kernel, monkeypatch):
    """Backprop through the fast-weight updates (several dual-form blocks, a ragged tail)."""
    monkeypatch.setenv("LENGEN_TTT_KERNEL", kernel)
    model = build(inner, pre_conv=True)
    ids = torch.randint(0, VOCAB, (2, 8 * 2 + 3 + 1))
    x, target = ids[:, :-1], ids[:, 1:]
    logits, _ = model(x)
    F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(naive_forward(model, x).reshape(-1, VOCAB), target.reshape(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("S", [12, 9, 3])
def test_linear_block_backward_gradcheck(S, monkeypatch):
    """The hand-written backward of one dual-form block (the torch code), all outputs used, ragged tails."""
    from lengen_ttt.model import LinearBlock

    monkeypatch.setenv("LENGEN_TTT_KERNEL", "torch")
    torch.manual_seed(0)
    N, d, K = 2, 4, 4
    dbl = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(N, 2 * S, d, **dbl), torch.randn(N, S, d, **dbl),
            (torch.rand(N, S, dtype=torch.float64) + 0.5).requires_grad_(), torch.rand(K, **dbl),
            (torch.rand(N, 1, d, dtype=torch.float64) + 0.5).requires_grad_(),
            torch.randn(N, d, d, **dbl), torch.randn(N, 1, d, **dbl))
    assert torch.autograd.gradcheck(lambda *a: LinearBlock.apply(*a, K), args, fast_mode=True)


@pytest.mark.parametrize("S", [12, 9, 3])
def test_mlp_block_backward_gradcheck(S, monkeypatch):
    from lengen_ttt.model import MLPBlock

    monkeypatch.setenv("LENGEN_TTT_KERNEL", "torch")
    torch.manual_seed(0)
    N, d, h, K = 2, 4, 6, 4
    dbl = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(N, 2 * S, d, **dbl), torch.randn(N, S, d, **dbl),
            (torch.rand(N, S, dtype=torch.float64) + 0.5).requires_grad_(), torch.rand(K, **dbl),
            (torch.rand(N, 1, d, dtype=torch.float64) + 0.5).requires_grad_(),
            torch.randn(N, d, h, **dbl), torch.randn(N, 1, h, **dbl),
            torch.randn(N, h, d, **dbl), torch.randn(N, 1, d, **dbl))
    assert torch.autograd.gradcheck(lambda *a: MLPBlock.apply(*a, K), args, fast_mode=True)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_causality(inner):
    model = build(inner, pre_conv=True).eval()
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        base, _ = model(x)
        for t in (0, 3, 4, 7, 17, 38):
            y = x.clone()
            y[:, t + 1:] = torch.randint(0, VOCAB, y[:, t + 1:].shape)
            out, _ = model(y)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("pre_conv", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 16, 37])
def test_streaming_equals_one_pass(inner, pre_conv, chunk):
    model = build(inner, pre_conv=pre_conv, mini_batch=16, block=32).eval()
    x = torch.randint(0, VOCAB, (2, 101))
    with torch.no_grad():
        full, full_state = model(x)
        state, outs = None, []
        for s in range(0, x.shape[1], chunk):
            out, state = model(x[:, s:s + chunk], state)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert state["pos"] == 101
    for a, b in zip(state["layers"], full_state["layers"]):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("W", [8, 6])  # windows of whole mini-batches (K = 4), and not
def test_state_passing_gradients_equal_truncated_unrolled(inner, W):
    """Window 2's loss with window 1's state detached (what training does) has the gradients
    of the concatenated sequence with every path from window 1 blocked at the boundary."""
    model = build(inner, pre_conv=True, use_gate=True)
    ids = torch.randint(0, VOCAB, (2, 2 * W + 1))
    w1, w2 = ids[:, :W], ids[:, W:2 * W]
    target = ids[:, W + 1:2 * W + 1]

    _, state = model(w1)
    logits, _ = model(w2, detach_state(state))
    F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    # the learned initial fast weights are replaced by the carried state: no gradient
    assert got["blocks.0.ttt.W1"] is None and got["blocks.0.ttt.token_offset"] is not None

    model.zero_grad()
    ref_logits = naive_forward(model, ids[:, :2 * W], cut_at=W)[:, W:]
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    F.cross_entropy(ref_logits.reshape(-1, VOCAB), target.reshape(-1)).backward()
    for n, p in model.named_parameters():
        if got[n] is None:
            assert p.grad is None or not p.grad.any(), n
        else:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
    # the carried state matters: gradients of window 2 alone (fresh state) differ
    model.zero_grad()
    fresh, _ = model(w2)
    F.cross_entropy(fresh.reshape(-1, VOCAB), target.reshape(-1)).backward()
    assert not torch.allclose(model.blocks[0].ttt.qkv.weight.grad, got["blocks.0.ttt.qkv.weight"])


def test_training_step_through_state_is_finite_and_detachable():
    model = build("mlp")
    ids = torch.randint(0, VOCAB, (2, 16))
    _, state = model(ids)
    state = detach_state(state)
    leaves = [t for layer in state["layers"] for t in layer.values()]
    assert all(not t.requires_grad for t in leaves)
    logits, _ = model(ids, state)
    logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.ttt.W1"] is None  # truncated: the initial weights were used in window 1
    assert grads["blocks.0.ttt.qkv.weight"] is not None and grads["blocks.0.ttt.ln_weight"] is not None


def test_determinism():
    x = torch.randint(0, VOCAB, (2, 30))
    a, _ = build("mlp", seed=3)(x)
    b, _ = build("mlp", seed=3)(x)
    c, _ = build("mlp", seed=4)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_finite_at_64_windows_and_constant_state(inner):
    torch.manual_seed(0)
    cfg = TTTConfig(inner=inner, d_model=32, n_layers=2, n_heads=2)
    model = TTT().build(cfg, BuildContext(vocab_size=VOCAB, window=16)).eval()
    x = torch.randint(0, VOCAB, (1, 64 * 16))
    with torch.no_grad():
        out, state = model(x)
        _, short = model(x[:, :48])
    assert torch.isfinite(out).all()
    for a, b in zip(state["layers"], short["layers"]):  # the state does not grow with length
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_presets_and_overrides():
    assert TTTConfig(preset="125m").size() == {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 2048}
    assert TTTConfig(preset="125m", d_ff=3072, n_layers=2).size()["d_ff"] == 3072
    assert TTTConfig(preset="bench").size() == {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024}


def test_config_rejects_unknown_keys():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TTTConfig(d_model=32, n_layer=3)
    with pytest.raises(ValidationError):
        TTTConfig(inner="conv")
    with pytest.raises(ValidationError):
        TTTConfig(preset="7b")


def test_registered():
    from lengen.plugins import PluginHost

    host = PluginHost()
    names = set(host.architectures.names())
    assert {"ttt", "ttt-linear", "ttt-mlp"} <= names
    assert host.architectures.get("ttt-mlp").defaults == {"inner": "mlp"}
    assert host.architectures.get("ttt").load().train_state_passing


def test_gelu_via_sigmoid_matches_tanh_gelu_and_its_derivatives():
    from lengen_ttt.model import gelu, gelu_second

    z = torch.linspace(-8, 8, 401, dtype=torch.float64)
    y, d1, sg = gelu(z, with_grad=True)
    zz = z.clone().requires_grad_()
    ref = F.gelu(zz, approximate="tanh")
    (g1,) = torch.autograd.grad(ref.sum(), zz, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), zz)
    torch.testing.assert_close(y, ref.detach())
    torch.testing.assert_close(d1, g1.detach())
    torch.testing.assert_close(gelu_second(z, sg), g2)


class TestTTTLinearContract(ArchitectureContract):
    """lengen's own conformance kit (what `lengen check --arch ttt` runs)."""

    arch = TTT()
    config = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mini_batch": 4, "pre_conv": True}


class TestTTTMLPContract(ArchitectureContract):
    arch = TTT()
    config = {"inner": "mlp", "d_model": 32, "n_layers": 2, "n_heads": 2, "mini_batch": 4, "use_gate": True}


def test_param_groups_decay_matrices_only():
    model = build("mlp", pre_conv=True, use_gate=True)
    decay, no_decay = TTT().param_groups(model, TTTConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay.weight_decay == 0.0
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay.params} >= {"ln_weight", "ln_bias", "b1", "b2",
                                                                       "token_offset", "lr_bias"}
    assert {"blocks.0.ttt.W1", "blocks.0.ttt.qkv.weight", "embed.weight"} <= {names[id(p)] for p in decay.params}
    assert len(decay.params) + len(no_decay.params) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------
# the compiled CPU kernel for TTT-Linear's block (kernels.py) against the torch code


def _skip_without_compiler():
    """The kernel tests skip only where the kernels cannot be built at all: no C++ compiler.
    With a compiler, a build error fails them (LENGEN_TTT_KERNEL=cpp raises, chained to the
    build's exception and its compiler output)."""
    from lengen_ttt import kernels

    if kernels.compiler_path() is None:
        pytest.skip(f"no C++ compiler here ({kernels.compiler()!r}, from $CXX or the default, is not on PATH): "
                    "the TTT CPU kernels cannot be built")


@pytest.fixture
def cpu_kernels(monkeypatch):
    from lengen_ttt import kernels

    _skip_without_compiler()
    monkeypatch.setenv("LENGEN_TTT_KERNEL", "cpp")
    return kernels.cpu_kernels()


def _block_args(N, S, d, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return [r(N, 2 * S, d), r(N, S, d), torch.rand(N, S, generator=g, dtype=dtype) + 0.5,
            torch.rand(K, generator=g, dtype=dtype), torch.rand(N, 1, d, generator=g, dtype=dtype) + 0.5,
            r(N, d, d), r(N, 1, d)]


@pytest.mark.parametrize("S", [32, 20, 12, 3])
@pytest.mark.parametrize("use_weights", [False, True])
def test_linear_kernel_equals_torch_code(cpu_kernels, monkeypatch, S, use_weights):
    """Same outputs and same gradients for every input, whole and ragged last mini-batches,
    with and without the gradient of the weights after the block (state passing)."""
    from lengen_ttt.model import LinearBlock

    N, d, K = 3, 8, 8
    results = []
    for mode in ("torch", "cpp"):
        monkeypatch.setenv("LENGEN_TTT_KERNEL", mode)
        args = [t.clone().requires_grad_() for t in _block_args(N, S, d, K, torch.float64)]
        out, W1, b1 = LinearBlock.apply(*args, K)
        w = _block_args(N, S, d, K, torch.float64, seed=1)  # random output weights
        loss = (out * w[1]).sum() + ((W1 * w[5]).sum() + (b1 * w[6]).sum() if use_weights else 0)
        loss.backward()
        results.append([out, W1, b1] + [a.grad for a in args])
    for name, ref, got in zip(["out", "W1", "b1", "qx", "bt", "lr", "s", "gamma2", "W", "b"], *results):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def _mlp_args(N, S, d, h, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return [r(N, 2 * S, d), r(N, S, d), torch.rand(N, S, generator=g, dtype=dtype) + 0.5,
            torch.rand(K, generator=g, dtype=dtype), torch.rand(N, 1, d, generator=g, dtype=dtype) + 0.5,
            r(N, d, h) * 0.5, r(N, 1, h), r(N, h, d) * 0.5, r(N, 1, d)]


@pytest.mark.parametrize("S", [32, 20, 12, 3])
@pytest.mark.parametrize("use_weights", [False, True])
def test_mlp_kernel_equals_torch_code(cpu_kernels, monkeypatch, S, use_weights):
    from lengen_ttt.model import MLPBlock

    N, d, h, K = 3, 4, 6, 8
    results = []
    for mode in ("torch", "cpp"):
        monkeypatch.setenv("LENGEN_TTT_KERNEL", mode)
        args = [t.clone().requires_grad_() for t in _mlp_args(N, S, d, h, K, torch.float64)]
        outs = MLPBlock.apply(*args, K)
        w = _mlp_args(N, S, d, h, K, torch.float64, seed=1)  # random output weights
        loss = (outs[0] * w[1]).sum()
        if use_weights:
            loss = loss + sum((o * ww).sum() for o, ww in zip(outs[1:], w[5:]))
        loss.backward()
        results.append(list(outs) + [a.grad for a in args])
    names = ["out", "W1n", "b1n", "W2n", "b2n", "qx", "bt", "lr", "s", "gamma2", "W1", "b1", "W2", "b2"]
    for name, ref, got in zip(names, *results):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def _kernel_case(inner, N, S, dtype, big=False):
    """The block class and random inputs of a given size for each inner model."""
    from lengen_ttt.model import LinearBlock, MLPBlock

    d, K = (64, 16) if big else (4, 4)
    if inner == "linear":
        return LinearBlock, _block_args(N, S, d, K, dtype), K
    return MLPBlock, _mlp_args(N, S, d, 4 * d if big else 6, K, dtype), K


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("S", [12, 9, 3])
def test_kernel_gradcheck(cpu_kernels, monkeypatch, inner, S):
    monkeypatch.setenv("LENGEN_TTT_KERNEL", "cpp")
    block, args, K = _kernel_case(inner, 2, S, torch.float64)
    args = [t.requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *a: block.apply(*a, K), args, fast_mode=True)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_kernel_float32_matches(cpu_kernels, monkeypatch, inner):
    """At the benchmark's sizes, to float32 summation-order differences."""
    outs = []
    for mode in ("torch", "cpp"):
        monkeypatch.setenv("LENGEN_TTT_KERNEL", mode)
        block, args, K = _kernel_case(inner, 32, 64, torch.float32, big=True)
        with torch.no_grad():
            outs.append(block.apply(*args, K))
    for ref, got in zip(*outs):
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-3)


def test_kernel_build_failure_falls_back_or_fails_clearly(monkeypatch):
    from lengen_ttt import kernels

    def broken():
        raise RuntimeError("Error building extension 'x'\nc++: command not found")

    monkeypatch.setattr(kernels, "_build", broken)
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setattr(kernels, "_exception", None)
    monkeypatch.setenv("LENGEN_TTT_KERNEL", "auto")
    with pytest.warns(UserWarning, match=r"did not compile \(c\+\+: command not found\); using the slower torch code"):
        assert kernels.cpu_kernels() is None
    assert kernels.cpu_kernels() is None  # tried once per process
    monkeypatch.setenv("LENGEN_TTT_KERNEL", "cpp")
    with pytest.raises(RuntimeError, match="LENGEN_TTT_KERNEL=cpp but the TTT CPU kernels did not compile") as info:
        kernels.cpu_kernels()
    assert "Error building extension" in str(info.value.__cause__)  # the whole build output, not just its last line


def test_kernel_extension_name_is_a_hash_of_the_build():
    """Same code, same name (installs share one build); any other source byte or flag, another
    name (versions never overwrite each other's build)."""
    from lengen_ttt import kernels

    code = {"blocks.cpp": b"int f() { return 1; }", "glue.cpp": b"int g() { return 2; }"}
    name = kernels.extension_name(code)
    assert name.startswith("lengen_ttt_") and name.isidentifier()
    assert kernels.extension_name(dict(code)) == name
    assert kernels.extension_name({**code, "glue.cpp": b"int g() { return 3; }"}) != name
    assert kernels.extension_name({"blocks.cpp": code["glue.cpp"], "glue.cpp": code["blocks.cpp"]}) != name
    for flags in ("CFLAGS", "LDFLAGS"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, flags, (*getattr(kernels, flags), "-g"))
            assert kernels.extension_name(code) != name
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "__version__", torch.__version__ + ".other")
        assert kernels.extension_name(code) != name
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXX", "clang++")
        assert kernels.extension_name(code) != name


def test_kernel_first_build_is_announced_above_live_progress_bars(monkeypatch, tmp_path):
    """lengen trains under rich progress bars on stderr: the announcement of the first build
    must come out as a line of its own above them, not be drawn over."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from lengen_ttt import kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there yet
    built = []
    monkeypatch.setattr(kernels, "_compile", lambda name, directory, sources: built.append((name, directory, sources)))
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with Progress(console=console) as progress:
        progress.add_task("train ttt", total=10)
        kernels._build()
    (name, directory, sources), = built
    assert directory == tmp_path / name and [s.parent for s in sources] == [directory] * 2  # built from copies there
    lines = [line.rsplit("\x1b[2K", 1)[-1] for line in out.getvalue().replace("\r", "\n").splitlines()]
    assert "lengen: compiling the TTT CPU kernels (once, about a minute) ..." in lines


def test_kernel_build_is_shared_by_installs_at_other_paths(cpu_kernels, monkeypatch, tmp_path, capsys):
    """A second copy of the plugin elsewhere (another checkout, another venv) imports the same
    built library, without compiling or even announcing a compile."""
    import importlib.util
    import shutil

    from lengen_ttt import kernels

    copy = tmp_path / "elsewhere" / "lengen_ttt"
    shutil.copytree(Path(kernels.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("lengen_ttt_elsewhere_kernels", copy / "kernels.py")
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    monkeypatch.setattr(other, "_compile", lambda *a: pytest.fail("compiled again for a copy at another path"))
    capsys.readouterr()
    ext = other._build()
    assert Path(ext.__file__) == Path(cpu_kernels.__file__)
    assert "compiling" not in capsys.readouterr().err


def test_kernel_mode_is_checked(monkeypatch):
    from lengen_ttt import kernels

    monkeypatch.setenv("LENGEN_TTT_KERNEL", "fast")
    with pytest.raises(ValueError, match="LENGEN_TTT_KERNEL='fast' is not one of auto, cpp, torch"):
        kernels.cpu_kernels()
    monkeypatch.setenv("LENGEN_TTT_KERNEL", "torch")
    assert kernels.cpu_kernels() is None


@pytest.mark.parametrize("mode", ["torch", "cpp"])
def test_qkv_and_readout_gradcheck(monkeypatch, mode):
    """The layer's two hand-written glue functions against finite differences, in the torch
    code and in the CPU kernels (glue.cpp)."""
    from lengen_ttt import kernels
    from lengen_ttt.model import QKV, Readout

    monkeypatch.setenv("LENGEN_TTT_KERNEL", mode)
    if mode == "cpp":
        _skip_without_compiler()
        kernels.cpu_kernels()  # a build error fails the test here
    torch.manual_seed(0)
    B, T, H, d = 2, 5, 2, 4
    dbl = dict(dtype=torch.float64, requires_grad=True)
    rot = torch.polar(torch.ones(T, d // 2, dtype=torch.float64), torch.rand(T, d // 2, dtype=torch.float64))
    args = (torch.randn(B, T, 3 * H * d + H, **dbl), rot, torch.randn(H, **dbl))
    assert torch.autograd.gradcheck(lambda P, r, b: QKV.apply(P, r, b, H, 0.3), args, fast_mode=True)
    args = (torch.randn(B, H, T, d, **dbl), torch.randn(B, H, T, d, **dbl), torch.rand(H, 1, d, **dbl),
            torch.randn(H, 1, d, **dbl), torch.rand(H * d, **dbl), torch.randn(H * d, **dbl))
    assert torch.autograd.gradcheck(lambda *a: Readout.apply(*a, 1e-6, 1e-6), args, fast_mode=True)


@pytest.mark.parametrize("unused", [None, 1, 2, 3])
def test_glue_kernels_equal_torch_code(cpu_kernels, monkeypatch, unused):
    """QKV and Readout in glue.cpp compute what their torch code computes, forward and every
    gradient (float64), also when one of QKV's outputs gets no gradient (it arrives as None)."""
    from lengen_ttt.model import QKV, Readout

    B, T, H, d = 2, 7, 2, 8
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    rot = torch.polar(torch.ones(T, d // 2), torch.rand(T, d // 2, generator=g))  # complex64, as the model's buffer
    P, lr_bias = r(B, T, 3 * H * d + H), r(H)
    z, q, w, b, pw, pb = r(B, H, T, d), r(B, H, T, d), r(H, 1, d), r(H, 1, d), r(H * d), r(H * d)
    results = {}
    for mode in ("torch", "cpp"):
        monkeypatch.setenv("LENGEN_TTT_KERNEL", mode)
        outs = QKV.apply(P, rot.to(torch.complex128), lr_bias, H, 0.3)
        w_out = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
                 for i, o in enumerate(outs)]
        loss = sum((o * wo).sum() for i, (o, wo) in enumerate(zip(outs, w_out)) if i != unused)
        y = Readout.apply(z, q, w, b, pw, pb, 1e-6, 1e-5)
        loss = loss + (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)).sum()
        inputs = (P, lr_bias, z, q, w, b, pw, pb)
        results[mode] = [o.detach() for o in (*outs, y)] + list(torch.autograd.grad(loss, inputs))
    for want, got in zip(results["torch"], results["cpp"]):
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)
