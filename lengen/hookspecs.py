"""The hooks a lengen plugin can implement.

Registration hooks receive a :class:`lengen.registry.Registry` and call
``registry.add(name, target, description=...)``; ``target`` is the component or a
``"module:attr"`` string imported only when the component is used. Lifecycle hooks receive
one frozen event object (see :mod:`lengen.events`) so fields can be added later without
breaking plugins. Every hook is documented with an example in ``docs/plugins/hooks.md``.
"""

import pluggy

hookspec = pluggy.HookspecMarker("lengen")
hookimpl = pluggy.HookimplMarker("lengen")


@hookspec
def lengen_register_architectures(registry):
    """Add architectures: targets are :class:`lengen.api.Architecture` subclasses."""


@hookspec
def lengen_register_datasets(registry):
    """Add datasets: targets are :class:`lengen.api.Dataset` subclasses."""


@hookspec
def lengen_register_metrics(registry):
    """Add metrics: targets are :class:`lengen.api.Metric` subclasses."""


@hookspec
def lengen_register_benchmarks(registry):
    """Add benchmark suites: targets are dicts in the benchmarks.toml schema."""


@hookspec
def lengen_register_commands(cli):
    """Add click commands to the ``lengen`` command group."""


@hookspec
def lengen_run_start(event):
    """Called once before training starts, with a :class:`lengen.events.RunStart`."""


@hookspec
def lengen_checkpoint_evaluated(event):
    """Called after every evaluated checkpoint, with a :class:`lengen.events.CheckpointEvaluated`."""


@hookspec
def lengen_run_end(event):
    """Called once when the run ends (finished, failed or interrupted), with a :class:`lengen.events.RunEnd`."""
