"""Reports of adaptive-TTT runs: the Pareto plot, allocation histograms, the recovery ratio.

Written into the run folder at the end of every ``lengen run`` that recorded variants of an
adaptive-TTT model (the ``lengen_run_end`` hook), and for any results folder by ``lengen
adaptive-report FOLDER``. It reads only the records and their ``scores-full.npz``: per
sequence, the summed NLL over all L positions (paired comparisons: every variant saw the same
sequences) and the per-token statistics the model reports (``k_l<i>``, ``signal_l<i>``,
``inner_flops``).

- ``adaptive_<model>_seed<s>_report.json`` / ``.md``: per variant, perplexity of all L tokens with its
  bootstrap interval, FLOPs per token at L (``cost.flops_by_length``, its inner-loop part
  apart) with an interval over sequences, the mean k and the k mix reached, microseconds per
  token; then, by paired bootstrap over sequences: the FLOPs saving and perplexity change of
  adaptive and of random against fixed-4, adaptive against random, and the recovery ratio
  ``(ppl_random - ppl_adaptive) / (ppl_random - ppl_oracle)``.
- ``adaptive_<model>_seed<s>_pareto.png``: perplexity (interval bars) against FLOPs per token, one point per
  policy; adaptive and random at each target mix as curves.
- ``adaptive_<model>_seed<s>_allocation.png``: the share of each k, overall, by position relative to W and
  by decile of the signal (adaptive, random, oracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BOOT = 2000
POSITION_EDGES = (0, 1, 2, 5, 10, 20)


def is_adaptive(record: dict) -> bool:
    cfg = record.get("model", {}).get("config", {})
    return {"policy", "choices", "mix"} <= set(cfg) and record.get("model", {}).get("variant") is not None


def load_groups(paths) -> list[dict]:
    """The adaptive records among ``paths`` (record.json files), grouped by (run, model, seed)."""
    groups: dict = {}
    for p in map(Path, paths):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not is_adaptive(rec) or "full" not in rec.get("evaluations", {}):
            continue
        scores = p.parent / "scores-full.npz"
        if not scores.exists():
            continue
        key = (rec.get("run_id"), rec["model"]["name"], rec["seed"])
        groups.setdefault(key, {"run_dir": p.parent.parent.parent, "name": key[1], "seed": key[2], "variants": {}})
        with np.load(scores) as z:
            arrays = {k: z[k] for k in z.files if k == "nll" or k.startswith("stat_")}
        groups[key]["variants"][rec["model"]["variant"]] = {"record": rec, "scores": arrays}
    return list(groups.values())


# ---------------------------------------------------------------------------------------
# numbers


def _flops_at_length(rec: dict) -> dict:
    """The record's FLOPs per token at the longest reported length, with its parts."""
    entries = rec.get("cost", {}).get("flops_by_length") or []
    if not entries:
        return {"per_token": rec.get("cost", {}).get("flops_per_token"), "parts": {}}
    return max(entries, key=lambda e: e["length"])


def seq_flops(v: dict) -> np.ndarray:
    """Per sequence: FLOPs per token over its L tokens, the inner loop from the per-token
    statistic and everything else from the record's analytic parts."""
    at_l = _flops_at_length(v["record"])
    parts = at_l.get("parts", {})
    outside = sum(x for n, x in parts.items() if not n.startswith("inner"))
    inner = v["scores"].get("stat_inner_flops")
    if inner is None or not parts:
        return np.full(len(v["scores"]["nll"]), float(at_l["per_token"]))
    return outside + inner.mean(1)


def decisions(v: dict) -> dict:
    """Every decision in the scores: k, its signal and where the decided mini-batch ends (in
    multiples of W), pooled over layers, with each decision's layer."""
    rec, s = v["record"], v["scores"]
    K = rec["model"]["config"]["mini_batch"]
    W = rec["protocol"]["window"]
    L = s["nll"].shape[1]
    cols = np.arange(K, L, K)  # the first token of mini-batch b >= 1 reads b - 1's update
    layers = sorted(int(n[len("stat_k_l"):]) for n in s if n.startswith("stat_k_l"))
    names = [(f"stat_k_l{l}", f"stat_signal_l{l}") for l in layers] or [("stat_k", "stat_signal")]
    out = {"k": [], "signal": [], "position": [], "layer": []}
    for l, (kn, sn) in enumerate(names):
        if kn not in s:
            continue
        k = s[kn][:, cols]
        out["k"].append(k.ravel())
        out["signal"].append(s[sn][:, cols].ravel())
        out["position"].append(np.broadcast_to(cols / W, k.shape).ravel())
        out["layer"].append(np.full(k.size, l))
    return {n: np.concatenate(x) if x else np.zeros(0) for n, x in out.items()}


def shares(k: np.ndarray, choices) -> list[float]:
    return [float((np.rint(k) == c).mean()) if len(k) else float("nan") for c in choices]


def _interval(samples) -> list[float]:
    lo, hi = np.quantile(np.asarray(samples, float), [0.025, 0.975])
    return [float(lo), float(hi)]


def compare(group: dict) -> dict:
    """Per-variant rows and the paired comparisons of one (run, model, seed)."""
    vs = group["variants"]
    first = next(iter(vs.values()))
    choices = first["record"]["model"]["config"]["choices"]
    n = len(first["scores"]["nll"])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, size=(BOOT, n))
    nll = {name: v["scores"]["nll"].astype(np.float64).sum(1) for name, v in vs.items()}
    tokens = first["scores"]["nll"].shape[1]
    fl = {name: seq_flops(v) for name, v in vs.items()}

    def ppl(name, rows=None):
        x = nll[name] if rows is None else nll[name][rows]
        return np.exp(x.sum(-1) / (x.shape[-1] * tokens))

    def flops(name, rows=None):
        return (fl[name] if rows is None else fl[name][rows]).mean(-1)

    rows = []
    for name, v in vs.items():
        rec = v["record"]
        cfg = rec["model"]["config"]
        at_l = _flops_at_length(rec)
        parts = at_l.get("parts", {})
        inner = sum(x for p, x in parts.items() if p.startswith("inner"))
        dec = decisions(v)
        metric = rec["evaluations"]["full"]["metrics"].get("ppl", {})
        k_stat = rec["evaluations"]["full"]["metrics"].get("stat.k", {})
        rows.append({
            "variant": name, "policy": cfg["policy"], "mix": cfg["mix"] if cfg["policy"] != "fixed" else None,
            "k": cfg["k"] if cfg["policy"] == "fixed" else None,
            "ppl": float(ppl(name)), "ppl_ci": [metric.get("ci_low"), metric.get("ci_high")],
            "flops_per_token": float(flops(name)), "flops_ci": _interval(flops(name, idx)),
            "flops_analytic_at_L": at_l.get("per_token"), "length": at_l.get("length"),
            "inner_share": inner / at_l["per_token"] if parts and at_l.get("per_token") else None,
            "mean_k": k_stat.get("value"), "mean_k_ci": [k_stat.get("ci_low"), k_stat.get("ci_high")],
            "k_mix": shares(dec["k"], choices),
            "eval_us_per_token": rec.get("cost", {}).get("eval_us_per_token"),
            "calibration": rec.get("calibration"),
        })
    out = {"run": str(group["run_dir"]), "arch": group["name"], "seed": group["seed"], "sequences": n,
           "tokens_per_sequence": tokens, "choices": choices, "variants": rows, "comparisons": {}}
    c = out["comparisons"]
    base = f"fixed-{max(choices)}"
    for name in ("adaptive", "random"):
        if name in vs and base in vs:
            r = ppl(name, idx) / ppl(base, idx) - 1
            f = 1 - flops(name, idx) / flops(base, idx)
            c[f"{name}_vs_{base}"] = {
                "flops_saving": float(1 - flops(name) / flops(base)), "flops_saving_ci": _interval(f),
                "ppl_change": float(ppl(name) / ppl(base) - 1), "ppl_change_ci": _interval(r)}
    if "adaptive" in vs and "random" in vs:
        r = ppl("adaptive", idx) / ppl("random", idx) - 1
        c["adaptive_vs_random"] = {"ppl_change": float(ppl("adaptive") / ppl("random") - 1),
                                   "ppl_change_ci": _interval(r),
                                   "flops_ratio": float(flops("adaptive") / flops("random"))}
    if {"adaptive", "random", "oracle"} <= set(vs):
        pr, pa, po = (ppl(x, idx) for x in ("random", "adaptive", "oracle"))
        den = pr - po
        c["recovery"] = {
            "value": float((ppl("random") - ppl("adaptive")) / (ppl("random") - ppl("oracle"))),
            "ci": _interval((pr - pa) / den), "random_minus_oracle": float(ppl("random") - ppl("oracle")),
            "random_minus_oracle_ci": _interval(den),
            "note": "(ppl_random - ppl_adaptive) / (ppl_random - ppl_oracle), paired bootstrap over sequences; "
                    "unstable when random - oracle is near 0"}
    return out


# ---------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"fixed": "tab:gray", "adaptive": "tab:blue", "random": "tab:orange", "oracle": "tab:green"}


def plot_pareto(report: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    by_policy: dict = {}
    for r in report["variants"]:
        by_policy.setdefault(r["policy"], []).append(r)
    for policy, rows in by_policy.items():
        rows = sorted(rows, key=lambda r: r["flops_per_token"])
        x = np.array([r["flops_per_token"] for r in rows]) / 1e6
        y = np.array([r["ppl"] for r in rows])
        lo = np.array([r["ppl_ci"][0] if r["ppl_ci"][0] is not None else r["ppl"] for r in rows])
        hi = np.array([r["ppl_ci"][1] if r["ppl_ci"][1] is not None else r["ppl"] for r in rows])
        xlo = np.array([r["flops_ci"][0] for r in rows]) / 1e6
        xhi = np.array([r["flops_ci"][1] for r in rows]) / 1e6
        ax.errorbar(x, y, yerr=[y - lo, hi - y], xerr=[x - xlo, xhi - x], fmt="o-" if len(rows) > 1 else "o",
                    color=COLORS.get(policy, "black"), capsize=3, ms=5, lw=1.4, label=policy)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["variant"], (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(f"forward FLOPs per token at L = {report['tokens_per_sequence']} (millions; inner loop from "
                  "the per-token k)")
    ax.set_ylabel("perplexity over all L tokens (full mode)")
    ax.set_title(f"{report['arch']} seed {report['seed']}: perplexity against compute, one training "
                 f"({report['sequences']} sequences, 95% intervals)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_allocation(group: dict, report: dict, path: Path) -> Path | None:
    plt = _plt()
    vs = group["variants"]
    rows = [n for n in ("adaptive", "random", "oracle") if n in vs]
    if not rows:
        return None
    choices = report["choices"]
    colors = plt.cm.viridis(np.linspace(0.15, 0.85, len(choices)))
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.1 * len(rows)), dpi=110, squeeze=False)

    def stacked(ax, labels, share_rows):
        bottom = np.zeros(len(labels))
        for j, c in enumerate(choices):
            vals = np.array([s[j] for s in share_rows])
            ax.bar(range(len(labels)), vals, bottom=bottom, color=colors[j], label=f"k = {c}")
            bottom += np.nan_to_num(vals)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(0, 1)

    for i, name in enumerate(rows):
        dec = decisions(vs[name])
        k, sig, pos, layer = dec["k"], dec["signal"], dec["position"], dec["layer"]
        target = vs[name]["record"]["model"]["config"]["mix"]
        stacked(axes[i, 0], ["reached", "target"], [shares(k, choices), target])
        axes[i, 0].set_ylabel(f"{name}\nshare of decisions")
        edges = list(POSITION_EDGES)
        labels = [f"{a}-{b}W" for a, b in zip(edges[:-1], edges[1:])]
        stacked(axes[i, 1], labels, [shares(k[(pos > a) & (pos <= b)], choices) for a, b in zip(edges[:-1], edges[1:])])
        dec_idx = np.zeros(len(sig), int)  # deciles of the signal within each layer
        for l in np.unique(layer):
            m = layer == l
            dec_idx[m] = np.clip(np.searchsorted(np.quantile(sig[m], np.linspace(0.1, 0.9, 9)), sig[m], side="right"),
                                 0, 9)
        stacked(axes[i, 2], [str(d + 1) for d in range(10)], [shares(k[dec_idx == d], choices) for d in range(10)])
    axes[0, 0].set_title("overall (reached vs target mix)", fontsize=9)
    axes[0, 1].set_title("by position of the mini-batch (multiples of W)", fontsize=9)
    signal = group["variants"][rows[0]]["record"]["model"]["config"]["signal"]
    axes[0, 2].set_title(f"by decile of the signal ({signal}; 1 = lowest)", fontsize=9)
    axes[0, 2].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{report['arch']} seed {report['seed']}: allocation of inner steps per mini-batch "
                 "(all layers' decisions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# writing


def _fmt(x, digits=2, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.{digits}f}%" if pct else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"# Adaptive TTT: {report['arch']} seed {report['seed']}", "",
             f"{report['sequences']} evaluation sequences of {report['tokens_per_sequence']} tokens, full mode; "
             "perplexity over all positions; FLOPs per token at L (forward matrix-multiply FLOPs, 2 per "
             "multiply-add).", "",
             "| variant | ppl [95%] | FLOPs/token (M) [95%] | inner share | mean k | k mix | us/token |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["variants"]:
        ci = r["ppl_ci"]
        lines.append(
            f"| {r['variant']} | {r['ppl']:.3f} [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}] | "
            f"{r['flops_per_token'] / 1e6:.4f} [{r['flops_ci'][0] / 1e6:.4f}, {r['flops_ci'][1] / 1e6:.4f}] | "
            f"{_fmt(r['inner_share'], 1, True)} | {_fmt(r['mean_k'])} | "
            f"{'/'.join(f'{100 * s:.0f}' for s in r['k_mix'])} | {_fmt(r['eval_us_per_token'], 0)} |")
    c = report["comparisons"]
    lines += ["", "Paired comparisons (bootstrap over sequences):", ""]
    for key, v in c.items():
        if key == "recovery":
            lines.append(f"- recovery ratio (random - adaptive) / (random - oracle): {v['value']:.3f} "
                         f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]; random - oracle = {v['random_minus_oracle']:.4f} "
                         f"[{v['random_minus_oracle_ci'][0]:.4f}, {v['random_minus_oracle_ci'][1]:.4f}] ppl")
        elif "flops_saving" in v:
            lines.append(f"- {key}: FLOPs saving {_fmt(v['flops_saving'], 2, True)} [{_fmt(v['flops_saving_ci'][0], 2, True)}, "
                         f"{_fmt(v['flops_saving_ci'][1], 2, True)}], perplexity change {_fmt(v['ppl_change'], 2, True)} "
                         f"[{_fmt(v['ppl_change_ci'][0], 2, True)}, {_fmt(v['ppl_change_ci'][1], 2, True)}]")
        else:
            lines.append(f"- {key}: perplexity change {_fmt(v['ppl_change'], 2, True)} "
                         f"[{_fmt(v['ppl_change_ci'][0], 2, True)}, {_fmt(v['ppl_change_ci'][1], 2, True)}] at "
                         f"{v['flops_ratio']:.4f}x the FLOPs")
    return "\n".join(lines) + "\n"


def write_reports(record_paths, out_dir: Path | None = None) -> list[Path]:
    """Write the reports of every (run, model, seed) with adaptive variants among
    ``record_paths`` into its run folder (or ``out_dir``); returns the files written."""
    written = []
    for group in load_groups(record_paths):
        report = compare(group)
        folder = Path(out_dir) if out_dir else Path(group["run_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        stem = "adaptive" if out_dir is None else f"adaptive_{group['run_dir'].name}"
        base = folder / f"{stem}_{group['name']}_seed{group['seed']}"  # one set per model and seed
        Path(f"{base}_report.json").write_text(json.dumps(report, indent=1))
        Path(f"{base}_report.md").write_text(markdown(report))
        written += [Path(f"{base}_report.json"), Path(f"{base}_report.md"),
                    plot_pareto(report, Path(f"{base}_pareto.png"))]
        alloc = plot_allocation(group, report, Path(f"{base}_allocation.png"))
        if alloc:
            written.append(alloc)
    return written
