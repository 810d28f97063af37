"""Scoring evaluation sequences in each evaluation mode.

Everything reduces to one primitive, :meth:`Scorer.score_rows`: feed each row of tokens to
the model from scratch (no state) and keep the NLL of its last ``k`` predictions. The modes
differ only in which rows they build from the evaluation sequences ``[N, L + 1]``
(column ``j`` of the result predicts token ``j + 1`` from tokens ``0..j``):

``full``
    each whole sequence, once: every prediction sees the whole prefix the model can use.
``window``
    every prediction sees at most the last W tokens: the first W predictions come from one
    pass over the first W tokens (exactly ``full`` there); after that, windows of W tokens
    ending every S tokens, each scoring its last S predictions (context W - S + 1 .. W).
    S = 1 is the exact, slow limit; the seeds used S = 16.
``nonoverlapping``
    at each evaluation length l, each sequence cut into independent pieces of l predictions,
    each scored from scratch (ALiBi's protocol, with its "early token" disadvantage).

A stateful model is fed in chunks with its state carried (``eval.chunk`` tokens, W by
default), which must equal one pass (the conformance kit checks it); the chunk bounds the
memory a long sequence needs, so evaluation at 64 x W and beyond fits where one pass would not.

:func:`evaluate_model` runs the suite's modes and every applicable metric on them.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lengen.api import Architecture, MetricContext, Scores, Split, as_output
from lengen.errors import ConfigError, LengenError

LOGIT_BUDGET = 1 << 25  # floats of logits held at once during evaluation
MODES = ("full", "window", "nonoverlapping")


def eval_sequences(split: Split, length: int, count: int, *, policy: str = "documents",
                   source: str = "eval") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``count`` sequences of ``length + 1`` tokens (the first is context only).

    ``documents``: the first ``length + 1`` tokens of each document that is long enough.
    ``packed``: consecutive ``length + 1``-token slices of the concatenated stream.
    """
    need = length + 1
    if policy == "documents":
        starts = [a for a, b in split.documents() if b - a >= need][:count]
    elif policy == "packed":
        starts = list(range(0, len(split) - need + 1, need))[:count]
    else:
        raise ConfigError(f"unknown document policy {policy!r}; use 'documents' or 'packed'")
    if not starts:
        raise ConfigError(
            f"no {source} sequence of {need} tokens is available ({len(split)} tokens in "
            f"{len(split.doc_starts)} documents, policy {policy!r}); lower eval.length or use "
            "the 'packed' policy")
    if len(starts) < count:
        warnings.warn(f"only {len(starts)} of the {count} requested evaluation sequences of "
                      f"{need} tokens are available; evaluating on those", stacklevel=2)
    idx = np.asarray(starts)[:, None] + np.arange(need)[None, :]
    return split.tokens[idx], {k: v[idx] for k, v in split.annotations.items()}


@dataclass
class Scorer:
    """Runs a model over rows of tokens, each from scratch, and scores their tail."""

    model: torch.nn.Module
    arch: Architecture
    device: object = "cpu"
    batch_tokens: int = 16 * 1280  # tokens per forward batch (rows per batch = this // row length)
    chunk: int | None = None  # tokens per forward for stateful models (None: by logit budget)
    autocast: object = None
    #: measure the peak memory of the first batch (every batch of a call has the same shapes,
    #: so that is the evaluation's peak, at a fraction of the cost of tracking every batch)
    measure_memory: bool = False
    memory_peak: int | None = None
    memory_method: str | None = None
    #: keep each per-token statistic of ``Output.stats`` per scored token (``token_stats``,
    #: ``[rows, last]`` like the NLL) for statistics by position
    keep_token_stats: bool = False
    token_stats: dict = field(default_factory=dict)
    tokens_processed: int = 0
    stat_sums: dict = field(default_factory=dict)
    stat_count: int = 0

    def score_rows(self, rows: np.ndarray, last: int, on_rows=None) -> tuple[np.ndarray, np.ndarray]:
        """NLL and correctness of the last ``last`` predictions of each row ``[R, T + 1]``."""
        from lengen.measure import peak_memory

        R, T1 = rows.shape
        T = T1 - 1
        if not 0 < last <= T:
            raise ValueError(f"cannot score the last {last} of {T} predictions")
        nll = np.empty((R, last), dtype=np.float64)
        correct = np.empty((R, last), dtype=bool)
        self.model.eval()
        grad = torch.enable_grad() if self.arch.grad_in_eval else torch.no_grad()
        with grad:
            per_batch = max(1, self.batch_tokens // T)
            for r0 in range(0, R, per_batch):
                x = torch.from_numpy(np.ascontiguousarray(rows[r0:r0 + per_batch])).to(self.device)
                out = (nll[r0:r0 + per_batch], correct[r0:r0 + per_batch], r0, R)
                if self.measure_memory and self.memory_peak is None:
                    _, self.memory_peak, self.memory_method = peak_memory(lambda: self._batch(x, last, *out),
                                                                          self.device)
                else:
                    self._batch(x, last, *out)
                self.tokens_processed += x.shape[0] * T
                if on_rows:
                    on_rows(min(R, r0 + per_batch), R)
        if not np.all(np.isfinite(nll)):
            bad = int((~np.isfinite(nll)).sum())
            raise LengenError(f"evaluation produced {bad} non-finite token losses; the model's outputs "
                              "overflow (check its numerics, or evaluate in fp32)")
        return nll, correct

    def _batch(self, x: torch.Tensor, last: int, nll: np.ndarray, correct: np.ndarray, r0: int = 0,
               rows: int = 0) -> None:
        """Score one batch of rows ``x`` ``[B, T + 1]`` into ``nll`` and ``correct`` ``[B, last]``:
        a stateful model chunk by chunk with its state carried, any other in one pass. Rows
        ``r0 .. r0 + B`` of ``rows`` in all."""
        B, T = x.shape[0], x.shape[1] - 1
        autocast = self.autocast or contextlib.nullcontext
        state, pos, vocab = None, 0, None
        while pos < T:
            if not self.arch.stateful:
                end = T
            elif self.chunk:
                end = min(T, pos + self.chunk)
            else:
                step = T if vocab is None else max(1, LOGIT_BUDGET // (B * vocab))
                end = min(T, pos + step)
            with autocast():
                out = as_output(self.model(x[:, pos:end], state) if self.arch.stateful else self.model(x[:, :end]))
            logits = out.logits[:, -(end - pos):]
            vocab = logits.shape[-1]
            lo = max(pos, T - last)  # first column of this chunk that is scored
            c0, c1 = lo - (T - last), end - (T - last)
            if lo < end:
                lg = logits[:, lo - pos:].float()
                target = x[:, lo + 1:end + 1]
                logp = F.log_softmax(lg, dim=-1)
                nll[:, c0:c1] = (-logp.gather(-1, target[..., None])[..., 0]).double().cpu().numpy()
                correct[:, c0:c1] = (lg.argmax(-1) == target).cpu().numpy()
            for k, v in out.stats.items():
                v = v.detach().float()
                self.stat_sums[k] = self.stat_sums.get(k, 0.0) + float(v.sum()) * (1 if v.dim() else B * (end - pos))
                if self.keep_token_stats and lo < end:
                    arr = self.token_stats.setdefault(k, np.zeros((rows, last), dtype=np.float64))
                    per_token = v.expand(B, end - pos) if v.dim() else v.new_full((B, end - pos), float(v))
                    arr[r0:r0 + B, c0:c1] = per_token[:, lo - pos:].double().cpu().numpy()
            self.stat_count += B * (end - pos)
            state = out.state if self.arch.stateful else None
            pos = end

    def stats(self) -> dict[str, float]:
        return {k: v / max(1, self.stat_count) for k, v in self.stat_sums.items()}


def _strip_context(annotations: dict) -> dict:
    return {k: v[:, 1:] for k, v in annotations.items()}


def score_full(scorer: Scorer, seqs: np.ndarray, annotations: dict, on_rows=None) -> Scores:
    nll, correct = scorer.score_rows(seqs, seqs.shape[1] - 1, on_rows)
    return Scores(nll, correct, _strip_context(annotations), mode="full")


def window_rows(seqs: np.ndarray, window: int, stride: int):
    """Yield ``(rows, last, first_column)``: the windows of window-mode evaluation."""
    L = seqs.shape[1] - 1
    first = min(window, L)
    yield seqs[:, :first + 1], first, 0
    col = first
    while col < L:
        end = min(L, col + stride)  # score columns [col, end)
        start = end - window  # the window's first input token
        yield seqs[:, start:end + 1], end - col, col
        col = end


def score_window(scorer: Scorer, seqs: np.ndarray, annotations: dict, *, window: int, stride: int
                 ) -> Scores:
    """Window mode: every prediction from at most the last ``window`` tokens (see module doc)."""
    if stride < 1 or stride > window:
        raise ConfigError(f"eval.stride = {stride} must be between 1 and the window W = {window}")
    N, L1 = seqs.shape
    L = L1 - 1
    nll = np.empty((N, L))
    correct = np.empty((N, L), dtype=bool)
    # Windows of equal length are batched together across positions and sequences.
    groups: dict[tuple[int, int], list[tuple[np.ndarray, int]]] = {}
    for rows, last, col in window_rows(seqs, window, stride):
        groups.setdefault((rows.shape[1], last), []).append((rows, col))
    for (_width, last), items in groups.items():
        stacked = np.concatenate([rows for rows, _ in items])
        n, c = scorer.score_rows(stacked, last)
        for i, (_rows, col) in enumerate(items):
            nll[:, col:col + last] = n[i * N:(i + 1) * N]
            correct[:, col:col + last] = c[i * N:(i + 1) * N]
    return Scores(nll, correct, _strip_context(annotations), mode="window")


def lengths_from_prefix(scores: Scores, lengths: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per-sequence NLL sums and counts of sequences of length l, read off a full- or
    window-mode pass (a sequence of length l is the first l predictions of a longer one)."""
    out = {}
    for l in lengths:
        if l <= scores.length:
            out[l] = (scores.nll[:, :l].sum(1), np.full(len(scores.nll), l))
    return out


def score_nonoverlapping(scorer: Scorer, seqs: np.ndarray, lengths: list[int]
                         ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each length l: every sequence cut into ``L // l`` pieces of l predictions (pieces
    overlap by one token, the context of the next piece's first prediction), each scored
    from scratch. Returns per-sequence NLL sums and counts."""
    N, L1 = seqs.shape
    L = L1 - 1
    out = {}
    for l in lengths:
        pieces = L // l
        if pieces == 0:
            continue
        rows = np.concatenate([seqs[:, p * l:(p + 1) * l + 1] for p in range(pieces)])
        nll, _ = scorer.score_rows(rows, l)
        per_seq = nll.sum(1).reshape(pieces, N).sum(0)
        out[l] = (per_seq, np.full(N, pieces * l))
    return out


def score_context(scorer: Scorer, seqs: np.ndarray, contexts: list[int], bucket: int
                  ) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """The same targets, the last ``bucket`` predictions of each sequence, scored with at
    most ``c`` tokens of context before the first of them, for each ``c`` in ``contexts``.

    Returns ``{c: (per-sequence NLL sums, counts, the context actually available)}``."""
    N, L1 = seqs.shape
    L = L1 - 1
    first = L - bucket  # column of the first target
    out = {}
    for c in contexts:
        avail = min(c, first + 1)
        rows = seqs[:, first + 1 - avail:]
        nll, _ = scorer.score_rows(rows, bucket)
        out[c] = (nll.sum(1), np.full(N, bucket), avail)
    return out


# ---------------------------------------------------------------------------------------
# the suite's modes and metrics


@dataclass
class ModeEval:
    scores: Any
    metrics: dict
    series: dict
    skipped: dict
    info: dict
    token_stats: dict = field(default_factory=dict)  # per-token Output.stats [sequences, L] (full mode)


def evaluate_model(model, arch, suite, seqs, ann, *, modes, metrics, mctx: MetricContext, device, autocast,
                   extras: bool = True, on_stage=None, measure_memory: bool = False, dist=None) -> dict[str, ModeEval]:
    """Score ``model`` in each of ``modes`` and compute every applicable metric.

    ``extras``: also the nonoverlapping lengths and the context curve (not at checkpoints).
    ``measure_memory``: record the peak memory of the first mode's scoring in its ``info``.
    ``dist`` (:class:`lengen.dist.Dist`): with several processes each scores its block of the
    sequences and the per-token results are reassembled in sequence order on every rank, so
    every sequence is scored exactly once and the metrics are those of one process."""
    from lengen.dist import Dist

    dist = dist or Dist()
    W = suite.window
    L = seqs.shape[1] - 1
    lengths = suite.eval.tokens(suite.eval.lengths, W)
    contexts = suite.eval.tokens(suite.eval.contexts, W)
    chunk = suite.eval.chunk or W
    block = dist.block(len(seqs))
    mine, mine_ann = seqs[block], {k: v[block] for k, v in ann.items()}
    out: dict[str, ModeEval] = {}
    for i, mode in enumerate(modes):
        scorer = Scorer(model, arch, device=device, batch_tokens=suite.eval.batch_size * L, autocast=autocast,
                        chunk=chunk, measure_memory=measure_memory and i == 0, keep_token_stats=mode == "full")
        t0 = time.perf_counter()
        part: dict[str, Any] = {"lengths": {}, "context": {}}
        if len(mine):
            if mode == "full":
                s = score_full(scorer, mine, mine_ann)
                part.update(nll=s.nll, correct=s.correct)
                if extras and contexts:
                    part["context"] = score_context(scorer, mine, contexts, suite.eval.bucket)
            elif mode == "window":
                s = score_window(scorer, mine, mine_ann, window=W, stride=suite.eval.stride)
                part.update(nll=s.nll, correct=s.correct)
            elif extras:
                part["lengths"] = score_nonoverlapping(scorer, mine, lengths)
        part.update(token_stats=scorer.token_stats, stat_sums=scorer.stat_sums, stat_count=scorer.stat_count,
                    tokens_processed=scorer.tokens_processed, wall=time.perf_counter() - t0,
                    peak=scorer.memory_peak, memory_method=scorer.memory_method)
        parts = dist.gather(part)
        scores = _assemble(parts, mode, _strip_context(ann))
        if scores.nll is not None:
            scores.lengths = lengths_from_prefix(scores, lengths)
        wall = max(p["wall"] for p in parts)
        stat_count = sum(p["stat_count"] for p in parts)
        stat_sums = {k: sum(p["stat_sums"].get(k, 0.0) for p in parts) for k in parts[0]["stat_sums"]}
        token_stats = {k: np.concatenate([p["token_stats"][k] for p in parts if k in p["token_stats"]])
                       for k in parts[0]["token_stats"]}
        scored = seqs.shape[0] * L if scores.nll is not None else sum(int(c.sum()) for _, c in scores.lengths.values())
        info = {"mode": mode, "length": L, "sequences": int(seqs.shape[0]), "wall_s": wall,
                "tokens_per_s": scored / wall if wall > 0 else None,
                "tokens_processed": sum(p["tokens_processed"] for p in parts),
                "stats": {k: v / max(1, stat_count) for k, v in stat_sums.items()},
                "batch_sequences": max(1, scorer.batch_tokens // L), "chunk": chunk if arch.stateful else None,
                "processes": dist.world}
        if parts[0]["peak"] is not None:
            info.update(peak_memory_bytes=max(p["peak"] or 0 for p in parts), memory_method=parts[0]["memory_method"])
        if mode == "window":
            info["stride"] = suite.eval.stride
        missing = [l for l in lengths if l not in scores.lengths]
        if missing and extras:
            if dist.main:
                warnings.warn(f"{mode} mode: lengths {', '.join(f'{l / W:g}W' for l in missing)} need more than the "
                              f"{L} tokens of each evaluation sequence; recorded as missing", stacklevel=2)
            info["missing_lengths"] = missing
        values, series, skipped = {}, {}, {}
        if token_stats and scores.nll is not None:
            stats_by_position(token_stats, mctx, values, series)
        for m in metrics:
            metric = m.obj
            if mode not in metric.modes:
                continue
            lacking = [r for r in metric.requires if r not in scores.annotations]
            if lacking:
                skipped[m.name] = f"needs annotations {lacking}"
                continue
            for key, val in metric.compute(scores, m.config, mctx).items():
                (series if hasattr(val, "x") else values)[key] = val
        out[mode] = ModeEval(scores, values, series, skipped, info, token_stats)
        if on_stage:
            on_stage(mode)
    return out


def _assemble(parts: list[dict], mode: str, annotations: dict) -> Scores:
    """One :class:`Scores` from the ranks' blocks, in sequence order."""
    have = [p for p in parts if "nll" in p]
    nll = np.concatenate([p["nll"] for p in have]) if have else None
    correct = np.concatenate([p["correct"] for p in have]) if have else None
    lengths = {l: tuple(np.concatenate([p["lengths"][l][i] for p in parts if l in p["lengths"]]) for i in range(2))
               for l in parts[0]["lengths"]}
    context = {c: (*(np.concatenate([p["context"][c][i] for p in parts if c in p["context"]]) for i in range(2)),
                   parts[0]["context"][c][2]) for c in parts[0]["context"]}
    return Scores(nll, correct, annotations if nll is not None else {}, mode=mode, lengths=lengths, context=context)


def stats_by_position(token_stats: dict[str, np.ndarray], mctx: MetricContext, values: dict, series: dict) -> None:
    """For each per-token statistic a model reports (``Output.stats``): its mean over the
    bucket ending at each position k x W (``stat.<name>@kW``), over all tokens
    (``stat.<name>``), and by position bucket (``stat.<name>_by_position``), each with a
    bootstrap interval over sequences."""
    from lengen.api import Series
    from lengen.stats import bootstrap_mean

    boot = {"samples": mctx.bootstrap, "confidence": mctx.confidence}
    for name, arr in token_stats.items():
        N, L = arr.shape
        for i, k in enumerate(mctx.positions):
            c = bucket_columns(k, mctx, L)
            values[f"stat.{name}@{mctx.label(k)}"] = bootstrap_mean(arr[:, c].sum(1), np.full(N, c.stop - c.start),
                                                                    seed=mctx.seed + 900 + i, **boot)
        values[f"stat.{name}"] = bootstrap_mean(arr.sum(1), np.full(N, L), seed=mctx.seed + 899, **boot)
        xs, vals = [], []
        for j, end in enumerate(range(mctx.bucket, L + 1, mctx.bucket)):
            xs.append(end / mctx.window)
            vals.append(bootstrap_mean(arr[:, end - mctx.bucket:end].sum(1), np.full(N, mctx.bucket),
                                       seed=mctx.seed + 2000 + j, **boot))
        series[f"stat.{name}_by_position"] = Series(xs, vals)


def add_baseline_ratios(evals: dict[str, ModeEval], baseline: str, mctx: MetricContext) -> None:
    """``ratio_<baseline>@kW``: the baseline mode's perplexity over this mode's, on the same
    tokens (paired bootstrap). Above 1: this mode predicts better (the seeds' SW / TTT)."""
    from lengen.stats import bootstrap_ppl_ratio

    base = evals.get(baseline)
    if base is None or base.scores.nll is None:
        return
    a = position_sums(base.scores, mctx)
    for mode, ev in evals.items():
        if mode == baseline or ev.scores.nll is None:
            continue
        b = position_sums(ev.scores, mctx)
        for i, k in enumerate(mctx.positions):
            c = bucket_columns(k, mctx, base.scores.length)
            n = np.full(len(a), c.stop - c.start)
            ev.metrics[f"ratio_{baseline}@{mctx.label(k)}"] = bootstrap_ppl_ratio(
                a[:, i], n, b[:, i], n, samples=mctx.bootstrap, confidence=mctx.confidence, seed=mctx.seed + 700 + i)


def bucket_columns(k: float, mctx: MetricContext, length: int) -> slice:
    """Columns of the ``bucket`` predictions ending at position k x W."""
    end = min(int(round(k * mctx.window)), length)
    return slice(max(0, end - mctx.bucket), end)


def position_sums(scores, mctx: MetricContext) -> np.ndarray:
    """Per-sequence NLL sums of each position bucket, ``[sequences, positions]`` (for
    paired comparisons of checkpoints and architectures)."""
    return np.stack([scores.nll[:, bucket_columns(k, mctx, scores.length)].sum(1) for k in mctx.positions], 1)
