"""The core metrics.

Position bucket: ``ppl@kW`` is the perplexity of the ``bucket`` tokens *ending* at position
k x W, i.e. positions ``kW - bucket + 1 .. kW`` (1-based; position p is predicted from the p
tokens before it), pooled over evaluation sequences. Intervals are percentile bootstraps
over sequences; accuracies use Wilson intervals over answers.
"""

from __future__ import annotations

import numpy as np
from dataclasses import replace

from pydantic import Field

from lengen.api import Metric, MetricConfig, MetricContext, OutputSpec, PlotSpec, Scores, Series, Value
from lengen.stats import bootstrap_mean, bootstrap_ppl, bootstrap_ppl_ratio, percentile_interval, wilson


def _bucket_columns(k: float, ctx: MetricContext, length: int) -> slice:
    end = int(round(k * ctx.window))
    end = min(end, length)
    return slice(max(0, end - ctx.bucket), end)


def _boot_kwargs(ctx: MetricContext, salt: int = 0) -> dict:
    return {"samples": ctx.bootstrap, "confidence": ctx.confidence, "seed": ctx.seed + salt}


def _ppl_curve(out: dict, prefix: str, points, ctx: MetricContext, salt: int) -> Series:
    """``out[f"{prefix}@{k}W"]`` for each ``(key tokens, x, sums, counts)`` in ``points``,
    and the series of them (x in multiples of W)."""
    xs, vals = [], []
    for i, (key, x, sums, counts) in enumerate(points):
        v = bootstrap_ppl(sums, counts, **_boot_kwargs(ctx, salt + i))
        out[f"{prefix}@{ctx.label(key / ctx.window)}"] = v
        xs.append(x)
        vals.append(v)
    return Series(xs, vals)


class PerplexityConfig(MetricConfig):
    horizon_eps: float = Field(0.05, ge=0, description="extrapolation horizon tolerance: ppl <= (1 + eps) ppl@1W")


class PositionPerplexity(Metric):
    """Perplexity at k x W, by position, whole-sequence, degradation ratios to 1 x W, and the
    extrapolation horizon (the largest reported k with ppl@kW <= (1 + eps) ppl@1W)."""

    Config = PerplexityConfig
    perfect = {"ppl@1W": 1.0, "ppl": 1.0}
    outputs = (
        OutputSpec("ppl@*W", better="lower", leaderboard=True, table="all", checkpoint=True, status=("1W", "10W"),
                   note="ppl@kW: perplexity of the bucket of tokens ending at position k x W."),
        OutputSpec("ppl_ratio@*W", leaderboard=True, table="last", checkpoint=True, header="ratio {x}/1W", digits=3),
        OutputSpec("horizon", leaderboard=True, table="all", checkpoint=True),
        OutputSpec("ppl", better="lower", leaderboard=True, checkpoint=True),
        OutputSpec("ppl_by_position", checkpoint=True),
    )
    plots = (PlotSpec("ppl_by_position", kind="position", filename="ppl_by_position.png",
                      xlabel="position (multiples of the training window W)",
                      ylabel="perplexity of the bucket ending there", primary=True),)

    def compute(self, scores: Scores, config: PerplexityConfig, ctx: MetricContext):
        nll, L = scores.nll, scores.length
        out: dict = {}
        cols = {k: _bucket_columns(k, ctx, L) for k in ctx.positions}
        for i, (k, c) in enumerate(cols.items()):
            out[f"ppl@{ctx.label(k)}"] = bootstrap_ppl(nll[:, c].sum(1), np.full(len(nll), c.stop - c.start),
                                                       **_boot_kwargs(ctx, i))
        ref = _bucket_columns(1, ctx, L)
        for i, (k, c) in enumerate(cols.items()):
            if k == 1:
                continue
            out[f"ppl_ratio@{ctx.label(k)}"] = bootstrap_ppl_ratio(
                nll[:, c].sum(1), np.full(len(nll), c.stop - c.start),
                nll[:, ref].sum(1), np.full(len(nll), ref.stop - ref.start), **_boot_kwargs(ctx, 100 + i))
        out["ppl"] = bootstrap_ppl(nll.sum(1), np.full(len(nll), L), **_boot_kwargs(ctx, 200))
        if 1 in cols:
            out["horizon"] = self._horizon(nll, cols, config.horizon_eps, ctx)
        xs, vals = [], []
        for j, end in enumerate(range(ctx.bucket, L + 1, ctx.bucket)):
            c = slice(end - ctx.bucket, end)
            xs.append(end / ctx.window)
            vals.append(bootstrap_ppl(nll[:, c].sum(1), np.full(len(nll), ctx.bucket),
                                      **_boot_kwargs(ctx, 1000 + j)))
        out["ppl_by_position"] = Series(xs, vals)
        return out

    @staticmethod
    def _horizon(nll, cols: dict, eps: float, ctx: MetricContext) -> Value:
        ks = np.array(list(cols))
        sums = np.stack([nll[:, c].sum(1) for c in cols.values()], 1)  # [N, positions]
        width = np.array([c.stop - c.start for c in cols.values()], dtype=float)
        ref = list(cols).index(1)

        def horizon(mean_nll):  # mean_nll [..., positions]
            ok = mean_nll <= mean_nll[..., ref:ref + 1] + np.log1p(eps)
            return np.where(ok, ks, 0).max(-1)

        point = float(horizon(sums.sum(0) / (len(nll) * width)))
        if len(nll) < 2 or ctx.bootstrap <= 0:
            return Value(point, None, None, None, len(nll), bounds=(float(ks.min()), float(ks.max())))
        rng = np.random.default_rng(ctx.seed + 300)
        idx = rng.integers(0, len(nll), size=(ctx.bootstrap, len(nll)))
        boot = horizon(sums[idx].sum(1) / (len(nll) * width))
        lo, hi = percentile_interval(boot, ctx.confidence)
        return Value(point, lo, hi, float(boot.std(ddof=1)), len(nll), bounds=(float(ks.min()), float(ks.max())))


class LengthPerplexity(Metric):
    """Perplexity of whole evaluation sequences of length l, over a grid of lengths.

    In ``full`` and ``window`` mode a sequence of length l is the first l predictions of a
    longer one; in ``nonoverlapping`` mode each sequence is cut into independent pieces of l.
    Lengths the data cannot fill are recorded as missing."""

    modes = ("full", "window", "nonoverlapping")
    perfect = {"ppl_len@1W": 1.0}
    outputs = (OutputSpec("ppl_len@*W", better="lower", leaderboard=True, table=("1W", "2W", "5W", "10W", "20W"),
                          table_modes=("nonoverlapping",), header="len {x}",
                          note="len kW: perplexity of independent sequences of k x W tokens."),)
    plots = (PlotSpec("ppl_by_length", kind="length", filename="ppl_by_length.png",
                      xlabel="evaluation length L (multiples of W)", ylabel="perplexity of whole sequences"),)

    def compute(self, scores: Scores, config: MetricConfig, ctx: MetricContext):
        out: dict = {}
        for l in ctx.lengths:
            if l not in scores.lengths:  # too little data: recorded as missing (value null, n 0)
                out[f"ppl_len@{ctx.label(l / ctx.window)}"] = Value(float("nan"), n=0)
        points = [(l, l / ctx.window, *scores.lengths[l]) for l in ctx.lengths if l in scores.lengths]
        out["ppl_by_length"] = _ppl_curve(out, "ppl_len", points, ctx, 400)
        return out


class ContextUtilization(Metric):
    """The same target tokens (the last bucket of each sequence) scored with c tokens of
    available context, for c over a grid: falling perplexity beyond W means the model uses
    context a window cannot see; it is not the early-token effect, since targets are fixed."""

    modes = ("full",)
    perfect = {"ppl_ctx@1W": 1.0}
    outputs = (OutputSpec("ppl_ctx@*W", better="lower", leaderboard=True),)
    plots = (PlotSpec("ppl_by_context", kind="context", filename="ppl_by_context.png",
                      xlabel="context available before the target tokens (multiples of W)",
                      ylabel="perplexity of the same target tokens"),)

    def compute(self, scores: Scores, config: MetricConfig, ctx: MetricContext):
        out: dict = {}
        if scores.context:  # eval.contexts set
            points = [(c, avail / ctx.window, sums, counts)
                      for c, (sums, counts, avail) in sorted(scores.context.items())]
            out["ppl_by_context"] = _ppl_curve(out, "ppl_ctx", points, ctx, 500)
        return out


class RecallConfig(MetricConfig):
    edges: list[float] = Field([0, 0.25, 0.5, 1, 2, 5, 10, 20],
                               description="distance bin edges in multiples of W (last bin is open)")


class RecallByDistance(Metric):
    """Accuracy on recall answers, by distance to the answer's last statement."""

    Config = RecallConfig
    requires = ("recall_kind", "recall_distance")
    perfect = {"recall@<=W": 1.0, "recall@>W": 1.0}
    KINDS = {"": (1, 2), "_recent": (1,), "_keyed": (2,)}
    outputs = (
        OutputSpec("recall@<=W", better="higher", leaderboard=True, table="all", checkpoint=True, header="rec≤W",
                   percent=True, digits=1, note="rec: recall accuracy in %, answers stated within / beyond W back."),
        OutputSpec("recall@>W", better="higher", leaderboard=True, table="all", checkpoint=True, header="rec>W",
                   percent=True, digits=1),
        OutputSpec("recall_*@*W", better="higher", leaderboard=True, checkpoint=True),
        OutputSpec("recall_chance", checkpoint=True),
    )
    plots = (PlotSpec("recall_by_distance", kind="recall", filename="recall_by_distance.png",
                      xlabel="distance to the answer's last statement (multiples of W)",
                      ylabel="recall accuracy"),)

    def example_inputs(self, n, length, rng):
        kind = np.where(rng.random((n, length)) < 0.1, rng.integers(1, 3, (n, length)), 0)
        dist = np.where(kind > 0, rng.integers(1, 4 * length, (n, length)), 0)
        return {"recall_kind": kind, "recall_distance": dist}, {"chance_recall": 1 / 32}

    def compute(self, scores: Scores, config: RecallConfig, ctx: MetricContext):
        kind = scores.annotations["recall_kind"]
        dist = scores.annotations["recall_distance"]
        W = ctx.window
        out: dict = {}
        chance = ctx.info.get("chance_recall")
        if chance is not None:
            out["recall_chance"] = Value(float(chance))
        edges = [e * W for e in config.edges] + [np.inf]
        for suffix, kinds in self.KINDS.items():
            answer = np.isin(kind, kinds)
            within = answer & (dist <= W)
            beyond = answer & (dist > W)
            out[f"recall{suffix}@<=W"] = wilson(int(scores.correct[within].sum()), int(within.sum()),
                                                confidence=ctx.confidence)
            out[f"recall{suffix}@>W"] = wilson(int(scores.correct[beyond].sum()), int(beyond.sum()),
                                               confidence=ctx.confidence)
            xs, vals = [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = answer & (dist > lo) & (dist <= hi)
                if sel.any():
                    xs.append(float(lo / W if np.isinf(hi) else hi / W))
                    vals.append(wilson(int(scores.correct[sel].sum()), int(sel.sum()), confidence=ctx.confidence))
            out[f"recall{suffix}_by_distance"] = Series(xs, vals)
        return out


class ExcessLoss(Metric):
    """Model NLL minus the Bayes-optimal NLL, at k x W, by position and overall (nats/token)."""

    requires = ("optimal_nll",)
    perfect = {"excess_nll": 0.0}
    outputs = (
        OutputSpec("excess_nll", better="lower", leaderboard=True, checkpoint=True),
        OutputSpec("excess_nll@*W", better="lower", leaderboard=True, checkpoint=True),
        OutputSpec("ppl_optimal@*W", leaderboard=True, reference="position", label="Bayes-optimal"),
    )
    plots = (PlotSpec("excess_nll_by_position", kind="excess", filename="excess_nll_by_position.png",
                      xlabel="position (multiples of the training window W)",
                      ylabel="NLL above the Bayes-optimal (nats/token)"),)

    def example_inputs(self, n, length, rng):
        return {"optimal_nll": np.zeros((n, length), np.float32)}, {}

    def compute(self, scores: Scores, config: MetricConfig, ctx: MetricContext):
        excess = scores.nll - scores.annotations["optimal_nll"]
        opt = scores.annotations["optimal_nll"].astype(np.float64)
        L = scores.length
        out: dict = {}
        for i, k in enumerate(ctx.positions):
            c = _bucket_columns(k, ctx, L)
            n = np.full(len(excess), c.stop - c.start)
            out[f"excess_nll@{ctx.label(k)}"] = bootstrap_mean(excess[:, c].sum(1), n, **_boot_kwargs(ctx, i))
            out[f"ppl_optimal@{ctx.label(k)}"] = bootstrap_ppl(opt[:, c].sum(1), n, **_boot_kwargs(ctx, 50 + i))
        out["excess_nll"] = bootstrap_mean(excess.sum(1), np.full(len(excess), L), **_boot_kwargs(ctx, 99))
        xs, vals = [], []
        for j, end in enumerate(range(ctx.bucket, L + 1, ctx.bucket)):
            c = slice(end - ctx.bucket, end)
            xs.append(end / ctx.window)
            vals.append(bootstrap_mean(excess[:, c].sum(1), np.full(len(excess), ctx.bucket),
                                       **_boot_kwargs(ctx, 1000 + j)))
        out["excess_nll_by_position"] = Series(xs, vals)
        return out


class UnigramReference(Metric):
    """Perplexity a unigram model fit on the training split gets on the same tokens."""

    requires = ("unigram_nll",)
    outputs = (OutputSpec("ppl_unigram@*W", leaderboard=True, reference="position", label="unigram"),
               OutputSpec("ppl_unigram", leaderboard=True))

    def annotate(self, corpus, sequences, config):
        """Per-token NLL of an add-one unigram model fit on the training split."""
        counts = np.bincount(np.asarray(corpus.train.tokens), minlength=corpus.vocab_size).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        nll = (-logp[sequences]).astype(np.float32)
        nll[:, 0] = 0.0  # the first token is context only
        return {"unigram_nll": nll}

    def example_inputs(self, n, length, rng):
        return {"unigram_nll": np.full((n, length), np.log(32), np.float32)}, {}

    def compute(self, scores: Scores, config: MetricConfig, ctx: MetricContext):
        uni = scores.annotations["unigram_nll"].astype(np.float64)
        out: dict = {}
        for i, k in enumerate(ctx.positions):
            c = _bucket_columns(k, ctx, scores.length)
            out[f"ppl_unigram@{ctx.label(k)}"] = bootstrap_ppl(
                uni[:, c].sum(1), np.full(len(uni), c.stop - c.start), **_boot_kwargs(ctx, i))
        out["ppl_unigram"] = bootstrap_ppl(uni.sum(1), np.full(len(uni), scores.length), **_boot_kwargs(ctx, 99))
        return out


class BitsPerCharacter(Metric):
    """Bits per character (character-level tokenizers) or per byte (byte-level ones) at k x W
    and over whole sequences: the NLL in bits of a bucket's tokens divided by the characters
    (bytes) those tokens encode, pooled over sequences, with the same bootstrap as ``ppl``.

    The dataset tells the unit: :meth:`annotate` reads ``corpus.tokenizer["kind"]`` (the
    ``text`` datasets' ``char`` or ``byte``) and counts each token as one character (byte),
    except the document separator, which encodes none. For other tokenizers (BPE, word-level,
    the synthetic language) the metric is skipped. Without separators, ``bpc@kW`` is exactly
    ``log2(ppl@kW)``, interval included."""

    requires = ("text_units",)
    perfect = {"bpc@1W": 0.0, "bpc": 0.0}
    outputs = (
        OutputSpec("bpc@*W", better="lower", leaderboard=True, table="all", checkpoint=True, header="bpc {x}",
                   digits=3, note="bpc kW: bits per character (per byte for a byte tokenizer) of the same bucket."),
        OutputSpec("bpc", better="lower", leaderboard=True, checkpoint=True, digits=3),
    )
    UNIT_KINDS = ("char", "byte")

    def annotate(self, corpus, sequences, config):
        """``text_units``: characters (bytes) each evaluation token encodes, for char- and
        byte-level tokenizers only."""
        tok = corpus.tokenizer or {}
        if tok.get("kind") not in self.UNIT_KINDS:
            return {}
        units = np.ones(sequences.shape, np.float32)
        if tok.get("separator_id") is not None:
            units[sequences == tok["separator_id"]] = 0.0
        units[:, 0] = 0.0  # the first token is context only
        return {"text_units": units}

    def example_inputs(self, n, length, rng):
        return {"text_units": np.ones((n, length), np.float32)}, {}

    def compute(self, scores: Scores, config: MetricConfig, ctx: MetricContext):
        bits = scores.nll / np.log(2.0)
        units = scores.annotations["text_units"].astype(np.float64)
        out: dict = {}

        def value(cols, salt):  # the salts of ppl@kW and ppl: the same resamples
            v = bootstrap_mean(bits[:, cols].sum(1), units[:, cols].sum(1), **_boot_kwargs(ctx, salt))
            return replace(v, bounds=(0.0, None))

        for i, k in enumerate(ctx.positions):
            out[f"bpc@{ctx.label(k)}"] = value(_bucket_columns(k, ctx, scores.length), i)
        out["bpc"] = value(slice(None), 200)
        return out
