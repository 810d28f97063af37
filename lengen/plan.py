"""Planning a run: resolve the suite, load and validate every component, before any work.

Everything the user can get wrong is checked here, before the first training step: the suite
and its overrides, every architecture name and config, the dataset and its config, the metric
configs, the seeds, the results folder and the data folder; and an architecture not seen
passing before must pass the causality check. Errors name the input (file and line where
there is one) and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lengen.api import DataContext
from lengen.errors import ConfigError, LengenError, UnknownComponentError, did_you_mean
from lengen.plugins import PluginHost
from lengen.suites import Suite, apply_overrides, line_of, parse_tables, read_text, validate_suite


@dataclass
class RunRequest:
    """What the user asked for (the command line of ``lengen run``)."""

    benchmark: str = "tiny"
    archs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    results_dir: Path = Path("results")
    cache_dir: Path | None = None
    data_dir: Path | None = None
    benchmarks_file: Path | None = None
    device: str = "auto"
    plot: bool = True
    check: bool = True  # run the causality check on architectures not seen passing before
    log_with: list[str] = field(default_factory=list)  # experiment trackers (lengen.trackers)


@dataclass
class SuiteOrigin:
    """Where a suite's text came from, so that config errors can name the file and line."""

    source: str
    text: str | None = None
    overrides: list[str] = field(default_factory=list)

    def where(self, table: list[str], key: str | None) -> str:
        """``file:line`` of ``key`` in ``[table]``, or the ``--set`` that gave it."""
        dotted = ".".join(table[1:] + ([key] if key else []))
        for o in self.overrides:
            if dotted and o.split("=", 1)[0].strip() == dotted:
                return f"--set {o}"
        line = line_of(self.text, table, key) if self.text else None
        return f"{self.source}:{line}" if line else self.source


@dataclass
class Component:
    """A resolved component: its name, registry entry, object and validated config."""

    name: str
    entry: Any
    obj: Any
    config: Any


@dataclass
class Plan:
    """Everything resolved and validated, before any training."""

    suite: Suite
    origin: SuiteOrigin
    archs: list[Component]
    dataset: Component
    metrics: list[Component]
    seeds: list[int]
    data_ctx: DataContext


def resolve_suite(host: PluginHost, name: str, overrides: list[str],
                  benchmarks_file: Path | None) -> tuple[Suite, SuiteOrigin]:
    """The named suite (a ``--benchmarks-file`` takes precedence over registered suites),
    with ``--set`` overrides applied, then validated."""
    if benchmarks_file is not None:
        text = read_text(benchmarks_file)
        tables = parse_tables(text, str(benchmarks_file))
        if name in tables:
            table, origin = tables[name], SuiteOrigin(str(benchmarks_file), text, list(overrides))
        elif name in host.benchmarks:
            table, origin = dict(host.benchmarks.load(name)), SuiteOrigin("benchmarks.toml", None, list(overrides))
        else:
            raise UnknownComponentError(did_you_mean(name, set(tables) | set(host.benchmarks.names()),
                                                     kind="benchmark"))
    else:
        table, origin = dict(host.benchmarks.load(name)), SuiteOrigin("benchmarks.toml", None, list(overrides))
    if not isinstance(table, dict):
        raise ConfigError(f"{origin.source}: {name!r} is not a suite table; write suites as [name] tables")
    if not overrides:
        return validate_suite(name, table, source=origin.source, text=origin.text), origin
    suite = validate_suite(name, apply_overrides(table, overrides),
                           source=f"{origin.source} with the command-line overrides")
    return suite, origin


def validate_config(config_cls, values: dict, *, suite: str, table: list[str], origin: SuiteOrigin):
    """``config_cls(**values)``, or a one-line error naming the file and line (or the
    ``--set``), the suite, the table and the key, like the suite's own keys."""
    try:
        return config_cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        key = loc[-1] if loc else None
        table_name = ".".join([suite] + table + loc[:-1])
        where = origin.where([suite] + table + loc[:-1], key)
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(key, list(config_cls.model_fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(config_cls.model_fields)
            msg = f"unknown key {key!r} in [{table_name}]; {hint}"
        elif err["type"] == "missing":
            msg = f"[{table_name}] is missing the required key {key!r}"
        else:
            text = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            got = f" (got {got!r})" if got is not None and not isinstance(got, dict) and key else ""
            msg = f"[{table_name}] {key}: {text}{got}" if key else f"[{table_name}]: {text}"
        raise ConfigError(f"{where}: suite {suite!r}: {msg}") from None


def arch_config(entry, arch, suite: Suite, name: str, origin: SuiteOrigin):
    """The validated config of architecture ``name``: its registered defaults, then the suite's
    table for it (``arch.<name>``, else its family's, with the overrides already applied)."""
    table = name if name in suite.arch else name.split("-", 1)[0]
    return validate_config(arch.Config, {**entry.defaults, **suite.arch_config(name)},
                           suite=suite.name, table=["arch", table], origin=origin)


def data_context(suite: Suite, req: RunRequest) -> DataContext:
    W = suite.window
    return DataContext(
        seed=suite.data_seed, window=W, eval_length=suite.eval_tokens, eval_sequences=suite.eval.sequences,
        train_tokens=suite.train.steps * suite.train.batch_size * suite.train.grad_accum * W + W + 1,
        cache_dir=Path(req.cache_dir or default_cache_dir()), data_dir=req.data_dir, tokenizer=suite.tokenizer)


def plan_run(host: PluginHost, req: RunRequest, *, check_results: bool = True) -> Plan:
    suite, origin = resolve_suite(host, req.benchmark, req.overrides, req.benchmarks_file)
    return plan_suite(host, req, suite, origin, check_results=check_results)


def plan_suite(host: PluginHost, req: RunRequest, suite: Suite, origin: SuiteOrigin | None = None, *,
               check_results: bool = True) -> Plan:
    """Load and validate every component of an already resolved ``suite`` (a resumed run
    plans from the suite it recorded)."""
    origin = origin or SuiteOrigin("run.json")
    names = list(dict.fromkeys(req.archs or suite.archs))
    if not names:
        raise ConfigError(
            f"no architecture named: give --arch NAME (available: {', '.join(host.architectures.names())})")
    entries = [(n, host.architectures.get(n)) for n in names]  # did-you-mean before any import
    _check_arch_tables(host, suite, req.overrides)
    seeds = list(dict.fromkeys(req.seeds or suite.seeds))
    bad = [s for s in seeds if s < 0]
    if bad:
        raise ConfigError(f"--seed {bad[0]}: seeds must be integers >= 0")
    if check_results:
        check_writable_folder(req.results_dir, "--results")
    if req.data_dir is not None and not Path(req.data_dir).expanduser().is_dir():
        what = "is a file, not a folder" if Path(req.data_dir).expanduser().exists() else "does not exist"
        raise ConfigError(f"--data-dir {req.data_dir}: the folder {what}; give the folder that holds the data files")
    archs = []
    for name, entry in entries:
        arch = entry.load()
        archs.append(Component(name, entry, arch, arch_config(entry, arch, suite, name, origin)))
    ds_entry = host.datasets.get(suite.dataset)
    ds = ds_entry.load()
    dataset = Component(suite.dataset, ds_entry, ds,
                        validate_config(ds.Config, suite.data, suite=suite.name, table=["data"], origin=origin))
    unknown = [m for m in suite.metrics if m not in host.metrics]
    if unknown:
        host.metrics.get(unknown[0])  # raises with did-you-mean
    metrics = []
    for entry in host.metrics:
        metric = entry.load()
        cfg = validate_config(metric.Config, suite.metrics.get(entry.name, {}), suite=suite.name,
                              table=["metrics", entry.name], origin=origin)
        metrics.append(Component(entry.name, entry, metric, cfg))
    plan = Plan(suite, origin, archs, dataset, metrics, seeds, data_context(suite, req))
    if suite.train.early_stopping:
        early_stopping_direction(plan)
    ds.validate(dataset.config, plan.data_ctx)  # missing files or an unreachable hub fail before any model is built
    if req.check:
        require_causal(plan, Path(req.cache_dir or default_cache_dir()))
    return plan


def early_stopping_direction(plan: Plan) -> str:
    """``"lower"`` or ``"higher"``: the direction the watched checkpoint metric's spec calls
    better; an error if no metric declares it as a checkpoint output with a direction."""
    name = plan.suite.train.early_stopping.metric
    specs = [s for m in plan.metrics for s in m.obj.outputs if s.checkpoint and s.better]
    spec = next((s for s in specs if s.matches(name)), None)
    if spec is None:
        raise ConfigError(f"train.early_stopping.metric = {name!r} is not a checkpoint output with a better "
                          f"direction; use one matching {', '.join(sorted({s.key for s in specs})) or '(none)'}")
    return spec.better


def check_writable_folder(path: Path, option: str) -> None:
    """Refuse, before any work, a results folder that cannot be created or written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: a file is in the way, not a folder; pick another folder with {option} DIR")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is a file, so the folder cannot be created there; "
                          f"pick another folder with {option} DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable; pick another folder with {option} DIR")


def _check_arch_tables(host: PluginHost, suite: Suite, overrides: list[str]) -> None:
    """An ``arch.<name>`` table must name an installed architecture or family: a typo given
    with --set is an error, one in a suite file a warning (its plugin may not be installed)."""
    names = host.architectures.names()
    known = set(names) | {n.split("-", 1)[0] for n in names}
    for key in suite.arch:
        if key in known:
            continue
        if any(o.startswith(f"arch.{key}.") for o in overrides):
            raise ConfigError(f"--set arch.{key}...: " + did_you_mean(key, known, kind="architecture"))
        warnings.warn(f"suite {suite.name!r} configures architecture {key!r}, which no installed plugin provides",
                      stacklevel=2)


# ---------------------------------------------------------------------------------------
# the causality check, remembered


def code_fingerprint(*modules: str) -> str:
    """A hash of every file of the packages that hold ``modules`` (their sources, compiled
    extensions' sources, data), so that any edit to a plugin changes it. A module outside a
    package (a script, a test file) is identified by its own file."""
    import inspect

    h = hashlib.sha256()
    for top in sorted({m.split(".", 1)[0] for m in modules}):
        mod = sys.modules.get(top)
        root = Path(getattr(mod, "__file__", None) or "")
        h.update(top.encode() + b"\0")
        if getattr(mod, "__path__", None) and root.name == "__init__.py":
            base = root.parent
            for f in sorted(base.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".pyo", ".so"):
                    h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes() + b"\0")
        else:
            try:
                h.update(Path(inspect.getsourcefile(mod)).read_bytes())
            except (TypeError, OSError):
                pass
    return h.hexdigest()[:16]


def _check_key(comp: Component, window: int) -> str:
    """Identifies what a passed check vouches for: the plugin's code and version, the
    architecture's version, the config, W and the checker's own version."""
    import lengen

    e = comp.entry
    modules = [type(comp.obj).__module__] + ([e.target.partition(":")[0]] if isinstance(e.target, str) else [])
    return (f"{comp.name}|{e.distribution}|{e.version}|{comp.obj.version}|{code_fingerprint(*modules)}|"
            f"{comp.config.hash()}|W{window}|lengen {lengen.__version__}")


def require_causal(plan: Plan, cache_dir: Path) -> None:
    """Refuse to train an architecture that sees the future; remember the ones that passed."""
    from lengen.checks import ArchSubject, check_causality, run_check
    from lengen.results import atomic_write_json

    path = cache_dir / "checks.json"
    try:
        passed = set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        passed = set()
    new = set()
    for comp in plan.archs:
        key = _check_key(comp, plan.suite.window)
        if key in passed:
            continue
        res = run_check("causality", lambda: check_causality(ArchSubject(comp.obj, comp.config,
                                                                         window=plan.suite.window)))
        if res.passed is False:
            raise LengenError(f"architecture {comp.name!r} ({comp.entry.origin}) failed the causality check: "
                              f"{res.reason}. Fix it, or run with --no-check to train it anyway")
        new.add(key)
    if new:
        try:
            atomic_write_json(path, sorted(passed | new))
        except OSError:
            pass  # an unwritable cache only means the check runs again next time


def default_cache_dir() -> Path:
    """``$LENGEN_CACHE`` or ``~/.cache/lengen``."""
    return Path(os.environ.get("LENGEN_CACHE") or Path.home() / ".cache" / "lengen")
