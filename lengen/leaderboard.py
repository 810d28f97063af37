"""``lengen leaderboard``: one row per (benchmark, architecture, mode), read from records.

Within a row, only records comparable with the newest one count (same suite, architecture
config and version, dataset fingerprint); the newest record of each seed is used. With one
seed the intervals are the record's bootstrap / Wilson intervals; with several, the value is
the mean over seeds and the interval a Student-t interval over seeds. Never imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from lengen.errors import ConfigError
from lengen.results import iter_records
from lengen.stats import across_seeds

FORMATS = ("table", "markdown", "csv", "json")
_KEY_METRICS = re.compile(r"^(ppl@[\d.]+W|ppl_ratio@[\d.]+W|recall@<=W|recall@>W|recall_recent@<=W|"
                          r"recall_keyed@>W|excess_nll|ppl_unigram@1W|ppl_optimal@1W)$")


def comparable_key(rec: dict) -> tuple:
    return (rec.get("suite_hash"), rec["model"].get("config_hash"), rec["model"].get("arch_version"),
            rec["dataset"].get("fingerprint"))


def rows_from_records(records: list[dict], benchmark: str | None = None) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        if benchmark and rec.get("benchmark") != benchmark:
            continue
        groups.setdefault((rec["benchmark"], rec["arch"], rec.get("mode", "full")), []).append(rec)
    rows = []
    for (bench, arch, mode), recs in sorted(groups.items()):
        recs.sort(key=lambda r: r.get("created", 0))
        newest = recs[-1]
        key = comparable_key(newest)
        by_seed: dict[int, dict] = {}
        for r in recs:
            if comparable_key(r) == key:
                by_seed[r["seed"]] = r
        chosen = [by_seed[s] for s in sorted(by_seed)]
        row: dict[str, Any] = {
            "benchmark": bench, "arch": arch, "mode": mode, "n_seeds": len(chosen),
            "seeds": sorted(by_seed), "superseded": len(recs) - len(chosen),
        }
        names = [k for k in newest.get("metrics", {}) if _KEY_METRICS.match(k)]
        for name in names:
            vals = [r["metrics"].get(name) for r in chosen if r.get("metrics", {}).get(name)]
            if len(vals) == 1:
                v = vals[0]
                row[name] = {"value": v["value"], "ci_low": v.get("ci_low"), "ci_high": v.get("ci_high")}
            elif vals:
                agg = across_seeds([v["value"] for v in vals])
                row[name] = {"value": agg.value, "ci_low": agg.ci_low, "ci_high": agg.ci_high}
        row["params"] = newest["model"].get("params")
        tps = [r["train"].get("tokens_per_s") for r in chosen if r.get("train")]
        row["train_tokens_per_s"] = sum(tps) / len(tps) if tps else None
        eps = [r["eval"].get("tokens_per_s") for r in chosen if r.get("eval")]
        row["eval_tokens_per_s"] = sum(eps) / len(eps) if eps else None
        row["window"] = newest.get("protocol", {}).get("window")
        row["run_id"] = newest.get("run_id")
        rows.append(row)
    return rows


def load_rows(results_dir: Path, benchmark: str | None = None) -> list[dict]:
    return rows_from_records(list(iter_records(results_dir)), benchmark)


def sort_rows(rows: list[dict], key: str | None) -> list[dict]:
    if not key:
        return rows
    desc = key.startswith("-")
    key = key.lstrip("-")
    known = sorted({k for r in rows for k in r})
    if rows and key not in known:
        from lengen.errors import did_you_mean

        raise ConfigError("--sort: " + did_you_mean(key, known, kind="column"))

    def val(row):
        v = row.get(key)
        if isinstance(v, dict):
            v = v.get("value")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (1, 0)
        return (0, -v if desc and isinstance(v, (int, float)) else v)

    return sorted(rows, key=val)


def position_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if re.match(r"^ppl@[\d.]+W$", k)}
    return sorted(keys, key=lambda k: float(k[4:-1]))


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        if v.get("value") is None or (isinstance(v["value"], float) and math.isnan(v["value"])):
            return "-"
        s = _num(v["value"], digits)
        if v.get("ci_low") is not None and v.get("ci_high") is not None:
            s += f" [{_num(v['ci_low'], digits)}, {_num(v['ci_high'], digits)}]"
        return s
    return _num(v, digits)


def _num(x: float, digits: int) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def table_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(header, row key) pairs shown in table / markdown / csv output."""
    cols = [("benchmark", "benchmark"), ("arch", "arch"), ("mode", "mode"), ("seeds", "n_seeds")]
    pos = position_keys(rows)
    cols += [(k, k) for k in pos]
    if pos:
        last = pos[-1][4:]
        if any(f"ppl_ratio@{last}" in r for r in rows):
            cols.append((f"ratio {last}/1W", f"ppl_ratio@{last}"))
    if any("recall@<=W" in r for r in rows):
        cols += [("recall<=W", "recall@<=W"), ("recall>W", "recall@>W")]
    cols += [("params", "params"), ("train tok/s", "train_tokens_per_s")]
    return cols


def render(rows: list[dict], fmt: str, console=None) -> str | None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(rows, indent=2)
    cols = table_columns(rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        flat_cols = []
        for header, key in cols:
            if any(isinstance(r.get(key), dict) for r in rows):
                flat_cols += [(header, key, "value"), (header + " ci_low", key, "ci_low"),
                              (header + " ci_high", key, "ci_high")]
            else:
                flat_cols.append((header, key, None))
        w.writerow([c[0] for c in flat_cols])
        for r in rows:
            out = []
            for _h, key, part in flat_cols:
                v = r.get(key)
                out.append((v or {}).get(part) if part else v)
            w.writerow(out)
        return buf.getvalue()
    if fmt == "markdown":
        cells = [[_fmt(r.get(key), 3 if "recall" in key or "ratio" in key else 2)
                  if key not in ("train_tokens_per_s",) else _fmt(round(r[key]) if r.get(key) else None)
                  for _h, key in cols] for r in rows]
        lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines) + "\n"
    width = console.width if console is not None else 200
    tables = [_rich_table(bench, [r for r in rows if r["benchmark"] == bench], width)
              for bench in dict.fromkeys(r["benchmark"] for r in rows)]
    if console is not None:
        for t in tables:
            console.print(t)
        return None
    return tables


def _short(x: float | None) -> str:
    """Three significant digits, no more than six characters for the usual ranges."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 10000:
        return f"{x:.3g}"
    if abs(x) >= 99.95:
        return f"{x:.0f}"
    if abs(x) >= 9.995:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _cell(v) -> str:
    """Value on one line, its interval under it."""
    if not isinstance(v, dict) or v.get("value") is None:
        return "-"
    s = _short(v["value"])
    if v.get("ci_low") is not None and v.get("ci_high") is not None:
        s += f"\n[dim]{_short(v['ci_low'])}-{_short(v['ci_high'])}[/dim]"
    return s


def _rich_table(bench: str, rows: list[dict], width: int = 200):
    from rich import box
    from rich.table import Table

    window = rows[0].get("window")
    modes = {r["mode"] for r in rows}
    title = f"{bench}" + (f", W = {window}" if window else "") + (f", mode {modes.pop()}" if len(modes) == 1 else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, title_justify="left",
                  caption="value; its 95% interval below. ppl@kW: perplexity of the bucket of tokens ending at "
                          "position k x W. recall in %.", caption_justify="left")
    cols = [c for c in table_columns(rows) if c[1] not in ("benchmark",) and not (c[1] == "mode" and len(
        {r["mode"] for r in rows}) == 1)]
    body = []
    for r in rows:
        cells = []
        for _h, key in cols:
            v = r.get(key)
            if key in ("arch", "mode", "n_seeds"):
                cells.append(str(v))
            elif key in ("params", "train_tokens_per_s"):
                cells.append(_short_count(v))
            elif key.startswith("recall"):
                cells.append(_cell(_scaled(v, 100)))
            else:
                cells.append(_cell(v))
        body.append(cells)
    headers = [{"n_seeds": "n", "train_tokens_per_s": "tok/s", "recall@<=W": "rec≤W",
                "recall@>W": "rec>W"}.get(key, header).removeprefix("ratio ") for header, key in cols]
    widths = [max([len(h)] + [len(_plain(line)) for c in body for line in c[i].splitlines()])
              for i, h in enumerate(headers)]
    if sum(widths) + len(widths) + 2 > width:
        # too wide for this terminal: one row per metric, one column per architecture
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", caption=table.caption,
                      caption_justify="left")
        table.add_column("")
        first = 2 if cols[1][1] == "mode" else 1
        for cells in body:
            table.add_column(" ".join(cells[:first]), justify="right")
        for i in range(first, len(cols)):
            table.add_row(headers[i], *[c[i].replace("\n", " ") for c in body])
        return table
    for i, (header, key) in enumerate(cols):
        table.add_column(headers[i], justify="left" if key in ("arch", "mode") else "right", min_width=widths[i])
    for cells in body:
        table.add_row(*cells)
    return table


def _scaled(v, factor: float):
    if not isinstance(v, dict):
        return v
    return {k: (x * factor if isinstance(x, (int, float)) else x) for k, x in v.items()}


def _plain(markup: str) -> str:
    return re.sub(r"\[/?dim\]", "", markup)


def _short_count(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"
