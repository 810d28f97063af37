"""``lengen status``: every run in a results folder, what it is doing and how far it is.

The sources are the run's ``run.json`` (what was asked, every job's outcome) and, while the
run lives, its ``heartbeat.json`` (pid, host, the current job, phase, step, loss, tokens/s,
checkpoints evaluated and their latest values), which :func:`lengen.results.run_state` checks
against the process table: a run recorded as running whose process is gone is ``terminated``.
The latest values shown are the ones the metrics declared for it (``OutputSpec.status``; the
built-in perplexity family declares ``ppl@1W`` and ``ppl@10W``): for each architecture, from the
running job's latest checkpoint, else from its newest finished record. Never imports torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lengen.api import OutputSpec, output_x, x_multiple
from lengen.results import HEARTBEAT, iter_runs, read_record

#: job states that are a problem worth a line under the table
PROBLEMS = ("diverged", "failed", "interrupted")


def status_keys(specs: list[OutputSpec], names) -> list[str]:
    """The output names among ``names`` to show as a run's latest values: the members each
    spec's ``status`` selects; without any such spec (older records), the 1W and 10W members of
    the first table family with a better direction, else its first and last."""
    names = list(names)

    def owner(n):
        return next((s for s in specs if s.matches(n)), None)

    def members(spec):
        return sorted((n for n in names if owner(n) is spec),
                      key=lambda n: (x_multiple(output_x(n)) is None, x_multiple(output_x(n)) or 0.0, n))

    def pick(spec, how):
        ms = members(spec)
        if how == "all":
            return ms
        if how == "last":
            return ms[-1:]
        return [m for m in ms if output_x(m) in how or (not output_x(m) and m in how)]

    chosen = [n for s in specs if s.status for n in pick(s, s.status)]
    if chosen or not specs:
        return list(dict.fromkeys(chosen))
    family = next((s for s in specs if s.better and s.table and "*" in s.key and members(s)), None)
    if family is None:
        return []
    ms = members(family)
    fallback = [m for m in ms if output_x(m) in ("1W", "10W")]
    return fallback or list(dict.fromkeys([ms[0], ms[-1]]))


def _specs(info: dict, records: list[dict]) -> list[OutputSpec]:
    from lengen.results import record_specs

    for rec in records:
        specs = record_specs(rec)
        if specs:
            return specs
    return [OutputSpec.from_dict(d) for m in (info.get("metric_plugins") or {}).values() if isinstance(m, dict)
            for d in m.get("outputs") or []]


def _read_heartbeat(run_dir: Path) -> dict:
    try:
        beat = json.loads((run_dir / HEARTBEAT).read_text())
        return beat if isinstance(beat, dict) else {}
    except (OSError, ValueError):
        return {}


def _eta(info: dict, beat: dict, now: float) -> float | None:
    """Seconds left: the current job's remaining training steps at its rate so far, plus, for
    each job still to run, the mean wall time of this run's finished jobs (or, while none has
    finished, the current job's training time at that rate)."""
    step, steps, started = beat.get("step"), beat.get("steps"), beat.get("job_started")
    jobs = info.get("jobs", [])
    pending = sum(j.get("status") == "pending" for j in jobs)
    walls = [j["wall_s"] for j in jobs if j.get("status") == "finished" and j.get("wall_s")]
    rate = step / max(1e-9, beat.get("time", now) - started) if step and started else None
    if rate is None:
        return None if not walls else pending * sum(walls) / len(walls)
    left = max(0.0, (steps - step) / rate) if steps else 0.0
    per_job = sum(walls) / len(walls) if walls else (steps / rate if steps else 0.0)
    return left + pending * per_job


def run_rows(results_dir: Path, now: float | None = None) -> list[dict]:
    """One row per run under ``results_dir``, oldest first (the ``--json`` output)."""
    now = time.time() if now is None else now
    rows = []
    for run_dir, info, state, why in iter_runs(results_dir):
        jobs = info.get("jobs", [])
        finished = [j for j in jobs if j.get("status") == "finished" and j.get("record")]
        beat = _read_heartbeat(run_dir) if state == "running" else {}
        # the newest finished record of each architecture (one file per architecture is read)
        latest: dict[str, dict] = {}
        for j in reversed(finished):
            if j["arch"] not in latest:
                rec = read_record(run_dir / j["record"])
                if rec is not None:
                    latest[j["arch"]] = rec
        specs = _specs(info, list(latest.values()))
        values = []
        current = None
        if beat.get("job"):
            current = {k: beat.get(k) for k in ("job", "phase", "step", "steps", "loss", "tokens_per_s",
                                                "checkpoints", "checkpoints_done")}
            current["heartbeat_age_s"] = round(now - beat["time"], 1) if beat.get("time") else None
            cur_arch = next((j["arch"] for j in jobs if j.get("status") == "running"), None)
            if beat.get("metrics") and cur_arch:
                keys = status_keys(specs, beat["metrics"])
                if keys:
                    values.append({"arch": cur_arch, "source": f"checkpoint at step {beat.get('metrics_step')}",
                                   "values": {k: beat["metrics"][k] for k in keys}})
        for arch, rec in latest.items():
            if any(v["arch"] == arch for v in values):
                continue
            ev = next(iter(rec.get("evaluations", {}).values()), {})
            metrics = ev.get("metrics", {})
            keys = status_keys(specs, metrics)
            if keys:
                values.append({"arch": arch, "source": f"seed {rec['seed']}, {ev.get('eval', {}).get('mode', '')} mode",
                               "values": {k: (metrics[k] or {}).get("value") for k in keys}})
        started = info.get("started")
        elapsed = (now - started if state == "running" else info.get("wall_s")) if started else None
        rows.append({
            "run_id": run_dir.name, "path": str(run_dir), "state": state, "why": why,
            "benchmark": info.get("benchmark"), "archs": info.get("archs"), "seeds": info.get("seeds"),
            "jobs_done": len(finished), "jobs": len(jobs),
            "jobs_to_do": sum(j.get("status") in ("pending", "running") for j in jobs) if state == "running" else 0,
            "started": started, "elapsed_s": elapsed, "eta_s": _eta(info, beat, now) if state == "running" else None,
            "current": current, "latest": values,
            "problems": [f"{j['arch']} seed {j['seed']}: {j['status']}" + (f" at step {j['step']}" if j.get("step") else "")
                         + (f": {j['error']}" if j.get("error") else "") for j in jobs if j.get("status") in PROBLEMS],
        })
    return rows


COLOURS = {"running": "cyan", "finished": "green", "interrupted": "yellow", "terminated": "red",
           "diverged": "red", "failed": "red"}


def _num(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def render(rows: list[dict], results_dir: Path):
    """The rows as a rich renderable: one table line per run, problems under it."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from lengen.progress import clock

    if not rows:
        return Text(f"no runs under {results_dir}")
    t = Table(box=box.SIMPLE_HEAD, title=f"lengen status: {results_dir}  ({time.strftime('%H:%M:%S')})",
              title_justify="left", padding=(0, 1))
    notes = []
    cells = []
    for r in rows:
        cur = r["current"] or {}
        now = ""
        if cur.get("job"):
            now = f"{cur['job']}: {cur.get('phase') or ''}"
            if cur.get("steps"):
                now += f" step {cur.get('step') or 0}/{cur['steps']}"
            if isinstance(cur.get("loss"), (int, float)):
                now += f", loss {cur['loss']:.3f}"
            if isinstance(cur.get("tokens_per_s"), (int, float)):
                now += f", {cur['tokens_per_s']:,.0f} tok/s"
        ckpts = f"{cur.get('checkpoints_done') or 0}/{cur['checkpoints']}" if cur.get("checkpoints") else "-"
        latest = "\n".join(f"{v['arch']}: " + ", ".join(f"{k} {_num(x)}" for k, x in v["values"].items())
                           for v in r["latest"])
        jobs = f"{r['jobs_done']}/{r['jobs']} done" + (f", {r['jobs_to_do']} to do" if r["jobs_to_do"] else "")
        cells.append([f"[{COLOURS.get(r['state'], 'white')}]{r['state']}[/]", escape(r["run_id"]), jobs, escape(now),
                      clock(r["elapsed_s"]), clock(r["eta_s"]) if r["state"] == "running" else "", ckpts,
                      escape(latest)])
        if r["why"]:
            notes.append(f"{escape(r['run_id'])}: [dim]{escape(r['why'])}[/dim]")
        notes += [f"{escape(r['run_id'])}: [red]{escape(p)}[/red]" for p in r["problems"]]
    # columns that say nothing for any run (no run is running: no "now", "eta", "ckpts") are left out
    keep = [i for i, col in enumerate(("state", "run", "jobs", "now", "elapsed", "eta", "ckpts", "latest"))
            if any(c[i] not in ("", "-") for c in cells)]
    for i in keep:
        col = ("state", "run", "jobs", "now", "elapsed", "eta", "ckpts", "latest")[i]
        t.add_column(col, no_wrap=col in ("state", "run", "elapsed", "eta"), overflow="fold")
    for c in cells:
        t.add_row(*[c[i] for i in keep])
    return Group(t, *[Text.from_markup(n) for n in notes])


def show(results_dir: Path, console, watch: float | None = None) -> None:
    """Print the status once, or with ``watch`` redraw it every ``watch`` seconds until
    interrupted (on a terminal in place; elsewhere one printout per interval)."""
    if not watch:
        console.print(render(run_rows(results_dir), results_dir))
        return
    try:
        if console.is_terminal:
            from rich.live import Live

            with Live(render(run_rows(results_dir), results_dir), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(watch)
                    live.update(render(run_rows(results_dir), results_dir), refresh=True)
        while True:
            console.print(render(run_rows(results_dir), results_dir))
            time.sleep(watch)
    except KeyboardInterrupt:
        return
