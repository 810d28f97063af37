"""Paired comparisons of two architectures on identical evaluation tokens, and crossovers
over checkpoints. Reads ``scores-<mode>.npz`` and ``checkpoints.npz`` next to records."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lengen.errors import LengenError
from lengen.stats import bootstrap_ppl_ratio


def _label(k: float) -> str:
    return f"{int(k) if float(k).is_integer() else k}W"


def _check_same_tokens(a: dict, b: dict) -> None:
    fa, fb = a["dataset"]["fingerprint"], b["dataset"]["fingerprint"]
    pa, pb = a["protocol"], b["protocol"]
    if (fa != fb or pa["eval_length"] != pb["eval_length"] or pa.get("doc_policy") != pb.get("doc_policy")
            or a["dataset"]["eval_sequences"] != b["dataset"]["eval_sequences"]):
        raise LengenError(
            f"{a['arch']} and {b['arch']} were not evaluated on the same tokens (dataset fingerprint, "
            "evaluation length, sequence policy or count differ); compare runs of the same suite")
    if pa["positions"] != pb["positions"] or pa["bucket"] != pb["bucket"]:
        raise LengenError("the two records report different positions or buckets; compare runs of the same suite")


def paired_ratios(a: dict, b: dict, mode: str = "full", *, samples: int = 1000, confidence: float = 0.95,
                  names: tuple[str, str] | list[str] | None = None) -> list[dict]:
    """``ppl_A / ppl_B`` at each position on the same sequences, with a paired bootstrap
    interval. Below 1: A predicts better. ``names``: how the verdicts name A and B (default:
    their architectures)."""
    name_a, name_b = names or (a["arch"], b["arch"])
    _check_same_tokens(a, b)
    sa, sb = (np.load(Path(r["_path"]).parent / f"scores-{mode}.npz") for r in (a, b))
    sums_a, sums_b = sa["position_sums"], sb["position_sums"]
    bucket = a["protocol"]["bucket"]
    out = []
    for i, k in enumerate(a["protocol"]["positions"]):
        n = np.full(len(sums_a), bucket)
        v = bootstrap_ppl_ratio(sums_a[:, i], n, sums_b[:, i], n, samples=samples, confidence=confidence, seed=i)
        out.append({"position": _label(k), "ratio": v.value, "ci_low": v.ci_low, "ci_high": v.ci_high,
                    "verdict": verdict(v.ci_low, v.ci_high, name_a, name_b)})
    return out


def verdict(lo, hi, name_a: str, name_b: str) -> str:
    if lo is None or hi is None:
        return "no interval"
    if hi < 1:
        return f"{name_a} better"
    if lo > 1:
        return f"{name_b} better"
    return "inside the noise"


def checkpoint_ratios(a: dict, b: dict, *, samples: int = 1000, confidence: float = 0.95) -> list[dict]:
    """The paired ratio at every position for every checkpoint both records have."""
    _check_same_tokens(a, b)
    ca, cb = (np.load(Path(r["_path"]).parent / "checkpoints.npz") for r in (a, b))
    steps = [int(s) for s in ca["steps"] if s in set(cb["steps"].tolist())]
    if not steps:
        raise LengenError("the two records have no checkpoint step in common; run both with the same --checkpoints")
    ia = {int(s): i for i, s in enumerate(ca["steps"])}
    ib = {int(s): i for i, s in enumerate(cb["steps"])}
    bucket = int(ca["bucket"])
    rows = []
    for step in steps:
        pa, pb = ca["position_sums"][ia[step]], cb["position_sums"][ib[step]]
        for i, k in enumerate(a["protocol"]["positions"]):
            n = np.full(len(pa), bucket)
            v = bootstrap_ppl_ratio(pa[:, i], n, pb[:, i], n, samples=samples, confidence=confidence, seed=step + i)
            rows.append({"step": step, "position": _label(k), "ratio": v.value, "ci_low": v.ci_low, "ci_high": v.ci_high})
    return rows


def crossovers(rows: list[dict], name_a: str, name_b: str) -> list[dict]:
    """Where the ratio A/B crosses 1 between consecutive checkpoints. ``significant``: the
    intervals on both sides exclude 1 (the lead really changed hands), otherwise the change
    is inside the noise."""
    by_pos: dict[str, list[dict]] = {}
    for r in rows:
        by_pos.setdefault(r["position"], []).append(r)
    out = []
    for pos, seq in by_pos.items():
        seq.sort(key=lambda r: r["step"])
        for prev, cur in zip(seq, seq[1:]):
            if (prev["ratio"] - 1) * (cur["ratio"] - 1) < 0:
                def side(r):
                    if r["ci_high"] is not None and r["ci_high"] < 1:
                        return -1
                    if r["ci_low"] is not None and r["ci_low"] > 1:
                        return 1
                    return 0
                sig = side(prev) * side(cur) == -1
                leader = name_a if cur["ratio"] < 1 else name_b
                out.append({"position": pos, "from_step": prev["step"], "to_step": cur["step"],
                            "ratio_before": prev["ratio"], "ratio_after": cur["ratio"],
                            "interval_before": [prev["ci_low"], prev["ci_high"]],
                            "interval_after": [cur["ci_low"], cur["ci_high"]],
                            "now_ahead": leader, "significant": sig})
    return out
