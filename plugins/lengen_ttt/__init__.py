"""Built-in plugin: TTT layers (Sun et al. 2024), TTT-Linear and TTT-MLP."""

from lengen import hookimpl


@hookimpl
def lengen_register_architectures(registry):
    registry.add(
        "ttt",
        "lengen_ttt.model:TTT",
        description="TTT-Linear LM: fast weights trained at test time by mini-batch gradient steps (dual form), "
                    "constant-size state, streams exactly",
    )
    registry.add(
        "ttt-linear",
        "lengen_ttt.model:TTT",
        description="TTT-Linear: the inner model is a linear map per head, updated every K = 16 tokens",
        defaults={"inner": "linear"},
    )
    registry.add(
        "ttt-mlp",
        "lengen_ttt.model:TTT",
        description="TTT-MLP: the inner model is a 2-layer GELU MLP (4x) per head, updated every K = 16 tokens",
        defaults={"inner": "mlp"},
    )
    registry.add(
        "adaptive-ttt",
        "lengen_ttt.adaptive:AdaptiveTTT",
        description="Adaptive TTT-Linear: 1, 2 or 4 inner steps per mini-batch chosen by a signal (inner loss or "
                    "entropy) against calibrated thresholds; evaluates fixed-k, adaptive, random and oracle policies "
                    "on one training",
    )
    registry.add(
        "adaptive-ttt-mlp",
        "lengen_ttt.adaptive:AdaptiveTTT",
        description="Adaptive TTT-MLP: the same policies on the TTT-MLP inner model",
        defaults={"inner": "mlp"},
    )
    for k in (1, 2, 4):
        registry.add(
            f"adaptive-ttt-k{k}",
            "lengen_ttt.adaptive:AdaptiveTTT",
            description=f"Adaptive TTT-Linear trained with k = {k} everywhere (a separately trained fixed-{k} model), "
                        f"evaluated as fixed-{k}",
            defaults={"train_k": k, "evaluate": [f"fixed-{k}"]},
        )


@hookimpl
def lengen_run_end(event):
    """Adaptive-TTT runs: the Pareto plot, allocation histograms and recovery ratio (report.py)."""
    if not event.records:
        return
    from .report import write_reports

    write_reports(event.records)


@hookimpl
def lengen_register_commands(cli):
    import click

    @cli.command(name="adaptive-report")
    @click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--out", type=click.Path(file_okay=False), help="Write here instead of into each run folder.")
    def adaptive_report(folders, out):
        """Adaptive-TTT reports (Pareto plot, allocation histograms, recovery ratio) of the
        runs in FOLDERS (run folders or a results root)."""
        from pathlib import Path

        from .report import write_reports

        paths = [p for f in folders for p in sorted(Path(f).glob("**/record.json"))]
        written = write_reports(paths, Path(out) if out else None)
        if not written:
            raise click.ClickException(f"no adaptive-ttt variants with per-token scores in {', '.join(folders)}")
        for p in written:
            click.echo(str(p))
