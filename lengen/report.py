"""``lengen report``: one self-contained HTML file of a results folder, to share.

The file needs nothing at view time (no network, no CDN, no other file): the plots are inline
PNG images (base64), the style is inline CSS (readable on a phone: tables scroll sideways in
their box, figures shrink to the screen; in print: every section open, no page break inside a
figure or table row), and a few lines of inline JavaScript sort the leaderboard by a column
when its header is clicked. It holds:

- the leaderboard (one table per benchmark and evaluation mode, the columns the metrics
  declared, values with their intervals, best values bold and ``≈`` for ties, as in
  ``lengen leaderboard``);
- the paired comparisons of every run with two or more architectures
  (:func:`lengen.compare.paired_ratios`: ppl A / ppl B at each position on the same tokens,
  with a paired bootstrap interval and a verdict);
- each run: its state and jobs (with the error line of a job that did not finish), its
  protocol (window, evaluation, training recipe, dataset), its provenance (lengen version,
  git commit, packages, device, command) and every plot its records support (the metrics'
  plots, evolution, training), drawn afresh from the records.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
import time
import warnings
from pathlib import Path

from lengen.leaderboard import _format_cell, _groups, group_specs, rows_from_records, spec_for, table_columns
from lengen.results import atomic_write_bytes, iter_runs, read_record

CSS = """
:root { --fg: #1d2330; --muted: #5d6778; --line: #d9dde5; --bg: #ffffff; --head: #f3f5f8; --accent: #2c5fb3; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1100px; padding: 1rem 1.2rem 3rem; }
h1 { font-size: 1.5rem; margin: .2rem 0 .3rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem;
     border-bottom: 2px solid var(--line); padding-bottom: .2rem; } h3 { font-size: 1.08rem; margin: 1.6rem 0 .4rem; }
.muted, figcaption { color: var(--muted); font-size: .88rem; }
nav a { margin-right: 1rem; color: var(--accent); }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: .5rem 0 1rem; border: 1px solid var(--line);
          border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: .32rem .6rem; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--head); position: sticky; top: 0; }
th.text, td.text { text-align: left; } td.wrap { white-space: normal; min-width: 16rem; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir="asc"]::after { content: " \\25B2"; font-size: .7em; }
table.sortable th[data-dir="desc"]::after { content: " \\25BC"; font-size: .7em; }
td.best { font-weight: 700; } .ci { color: var(--muted); font-size: .85em; }
.state { display: inline-block; padding: 0 .45rem; border-radius: 4px; font-size: .85rem; color: #fff; }
.finished { background: #2f855a; } .running { background: #2b6cb0; } .interrupted { background: #b7791f; }
.failed, .diverged, .terminated, .unknown { background: #c53030; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .4rem 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
details { margin: .4rem 0; } summary { cursor: pointer; color: var(--accent); }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: .8rem; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: .4rem; break-inside: avoid; }
figure img { width: 100%; height: auto; display: block; }
code { font-size: .88em; overflow-wrap: anywhere; }
@media (max-width: 640px) {
  body { font-size: 14px; padding: .6rem .6rem 2rem; }
  .figs { grid-template-columns: 1fr; }
  th, td { padding: .25rem .4rem; }
  dl { grid-template-columns: 1fr; } dt { margin-top: .3rem; }
}
@media print {
  body { max-width: none; font-size: 10.5pt; } nav { display: none; }
  .scroll { overflow: visible; border: none; } th { position: static; }
  table.sortable th::after { content: "" !important; }
  tr, figure { break-inside: avoid; } h2, h3 { break-after: avoid; }
  .figs { grid-template-columns: 1fr 1fr; } a { color: inherit; text-decoration: none; }
}
"""

JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('thead th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.dataset.dir !== 'asc';
      table.querySelectorAll('thead th').forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = asc ? 'asc' : 'desc';
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) { var c = row.cells[col], v = c.getAttribute('data-v');
        return v === null || v === '' ? [1, c.textContent.trim()] : [0, parseFloat(v)]; }
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        if (x[0] !== y[0]) return x[0] - y[0];
        var d = typeof x[1] === 'number' ? x[1] - y[1] : String(x[1]).localeCompare(String(y[1]));
        return asc ? d : -d; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
window.addEventListener('beforeprint', function () {
  document.querySelectorAll('details').forEach(function (d) { d.open = true; });
});
document.documentElement.setAttribute('data-ready', '1');
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if isinstance(t, (int, float)) else "-"


def _duration(s) -> str:
    from lengen.progress import clock

    return clock(s) if isinstance(s, (int, float)) else "-"


def _leaderboard(rows: list[dict]) -> str:
    out = []
    for grp in _groups(rows):
        cols = table_columns(grp)
        specs = group_specs(grp)
        window = grp[0].get("window")
        notes = list(dict.fromkeys(s.note for _h, k in cols if (s := spec_for(k, specs)) is not None and s.note))
        head = "".join(f'<th class="{"text" if k in ("benchmark", "arch", "mode") else ""}">{_e(h)}</th>'
                       for h, k in cols)
        body = []
        for r in grp:
            cells = []
            for _h, key in cols:
                v = r.get(key)
                spec = spec_for(key, specs)
                if key in ("benchmark", "arch", "mode"):
                    cells.append(f'<td class="text">{_e(v)}</td>')
                    continue
                num = v.get("value") if isinstance(v, dict) else v
                text = _format_cell(v, key, spec)
                value, _, interval = text.partition(" [")
                shown = _e(value) + (f' <span class="ci">[{_e(interval)}</span>' if interval else "")
                cls = "best" if key in r.get("best", []) else ""
                if key in r.get("overlaps_best", []):
                    shown += " ≈"
                data = f"{num:.10g}" if isinstance(num, (int, float)) and num == num else ""
                cells.append(f'<td class="{cls}" data-v="{data}">{shown}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        caption = ("Values with their 95% interval; bold: best in its column; ≈: interval overlaps the best one's. "
                   + " ".join(notes) + " Click a header to sort.")
        out.append(f"<h3>{_e(grp[0]['benchmark'])}" + (f", W = {_e(window)}" if window else "")
                   + f", mode {_e(grp[0]['mode'])}</h3>"
                   f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
                   f"<tbody>{''.join(body)}</tbody></table></div><p class=\"muted\">{_e(caption)}</p>")
    return "\n".join(out) or '<p class="muted">No finished record.</p>'


def _comparisons(runs: list[tuple[Path, dict, list[dict]]]) -> str:
    from lengen.compare import paired_ratios

    out = []
    for run_dir, _info, records in runs:
        archs = list(dict.fromkeys(r["arch"] for r in records))
        if len(archs) < 2:
            continue
        first = {a: sorted((r for r in records if r["arch"] == a), key=lambda r: r["seed"])[0] for a in archs}
        for i, a in enumerate(archs):
            for b in archs[i + 1:]:
                ra, rb = first[a], first[b]
                mode = next((m for m in ra["evaluations"] if m != "nonoverlapping" and m in rb["evaluations"]), None)
                if mode is None:
                    continue
                try:
                    pairs = paired_ratios(ra, rb, mode)
                except Exception as exc:  # noqa: BLE001 - a comparison that cannot be made is said, not fatal
                    out.append(f"<p class=\"muted\">{_e(run_dir.name)}: {_e(a)} vs {_e(b)}: not comparable "
                               f"({_e(exc)})</p>")
                    continue
                seeds = (f"seed {ra['seed']} of each" if ra["seed"] == rb["seed"] else
                         f"{a} seed {ra['seed']}, {b} seed {rb['seed']}")
                rows = "".join(
                    f"<tr><td class=\"text\">{_e(p['position'])}</td><td>{p['ratio']:.3f}</td>"
                    f"<td>{_interval(p)}</td><td class=\"text\">{_e(p['verdict'])}</td></tr>" for p in pairs)
                out.append(f"<h3>{_e(run_dir.name)}: ppl {_e(a)} / ppl {_e(b)}</h3>"
                           f'<div class="scroll"><table><thead><tr><th class="text">position</th><th>ratio</th>'
                           f'<th>95% interval</th><th class="text">verdict</th></tr></thead><tbody>{rows}</tbody>'
                           f'</table></div><p class="muted">{_e(seeds)}, {_e(mode)} mode, the same evaluation '
                           f"tokens; paired bootstrap over sequences. Below 1: {_e(a)} predicts better.</p>")
    return "\n".join(out) or '<p class="muted">No run with two architectures.</p>'


def _interval(p: dict) -> str:
    lo, hi = p.get("ci_low"), p.get("ci_high")
    return "-" if lo is None or hi is None else f"{lo:.3f} – {hi:.3f}"


class Markup(str):
    """Text already escaped."""


def _dl(items: list[tuple[str, object]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v if isinstance(v, Markup) else _e(v)}</dd>"
                            for k, v in items if v not in (None, "")) + "</dl>"


def _protocol(info: dict, rec: dict | None) -> str:
    suite = info.get("suite") or (rec or {}).get("suite") or {}
    tr, ev = suite.get("train", {}), suite.get("eval", {})
    proto = (rec or {}).get("protocol", {})
    ds = (rec or {}).get("dataset", {})
    tok = ds.get("tokenizer") or {}
    items = [
        ("window W", suite.get("window")),
        ("evaluation", f"{ev.get('sequences')} sequences of {ev.get('length')} x W; positions "
                       f"{', '.join(f'{p:g}' for p in ev.get('positions', []))} x W; bucket {ev.get('bucket')}; "
                       f"modes {', '.join(ev.get('modes', []))}; {ev.get('bootstrap')} bootstrap resamples"),
        ("checkpoints", ev.get("checkpoints") or None),
        ("training", f"{tr.get('steps')} steps of batch {tr.get('batch_size')} x {tr.get('grad_accum', 1)}; "
                     f"lr {tr.get('lr')}, warmup {tr.get('warmup')}, clip {tr.get('clip')}, weight decay "
                     f"{tr.get('weight_decay')}; precision {tr.get('precision')}; state passing "
                     f"{'on' if tr.get('state_passing') else 'off'}"),
        ("dataset", f"{suite.get('dataset')} (data seed {suite.get('data_seed')})"
                    + (f"; fingerprint {ds.get('fingerprint')}" if ds.get("fingerprint") else "")),
        ("tokenizer", tok.get("name")),
        ("dataset config", json.dumps(suite.get("data") or {}, sort_keys=True)),
        ("architectures", Markup("<br>".join(f"<code>{_e(a)}</code>: {_e(json.dumps(c, sort_keys=True))}"
                                             for a, c in (suite.get("arch") or {}).items()))),
        ("evaluated length", f"{proto.get('eval_length')} tokens" if proto.get("eval_length") else None),
        ("suite hash", info.get("suite_hash")),
    ]
    return _dl(items)


def _provenance(info: dict) -> str:
    prov = info.get("provenance") or {}
    git = prov.get("git") or {}
    packages = prov.get("packages") or {}
    device = prov.get("device") or {}
    items = [
        ("lengen", prov.get("lengen_version")),
        ("git", f"{git.get('commit', '-')}" + (" (uncommitted changes)" if git.get("dirty") else "") if git else None),
        ("python", prov.get("python")),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items())),
        ("device", ", ".join(f"{k}: {v}" for k, v in device.items())),
        ("precision", prov.get("precision")),
        ("command", " ".join(prov.get("command") or [])),
        ("host, pid", f"{info.get('host')}, {info.get('pid')}" if info.get("host") else None),
        ("trackers", ", ".join(info.get("log_with") or [])),
    ]
    return _dl(items)


def _plots(records: list[dict]) -> list[tuple[str, str]]:
    """``(kind, base64 PNG)`` of every plot the records support, drawn afresh."""
    from lengen.plots import plot_kinds, write_run_plots

    kinds = {v: k for k, v in plot_kinds(records).items()}
    out = []
    with tempfile.TemporaryDirectory(prefix="lengen-report-") as tmp:
        for p in write_run_plots(records, Path(tmp)):
            out.append((kinds.get(p.name, p.stem), base64.b64encode(p.read_bytes()).decode("ascii")))
    return out


def _run(run_dir: Path, info: dict, state: str, why: str, records: list[dict]) -> str:
    jobs = info.get("jobs", [])
    job_rows = "".join(
        f"<tr><td class=\"text\">{_e(j.get('arch'))}</td><td>{_e(j.get('seed'))}</td>"
        f"<td class=\"text\"><span class=\"state {_e(j.get('status'))}\">{_e(j.get('status'))}</span></td>"
        f"<td>{_e(j.get('step') if j.get('step') is not None else '-')}</td><td>{_duration(j.get('wall_s'))}</td>"
        f"<td class=\"text wrap\">{_e(j.get('error') or '')}</td></tr>" for j in jobs)
    figs = "".join(f'<figure><img alt="{_e(kind)} plot of {_e(run_dir.name)}" src="data:image/png;base64,{b64}">'
                   f"<figcaption>{_e(kind)}</figcaption></figure>" for kind, b64 in (_plots(records) if records else []))
    return (f'<section class="run" id="run-{_e(run_dir.name)}"><h3>{_e(run_dir.name)} '
            f'<span class="state {_e(state)}">{_e(state)}</span></h3>'
            + _dl([("benchmark", info.get("benchmark")), ("architectures", ", ".join(info.get("archs") or [])),
                   ("seeds", ", ".join(map(str, info.get("seeds") or []))), ("started", _when(info.get("started"))),
                   ("wall time", _duration(info.get("wall_s"))), ("state", f"{state}" + (f": {why}" if why else ""))])
            + '<div class="scroll"><table><thead><tr><th class="text">arch</th><th>seed</th><th class="text">status'
              '</th><th>step</th><th>wall</th><th class="text">error</th></tr></thead>'
            + f"<tbody>{job_rows}</tbody></table></div>"
            + f"<details open><summary>protocol</summary>{_protocol(info, records[0] if records else None)}</details>"
            + f"<details><summary>provenance</summary>{_provenance(info)}</details>"
            + (f'<div class="figs">{figs}</div>' if figs else '<p class="muted">No plot: no finished record.</p>')
            + "</section>")


def build_report(results_dir: Path, title: str | None = None, progress=None) -> str:
    """The HTML text of the report of every run under ``results_dir``."""
    results_dir = Path(results_dir)
    say = progress or (lambda message: None)
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable record is left out (lengen leaderboard names it)
        for run_dir, info, state, why in iter_runs(results_dir):
            recs = [r for r in (read_record(run_dir / j["record"]) for j in info.get("jobs", []) if j.get("record"))
                    if r is not None]
            runs.append((run_dir, info, state, why, recs))
    records = [r for *_x, recs in runs for r in recs]
    rows = rows_from_records(records)
    sections = []
    for i, (run_dir, info, state, why, recs) in enumerate(runs):
        say(f"run {i + 1}/{len(runs)}: {run_dir.name}")
        sections.append(_run(run_dir, info, state, why, recs))
    title = title or f"lengen report: {results_dir.resolve().name}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p class=\"muted\">{_count(len(runs), 'run')}, "
        f"{_count(len(records), 'record')} under "
        f"<code>{_e(results_dir)}</code>; written {_e(time.strftime('%Y-%m-%d %H:%M'))} by lengen "
        f"{_e(_version())}.</p>"
        "<nav><a href=\"#leaderboard\">leaderboard</a><a href=\"#comparisons\">paired comparisons</a>"
        "<a href=\"#runs\">runs</a></nav></header>"
        f"<h2 id=\"leaderboard\">Leaderboard</h2>{_leaderboard(rows)}"
        f"<h2 id=\"comparisons\">Paired comparisons</h2>"
        f"{_comparisons([(d, i, recs) for d, i, _s, _w, recs in runs])}"
        f"<h2 id=\"runs\">Runs</h2>{''.join(sections) or '<p class=muted>No run.</p>'}"
        f"<script>{JS}</script></body></html>\n")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _version() -> str:
    from lengen import __version__

    return __version__


def write_report(results_dir: Path, out: Path, title: str | None = None, progress=None) -> Path:
    atomic_write_bytes(Path(out), build_report(results_dir, title, progress).encode("utf-8"))
    return Path(out)
