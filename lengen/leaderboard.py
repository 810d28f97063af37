"""``lengen leaderboard``: one row per (benchmark, architecture, mode), read from records.

Within a row, only records comparable with the newest one count (same suite, architecture
config and version, dataset fingerprint); the newest record of each seed is used. With one
seed the intervals are the record's bootstrap / Wilson intervals; with several, the value is
the mean over seeds and the interval a Student-t interval over seeds.

Which metric outputs become row keys and table columns, which direction is better and how a
column is headed and formatted is what the metrics declared (:class:`lengen.api.OutputSpec`),
as recorded in each record: the leaderboard knows no metric by name. Never imports torch.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from lengen.api import OutputSpec, output_x, x_multiple
from lengen.errors import ConfigError
from lengen.results import CORE_OUTPUTS, iter_records, record_specs
from lengen.stats import across_seeds

FORMATS = ("table", "markdown", "csv", "json")
#: the columns every table starts and ends with: (header, row key)
HEAD = [("benchmark", "benchmark"), ("arch", "arch"), ("mode", "mode"), ("seeds", "n_seeds")]
TAIL = [("params", "params"), ("train tok/s", "train_tokens_per_s")]


def comparable_key(rec: dict) -> tuple:
    return (rec.get("suite_hash"), rec["model"].get("config_hash"), rec["model"].get("arch_version"),
            rec["dataset"].get("fingerprint"))


def spec_for(name: str, specs: list[OutputSpec]) -> OutputSpec | None:
    """The first spec whose key matches an output name."""
    return next((s for s in specs if s.matches(name)), None)


def rows_from_records(records: list[dict], benchmark: str | None = None,
                      fallback_specs: list[OutputSpec] = ()) -> list[dict]:
    """One row per (benchmark, arch, mode) from records (each holds one evaluation per mode).

    ``fallback_specs`` serve records written before records carried their metrics' specs."""
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
        specs = record_specs(newest) or list(fallback_specs) + list(CORE_OUTPUTS)
        row: dict[str, Any] = {
            "benchmark": bench, "arch": arch, "mode": mode, "n_seeds": len(chosen),
            "seeds": sorted(by_seed), "superseded": len(recs) - len(chosen),
            "_specs": specs,
        }
        for name in newest["evaluations"][mode].get("metrics", {}):
            spec = spec_for(name, specs)
            if spec is None or not spec.leaderboard:
                continue
            vals = [r["evaluations"][mode]["metrics"].get(name) for r in chosen]
            vals = [v for v in vals if isinstance(v, dict) and v.get("value") is not None]
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
        row["eval_tokens_per_s"] = _mean([r["evaluations"][mode].get("eval", {}).get("tokens_per_s") for r in chosen])
        row["flops_per_token"] = _mean([c.get("flops_per_token") for c in cost])
        row["peak_eval_memory_bytes"] = _mean([c.get("peak_eval_memory_bytes") for c in cost])
        row["window"] = newest.get("protocol", {}).get("window")
        row["run_id"] = newest.get("run_id")
        rows.append(row)
    mark_overlaps(rows)
    return rows


def public(rows: list[dict]) -> list[dict]:
    """Rows without the specs they were built with (what JSON and CSV show)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def group_specs(rows: list[dict]) -> list[OutputSpec]:
    """The specs of a group of rows, each once, in the order the rows declare them."""
    return list(dict.fromkeys(s for r in rows for s in r.get("_specs", ())))


def _cells(row: dict) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, dict) and "value" in v]


def mark_overlaps(rows: list[dict]) -> None:
    """Per (benchmark, mode) and metric with a declared direction: ``best`` lists the metrics
    in which a row is best; ``overlaps_best`` those in which its interval overlaps the best
    row's interval, i.e. the difference is inside the noise."""
    for r in rows:
        r["best"], r["overlaps_best"] = [], []
    for grp in _groups(rows):
        if len(grp) < 2:
            continue
        specs = group_specs(grp)
        for k in sorted({k for r in grp for k in _cells(r)}):
            spec = spec_for(k, specs)
            if spec is None or spec.better is None:
                continue
            cells = [(r, r[k]) for r in grp if isinstance(r.get(k), dict) and r[k].get("value") is not None]
            if len(cells) < 2:
                continue
            pick = min if spec.better == "lower" else max
            best_row, best = pick(cells, key=lambda rc: rc[1]["value"])
            best_row["best"].append(k)
            if best.get("ci_low") is None or best.get("ci_high") is None:
                continue
            for r, c in cells:
                if r is best_row or c.get("ci_low") is None or c.get("ci_high") is None:
                    continue
                if c["ci_low"] <= best["ci_high"] and best["ci_low"] <= c["ci_high"]:
                    r["overlaps_best"].append(k)


def load_rows(results_dir: Path, benchmark: str | None = None, fallback_specs: list[OutputSpec] = ()) -> list[dict]:
    return rows_from_records(list(iter_records(results_dir)), benchmark, fallback_specs)


def sort_rows(rows: list[dict], key: str | None) -> list[dict]:
    if not key:
        return rows
    desc = key.startswith("-")
    key = key.lstrip("-")
    known = sorted({k for r in public(rows) for k in r})
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


def _x_order(name: str) -> tuple:
    m = x_multiple(output_x(name))
    return (m is None, m if m is not None else 0.0, name)


def table_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(header, row key) pairs shown in table / markdown / csv output: the core's columns and
    every declared table column the rows have, in the metrics' declared order."""
    specs = group_specs(rows)
    present = {k for r in rows for k in _cells(r)}
    cols = list(HEAD)
    for spec in specs:
        if spec.table is None or (spec.table_modes is not None and not any(r["mode"] in spec.table_modes for r in rows)):
            continue
        members = sorted((k for k in present if spec.matches(k) and spec_for(k, specs) is spec), key=_x_order)
        if spec.table == "last":
            members = members[-1:]
        elif isinstance(spec.table, tuple):
            members = [k for k in members if output_x(k) in spec.table]
        for k in members:
            header = (spec.header or k).format(x=output_x(k), stem=k.partition("@")[0])
            if (header, k) not in cols:
                cols.append((header, k))
    return cols + TAIL


def _groups(rows: list[dict]) -> list[list[dict]]:
    """Rows split by (benchmark, mode): a table never mixes modes in one column."""
    keys = list(dict.fromkeys((r["benchmark"], r["mode"]) for r in rows))
    return [[r for r in rows if (r["benchmark"], r["mode"]) == k] for k in keys]


def dataframe(rows: list[dict]):
    """The rows as a flat pandas DataFrame: one column per row key, a metric cell spread over
    ``name``, ``name ci_low``, ``name ci_high`` (and ``name sd`` across seeds)."""
    import pandas as pd

    flat = []
    for r in public(rows):
        out = {}
        for k, v in r.items():
            if isinstance(v, dict):
                out[k] = v.get("value")
                for part in ("ci_low", "ci_high", "sd"):
                    if part in v:
                        out[f"{k} {part}"] = v[part]
            elif isinstance(v, list):
                out[k] = " ".join(map(str, v))
            else:
                out[k] = v
        flat.append(out)
    return pd.DataFrame(flat)


def load_dataframe(results_dir: Path = Path("results"), benchmark: str | None = None):
    """Every leaderboard row under ``results_dir`` as a DataFrame (for notebooks)."""
    return dataframe(load_rows(results_dir, benchmark))


def render(rows: list[dict], fmt: str, console=None) -> str | None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(public(rows), indent=2)
    if fmt == "csv":
        cols: list[tuple[str, str]] = []
        for grp in _groups(rows):
            cols += [c for c in table_columns(grp) if c not in cols]
        df = dataframe(rows)
        keep = [c for _h, key in cols for c in (key, f"{key} ci_low", f"{key} ci_high") if c in df.columns]
        return df[keep].to_csv(index=False) if len(df) else ""
    if fmt == "markdown":
        out = []
        for grp in _groups(rows):
            cols = table_columns(grp)
            specs = group_specs(grp)
            out.append(f"**{grp[0]['benchmark']}**, mode `{grp[0]['mode']}`\n")
            out.append("| " + " | ".join(h for h, _ in cols) + " |")
            out.append("|" + "---|" * len(cols))
            for r in grp:
                cells = []
                for _h, key in cols:
                    text = _format_cell(r.get(key), key, spec_for(key, specs))
                    if key in r.get("best", []):
                        text = f"**{text}**"
                    elif key in r.get("overlaps_best", []):
                        text += " ≈"
                    cells.append(text)
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        out.append("Bold: best in its column; ≈: interval overlaps the best one's (a difference inside the noise). "
                   "Percentages: x 100. train tok/s: training throughput.")
        return "\n".join(out) + "\n"
    width = console.width if console is not None else 200
    tables = [_rich_table(grp, width) for grp in _groups(rows)]
    if console is not None:
        for t in tables:
            console.print(t)
        return None
    return tables


def _format_cell(v: Any, key: str, spec: OutputSpec | None) -> str:
    """A cell as text: counts with thousands separators, metric values with their interval."""
    if v is None:
        return "-"
    if key == "train_tokens_per_s":
        return f"{round(v):,}"
    if isinstance(v, dict):
        if v.get("value") is None or (isinstance(v["value"], float) and math.isnan(v["value"])):
            return "-"
        scale = 100 if spec is not None and spec.percent else 1
        digits = spec.digits if spec is not None else 2
        s = _num(v["value"] * scale, digits)
        if v.get("ci_low") is not None and v.get("ci_high") is not None:
            s += f" [{_num(v['ci_low'] * scale, digits)}, {_num(v['ci_high'] * scale, digits)}]"
        return s
    if isinstance(v, str):
        return v
    return _num(v, 2)


def _num(x: float, digits: int) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


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


def _cell(v, scale: float = 1.0) -> str:
    """Value on one line, its interval under it."""
    if not isinstance(v, dict) or v.get("value") is None:
        return "-"
    s = _short(v["value"] * scale)
    if v.get("ci_low") is not None and v.get("ci_high") is not None:
        s += f"\n[dim]{_short(v['ci_low'] * scale)}-{_short(v['ci_high'] * scale)}[/dim]"
    return s


def _rich_table(rows: list[dict], width: int = 200):
    from rich import box
    from rich.table import Table

    specs = group_specs(rows)
    window = rows[0].get("window")
    title = f"{rows[0]['benchmark']}" + (f", W = {window}" if window else "") + f", mode {rows[0]['mode']}"
    cols = [c for c in table_columns(rows) if c[1] not in ("benchmark", "mode")]
    col_specs = [spec_for(key, specs) for _h, key in cols]
    notes = list(dict.fromkeys(s.note for s in col_specs if s is not None and s.note))
    caption = " ".join(["value; its 95% interval below; bold: best, ≈: interval overlaps the best.", *notes,
                        "train tok/s: training tokens per second."])
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, title_justify="left",
                  caption=caption, caption_justify="left")
    body = []
    for r in rows:
        cells = []
        for (_h, key), spec in zip(cols, col_specs):
            v = r.get(key)
            if key in ("arch", "n_seeds"):
                cells.append(str(v))
            elif key in ("params", "train_tokens_per_s"):
                cells.append(_short_count(v))
            else:
                cell = _cell(v, 100 if spec is not None and spec.percent else 1)
                if key in r.get("best", []):
                    first, _, rest = cell.partition("\n")
                    cell = f"[bold]{first}[/bold]" + ("\n" + rest if rest else "")
                elif key in r.get("overlaps_best", []):
                    first, _, rest = cell.partition("\n")
                    cell = f"≈{first}" + ("\n" + rest if rest else "")
                cells.append(cell)
        body.append(cells)
    headers = [{"n_seeds": "n"}.get(key, header) for header, key in cols]
    widths = [max([len(h)] + [len(_plain(line)) for c in body for line in c[i].splitlines()])
              for i, h in enumerate(headers)]
    rows_wide = sum(widths) + len(widths) + 2
    cols_wide = (max(len(h) for h in headers) + 1
                 + sum(max(len(_plain(" ".join(c[:1]))), *(len(_plain(x.replace("\n", " "))) for x in c[1:])) + 1
                       for c in body))
    if rows_wide > width and cols_wide < rows_wide:
        # too wide for this terminal and narrower turned: one row per metric, one column per architecture
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


def _plain(markup: str) -> str:
    return re.sub(r"\[/?(dim|bold)\]", "", markup)


def _short_count(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"
