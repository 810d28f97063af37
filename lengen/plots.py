"""Plots people would rather look at than tables (matplotlib, Agg backend).

Which plots exist is what the records' metrics declared (:class:`lengen.api.PlotSpec`): one
per declared series, one curve per (architecture, mode) with its interval band; values a
metric declared as a ``reference`` for a plot are drawn on it as grey lines. The y axis is
scaled to the curves and their bands, so the architectures being compared fill it; a
reference line outside that range is marked at the edge with its value instead of
stretching the axis. Every such plot puts x in multiples of W on a log scale and marks W.

The core adds two plots of its own: ``evolution`` (a checkpoint-tracked series at every
checkpoint) and ``training`` (the training curves recorded every few steps: the language-
modelling loss, each auxiliary loss and the learning rate against the step, every
(architecture, seed) overlaid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lengen.api import PlotSpec, output_x, x_multiple
from lengen.results import atomic_save, record_plots, record_specs

EVOLUTION = "evolution"
EVOLUTION_FILE = "evolution.png"
TRAINING = "training"
TRAINING_FILE = "training.png"
#: fraction of the curves' range added above and below them
Y_PAD = 0.06


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
    """``kind -> file name`` of every plot the records can have, the core's included."""
    return {**{k: p.filename for k, p in plot_specs(records).items()}, EVOLUTION: EVOLUTION_FILE,
            TRAINING: TRAINING_FILE}


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
    spans = []
    for label, curves in groups.items():
        s = _series_mean(curves)
        if s is None:
            continue
        x, y, lo, hi = s
        n = len(curves)
        line, = ax.plot(x, y, marker="o" if len(x) <= 40 else None, ms=3, lw=1.6,
                        label=label + (f", {n} seeds" if n > 1 else ""))
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        spans += [y, lo, hi]
    _mark_w(ax)
    ax.set_xscale("log")
    if spec.log_y:
        ax.set_yscale("log")
    limits = y_limits(spans, spec.log_y)
    if limits is not None:
        ax.set_ylim(*limits)
    first = records[0]
    for (text, pts), style in zip(_references(first, spec.kind), (":", "--", "-.")):
        _reference_line(ax, text, pts, style, limits)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(title or f"{first['benchmark']}: {spec.title or spec.ylabel} (W = {first['protocol']['window']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def y_limits(arrays, log: bool = False, pad: float = Y_PAD) -> tuple[float, float] | None:
    """The y range of the curves and their bands (finite values only), padded by ``pad`` of
    the range on each side (in log space on a log axis); None when there is nothing to show."""
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else np.array([])
    vals = vals[np.isfinite(vals) & ((vals > 0) if log else True)]
    if not len(vals):
        return None
    lo, hi = float(vals.min()), float(vals.max())
    if log:
        llo, lhi = np.log10(lo), np.log10(hi)
        span = (lhi - llo) or 0.05
        return 10 ** (llo - pad * span), 10 ** (lhi + pad * span)
    span = (hi - lo) or max(abs(hi) * 0.05, 1e-9)
    return lo - pad * span, hi + pad * span


def _reference_line(ax, text: str, pts, style: str, limits) -> None:
    """A grey reference line; where its values fall outside the axes, a marker at that edge and
    the values in the legend, so that the reference does not squeeze the curves."""
    xs, ys = zip(*pts)
    lo, hi = limits if limits is not None else (-np.inf, np.inf)
    outside = [(x, y) for x, y in pts if not lo <= y <= hi]
    label = f"{text} (at k x W)"
    if outside:
        where = "above" if all(y > hi for _x, y in outside) else "below" if all(y < lo for _x, y in outside) \
            else "outside"
        shown = ", ".join(f"{y:.3g}" for _x, y in outside[:3]) + (", ..." if len(outside) > 3 else "")
        label += f"; {where} the axes: {shown}"
    ax.plot(xs, ys, style, color="grey", lw=1, label=label)
    for x, y in outside:  # the legend gives the values
        top = y > hi
        ax.plot([x], [1.0 if top else 0.0], "^" if top else "v", color="grey", ms=6, clip_on=False,
                transform=ax.get_xaxis_transform())


def plot_training(records: list[dict], path: Path, title: str | None = None) -> Path | None:
    """Training curves (``record["train"]["losses"]``): the language-modelling loss, each
    auxiliary loss and the learning rate against the step, every (architecture, seed) a line."""
    plt = _plt()
    with_losses = [r for r in records if (r.get("train") or {}).get("losses")]
    if not with_losses:
        return None
    reserved = {"step", "loss", "lr"}
    aux = list(dict.fromkeys(k for r in with_losses for e in r["train"]["losses"] for k in e if k not in reserved))
    panels = ["loss", *aux, "lr"]
    labels = [f"{r['arch']} seed {r['seed']}" for r in with_losses]
    if len(set(labels)) < len(labels):  # the same job in several runs: name the runs
        labels = [f"{lab} ({r.get('run_id', '?')})" for lab, r in zip(labels, with_losses)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 + 1.9 * len(panels)), dpi=120, squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [2.2] + [1] * (len(panels) - 1)})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (r, label) in enumerate(zip(with_losses, labels)):
        entries = r["train"]["losses"]
        for ax, key in zip(axes[:, 0], panels):
            pts = [(e["step"], e[key]) for e in entries if isinstance(e.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), lw=1.3, color=colours[i % len(colours)], label=label)
    names = {"loss": "LM loss (nats/token)", "lr": "learning rate"}
    for ax, key in zip(axes[:, 0], panels):
        ax.set_ylabel(names.get(key, f"{key} (aux)"), fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    first = with_losses[0]
    fig.suptitle(title or f"{first['benchmark']}: training (W = {first.get('protocol', {}).get('window')})")
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
    if kind == TRAINING:
        return plot_training(records, path)
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
