"""Plots people would rather look at than tables (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lengen.results import atomic_save


def _series_mean(records: list[dict], name: str):
    """Mean of a series over records (seeds), with the envelope of their intervals."""
    curves = [r["series"][name] for r in records if name in r.get("series", {})]
    if not curves:
        return None
    x = curves[0]["x"]
    curves = [c for c in curves if c["x"] == x]
    vals = np.array([[v["value"] for v in c["values"]] for c in curves], dtype=float)
    lo = np.array([[v["ci_low"] if v["ci_low"] is not None else v["value"] for v in c["values"]] for c in curves], float)
    hi = np.array([[v["ci_high"] if v["ci_high"] is not None else v["value"] for v in c["values"]] for c in curves], float)
    return np.asarray(x, float), vals.mean(0), lo.min(0), hi.max(0)


def plot_position(records: list[dict], path: Path, title: str | None = None) -> Path:
    """Perplexity against position (x in multiples of W, log scale), one line per
    architecture with its interval band, W marked, and the reference lines the records carry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arch: dict[str, list[dict]] = {}
    for r in records:
        by_arch.setdefault(f"{r['arch']} ({r.get('mode', 'full')})", []).append(r)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for label, recs in by_arch.items():
        s = _series_mean(recs, "ppl_by_position")
        if s is None:
            continue
        x, y, lo, hi = s
        n = len(recs)
        line, = ax.plot(x, y, label=f"{label}" + (f", {n} seeds" if n > 1 else ""), lw=1.6)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    first = records[0]
    positions = first.get("protocol", {}).get("positions", [])
    for ref, style, text in (("ppl_optimal", ":", "Bayes-optimal"), ("ppl_unigram", "--", "unigram")):
        pts = [(k, first["metrics"].get(f"{ref}@{_label(k)}")) for k in positions]
        pts = [(k, v["value"]) for k, v in pts if v]
        if pts:
            ax.plot(*zip(*pts), style, color="grey", lw=1, label=f"{text} (at k x W)")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.text(1.0, 1.0, " W", transform=ax.get_xaxis_transform(), va="top", ha="left")
    ax.set_xscale("log")
    ax.set_xlabel("position (multiples of the training window W)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or f"{first['benchmark']}: perplexity by position (W = {first['protocol']['window']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(Path(path), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(path)


def _label(k: float) -> str:
    return f"{int(k) if float(k).is_integer() else k}W"
