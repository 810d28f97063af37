"""``lengen leaderboard``: one row per (benchmark, architecture, mode), read from records.

Within a row, only records comparable with the newest one count (same suite, architecture
config and version, dataset fingerprint); the newest record of each seed is used. With one
seed the intervals are the record's bootstrap / Wilson intervals; with several, the value is
the mean over seeds and the interval a Student-t interval over seeds. Never imports torch.
"""

from __future__ import annotations

import csv
import io
import statistics
import json
import math
import re
from pathlib import Path
from typing import Any

from lengen.errors import ConfigError
from lengen.results import iter_records
from lengen.stats import across_seeds

FORMATS = ("table", "markdown", "csv", "json")
_KEY_METRICS = re.compile(r"^(ppl@[\d.]+W|ppl_ratio@[\d.]+W|ratio_\w+@[\d.]+W|ppl_len@[\d.]+W|ppl_ctx@[\d.]+W|"
                          r"recall@<=W|recall@>W|recall_recent@<=W|recall_recent@>W|recall_keyed@<=W|recall_keyed@>W|"
                          r"excess_nll|horizon|ppl|ppl_unigram@1W|ppl_optimal@1W)$")
LOWER_IS_BETTER = re.compile(r"^(ppl@|ppl_len@|ppl_ctx@|excess_nll)")
HIGHER_IS_BETTER = re.compile(r"^recall")


def comparable_key(rec: dict) -> tuple:
    return (rec.get("suite_hash"), rec["model"].get("config_hash"), rec["model"].get("arch_version"),
            rec["dataset"].get("fingerprint"))


def rows_from_records(records: list[dict], benchmark: str | None = None) -> list[dict]:
    """One row per (benchmark, arch, mode) from records (each holds one evaluation per mode)."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        if benchmark and rec.get("benchmark") != benchmark:
            continue
        for mode in rec.get("evaluations", {}):
            groups.setdefault((rec["benchmark"], rec["arch"], mode), []).append(rec)
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
        names = [k for k in newest["evaluations"][mode].get("metrics", {}) if _KEY_METRICS.match(k)]
        for name in names:
            vals = [r["evaluations"][mode]["metrics"].get(name) for r in chosen]
            vals = [v for v in vals if v and v.get("value") is not None]
            if len(vals) == 1:
                v = vals[0]
                row[name] = {"value": v["value"], "ci_low": v.get("ci_low"), "ci_high": v.get("ci_high")}
            elif vals:
                values = [v["value"] for v in vals]
                bounds = next((v["bounds"] for v in vals if v.get("bounds")), (None, None))  # older records have none
                agg = across_seeds(values, bounds=tuple(bounds))
                sd = float(statistics.stdev(values))
                row[name] = {"value": agg.value, "ci_low": agg.ci_low, "ci_high": agg.ci_high, "sd": sd}
        cost = [r.get("cost", {}) for r in chosen]
        row["params"] = newest["model"].get("params")
        row["train_tokens_per_s"] = _mean([c.get("train_tokens_per_s") for c in cost])
        row["eval_tokens_per_s"] = _mean([r["evaluations"][mode]["eval"].get("tokens_per_s") for r in chosen])
        row["flops_per_token"] = _mean([c.get("flops_per_token") for c in cost])
        row["peak_eval_memory_bytes"] = _mean([c.get("peak_eval_memory_bytes") for c in cost])
        row["window"] = newest.get("protocol", {}).get("window")
        row["run_id"] = newest.get("run_id")
        rows.append(row)
    mark_overlaps(rows)
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def mark_overlaps(rows: list[dict]) -> None:
    """Per (benchmark, mode) and metric: ``best`` lists the metrics in which a row is best;
    ``overlaps_best`` those in which its interval overlaps the best row's interval, i.e. the
    difference is inside the noise."""
    for r in rows:
        r["best"], r["overlaps_best"] = [], []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["mode"]), []).append(r)
    for grp in groups.values():
        if len(grp) < 2:
            continue
        keys = {k for r in grp for k, v in r.items() if isinstance(v, dict) and "value" in v}
        for k in keys:
            lower = bool(LOWER_IS_BETTER.match(k))
            if not lower and not HIGHER_IS_BETTER.match(k):
                continue
            cells = [(r, r[k]) for r in grp if isinstance(r.get(k), dict) and r[k].get("value") is not None]
            if len(cells) < 2:
                continue
            best_row, best = (min if lower else max)(cells, key=lambda rc: rc[1]["value"])
            best_row["best"].append(k)
            if best.get("ci_low") is None or best.get("ci_high") is None:
                continue
            for r, c in cells:
                if r is best_row or c.get("ci_low") is None or c.get("ci_high") is None:
                    continue
                if c["ci_low"] <= best["ci_high"] and best["ci_low"] <= c["ci_high"]:
                    r["overlaps_best"].append(k)


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


def position_keys(rows: list[dict], prefix: str = "ppl@") -> list[str]:
    keys = {k for r in rows for k in r if re.match("^" + re.escape(prefix) + r"[\d.]+W$", k)}
    return sorted(keys, key=lambda k: float(k[len(prefix):-1]))


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
    if pos:
        cols += [(k, k) for k in pos]
        last = pos[-1][4:]
        if any(f"ppl_ratio@{last}" in r for r in rows):
            cols.append((f"ratio {last}/1W", f"ppl_ratio@{last}"))
        baselines = sorted({k.split("@")[0] for r in rows for k in r if k.startswith("ratio_")})
        for b in baselines:
            if any(f"{b}@{last}" in r for r in rows):
                cols.append((f"{b.removeprefix('ratio_')}/this@{last}", f"{b}@{last}"))
    else:  # nonoverlapping rows: perplexity at evaluation length k x W
        positions = sorted({float(k[8:-1]) for r in rows for k in r if k.startswith("ppl_len@")})
        wanted = [p for p in positions if p in (1, 2, 5, 10, 20)] or positions[-5:]
        cols += [(f"len {p:g}W", f"ppl_len@{p:g}W") for p in wanted]
    if any("horizon" in r for r in rows):
        cols.append(("horizon", "horizon"))
    if any("recall@<=W" in r for r in rows):
        cols += [("recall<=W", "recall@<=W"), ("recall>W", "recall@>W")]
    cols += [("params", "params"), ("train tok/s", "train_tokens_per_s")]
    return cols


def _groups(rows: list[dict]) -> list[list[dict]]:
    """Rows split by (benchmark, mode): a table never mixes modes in one column."""
    keys = list(dict.fromkeys((r["benchmark"], r["mode"]) for r in rows))
    return [[r for r in rows if (r["benchmark"], r["mode"]) == k] for k in keys]


def render(rows: list[dict], fmt: str, console=None) -> str | None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        cols: list[tuple[str, str]] = []
        for grp in _groups(rows):
            cols += [c for c in table_columns(grp) if c not in cols]
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
            w.writerow([((r.get(key) or {}).get(part) if part else r.get(key)) for _h, key, part in flat_cols])
        return buf.getvalue()
    if fmt == "markdown":
        out = []
        for grp in _groups(rows):
            cols = table_columns(grp)
            out.append(f"**{grp[0]['benchmark']}**, mode `{grp[0]['mode']}`\n")
            out.append("| " + " | ".join(h for h, _ in cols) + " |")
            out.append("|" + "---|" * len(cols))
            for r in grp:
                cells = []
                for _h, key in cols:
                    v = r.get(key)
                    text = (_fmt(round(v) if v else None) if key == "train_tokens_per_s"
                            else _fmt(v, 3 if "recall" in key or "ratio" in key else 2))
                    if key in r.get("best", []):
                        text = f"**{text}**"
                    elif key in r.get("overlaps_best", []):
                        text += " ≈"
                    cells.append(text)
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        out.append("Bold: best in its column; ≈: interval overlaps the best one's (a difference inside the noise).")
        return "\n".join(out) + "\n"
    width = console.width if console is not None else 200
    tables = [_rich_table(grp, width) for grp in _groups(rows)]
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


def _rich_table(rows: list[dict], width: int = 200):
    from rich import box
    from rich.table import Table

    window = rows[0].get("window")
    title = f"{rows[0]['benchmark']}" + (f", W = {window}" if window else "") + f", mode {rows[0]['mode']}"
    caption = ("value; its 95% interval below; bold: best, ≈: interval overlaps the best. "
               + ("ppl@kW: perplexity of the bucket of tokens ending at position k x W. "
                  if rows[0]["mode"] != "nonoverlapping" else
                  "len kW: perplexity of independent sequences of k x W tokens. ") + "recall in %.")
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, title_justify="left",
                  caption=caption, caption_justify="left")
    cols = [c for c in table_columns(rows) if c[1] not in ("benchmark", "mode")]
    body = []
    for r in rows:
        cells = []
        for _h, key in cols:
            v = r.get(key)
            if key in ("arch", "n_seeds"):
                cells.append(str(v))
            elif key in ("params", "train_tokens_per_s"):
                cells.append(_short_count(v))
            else:
                cell = _cell(_scaled(v, 100) if key.startswith("recall") else v)
                if key in r.get("best", []):
                    first, _, rest = cell.partition("\n")
                    cell = f"[bold]{first}[/bold]" + ("\n" + rest if rest else "")
                elif key in r.get("overlaps_best", []):
                    first, _, rest = cell.partition("\n")
                    cell = f"≈{first}" + ("\n" + rest if rest else "")
                cells.append(cell)
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
        first = 1
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
    return re.sub(r"\[/?(dim|bold)\]", "", markup)


def _short_count(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"
