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

A stateful model is fed in chunks with its state carried (``chunk`` tokens, by default as
many as the logit budget allows), which must equal one pass; the chunk only bounds memory.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lengen.api import Architecture, Scores, Split, as_output
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
    tokens_processed: int = 0
    stat_sums: dict = field(default_factory=dict)
    stat_count: int = 0

    def score_rows(self, rows: np.ndarray, last: int, on_rows=None) -> tuple[np.ndarray, np.ndarray]:
        """NLL and correctness of the last ``last`` predictions of each row ``[R, T + 1]``."""
        R, T1 = rows.shape
        T = T1 - 1
        if not 0 < last <= T:
            raise ValueError(f"cannot score the last {last} of {T} predictions")
        nll = np.empty((R, last), dtype=np.float64)
        correct = np.empty((R, last), dtype=bool)
        self.model.eval()
        grad = torch.enable_grad() if self.arch.grad_in_eval else torch.no_grad()
        autocast = self.autocast or contextlib.nullcontext
        vocab = None
        with grad:
            per_batch = max(1, self.batch_tokens // T)
            for r0 in range(0, R, per_batch):
                x = torch.from_numpy(np.ascontiguousarray(rows[r0:r0 + per_batch])).to(self.device)
                B = x.shape[0]
                state, pos = None, 0
                while pos < T:
                    if not self.arch.stateful:
                        end = T
                    elif self.chunk:
                        end = min(T, pos + self.chunk)
                    else:
                        step = T if vocab is None else max(1, LOGIT_BUDGET // (B * vocab))
                        end = min(T, pos + step)
                    with autocast():
                        out = as_output(self.model(x[:, pos:end], state) if self.arch.stateful
                                        else self.model(x[:, :end]))
                    logits = out.logits[:, -(end - pos):]
                    vocab = logits.shape[-1]
                    lo = max(pos, T - last)  # first column of this chunk that is scored
                    if lo < end:
                        lg = logits[:, lo - pos:].float()
                        target = x[:, lo + 1:end + 1]
                        logp = F.log_softmax(lg, dim=-1)
                        c0, c1 = lo - (T - last), end - (T - last)
                        nll[r0:r0 + B, c0:c1] = (-logp.gather(-1, target[..., None])[..., 0]).double().cpu().numpy()
                        correct[r0:r0 + B, c0:c1] = (lg.argmax(-1) == target).cpu().numpy()
                    for k, v in out.stats.items():
                        v = v.detach().float()
                        self.stat_sums[k] = self.stat_sums.get(k, 0.0) + float(v.sum()) * (1 if v.dim() else B * (end - pos))
                    self.stat_count += B * (end - pos)
                    state = out.state if self.arch.stateful else None
                    pos = end
                self.tokens_processed += B * T
                if on_rows:
                    on_rows(min(R, r0 + per_batch), R)
        if not np.all(np.isfinite(nll)):
            bad = int((~np.isfinite(nll)).sum())
            raise LengenError(f"evaluation produced {bad} non-finite token losses; the model's outputs "
                              "overflow (check its numerics, or evaluate in fp32)")
        return nll, correct

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


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0
