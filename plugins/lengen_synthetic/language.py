"""The embedded synthetic language.

A document is a stream of *segments*. At every segment boundary the generator emits

* ``SET k v`` with probability ``p_set``: key ``k`` (uniform) is bound to value ``v``
  (uniform), replacing any earlier binding of ``k``;
* ``GET k v`` with probability ``p_get`` (only once some key is bound): with probability
  ``p_recent`` ``k`` is the most recently SET key, otherwise a uniformly chosen bound key;
  ``v`` is ``k``'s current value, so the answer ``v`` is fully determined by the past;
* otherwise one *filler* word from a second-order Markov chain over a Zipfian vocabulary;
  its context is the previous two filler words, which may lie before SET/GET segments.

Because every latent choice is visible in the tokens, the probability the generator assigned
to each token is exactly the Bayes-optimal predictive probability given the whole prefix;
it is recorded as ``optimal_nll``. Each GET answer is annotated with ``recall_kind`` (1: the
key is the most recently SET key, "recent"; 2: another key, "keyed") and
``recall_distance``: how many tokens back the pair ``k v`` was last stated (by its SET or an
earlier GET). A model limited to the last W tokens can only answer when that distance is at
most W (an n-layer window model can relay up to n x W). Every document starts with ``BOS``.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from lengen.api import Corpus, DataContext, Dataset, DatasetConfig, Split, config_hash

BOS, SET, GET = 0, 1, 2
N_SPECIAL = 3
GENERATOR_VERSION = "1"


class SyntheticConfig(DatasetConfig):
    n_keys: int = Field(16, ge=1, description="number of keys")
    n_values: int = Field(32, ge=2, description="number of values")
    n_filler: int = Field(96, ge=2, description="filler vocabulary size")
    branching: int = Field(6, ge=1, description="successors per filler context")
    zipf: float = Field(1.0, ge=0, description="Zipf exponent of successor popularity")
    sharpness: float = Field(1.5, gt=0, description="peakiness of each context's successor weights")
    p_set: float = Field(0.06, gt=0, lt=1, description="P(SET segment) at a boundary")
    p_get: float = Field(0.06, ge=0, lt=1, description="P(GET segment) at a boundary once a key is bound")
    p_recent: float = Field(0.5, ge=0, le=1, description="P(a GET asks the most recently SET key)")
    doc_length: int | None = Field(None, gt=1, description="tokens per document (default: eval length + 1)")
    train_tokens: int | None = Field(None, gt=0, description="training tokens (default: what the run consumes)")
    eval_docs: int | None = Field(None, gt=0, description="evaluation documents (default: the suite's sequences)")

    @model_validator(mode="after")
    def _probabilities(self) -> "SyntheticConfig":
        if self.p_set + self.p_get >= 1:
            raise ValueError("p_set + p_get must be < 1 (filler needs probability mass)")
        if self.branching > self.n_filler:
            raise ValueError("branching cannot exceed n_filler")
        return self


@dataclass
class Language:
    """The fixed parameters of one language (drawn from the data seed)."""

    cfg: SyntheticConfig
    succ: list  # succ[ctx] -> list of successor filler ids
    cum: list  # cum[ctx] -> cumulative probabilities (last = 1.0)
    probs: list  # probs[ctx] -> dict successor -> probability

    @property
    def vocab_size(self) -> int:
        c = self.cfg
        return N_SPECIAL + c.n_keys + c.n_values + c.n_filler

    def key_token(self, k: int) -> int:
        return N_SPECIAL + k

    def value_token(self, v: int) -> int:
        return N_SPECIAL + self.cfg.n_keys + v

    def filler_token(self, f: int) -> int:
        return N_SPECIAL + self.cfg.n_keys + self.cfg.n_values + f

    def decode(self, tokens) -> str:
        c = self.cfg
        out = []
        for t in tokens:
            t = int(t)
            if t < N_SPECIAL:
                out.append(("<bos>", "SET", "GET")[t])
            elif t < N_SPECIAL + c.n_keys:
                out.append(f"k{t - N_SPECIAL}")
            elif t < N_SPECIAL + c.n_keys + c.n_values:
                out.append(f"v{t - N_SPECIAL - c.n_keys}")
            else:
                out.append(f"w{t - N_SPECIAL - c.n_keys - c.n_values}")
        return " ".join(out)

    def encode(self, text: str) -> list[int]:
        """The inverse of :meth:`decode`: ``"<bos> SET k3 v5 w12"`` -> token ids. A word outside
        the vocabulary is a ``ValueError`` naming it and the words there are."""
        c = self.cfg
        ranges = {"k": (c.n_keys, self.key_token), "v": (c.n_values, self.value_token),
                  "w": (c.n_filler, self.filler_token)}
        special = {"<bos>": BOS, "SET": SET, "GET": GET}
        out = []
        for word in text.split():
            if word in special:
                out.append(special[word])
                continue
            n, token = ranges.get(word[:1], (0, None))
            if token is None or not word[1:].isdigit() or int(word[1:]) >= n:
                raise ValueError(
                    f"{word!r} is not a word of this synthetic language; its words are <bos>, SET, GET, "
                    f"k0..k{c.n_keys - 1} (keys), v0..v{c.n_values - 1} (values), w0..w{c.n_filler - 1} (filler)")
            out.append(token(int(word[1:])))
        return out


def make_language(cfg: SyntheticConfig, seed: int) -> Language:
    """Draw the filler chain: each context (a, b) gets ``branching`` distinct successors,
    preferring popular (Zipfian) words, with weights ``Exp(1) ** sharpness``."""
    rng = random.Random(f"lengen-synthetic-language-{seed}")
    F = cfg.n_filler
    popularity = [1.0 / (i + 1) ** cfg.zipf for i in range(F)]
    pop_cum = _cumulative(popularity)
    succ, cum, probs = [], [], []
    for _ctx in range(F * F):
        chosen: list[int] = []
        while len(chosen) < cfg.branching:
            w = bisect.bisect_right(pop_cum, rng.random() * pop_cum[-1])
            w = min(w, F - 1)
            if w not in chosen:
                chosen.append(w)
        weights = [(-math.log(1.0 - rng.random())) ** cfg.sharpness for _ in chosen]
        total = sum(weights)
        p = [w / total for w in weights]
        succ.append(chosen)
        cum.append(_cumulative(p))
        probs.append(dict(zip(chosen, p)))
    return Language(cfg, succ, cum, probs)


def _cumulative(weights):
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(acc)
    out[-1] = acc
    return out


def generate_document(lang: Language, rng: random.Random, length: int):
    """One document of ``length`` tokens, with per-token annotations.

    Returns ``tokens, optimal_nll, recall_kind, recall_distance`` (lists). ``optimal_nll``
    of the first token (BOS, never predicted) is 0.
    """
    c = lang.cfg
    F = c.n_filler
    p_set, p_get, p_recent = c.p_set, c.p_get, c.p_recent
    key_base = N_SPECIAL
    val_base = N_SPECIAL + c.n_keys
    fil_base = val_base + c.n_values
    log_nv = math.log(c.n_values)
    log_nk = math.log(c.n_keys)

    toks = [BOS]
    nll = [0.0]
    kind = [0]
    dist = [0]
    binding: dict[int, int] = {}  # key -> value
    bound: list[int] = []  # keys bound so far, in first-binding order
    last_mention: dict[int, int] = {}  # key -> index of the value token that last stated k v
    last_set = -1
    a = b = 0  # filler context: the two previous filler words
    while len(toks) < length:
        pg = p_get if bound else 0.0
        u = rng.random()
        if u < p_set:
            k = int(rng.random() * c.n_keys)
            v = int(rng.random() * c.n_values)
            if k not in binding:
                bound.append(k)
            binding[k] = v
            last_set = k
            toks += [SET, key_base + k, val_base + v]
            nll += [-math.log(p_set), log_nk, log_nv]
            kind += [0, 0, 0]
            dist += [0, 0, 0]
            last_mention[k] = len(toks) - 1
        elif u < p_set + pg:
            if rng.random() < p_recent:
                k = last_set
            else:
                k = bound[int(rng.random() * len(bound))]
            p_key = p_recent * (k == last_set) + (1.0 - p_recent) / len(bound)
            v = binding[k]
            toks += [GET, key_base + k, val_base + v]
            nll += [-math.log(pg), -math.log(p_key), 0.0]
            answer_at = len(toks) - 1
            kind += [0, 0, 1 if k == last_set else 2]
            dist += [0, 0, answer_at - last_mention[k]]
            last_mention[k] = answer_at
        else:
            ctx = a * F + b
            w = bisect.bisect_right(lang.cum[ctx], rng.random())
            w = lang.succ[ctx][min(w, len(lang.succ[ctx]) - 1)]
            toks.append(fil_base + w)
            nll.append(-math.log((1.0 - p_set - pg) * lang.probs[ctx][w]))
            kind.append(0)
            dist.append(0)
            a, b = b, w
    return toks[:length], nll[:length], kind[:length], dist[:length]


def generate_split(lang: Language, seed: str, n_docs: int, length: int) -> Split:
    rng = random.Random(seed)
    toks, nll, kind, dist = [], [], [], []
    for _ in range(n_docs):
        t, n, k, d = generate_document(lang, rng, length)
        toks += t
        nll += n
        kind += k
        dist += d
    return Split(
        tokens=np.asarray(toks, dtype=np.int64),
        doc_starts=np.arange(n_docs, dtype=np.int64) * length,
        annotations={
            "optimal_nll": np.asarray(nll, dtype=np.float32),
            "recall_kind": np.asarray(kind, dtype=np.int8),
            "recall_distance": np.asarray(dist, dtype=np.int32),
        },
    )


class SyntheticLanguage(Dataset):
    """Embedded synthetic language with known optimal loss and long-range recall."""

    Config = SyntheticConfig
    version = GENERATOR_VERSION

    def load(self, config: SyntheticConfig, ctx: DataContext) -> Corpus:
        doc_len = config.doc_length or ctx.eval_length + 1
        if doc_len < ctx.eval_length + 1:
            from lengen.errors import ConfigError

            raise ConfigError(
                f"synthetic doc_length = {doc_len} is shorter than the evaluation length "
                f"{ctx.eval_length} + 1; raise data.doc_length or drop it to use the default")
        train_tokens = config.train_tokens or ctx.train_tokens
        n_train = max(1, math.ceil(train_tokens / doc_len))
        n_eval = config.eval_docs or ctx.eval_sequences
        lang = make_language(config, ctx.seed)
        train = generate_split(lang, f"lengen-synthetic-train-{ctx.seed}", n_train, doc_len)
        evals = generate_split(lang, f"lengen-synthetic-eval-{ctx.seed}", n_eval, doc_len)
        fingerprint = config_hash({
            "generator": GENERATOR_VERSION, "config": config.model_dump(mode="json"),
            "seed": ctx.seed, "doc_length": doc_len, "n_train": n_train, "n_eval": n_eval,
        })
        return Corpus(
            train=train,
            eval=evals,
            vocab_size=lang.vocab_size,
            fingerprint=fingerprint,
            tokenizer={"name": "synthetic", "hash": config_hash(config.model_dump(mode="json"))},
            info={"doc_length": doc_len, "train_docs": n_train, "eval_docs": n_eval,
                  "chance_recall": 1.0 / config.n_values},
            decode=lang.decode,
            encode=lang.encode,
        )
