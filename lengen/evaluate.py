"""Scoring evaluation sequences: per-token NLL, correctness and model statistics.

This issue's protocol is ``full`` mode: the model reads each evaluation sequence once,
carrying whatever state it has from the start of the sequence. A stateful model is fed in
chunks (``chunk`` tokens at a time, the state carried), which must give the same numbers as
one pass; the chunk size only bounds memory (``batch x chunk x vocab`` logits).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lengen.api import Architecture, Scores, Split, as_output
from lengen.errors import ConfigError

LOGIT_BUDGET = 1 << 25  # floats of logits held at once during evaluation


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
class EvalRun:
    scores: Scores
    wall_s: float
    tokens_per_s: float
    stats: dict[str, float]


def score(model: torch.nn.Module, arch: Architecture, sequences: np.ndarray, annotations: dict,
          *, batch_size: int, device, autocast=None, chunk: int | None = None,
          on_batch=None) -> EvalRun:
    """Full-mode scores of ``sequences`` ``[N, L + 1]``: column ``j`` predicts token ``j + 1``."""
    model.eval()
    N, L1 = sequences.shape
    L = L1 - 1
    vocab = None
    nll = np.empty((N, L), dtype=np.float64)
    correct = np.empty((N, L), dtype=bool)
    stat_sums: dict[str, float] = {}
    grad = torch.enable_grad() if arch.grad_in_eval else torch.no_grad()
    autocast = autocast or contextlib.nullcontext
    start = time.perf_counter()
    with grad:
        for b0 in range(0, N, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(sequences[b0:b0 + batch_size])).to(device)
            B = x.shape[0]
            state = None
            step = L if not arch.stateful else (chunk or L)
            pos = 0
            while pos < L:
                if vocab is not None and arch.stateful and chunk is None:
                    step = max(1, min(L, LOGIT_BUDGET // (B * vocab)))
                end = min(L, pos + step)
                with autocast():
                    out = as_output(model(x[:, pos:end], state) if arch.stateful else model(x[:, :end]))
                logits = out.logits[:, -(end - pos):].float()
                if vocab is None:
                    vocab = logits.shape[-1]
                target = x[:, pos + 1:end + 1]
                logp = F.log_softmax(logits, dim=-1)
                nll[b0:b0 + B, pos:end] = (-logp.gather(-1, target[..., None])[..., 0]).double().cpu().numpy()
                correct[b0:b0 + B, pos:end] = (logits.argmax(-1) == target).cpu().numpy()
                for k, v in out.stats.items():
                    v = v.detach().float()
                    stat_sums[k] = stat_sums.get(k, 0.0) + float(v.sum()) * (1 if v.dim() else B * (end - pos))
                state = out.state if arch.stateful else None
                pos = end
            if on_batch:
                on_batch(min(N, b0 + batch_size))
    wall = time.perf_counter() - start
    ann = {k: v[:, 1:] for k, v in annotations.items()}
    stats = {k: v / (N * L) for k, v in stat_sums.items()}
    if not np.all(np.isfinite(nll)):
        bad = int((~np.isfinite(nll)).sum())
        raise ConfigError(f"evaluation produced {bad} non-finite token losses; the model's outputs "
                          "overflow at this length (check its numerics, or evaluate in fp32)")
    return EvalRun(Scores(nll=nll, correct=correct, annotations=ann, mode="full"),
                   wall, N * L / wall, stats)
