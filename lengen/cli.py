"""The ``lengen`` command line. Importing this module never imports torch.

Commands are module-level click commands; :func:`make_cli` puts them (and any plugin's
commands) in a fresh group around a :class:`~lengen.plugins.PluginHost`, which the commands
reach through the click context. Options several commands share are defined once below.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from lengen import __version__
from lengen.errors import LengenError, Terminated
from lengen.plugins import PluginHost

LIST_KINDS = {"archs": "architectures", "datasets": "datasets", "metrics": "metrics", "benchmarks": "benchmarks"}
SEED = click.IntRange(min=0)


class LengenGroup(click.Group):
    """Turns a :class:`LengenError` into one ``Error: ...`` line and a non-zero exit, and an
    interruption (Ctrl-C, SIGTERM) into one line saying what was kept."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LengenError as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            what = "Terminated (SIGTERM)" if isinstance(exc, Terminated) else "Interrupted"
            run_dir = getattr(exc, "run_dir", None)
            more = f"; continue with: lengen run --resume {run_dir}" if run_dir else ""
            click.secho(f"{what}: records already written are kept{more}.", fg="yellow", err=True)
            ctx.exit(143 if isinstance(exc, Terminated) else 130)


def host() -> PluginHost:
    """The plugin host of the running command line."""
    return click.get_current_context().find_object(PluginHost)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _table_console():
    """Where result tables go: the terminal's width, or 200 columns when stdout is a file or
    pipe (a log is read in an editor, not wrapped at 80)."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal or "COLUMNS" in os.environ else Console(width=200)


def _show_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        click.secho(f"warning: {message}", fg="yellow", err=True)

    warnings.showwarning = show


def _is_main() -> bool:
    """Whether this is the main process of a multi-process run (or the only one)."""
    import os

    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------------------------------
# options shared by several commands


def suite_options(f):
    """``--benchmark``, ``--set`` and ``--benchmarks-file``: which suite, and changes to it."""
    f = click.option("--benchmarks-file", type=click.Path(path_type=Path),
                     help="A benchmarks.toml of your own; its suites take precedence.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any suite key, e.g. --set train.lr=1e-3 --set arch.sw.n_layers=3 "
                          "(KEY=null resets it to its default).")(f)
    return click.option("--benchmark", "-b", default="tiny", show_default=True, help="Benchmark suite.")(f)


def results_option(f):
    return click.option("--results", "results_dir", type=click.Path(path_type=Path), default=Path("results"),
                        show_default=True, help="Results folder.")(f)


def device_option(f):
    return click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


# ---------------------------------------------------------------------------------------
# commands


@click.command()
@click.option("--arch", "-a", "archs", multiple=True, help="Architecture to run (repeatable).")
@suite_options
@click.option("--seed", "seeds", type=SEED, multiple=True, help="Training seed, >= 0 (repeatable); default: the suite's.")
@click.option("--steps", type=int, help="Override train.steps.")
@click.option("--window", type=int, help="Override the training window W.")
@results_option
@click.option("--data-dir", type=click.Path(path_type=Path), help="Local data for file-based datasets.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/lengen).")
@device_option
@click.option("--mode", "modes", multiple=True, type=click.Choice(["full", "window", "nonoverlapping"]),
              help="Evaluation mode (repeatable); default: the suite's eval.modes.")
@click.option("--checkpoints", type=int, help="Evaluate N checkpoints spread over training (evolution plot).")
@click.option("--no-plot", is_flag=True, help="Do not write plots.")
@click.option("--no-check", is_flag=True, help="Skip the causality check of architectures not seen passing before.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue an interrupted run (its folder): finished jobs are kept, the others continue from their "
                   "latest checkpoint. The run's own options apply (--device may change).")
@click.option("--log-with", "log_with", multiple=True, metavar="TRACKER",
              help="Log to an experiment tracker through accelerate: tensorboard, wandb, mlflow, comet_ml, aim, "
                   "clearml, dvclive, swanlab, trackio (repeatable or comma-separated; default: none).")
def run(archs, benchmark, overrides, benchmarks_file, seeds, steps, window, results_dir, data_dir, cache_dir,
        device, modes, checkpoints, no_plot, no_check, resume_dir, log_with):
    """Train and evaluate architectures on a benchmark suite.

    \b
    Several processes (data parallel, through accelerate):
      torchrun --nproc_per_node 4 -m lengen.cli run ...
      accelerate launch --multi_gpu --num_processes 4 -m lengen.cli run ...
    """
    from lengen import allocator, interrupt
    from lengen.plan import RunRequest
    from lengen.runner import resume as resume_run, run as run_suite

    h = host()
    h.warn_errors()
    overrides = list(overrides)
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    if window is not None:
        overrides.append(f"window={window}")
    if modes:
        overrides.append("eval.modes=[" + ", ".join(f'"{m}"' for m in modes) + "]")
    if checkpoints is not None:
        overrides.append(f"eval.checkpoints={checkpoints}")
    req = RunRequest(benchmark=benchmark, archs=list(archs), seeds=list(seeds), overrides=overrides,
                     results_dir=results_dir, cache_dir=cache_dir, data_dir=data_dir,
                     benchmarks_file=benchmarks_file, device=device, plot=not no_plot, check=not no_check,
                     log_with=list(log_with))
    allocator.tune()
    with interrupt.installed():
        if resume_dir is not None:
            outcome = resume_run(h, resume_dir, _stderr_console(), device=None if device == "auto" else device)
        else:
            outcome = run_suite(h, req, _stderr_console())
    if not _is_main():
        return
    from rich.console import Console

    from lengen.leaderboard import render, rows_from_records
    from lengen.results import read_record

    paths = [p for j in outcome.jobs for p in (j.get("records") or ([j["record"]] if j["record"] else []))]
    records = [r for r in (read_record(outcome.run_dir / p) for p in paths) if r]  # every variant's row
    out = _table_console()
    if records:
        render(rows_from_records(records), "table", out)
        archs_run = list(dict.fromkeys(r["arch"] for r in records))
        if len(archs_run) >= 2:
            _print_comparison(out, records, archs_run[0], archs_run[1])
    click.echo(f"results: {outcome.run_dir}")
    for png in sorted(outcome.run_dir.glob("*.png")):
        click.echo(f"plot:    {png}")
    problems = outcome.problems()
    if problems:
        code = 3 if all(j["status"] == "diverged" for j in problems) else 1
        click.secho(f"Error: {outcome.summary()}", fg="red", err=True)
        raise SystemExit(code)


@click.command()
@click.option("--benchmark", "-b", help="Only this benchmark.")
@click.option("--sort", "sort_key", help="Column to sort by: a key of the JSON rows (prefix - for descending).")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "markdown", "csv", "json"]))
@results_option
def leaderboard(benchmark, sort_key, fmt, results_dir):
    """Compare every recorded result: one row per (benchmark, arch, mode)."""
    from lengen.leaderboard import load_rows, render, sort_rows

    rows = sort_rows(load_rows(results_dir, benchmark, _fallback_specs(results_dir)), sort_key)
    if fmt == "table":
        if not rows:
            click.echo(f"no results under {results_dir}" + (f" for benchmark {benchmark!r}" if benchmark else "")
                       + "; run `lengen run --arch sw` first")
            return
        from rich.console import Console

        render(rows, fmt, _table_console())
        _print_unfinished(results_dir, benchmark)
    else:
        click.echo(render(rows, fmt), nl=False)


def _fallback_specs(results_dir: Path) -> list:
    """The installed metrics' output specs, for records written before records carried theirs
    (loaded only when such a record exists)."""
    from lengen.results import iter_records, record_specs

    if all(record_specs(r) for r in iter_records(results_dir)):
        return []
    return [s for e in host().metrics for s in e.load().outputs]


def _print_unfinished(results_dir: Path, benchmark: str | None) -> None:
    """Jobs that diverged or failed are not on the leaderboard: say so under it."""
    from lengen.results import iter_runs

    for run_dir, info, state, _why in iter_runs(results_dir):
        if benchmark and info.get("benchmark") != benchmark:
            continue
        for j in info.get("jobs", []):
            if j.get("status") in ("diverged", "failed"):
                step = f" at step {j['step']}" if j.get("step") else ""
                click.echo(f"not on the leaderboard: {j['arch']} seed {j['seed']} {j['status']}{step} "
                           f"({run_dir.name})")


@click.command()
@click.argument("results", required=False, type=click.Path(path_type=Path))
@results_option
@click.option("--watch", type=click.FloatRange(min=0.5), metavar="SECONDS",
              help="Redraw every SECONDS until interrupted (Ctrl-C).")
@json_option
def status(results, results_dir, watch, as_json):
    """Every run in a results folder (RESULTS or --results, default results/): running,
    finished, diverged, failed, interrupted, or terminated (its process is gone without a final
    record); its jobs done and to do, the current step, elapsed time and ETA, checkpoints
    evaluated, the latest values and the error line of a failed job."""
    from lengen.status import run_rows, show

    results_dir = _results_arg(results, results_dir)
    if as_json:
        if watch:
            raise LengenError("--watch redraws a table; it cannot be combined with --json")
        click.echo(json.dumps(run_rows(results_dir), indent=2))
        return
    from rich.console import Console

    show(results_dir, _table_console(), watch)


@click.command()
@json_option
def plugins(as_json):
    """Installed plugins: distribution, version, hooks, components, load errors."""
    h = host()
    h.load_all_registries()
    infos = [i.as_dict() for i in h.infos.values()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape

    out = Console()
    colour = {"loaded": "green", "failed": "red", "disabled": "yellow"}
    for i in infos:
        source = f"{i['distribution']} {i['version']}" if i["distribution"] else "registered in-process"
        out.print(f"[bold]{escape(i['name'])}[/bold]  ({escape(source)})  [{colour[i['status']]}]{i['status']}[/]")
        if i["hooks"]:
            out.print(f"  {'hooks:':<15}" + ", ".join(h.removeprefix("lengen_") for h in i["hooks"]))
        for kind, names in i["components"].items():
            out.print(f"  {kind + 's:':<15}" + escape(", ".join(names)))
        for err in i["errors"]:
            out.print(f"  [red]{'error:':<15}[/red]{escape(err)}")


@click.command(name="list")
@click.argument("kind", type=click.Choice(list(LIST_KINDS)))
@json_option
def list_cmd(kind, as_json):
    """List archs, datasets, metrics or benchmarks with their descriptions."""
    h = host()
    h.warn_errors()
    registry = h.registry(LIST_KINDS[kind])
    items = [{"name": e.name, "description": e.description, "plugin": e.plugin,
              "distribution": e.distribution, "version": e.version} for e in registry]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lengen {kind}")
    for col in ("name", "description", "plugin"):
        table.add_column(col, overflow="fold")
    from rich.markup import escape

    for it in items:
        table.add_row(escape(it["name"]), escape(it["description"]), escape(it["plugin"]))
    Console().print(table)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--kind", help="Plot kind: one the records' metrics declare, or evolution; default: the "
                             "records' primary plot.")
@click.option("--out", type=click.Path(path_type=Path), help="PNG path (default: in the first run's folder).")
def plot(runs, kind, out):
    """Plot one or more runs (folders or record.json files) together."""
    from lengen.errors import did_you_mean
    from lengen.plots import EVOLUTION, default_kind, plot as make_plot, plot_kinds

    records = _records_from(runs)
    kinds = plot_kinds(records)
    kind = kind or default_kind(records)
    if kind not in kinds:
        raise LengenError("--kind: " + did_you_mean(kind, kinds, kind="plot kind"))
    out = out or (runs[0] if runs[0].is_dir() else runs[0].parent) / kinds[kind]
    path = make_plot(records, out, kind)
    if path is None:
        what = "checkpoints (run with --checkpoints N)" if kind == EVOLUTION else f"a {kind} curve"
        raise LengenError(f"none of the records has {what}")
    click.echo(path)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--arch", "archs", multiple=True, help="The two architectures to compare (default: the first two).")
@click.option("--mode", default="full", show_default=True)
@click.option("--seed", type=SEED, help="Seed to compare (default: the first both have).")
@json_option
def compare(runs, archs, mode, seed, as_json):
    """Paired comparison of two architectures on identical tokens, and crossovers over checkpoints."""
    from lengen.compare import checkpoint_ratios, crossovers, paired_ratios

    records = _records_from(runs)
    names = list(archs) or list(dict.fromkeys(r["arch"] for r in records))[:2]
    if len(names) == 1 and len(runs) == 2:
        names = names * 2  # one architecture in two runs (a suite and its ablation)
    if len(names) != 2:
        raise LengenError(f"need two architectures to compare, found {names}; pass --arch A --arch B")
    if names[0] == names[1]:
        if len(runs) != 2:
            raise LengenError(f"to compare {names[0]!r} with itself, give two runs (a suite and its ablation): "
                              f"lengen compare RUN_A RUN_B --arch {names[0]}")
        a, b = _pick(_records_from(runs[:1]), names[0], seed), _pick(_records_from(runs[1:]), names[1], seed)
        where = ((a["benchmark"], b["benchmark"]) if a["benchmark"] != b["benchmark"]
                 else (Path(runs[0]).resolve().name, Path(runs[1]).resolve().name))
        labels = [f"{names[0]} ({where[0]})", f"{names[1]} ({where[1]})"]
    else:
        a, b = _pick(records, names[0], seed), _pick(records, names[1], seed)
        labels = names
    result = {"a": labels[0], "b": labels[1], "mode": mode, "final": paired_ratios(a, b, mode, names=labels)}
    if a.get("checkpoints") and b.get("checkpoints"):
        rows = checkpoint_ratios(a, b)
        result["checkpoints"] = rows
        result["crossovers"] = crossovers(rows, labels[0], labels[1])
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    _print_comparison(Console(), [a, b], labels[0], labels[1], result)


@click.command()
@click.option("--arch", "-a", "archs", multiple=True, help="Architecture to check (repeatable).")
@click.option("--dataset", "-d", "datasets", multiple=True, help="Dataset to check (repeatable).")
@click.option("--metric", "-m", "metric_names", multiple=True, help="Metric to check (repeatable).")
@suite_options
@click.option("--window", type=int, help="W to check at (default: the suite's).")
@click.option("--data-dir", type=click.Path(path_type=Path))
@json_option
def check(archs, datasets, metric_names, benchmark, overrides, benchmarks_file, window, data_dir, as_json):
    """Conformance checks: causality, state and window equivalence, determinism, finite
    outputs, strict configs (architectures); deterministic streams (datasets); best value
    on perfect predictions (metrics). Exit code 1 if any check fails."""
    from lengen.checks import check_components

    h = host()
    h.warn_errors()
    if not (archs or datasets or metric_names):
        raise LengenError("name what to check: --arch NAME, --dataset NAME or --metric NAME")
    rows = check_components(h, archs=list(archs), datasets=list(datasets), metrics=list(metric_names),
                            benchmark=benchmark, overrides=list(overrides), benchmarks_file=benchmarks_file,
                            data_dir=data_dir, window=window)
    failed = [r for r in rows if r["passed"] is False]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(title="lengen check", title_justify="left")
        for col in ("component", "check", "result", "reason", "s"):
            t.add_column(col, overflow="fold")
        for r in rows:
            res = {True: "[green]pass", False: "[red]FAIL", None: "[yellow]skip"}[r["passed"]]
            t.add_row(escape(r["component"]), r["check"], res, escape(r["reason"]), f"{r['seconds']:.1f}")
        Console().print(t)
        click.echo(f"{len(failed)} failed" if failed else "all checks passed")
    if failed:
        raise SystemExit(1)


@click.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--arch", help="Architecture, when the run has several.")
@click.option("--seed", type=SEED, help="Training seed of the record (default: the first).")
@click.option("--prompt", help="Text to continue, in the dataset's tokenizer (synthetic: e.g. 'SET k3 v7 w1 GET k3'); "
                               "default: the first token of an evaluation document.")
@click.option("--tokens", "n_tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate.")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="0: greedy.")
@click.option("--top-k", type=int, help="Sample among the K most likely tokens.")
@click.option("--top-p", type=float, help="Sample among the most likely tokens holding this much probability.")
@click.option("--sampling-seed", default=0, show_default=True, type=int, help="Seed of the sampler.")
@click.option("--stream", is_flag=True, help="Print tokens as they come.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: torch's); one token per "
                                                             "forward is small work: 1 is often faster.")
@device_option
@click.option("--data-dir", type=click.Path(path_type=Path), help="Local data for file-based datasets (as the run had).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/lengen).")
@json_option
def generate(run_path, arch, seed, prompt, n_tokens, temperature, top_k, top_p, sampling_seed, stream, threads,
             device, data_dir, cache_dir, as_json):
    """Generate text with a recorded run's model (RUN: a run folder, a record folder or a
    record.json), its state carried from token to token."""
    from lengen.generate import Detokenizer, check_sampling, find_record, generate as gen_tokens, load_model, timed

    check_sampling(temperature, top_k, top_p)
    h = host()
    record = find_record(run_path, arch, seed)
    if threads:
        import torch

        torch.set_num_threads(threads)
    m = load_model(h, record, device=device, data_dir=data_dir, cache_dir=cache_dir)
    if prompt is not None:
        if m.encode is None:
            raise LengenError(f"--prompt: dataset {record['dataset']['name']!r} gives no encoder (Corpus.encode); "
                              "leave --prompt out to start from an evaluation document")
        try:
            ids = list(m.encode(prompt))
        except ValueError as exc:
            raise LengenError(f"--prompt: {exc}") from None
        if not ids:
            raise LengenError(f"--prompt {prompt!r} encodes to no tokens; give some text")
    else:
        ids = [m.start_token]
    shown = prompt if prompt is not None else (m.decode([m.start_token]) if m.decode else str(m.start_token))
    detok = Detokenizer(m.decode, ids)
    out, pieces, seconds = [], [], 0.0
    if stream and not as_json:
        click.echo(click.style(shown, dim=True), nl=False)
    for tok, seconds in timed(gen_tokens(m, ids, n_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=sampling_seed)):
        out.append(tok)
        piece = detok.push(tok)
        pieces.append(piece)
        if stream and not as_json and piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    text = "".join(pieces)
    who = f"{record['arch']} seed {record['seed']} of {Path(record['_path']).parent.parent.parent.name}"
    if as_json:
        click.echo(json.dumps({"arch": record["arch"], "seed": record["seed"], "record": record["_path"],
                               "prompt": shown, "prompt_ids": ids, "ids": out, "text": text, "seconds": seconds,
                               "tokens_per_s": len(out) / seconds if seconds else None}, indent=2))
        return
    if stream:
        click.echo()
    else:
        click.echo(click.style(shown, dim=True) + text)
    click.echo(f"{len(out)} tokens in {seconds:.2f} s ({len(out) / max(seconds, 1e-9):,.0f} tokens/s): {who}", err=True)


@click.command()
@click.argument("results", required=False, type=click.Path(path_type=Path))
@results_option
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="The HTML file to write.")
@click.option("--title", help="Title of the report (default: the results folder's name).")
def report(results, results_dir, out, title):
    """One self-contained HTML file of a results folder (RESULTS or --results): the sortable
    leaderboard, paired comparisons, each run's protocol, provenance and plots. Needs no network
    to view; readable on a phone and in print."""
    from lengen.progress import phase
    from lengen.report import write_report

    results_dir = _results_arg(results, results_dir)
    if not results_dir.is_dir():
        raise LengenError(f"{results_dir}: no such results folder; give the folder `lengen run --results` wrote to")
    if out.is_dir():
        raise LengenError(f"-o {out}: is a folder; give a file name such as {out / 'report.html'}")
    console = _stderr_console()
    try:
        with phase(console, f"writing the report of {results_dir}") as status:
            path = write_report(results_dir, out, title, progress=status.update)
    except OSError as exc:
        raise LengenError(f"-o {out}: cannot write it ({exc.strerror or exc}); give a writable file path") from None
    click.echo(f"report: {path} ({path.stat().st_size / 1024:,.0f} KiB)")


@click.group()
def bench():
    """Benchmarks of cost (speed, memory) against length."""


@bench.command(name="eval")
@click.option("--arch", "-a", "arch_name", required=True, help="Architecture.")
@suite_options
@click.option("--lengths", default="1,5,20,64", show_default=True, help="Multiples of W.")
@click.option("--batch", default=1, show_default=True, help="Sequences per forward.")
@click.option("--repeats", default=5, show_default=True, help="Timed repeats per length (median).")
@device_option
@json_option
def bench_eval_cmd(arch_name, benchmark, overrides, benchmarks_file, lengths, batch, repeats, device, as_json):
    """Evaluation tokens/s and peak memory at L = k x W (per-token cost should be flat in L)."""
    from lengen import allocator
    from lengen.plan import RunRequest, plan_run

    allocator.tune()
    try:
        multiples = [float(x) for x in lengths.split(",") if x.strip()]
    except ValueError:
        raise LengenError(f"--lengths {lengths!r}: expected comma-separated multiples of W, e.g. 1,5,20,64") from None
    # no causality check and no results folder: nothing is trained or recorded, only timed
    plan = plan_run(host(), RunRequest(benchmark=benchmark, archs=[arch_name], overrides=list(overrides),
                                       benchmarks_file=benchmarks_file, check=False), check_results=False)
    import torch

    from lengen.api import BuildContext
    from lengen.bench import bench_eval
    from lengen.train import make_accelerator

    accelerator, _precision = make_accelerator(device, plan.suite.train.precision)
    comp = plan.archs[0]
    vocab = plan.dataset.obj.load(plan.dataset.config, plan.data_ctx).vocab_size  # the data, loaded once
    torch.manual_seed(0)
    model = comp.obj.build(comp.config, BuildContext(vocab_size=vocab, window=plan.suite.window)).to(accelerator.device)
    rows = bench_eval(model, comp.obj, window=plan.suite.window, vocab_size=vocab, multiples=multiples, batch=batch,
                      repeats=repeats, device=accelerator.device)
    if as_json:
        click.echo(json.dumps({"arch": arch_name, "benchmark": benchmark, "window": plan.suite.window,
                               "device": str(accelerator.device), "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"evaluation cost: {arch_name} on {benchmark} (W = {plan.suite.window}, batch {batch}, "
                    f"{accelerator.device})")
    for col in ("L", "tokens/s", "us/token", "vs 1st", "peak memory", "vs 1st"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['multiple']:g}W = {r['length']}", f"{r['tokens_per_s']:,.0f}", f"{r['us_per_token']:.1f}",
                  f"{r['time_per_token_vs_first']:.2f}x", f"{r['peak_memory_bytes'] / 2**20:.2f} MiB",
                  f"{r['memory_vs_first']:.2f}x" if r["memory_vs_first"] else "-")
    Console().print(t)
    click.echo(f"medians of {repeats} repeats; memory: {rows[0]['memory_method']} (excludes the weights)")


COMMANDS = [run, leaderboard, status, plugins, list_cmd, plot, compare, check, bench, generate, report]


def make_cli(plugin_host: PluginHost | None = None) -> click.Group:
    """A fresh command group around ``plugin_host`` (default: the installed plugins), with
    lengen's commands and every plugin's: no import-time side effects."""
    plugin_host = plugin_host if plugin_host is not None else PluginHost()

    @click.group(cls=LengenGroup, context_settings={"help_option_names": ["-h", "--help"], "obj": plugin_host})
    @click.version_option(__version__, prog_name="lengen")
    def cli():
        """lengen: train sequence models on a window W, measure them at 1x to 20x W and beyond.

        \b
        Quick start:
          lengen run --arch sw           train + evaluate on the default 'tiny' suite
          lengen leaderboard             compare every recorded result
          lengen status                  the runs in results/ and their state (--watch 10)
          lengen report -o report.html   a self-contained HTML report to share
          lengen generate results/RUN    what a trained model writes
          lengen list archs              what can be run
          lengen plugins                 installed plugins and their problems
        """
        _show_warnings()

    for command in COMMANDS:
        cli.add_command(command)
    plugin_host.register_commands(cli)
    return cli


# ---------------------------------------------------------------------------------------
# helpers


def _results_arg(results: Path | None, results_dir: Path) -> Path:
    """The results folder given as an argument or with --results (not two different ones)."""
    if results is not None and results_dir != Path("results") and results != results_dir:
        raise LengenError(f"two results folders given ({results} and --results {results_dir}); give one")
    return results if results is not None else results_dir


def _records_from(paths) -> list[dict]:
    """Records in run folders, record folders or record.json files; a corrupt one is named
    in a warning and skipped."""
    from lengen.results import RECORD, read_record

    records = []
    for p in paths:
        if not p.exists():
            raise LengenError(f"{p}: no such run folder or record; see `ls results/`")
        files = [p] if p.is_file() else sorted(p.glob(f"**/{RECORD}"))
        records += [r for r in map(read_record, files) if r is not None]
    if not records:
        raise LengenError(f"no readable records found in {', '.join(map(str, paths))}")
    return records


def _pick(records: list[dict], arch: str, seed: int | None) -> dict:
    found = [r for r in records if r["arch"] == arch and (seed is None or r["seed"] == seed)]
    if not found:
        have = sorted({f"{r['arch']} seed {r['seed']}" for r in records})
        raise LengenError(f"no record of {arch!r}" + (f" seed {seed}" if seed is not None else "")
                          + f" in the given runs; found: {', '.join(have)}")
    return sorted(found, key=lambda r: (r["seed"], r.get("created", 0)))[0]


def _print_comparison(console, records, name_a, name_b, result=None) -> None:
    """Paired ratios A/B at each position (and crossovers over checkpoints)."""
    from rich.table import Table

    from lengen.compare import checkpoint_ratios, crossovers, paired_ratios

    if result is None:
        a = _pick(records, name_a, None)
        b = _pick(records, name_b, None)
        mode = next(iter(a["evaluations"]))
        if mode == "nonoverlapping" or mode not in b["evaluations"]:
            return
        result = {"mode": mode, "final": paired_ratios(a, b, mode)}
        if a.get("checkpoints") and b.get("checkpoints"):
            result["crossovers"] = crossovers(checkpoint_ratios(a, b), name_a, name_b)
    t = Table(title=f"paired: ppl {name_a} / ppl {name_b} on the same tokens ({result['mode']} mode)",
              title_justify="left")
    for col in ("position", "ratio", "95% interval", "verdict"):
        t.add_column(col)
    for r in result["final"]:
        t.add_row(r["position"], f"{r['ratio']:.3f}",
                  f"{r['ci_low']:.3f}-{r['ci_high']:.3f}" if r["ci_low"] is not None else "-", r["verdict"])
    console.print(t)
    for c in result.get("crossovers", []):
        console.print(f"crossover at {c['position']} between steps {c['from_step']} and {c['to_step']}: "
                      f"{name_a}/{name_b} {c['ratio_before']:.3f} -> {c['ratio_after']:.3f}, {c['now_ahead']} now "
                      f"ahead, " + ("significant (both intervals exclude 1)" if c["significant"]
                                    else "inside the noise (an interval includes 1)"))


def main(argv=None) -> None:
    cli = make_cli()
    cli.main(args=argv, prog_name="lengen")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
