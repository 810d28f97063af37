"""The embedded synthetic language: determinism, annotations, and its optimal NLL checked
against a brute-force enumeration of the generating process."""

import math
import random
from pathlib import Path

import numpy as np
import pytest

from lengen.api import DataContext
from lengen_synthetic.language import (BOS, GET, N_SPECIAL, SET, SyntheticConfig, SyntheticLanguage,
                                       generate_document, make_language)


def ctx(**kw):
    base = dict(seed=3, window=16, eval_length=64, eval_sequences=5, train_tokens=3000, cache_dir=Path("/tmp"))
    base.update(kw)
    return DataContext(**base)


def test_deterministic_and_fingerprinted():
    cfg = SyntheticConfig(n_filler=16, branching=3)
    a = SyntheticLanguage().load(cfg, ctx())
    b = SyntheticLanguage().load(cfg, ctx())
    assert np.array_equal(a.train.tokens, b.train.tokens)
    assert np.array_equal(a.eval.tokens, b.eval.tokens)
    for k in a.eval.annotations:
        assert np.array_equal(a.eval.annotations[k], b.eval.annotations[k])
    assert a.fingerprint == b.fingerprint
    c = SyntheticLanguage().load(cfg, ctx(seed=4))
    assert c.fingerprint != a.fingerprint and not np.array_equal(c.eval.tokens, a.eval.tokens)
    d = SyntheticLanguage().load(SyntheticConfig(n_filler=16, branching=3, p_get=0.1), ctx())
    assert d.fingerprint != a.fingerprint
    # train and eval are different samples of the same language; docs start with BOS
    assert not np.array_equal(a.train.tokens[:65], a.eval.tokens[:65])
    assert (a.eval.tokens[a.eval.doc_starts] == BOS).all()
    assert len(a.eval.doc_starts) == 5 and len(a.eval) == 5 * 65


def test_annotations_are_consistent():
    cfg = SyntheticConfig()
    lang = make_language(cfg, 0)
    toks, nll, kind, dist = generate_document(lang, random.Random(1), 3000)
    val_base = N_SPECIAL + cfg.n_keys
    for i, k in enumerate(kind):
        if k:
            # an answer follows GET key, and the same key-value pair was stated dist tokens back
            assert toks[i - 2] == GET and val_base <= toks[i] < val_base + cfg.n_values
            j = i - dist[i]
            assert toks[j] == toks[i] and toks[j - 1] == toks[i - 1] and toks[j - 2] in (SET, GET)
            assert nll[i] == 0.0
    assert sum(1 for k in kind if k == 1) > 0 and sum(1 for k in kind if k == 2) > 0
    assert max(dist) > 64  # long-range recall exists


def brute_force_sequence_probs(lang, length):
    """P(x_1..x_length) for every sequence the process can emit, by enumerating every latent
    path (segment choices, and for GET whether the key came from the "recent" or the
    "random bound key" branch) and summing the paths that emit the same tokens."""
    c = lang.cfg
    F = c.n_filler
    key = lambda k: N_SPECIAL + k  # noqa: E731
    val = lambda v: N_SPECIAL + c.n_keys + v  # noqa: E731
    full: dict[tuple, float] = {}

    def walk(seq, p, binding, order, last_set, a, b):
        if len(seq) >= length:
            t = tuple(seq[:length])
            full[t] = full.get(t, 0.0) + p
            return
        pg = c.p_get if order else 0.0
        for k in range(c.n_keys):
            for v in range(c.n_values):
                nb = dict(binding)
                nb[k] = v
                walk(seq + [SET, key(k), val(v)], p * c.p_set / c.n_keys / c.n_values, nb,
                     order + ([k] if k not in binding else []), k, a, b)
        if pg:
            branches = [(last_set, c.p_recent)] + [(k, (1 - c.p_recent) / len(order)) for k in order]
            for k, pk in branches:
                walk(seq + [GET, key(k), val(binding[k])], p * pg * pk, binding, order, last_set, a, b)
        for w, pw in lang.probs[a * F + b].items():
            walk(seq + [N_SPECIAL + c.n_keys + c.n_values + w], p * (1 - c.p_set - pg) * pw,
                 binding, order, last_set, b, w)

    walk([BOS], 1.0, {}, [], -1, 0, 0)
    return full


def test_optimal_ppl_below_unigram():
    corpus = SyntheticLanguage().load(SyntheticConfig(), ctx(eval_length=640, eval_sequences=8, train_tokens=100_000))
    opt = np.exp(corpus.eval.annotations["optimal_nll"][1:].mean())
    counts = np.bincount(corpus.train.tokens, minlength=corpus.vocab_size) + 1
    uni = np.exp(-np.log(counts / counts.sum())[corpus.eval.tokens].mean())
    assert 1 < opt < uni


def test_doc_length_shorter_than_eval_is_refused():
    from lengen.errors import ConfigError

    with pytest.raises(ConfigError, match="shorter than the evaluation length"):
        SyntheticLanguage().load(SyntheticConfig(doc_length=10), ctx())
