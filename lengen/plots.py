"""Plots people would rather look at than tables (matplotlib, Agg backend).

Which plots exist is what the records' metrics declared (:class:`lengen.api.PlotSpec`): one
per declared series, one curve per (architecture, mode) with its interval band; values a
metric declared as a ``reference`` for a plot are drawn on it as grey lines. The core adds
one plot of its own, ``evolution``: a checkpoint-tracked series at every checkpoint. Every
plot puts x in multiples of W on a log scale and marks W.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lengen.api import PlotSpec, output_x, x_multiple
from lengen.results import atomic_save, record_plots, record_specs

EVOLUTION = "evolution"
EVOLUTION_FILE = "evolution.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_specs(records: list[dict]) -> dict[str, PlotSpec]:
    """Every plot the records declare, by kind (the first declaration of a kind wins)."""
    out: dict[str, PlotSpec] = {}
    for r in records:
        for p in record_plots(r):
            out.setdefault(p.kind, p)
    return out


def plot_kinds(records: list[dict]) -> dict[str, str]:
    """``kind -> file name`` of every plot the records can have, evolution included."""
    return {**{k: p.filename for k, p in plot_specs(records).items()}, EVOLUTION: EVOLUTION_FILE}


def default_kind(records: list[dict]) -> str:
    """The plot to draw when none is named: a primary one the records have data for, else the
    first such, else evolution."""
    have = {name for r in records for ev in r.get("evaluations", {}).values() for name in ev.get("series", {})}
    specs = [p for p in plot_specs(records).values() if p.series in have]
    return next((p.kind for p in specs if p.primary), specs[0].kind if specs else EVOLUTION)


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


def _references(record: dict, kind: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """``(label, [(x, value)])`` of the values a record's metrics declared as references for
    plots of ``kind`` (from its first evaluation)."""
    ev = next(iter(record.get("evaluations", {}).values()), {})
    metrics = ev.get("metrics", {})
    out = []
    for spec in record_specs(record):
        if spec.reference != kind:
            continue
        pts = []
        for name, cell in metrics.items():
            x = x_multiple(output_x(name))
            if spec.matches(name) and x is not None and isinstance(cell, dict) and cell.get("value") is not None:
                pts.append((x, cell["value"]))
        if pts:
            out.append((spec.label or spec.key, sorted(pts)))
    return out


def plot_curves(records: list[dict], path: Path, spec: PlotSpec, title: str | None = None) -> Path | None:
    """One line per (architecture, mode) with its band; ``None`` when no record carries the
    series."""
    plt = _plt()
    groups: dict[str, list[dict]] = {}
    for r in records:
        for mode, ev in r.get("evaluations", {}).items():
            if ev.get("series", {}).get(spec.series, {}).get("x"):
                groups.setdefault(f"{r['arch']} ({mode})", []).append(ev["series"][spec.series])
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for label, curves in groups.items():
        s = _series_mean(curves)
        if s is None:
            continue
        x, y, lo, hi = s
        n = len(curves)
        line, = ax.plot(x, y, marker="o" if len(x) <= 40 else None, ms=3, lw=1.6,
                        label=label + (f", {n} seeds" if n > 1 else ""))
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    first = records[0]
    for (text, pts), style in zip(_references(first, spec.kind), (":", "--", "-.")):
        ax.plot(*zip(*pts), style, color="grey", lw=1, label=f"{text} (at k x W)")
    _mark_w(ax)
    ax.set_xscale("log")
    if spec.log_y:
        ax.set_yscale("log")
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(title or f"{first['benchmark']}: {spec.title or spec.ylabel} (W = {first['protocol']['window']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_evolution(records: list[dict], path: Path, title: str | None = None) -> Path | None:
    """One curve per checkpoint of a checkpoint-tracked series (the first one a plot is
    declared for), coloured by training step; a panel per architecture."""
    plt = _plt()
    with_ck = [r for r in records if r.get("checkpoints")]
    if not with_ck:
        return None
    tracked = set(with_ck[0]["checkpoints"][0].get("series", {}))
    spec = next((p for p in plot_specs(with_ck).values() if p.series in tracked), None)
    if spec is None:
        return None
    archs = list(dict.fromkeys(r["arch"] for r in with_ck))
    fig, axes = plt.subplots(len(archs), 1, figsize=(8, 3.6 * len(archs)), dpi=120, squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for ax, arch in zip(axes[:, 0], archs):
        rec = [r for r in with_ck if r["arch"] == arch][-1]  # one seed per panel: the last
        cks = rec["checkpoints"]
        top = max(1, max(c["step"] for c in cks))
        for c in cks:
            s = _series_mean([c["series"].get(spec.series)])
            if s is not None:
                ax.plot(s[0], s[1], color=cmap(c["step"] / top), lw=1.2)
        _mark_w(ax)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel(spec.ylabel)
        ax.set_title(f"{arch} (seed {rec['seed']}, mode {cks[0]['mode']}): {len(cks)} checkpoints")
        ax.grid(True, which="both", alpha=0.3)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
        fig.colorbar(sm, ax=ax, label="training step")
    axes[-1, 0].set_xlabel(spec.xlabel)
    fig.suptitle(title or f"{with_ck[0]['benchmark']}: {spec.ylabel} over training")
    return _save(fig, path)


def plot(records: list[dict], path: Path, kind: str) -> Path | None:
    if kind == EVOLUTION:
        return plot_evolution(records, path)
    spec = plot_specs(records).get(kind)
    return plot_curves(records, path, spec) if spec is not None else None


def write_run_plots(records: list[dict], run_dir: Path) -> list[Path]:
    """Every plot the records support, next to them."""
    out = []
    for kind, filename in plot_kinds(records).items():
        p = plot(records, Path(run_dir) / filename, kind)
        if p is not None:
            out.append(p)
    return out
