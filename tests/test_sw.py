"""The sliding-window transformer: causal, windowed, streamable, O(L x W)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lengen.api import BuildContext
from lengen_sw.model import SlidingWindow, SWConfig


def build(window=8, vocab=50, **kw):
    torch.manual_seed(0)
    cfg = SWConfig(d_model=32, n_layers=2, n_heads=2, **kw)
    return SlidingWindow().build(cfg, BuildContext(vocab_size=vocab, window=window)).eval()


def dense_reference(model, x):
    """The same network with an explicit L x L band-masked attention (the slow definition)."""
    from lengen.nn import Rotary

    T = x.shape[1]
    cos, sin = model.rotary.cos_sin(torch.arange(T))
    h = model.embed(x)
    i = torch.arange(T)
    mask = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < model.window)
    for block in model.blocks:
        att = block.attn
        B = x.shape[0]
        q, k, v = att.qkv(block.norm1(h)).view(B, T, 3, att.n_heads, att.head_dim).permute(2, 0, 3, 1, 4)
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(att.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        y = scores.softmax(-1) @ v
        h = h + att.proj(y.transpose(1, 2).reshape(B, T, -1))
        h = h + block.mlp(block.norm2(h))
    return model.head(model.norm(h))


def test_long_evaluation_equals_dense_masked_reference():
    model = build(window=8)
    x = torch.randint(0, 50, (3, 8 * 7 + 3))  # several blocks and a ragged tail
    with torch.no_grad():
        fast, _ = model(x)
        ref = dense_reference(model, x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_training_length_is_plain_causal_attention():
    model = build(window=16)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], dense_reference(model, x), atol=1e-5, rtol=1e-5)


def test_causality():
    model = build(window=8)
    x = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        base, _ = model(x)
        for t in (0, 7, 8, 23, 38):
            y = x.clone()
            y[:, t + 1:] = torch.randint(0, 50, y[:, t + 1:].shape)
            out, _ = model(y)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=0, rtol=0)


def test_window_limits_what_is_seen():
    model = build(window=8)
    x = torch.randint(0, 50, (1, 40))
    y = x.clone()
    y[:, :20] = torch.randint(0, 50, (1, 20))  # change only tokens more than W back
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    # position t sees tokens t-7..t in layer 1 and so up to 14 back through two layers
    torch.testing.assert_close(a[:, 20 + 14:], b[:, 20 + 14:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 20:27], b[:, 20:27])


@pytest.mark.parametrize("chunk", [1, 5, 8, 13])
def test_streaming_equals_one_pass(chunk):
    model = build(window=8)
    x = torch.randint(0, 50, (2, 45))
    with torch.no_grad():
        full, _ = model(x)
        state, outs = None, []
        for s in range(0, 45, chunk):
            out, state = model(x[:, s:s + chunk], state)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert state["pos"] == 45 and state["kv"][0][0].shape[2] == 7  # W - 1 cached keys


def test_no_quadratic_attention_matrix(monkeypatch):
    """At L = 20 x W every attention call sees at most 2W keys per query block."""
    model = build(window=8)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 160)))
    assert seen and all(nq <= 8 and nk <= 16 for nq, nk in seen)


def test_config_rejects_unknown_keys():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SWConfig(d_model=32, n_layer=3)
