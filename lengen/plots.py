"""Plots people would rather look at than tables (matplotlib, Agg backend).

Every plot puts x in multiples of W on a log scale, draws interval bands and marks W.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lengen.results import atomic_save

KINDS = ("position", "length", "context", "evolution")
SERIES = {"position": "ppl_by_position", "length": "ppl_by_length", "context": "ppl_by_context"}
XLABEL = {"position": "position (multiples of the training window W)",
          "length": "evaluation length L (multiples of W)",
          "context": "context available before the target tokens (multiples of W)"}
YLABEL = {"position": "perplexity of the bucket ending there", "length": "perplexity of whole sequences",
          "context": "perplexity of the same target tokens"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_mean(curves: list[dict]):
    """Mean of curves (seeds) with the envelope of their intervals; None when absent."""
    curves = [c for c in curves if c and c.get("x")]
    if not curves:
        return None
    x = curves[0]["x"]
    curves = [c for c in curves if c["x"] == x]

    def arr(field, fallback="value"):
        return np.array([[v[field] if v.get(field) is not None else v[fallback] for v in c["values"]]
                         for c in curves], dtype=float)

    vals = arr("value")
    return np.asarray(x, float), vals.mean(0), arr("ci_low").min(0), arr("ci_high").max(0)


def _mark_w(ax) -> None:
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.text(1.0, 1.0, " W", transform=ax.get_xaxis_transform(), va="top", ha="left")


def _save(fig, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    atomic_save(Path(path), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(path)


def plot_curves(records: list[dict], path: Path, kind: str = "position", title: str | None = None) -> Path | None:
    """One line per (architecture, mode) with its band, for ``kind`` position, length or
    context; ``None`` when no record carries that curve."""
    plt = _plt()
    name = SERIES[kind]
    groups: dict[str, list[dict]] = {}
    for r in records:
        for mode, ev in r.get("evaluations", {}).items():
            if ev.get("series", {}).get(name, {}).get("x"):
                groups.setdefault(f"{r['arch']} ({mode})", []).append(ev["series"][name])
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for label, curves in groups.items():
        s = _series_mean(curves)
        if s is None:
            continue
        x, y, lo, hi = s
        n = len(curves)
        line, = ax.plot(x, y, marker="o" if kind != "position" else None, ms=3, lw=1.6,
                        label=label + (f", {n} seeds" if n > 1 else ""))
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    first = records[0]
    if kind == "position":
        ev = next(iter(first.get("evaluations", {}).values()), {})
        positions = first.get("protocol", {}).get("positions", [])
        for ref, style, text in (("ppl_optimal", ":", "Bayes-optimal"), ("ppl_unigram", "--", "unigram")):
            pts = [(k, ev.get("metrics", {}).get(f"{ref}@{_label(k)}")) for k in positions]
            pts = [(k, v["value"]) for k, v in pts if v and v.get("value") is not None]
            if pts:
                ax.plot(*zip(*pts), style, color="grey", lw=1, label=f"{text} (at k x W)")
    _mark_w(ax)
    ax.set_xscale("log")
    ax.set_xlabel(XLABEL[kind])
    ax.set_ylabel(YLABEL[kind])
    ax.set_title(title or f"{first['benchmark']}: {YLABEL[kind]} (W = {first['protocol']['window']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_evolution(records: list[dict], path: Path, title: str | None = None) -> Path | None:
    """One curve per checkpoint, coloured by training step; a panel per architecture."""
    plt = _plt()
    with_ck = [r for r in records if r.get("checkpoints")]
    if not with_ck:
        return None
    archs = list(dict.fromkeys(r["arch"] for r in with_ck))
    fig, axes = plt.subplots(len(archs), 1, figsize=(8, 3.6 * len(archs)), dpi=120, squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for ax, arch in zip(axes[:, 0], archs):
        rec = [r for r in with_ck if r["arch"] == arch][-1]  # one seed per panel: the last
        cks = rec["checkpoints"]
        top = max(1, max(c["step"] for c in cks))
        for c in cks:
            s = _series_mean([c["series"]["ppl_by_position"]])
            x, y, _lo, _hi = s
            ax.plot(x, y, color=cmap(c["step"] / top), lw=1.2)
        _mark_w(ax)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{arch} (seed {rec['seed']}, mode {cks[0]['mode']}): {len(cks)} checkpoints")
        ax.grid(True, which="both", alpha=0.3)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
        fig.colorbar(sm, ax=ax, label="training step")
    axes[-1, 0].set_xlabel(XLABEL["position"])
    fig.suptitle(title or f"{with_ck[0]['benchmark']}: perplexity by position over training")
    return _save(fig, path)


def plot(records: list[dict], path: Path, kind: str) -> Path | None:
    if kind == "evolution":
        return plot_evolution(records, path)
    return plot_curves(records, path, kind)


def write_run_plots(records: list[dict], run_dir: Path) -> list[Path]:
    """Every plot the records support, next to them."""
    out = []
    for kind in KINDS:
        p = plot(records, Path(run_dir) / f"{FILENAMES[kind]}", kind)
        if p is not None:
            out.append(p)
    return out


FILENAMES = {"position": "ppl_by_position.png", "length": "ppl_by_length.png",
             "context": "ppl_by_context.png", "evolution": "evolution.png"}


def _label(k: float) -> str:
    return f"{int(k) if float(k).is_integer() else k}W"
