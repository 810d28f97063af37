"""The ``lengen`` command line. Importing this module never imports torch."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from lengen import __version__
from lengen.errors import LengenError
from lengen.plugins import PluginHost

LIST_KINDS = {"archs": "architectures", "datasets": "datasets", "metrics": "metrics", "benchmarks": "benchmarks"}


class LengenGroup(click.Group):
    """Turns a :class:`LengenError` into one ``Error: ...`` line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LengenError as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.secho("Interrupted: records already written are kept.", fg="yellow", err=True)
            ctx.exit(130)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _show_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        click.secho(f"warning: {message}", fg="yellow", err=True)

    warnings.showwarning = show


def make_cli(host: PluginHost | None = None) -> click.Group:
    """Build the command group (and its plugin host) afresh: no import-time side effects."""
    host = host if host is not None else PluginHost()

    @click.group(cls=LengenGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="lengen")
    def cli():
        """lengen: train sequence models on a window W, measure them at 1x to 20x W and beyond.

        \b
        Quick start:
          lengen run --arch sw           train + evaluate on the default 'tiny' suite
          lengen leaderboard             compare every recorded result
          lengen list archs              what can be run
          lengen plugins                 installed plugins and their problems
        """
        _show_warnings()

    @cli.command()
    @click.option("--arch", "-a", "archs", multiple=True, help="Architecture to run (repeatable).")
    @click.option("--benchmark", "-b", default="tiny", show_default=True, help="Benchmark suite.")
    @click.option("--seed", "seeds", type=int, multiple=True, help="Training seed (repeatable); default: the suite's.")
    @click.option("--steps", type=int, help="Override train.steps.")
    @click.option("--window", type=int, help="Override the training window W.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override any suite key, e.g. --set train.lr=1e-3 --set arch.sw.n_layers=3.")
    @click.option("--results", "results_dir", type=click.Path(path_type=Path), default=Path("results"),
                  show_default=True, help="Folder the run is written to.")
    @click.option("--benchmarks-file", type=click.Path(path_type=Path),
                  help="A benchmarks.toml of your own; its suites take precedence.")
    @click.option("--data-dir", type=click.Path(path_type=Path), help="Local data for file-based datasets.")
    @click.option("--cache-dir", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/lengen).")
    @click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
    @click.option("--mode", "modes", multiple=True, type=click.Choice(["full", "window", "nonoverlapping"]),
                  help="Evaluation mode (repeatable); default: the suite's eval.modes.")
    @click.option("--checkpoints", type=int, help="Evaluate N checkpoints spread over training (evolution plot).")
    @click.option("--no-plot", is_flag=True, help="Do not write plots.")
    @click.option("--no-check", is_flag=True, help="Skip the causality check of architectures not seen passing before.")
    def run(archs, benchmark, seeds, steps, window, overrides, results_dir, benchmarks_file, data_dir,
            cache_dir, device, modes, checkpoints, no_plot, no_check):
        """Train and evaluate architectures on a benchmark suite."""
        from lengen.runner import RunRequest, run as run_suite

        host.warn_errors()
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
                         benchmarks_file=benchmarks_file, device=device, plot=not no_plot, check=not no_check)
        console = _stderr_console()
        run_dir = run_suite(host, req, console)
        from lengen.leaderboard import render, rows_from_records
        from lengen.results import iter_records

        records = [r for r in iter_records(results_dir) if r["run_id"] == run_dir.name]
        rows = rows_from_records(records)
        from rich.console import Console

        out = Console()
        render(rows, "table", out)
        archs_run = list(dict.fromkeys(r["arch"] for r in records))
        if len(archs_run) >= 2:
            _print_comparison(out, records, archs_run[0], archs_run[1])
        click.echo(f"results: {run_dir}")
        for png in sorted(run_dir.glob("*.png")):
            click.echo(f"plot:    {png}")

    @cli.command()
    @click.option("--benchmark", "-b", help="Only this benchmark.")
    @click.option("--sort", "sort_key", help="Column to sort by (JSON key, e.g. ppl@20W; prefix - for descending).")
    @click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "markdown", "csv", "json"]))
    @click.option("--results", "results_dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
    def leaderboard(benchmark, sort_key, fmt, results_dir):
        """Compare every recorded result: one row per (benchmark, arch, mode)."""
        from lengen.leaderboard import load_rows, render, sort_rows

        rows = sort_rows(load_rows(results_dir, benchmark), sort_key)
        if fmt == "table":
            if not rows:
                click.echo(f"no results under {results_dir}" + (f" for benchmark {benchmark!r}" if benchmark else "")
                           + "; run `lengen run --arch sw` first")
                return
            from rich.console import Console

            render(rows, fmt, Console())
        else:
            click.echo(render(rows, fmt), nl=False)

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def plugins(as_json):
        """Installed plugins: distribution, version, hooks, components, load errors."""
        host.load_all_registries()
        infos = [i.as_dict() for i in host.infos.values()]
        if as_json:
            click.echo(json.dumps(infos, indent=2))
            return
        from rich.console import Console

        out = Console()
        colour = {"loaded": "green", "failed": "red", "disabled": "yellow"}
        for i in infos:
            source = f"{i['distribution']} {i['version']}" if i["distribution"] else "registered in-process"
            out.print(f"[bold]{i['name']}[/bold]  ({source})  [{colour[i['status']]}]{i['status']}[/]")
            if i["hooks"]:
                out.print(f"  {'hooks:':<15}" + ", ".join(h.removeprefix("lengen_") for h in i["hooks"]))
            for kind, names in i["components"].items():
                out.print(f"  {kind + 's:':<15}" + ", ".join(names))
            for err in i["errors"]:
                out.print(f"  [red]{'error:':<15}[/red]{err}")

    @cli.command(name="list")
    @click.argument("kind", type=click.Choice(list(LIST_KINDS)))
    @click.option("--json", "as_json", is_flag=True)
    def list_cmd(kind, as_json):
        """List archs, datasets, metrics or benchmarks with their descriptions."""
        host.warn_errors()
        registry = host.registry(LIST_KINDS[kind])
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
        for it in items:
            table.add_row(it["name"], it["description"], it["plugin"])
        Console().print(table)

    @cli.command()
    @click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--kind", default="position", show_default=True,
                  type=click.Choice(["position", "length", "context", "evolution"]))
    @click.option("--out", type=click.Path(path_type=Path), help="PNG path (default: in the first run's folder).")
    def plot(runs, kind, out):
        """Plot one or more runs (folders or record.json files) together."""
        from lengen.plots import FILENAMES, plot as make_plot

        records = _records_from(runs)
        out = out or (runs[0] if runs[0].is_dir() else runs[0].parent) / FILENAMES[kind]
        path = make_plot(records, out, kind)
        if path is None:
            what = {"evolution": "checkpoints (run with --checkpoints N)",
                    "context": "a context curve (set eval.contexts)"}.get(kind, f"a {kind} curve")
            raise LengenError(f"none of the records has {what}")
        click.echo(path)

    @cli.command()
    @click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--arch", "archs", multiple=True, help="The two architectures to compare (default: the first two).")
    @click.option("--mode", default="full", show_default=True)
    @click.option("--seed", type=int, help="Seed to compare (default: the first both have).")
    @click.option("--json", "as_json", is_flag=True)
    def compare(runs, archs, mode, seed, as_json):
        """Paired comparison of two architectures on identical tokens, and crossovers over checkpoints."""
        from lengen.compare import checkpoint_ratios, crossovers, paired_ratios

        records = _records_from(runs)
        names = list(archs) or list(dict.fromkeys(r["arch"] for r in records))[:2]
        if len(names) != 2:
            raise LengenError(f"need two architectures to compare, found {names}; pass --arch A --arch B")
        a, b = _pick(records, names[0], seed), _pick(records, names[1], seed)
        result = {"a": names[0], "b": names[1], "mode": mode, "final": paired_ratios(a, b, mode)}
        if a.get("checkpoints") and b.get("checkpoints"):
            rows = checkpoint_ratios(a, b)
            result["checkpoints"] = rows
            result["crossovers"] = crossovers(rows, names[0], names[1])
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        from rich.console import Console

        _print_comparison(Console(), [a, b], names[0], names[1], result)

    @cli.command()
    @click.option("--arch", "-a", "archs", multiple=True, help="Architecture to check (repeatable).")
    @click.option("--dataset", "-d", "datasets", multiple=True, help="Dataset to check (repeatable).")
    @click.option("--metric", "-m", "metric_names", multiple=True, help="Metric to check (repeatable).")
    @click.option("--benchmark", "-b", default="tiny", show_default=True,
                  help="Suite whose configs (architecture size, W, dataset settings) are checked.")
    @click.option("--window", type=int, help="W to check at (default: the suite's).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a suite key.")
    @click.option("--benchmarks-file", type=click.Path(path_type=Path))
    @click.option("--data-dir", type=click.Path(path_type=Path))
    @click.option("--json", "as_json", is_flag=True)
    def check(archs, datasets, metric_names, benchmark, window, overrides, benchmarks_file, data_dir, as_json):
        """Conformance checks: causality, state and window equivalence, determinism, finite
        outputs, strict configs (architectures); deterministic streams (datasets); best value
        on perfect predictions (metrics). Exit code 1 if any check fails."""
        from lengen.runner import check_components

        host.warn_errors()
        if not (archs or datasets or metric_names):
            raise LengenError("name what to check: --arch NAME, --dataset NAME or --metric NAME")
        rows = check_components(host, archs=list(archs), datasets=list(datasets), metrics=list(metric_names),
                                benchmark=benchmark, overrides=list(overrides), benchmarks_file=benchmarks_file,
                                data_dir=data_dir, window=window)
        failed = [r for r in rows if r["passed"] is False]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            from rich.console import Console
            from rich.table import Table

            t = Table(title="lengen check", title_justify="left")
            for col in ("component", "check", "result", "reason", "s"):
                t.add_column(col, overflow="fold")
            for r in rows:
                res = {True: "[green]pass", False: "[red]FAIL", None: "[yellow]skip"}[r["passed"]]
                t.add_row(r["component"], r["check"], res, r["reason"], f"{r['seconds']:.1f}")
            Console().print(t)
            click.echo(f"{len(failed)} failed" if failed else "all checks passed")
        if failed:
            raise SystemExit(1)

    @cli.group()
    def bench():
        """Benchmarks of cost (speed, memory) against length."""

    @bench.command(name="eval")
    @click.option("--arch", "-a", "arch_name", required=True, help="Architecture.")
    @click.option("--benchmark", "-b", default="tiny", show_default=True, help="Suite giving W, sizes and the data.")
    @click.option("--lengths", default="1,5,20,64", show_default=True, help="Multiples of W.")
    @click.option("--batch", default=1, show_default=True, help="Sequences per forward.")
    @click.option("--repeats", default=5, show_default=True, help="Timed repeats per length (median).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
    @click.option("--benchmarks-file", type=click.Path(path_type=Path))
    @click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
    @click.option("--json", "as_json", is_flag=True)
    def bench_eval_cmd(arch_name, benchmark, lengths, batch, repeats, overrides, benchmarks_file, device, as_json):
        """Evaluation tokens/s and peak memory at L = k x W (per-token cost should be flat in L)."""
        from lengen import allocator
        from lengen.runner import RunRequest, make_accelerator, plan_run

        allocator.tune()

        try:
            multiples = [float(x) for x in lengths.split(",") if x.strip()]
        except ValueError:
            raise LengenError(f"--lengths {lengths!r}: expected comma-separated multiples of W, e.g. 1,5,20,64") from None
        plan = plan_run(host, RunRequest(benchmark=benchmark, archs=[arch_name], overrides=list(overrides),
                                         benchmarks_file=benchmarks_file))
        import torch

        from lengen.api import BuildContext
        from lengen.bench import bench_eval

        accelerator, precision = make_accelerator(device, plan.suite.train.precision)
        _name, _entry, arch, cfg = plan.archs[0]
        vocab = _vocab_size(plan)
        torch.manual_seed(0)
        model = arch.build(cfg, BuildContext(vocab_size=vocab, window=plan.suite.window)).to(accelerator.device)
        rows = bench_eval(model, arch, window=plan.suite.window, vocab_size=vocab, multiples=multiples, batch=batch,
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

    host.register_commands(cli)
    return cli


def _records_from(paths) -> list[dict]:
    """Records in run folders, record folders or record.json files."""
    from lengen.results import RECORD

    records = []
    for p in paths:
        if not p.exists():
            raise LengenError(f"{p}: no such run folder or record; see `ls results/`")
        files = [p] if p.is_file() else sorted(p.glob(f"**/{RECORD}"))
        for f in files:
            rec = json.loads(f.read_text())
            rec["_path"] = str(f)
            records.append(rec)
    if not records:
        raise LengenError(f"no records found in {', '.join(map(str, paths))}")
    return records


def _pick(records: list[dict], arch: str, seed: int | None) -> dict:
    found = [r for r in records if r["arch"] == arch and (seed is None or r["seed"] == seed)]
    if not found:
        have = sorted({f"{r['arch']} seed {r['seed']}" for r in records})
        raise LengenError(f"no record of {arch!r}" + (f" seed {seed}" if seed is not None else "")
                          + f" in the given runs; found: {', '.join(have)}")
    return sorted(found, key=lambda r: (r["seed"], r.get("created", 0)))[0]


def _vocab_size(plan) -> int:
    from dataclasses import replace

    _entry, ds, cfg = plan.dataset
    return ds.load(cfg, replace(plan.data_ctx, eval_sequences=1, train_tokens=plan.suite.window + 1)).vocab_size


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
