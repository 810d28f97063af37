"""Train/eval overlap: how much of the evaluation text the training split already contains.

Two measures, both shares of the evaluation split:

* ``ngram_shared``: evaluation word n-grams (``n`` consecutive whitespace-separated words,
  13 by default, the GPT-3 contamination window) that also occur anywhere in the training
  split. Words, not tokens: the figure does not depend on the tokenizer, and 13 characters
  of a char-level tokenizer would match common phrases;
* ``lines_shared``: evaluation lines (stripped, at least ``min_line_chars`` characters, so
  that headings and stage directions do not count) that also occur as training lines.

n-grams are compared by 64-bit hashes (collisions are negligible at these sizes).
"""

from __future__ import annotations

import warnings

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """One uint64 hash per window of ``n`` consecutive ids."""
    t = np.asarray(tokens).astype(np.uint64) + np.uint64(1)
    m = len(t) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULT + t[j:j + m]
            h ^= h >> np.uint64(29)
    return h


def _lines(docs: list[str], min_chars: int):
    for d in docs:
        for line in d.split("\n"):
            s = line.strip()
            if len(s) >= min_chars:
                yield s


def word_ids(docs: list[str]) -> np.ndarray:
    """One 64-bit hash per whitespace-separated word of ``docs``, in order (comparable
    within one process)."""
    return np.fromiter((hash(w) for d in docs for w in d.split()), dtype=np.int64).view(np.uint64)


def measure(train_docs: list[str], eval_docs: list[str], *, n: int = 13, min_line_chars: int = 40) -> dict:
    """The overlap of the evaluation documents with the training documents (JSON-able)."""
    ev = ngram_hashes(word_ids(eval_docs), n)
    tr = np.sort(ngram_hashes(word_ids(train_docs), n))
    if len(ev) and len(tr):
        idx = np.minimum(np.searchsorted(tr, ev), len(tr) - 1)
        shared = tr[idx] == ev
    else:
        shared = np.zeros(len(ev), bool)
    train_lines = {hash(s) for s in _lines(train_docs, min_line_chars)}
    eval_lines = list(_lines(eval_docs, min_line_chars))
    hits = [s for s in eval_lines if hash(s) in train_lines]
    return {
        "unit": "words",
        "ngram": n,
        "eval_ngrams": int(len(ev)),
        "ngram_shared": round(float(shared.mean()), 6) if len(ev) else 0.0,
        "min_line_chars": min_line_chars,
        "eval_lines": len(eval_lines),
        "lines_shared": round(len(hits) / len(eval_lines), 6) if eval_lines else 0.0,
        "example": hits[0][:80] if hits else None,
    }


def check(overlap: dict, threshold: float, what: str) -> bool:
    """Warn (once, one line) when either share exceeds ``threshold``; returns whether it did."""
    worst = max(overlap["ngram_shared"], overlap["lines_shared"])
    if worst <= threshold:
        return False
    example = f" (e.g. {overlap['example']!r})" if overlap.get("example") else ""
    warnings.warn(
        f"data hygiene: {what}: {overlap['ngram_shared']:.1%} of evaluation {overlap['ngram']}-grams and "
        f"{overlap['lines_shared']:.1%} of evaluation lines also occur in the training split{example}, "
        f"above data.overlap_warn = {threshold:g}; the evaluation partly measures memorisation: use "
        "separate sources or deduplicate", stacklevel=3)
    return True
