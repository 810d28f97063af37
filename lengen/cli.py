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
    @click.option("--no-plot", is_flag=True, help="Do not write the position plot.")
    def run(archs, benchmark, seeds, steps, window, overrides, results_dir, benchmarks_file, data_dir,
            cache_dir, device, no_plot):
        """Train and evaluate architectures on a benchmark suite."""
        from lengen.runner import RunRequest, run as run_suite

        host.warn_errors()
        overrides = list(overrides)
        if steps is not None:
            overrides.append(f"train.steps={steps}")
        if window is not None:
            overrides.append(f"window={window}")
        req = RunRequest(benchmark=benchmark, archs=list(archs), seeds=list(seeds), overrides=overrides,
                         results_dir=results_dir, cache_dir=cache_dir, data_dir=data_dir,
                         benchmarks_file=benchmarks_file, device=device, plot=not no_plot)
        console = _stderr_console()
        run_dir = run_suite(host, req, console)
        from lengen.leaderboard import render, rows_from_records
        from lengen.results import iter_records

        rows = rows_from_records([r for r in iter_records(results_dir) if r["run_id"] == run_dir.name])
        from rich.console import Console

        render(rows, "table", Console())
        click.echo(f"results: {run_dir}")
        if not no_plot and (run_dir / "ppl_by_position.png").exists():
            click.echo(f"plot:    {run_dir / 'ppl_by_position.png'}")

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
        from rich.table import Table

        table = Table(title="lengen plugins")
        for col in ("plugin", "distribution", "version", "status", "hooks", "components", "errors"):
            table.add_column(col, overflow="fold")
        for i in infos:
            comps = "; ".join(f"{k}: {', '.join(v)}" for k, v in i["components"].items())
            hooks = ", ".join(h.removeprefix("lengen_") for h in i["hooks"])
            status = {"loaded": "[green]loaded", "failed": "[red]failed", "disabled": "[yellow]disabled"}[i["status"]]
            table.add_row(i["name"], i["distribution"] or "-", i["version"] or "-", status, hooks, comps,
                          "[red]" + "\n".join(i["errors"]) if i["errors"] else "")
        Console().print(table)

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
    @click.option("--kind", default="position", show_default=True, type=click.Choice(["position"]))
    @click.option("--out", type=click.Path(path_type=Path), help="PNG path (default: <first run>/ppl_by_position.png).")
    def plot(runs, kind, out):
        """Plot one or more runs (folders or record.json files) together."""
        from lengen.plots import plot_position
        from lengen.results import iter_records

        records = []
        for r in runs:
            if r.is_file():
                records.append(json.loads(r.read_text()))
            elif r.is_dir():
                found = [x for x in iter_records(r.parent) if Path(x["_path"]).is_relative_to(r)]
                records += found
            if not r.exists():
                raise LengenError(f"{r}: no such run folder or record; see `ls results/`")
        if not records:
            raise LengenError(f"no records found in {', '.join(map(str, runs))}")
        out = out or (runs[0] if runs[0].is_dir() else runs[0].parent) / "ppl_by_position.png"
        click.echo(plot_position(records, out))

    host.register_commands(cli)
    return cli


def main(argv=None) -> None:
    cli = make_cli()
    cli.main(args=argv, prog_name="lengen")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
