"""Plugin discovery and the registries they fill.

Plugins are modules named by entry points in the ``lengen`` group; the built-ins under
``plugins/`` are declared in lengen's own ``pyproject.toml`` exactly like a third party's.
Entry points are loaded one by one, so a plugin that fails to import (or implements a
misspelt hook) is reported and the others keep working. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from lengen import hookspecs
from lengen.registry import KINDS, Registry

GROUP = "lengen"
PREFIX = "lengen_"
DISABLE_ENV = "LENGEN_DISABLE_PLUGINS"
HOOK_NAMES = sorted(n for n in dir(hookspecs) if n.startswith(PREFIX))


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    status: str = "loaded"  # loaded | failed | disabled
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "hooks": self.hooks,
            "components": self.components,
            "errors": self.errors,
        }


def closest_hook(name: str) -> str | None:
    """The hook a misspelt name most likely meant (``lengen_register_archs`` ->
    ``lengen_register_architectures``): a shared stem wins over plain similarity."""
    def stem(n: str) -> str:
        return n.removeprefix(PREFIX).removeprefix("register_")

    s = stem(name)
    by_stem = [h for h in HOOK_NAMES if s[:4] and stem(h).startswith(s[:4])]
    if len(by_stem) == 1:
        return by_stem[0]
    close = difflib.get_close_matches(name, by_stem or HOOK_NAMES, n=1, cutoff=0.6)
    return close[0] if close else None


class _Manager(pluggy.PluginManager):
    """A pluggy manager that, like pytest, treats any ``lengen_*`` function as a hook
    implementation, decorated or not, so that a misspelt hook cannot go unnoticed."""

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith(PREFIX) and callable(getattr(plugin, name, None)):
            return {}
        return opts


class PluginHost:
    """The plugin manager, what each plugin is and did, and the registries it filled."""

    def __init__(self, *, load_entry_points: bool = True, plugins: Iterable[tuple[str, Any]] = (),
                 disabled: Iterable[str] | None = None):
        self.pm = _Manager("lengen")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        if disabled is None:
            disabled = [d.strip() for d in os.environ.get(DISABLE_ENV, "").split(",") if d.strip()]
        self.disabled = set(disabled)
        self._registries: dict[str, Registry] = {}
        if load_entry_points:
            self._load_entry_points()
        for name, plugin in plugins:
            self.register(plugin, name)

    # -- loading -------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        eps = list(metadata.entry_points(group=GROUP))
        # Built-ins (distribution "lengen") first, then the rest by name: conflicts resolve
        # the same way on every machine.
        def key(ep):
            dist = ep.dist.name if ep.dist else ""
            return (dist != "lengen", ep.name)

        seen: set[str] = set()
        for ep in sorted(eps, key=key):
            if ep.name in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(ep.name)
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            info = PluginInfo(ep.name, dist, version, ep.value)
            self.infos[ep.name] = info
            if ep.name in self.disabled:
                info.status = "disabled"
                continue
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
                info.status = "failed"
                info.errors.append(
                    f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}; reinstall "
                    f"{dist or ep.name} or disable it with {DISABLE_ENV}={ep.name}"
                )
                continue
            self._register(module, info)

    def register(self, plugin: Any, name: str, *, distribution: str | None = None,
                 version: str | None = None) -> PluginInfo:
        """Register a plugin object by hand (tests, scripts). Returns its info."""
        if self._registries:
            raise RuntimeError("register plugins before the registries are first used")
        info = PluginInfo(name, distribution, version, getattr(plugin, "__name__", type(plugin).__name__))
        self.infos[name] = info
        if name in self.disabled:
            info.status = "disabled"
            return info
        self._register(plugin, info)
        return info

    def _register(self, plugin: Any, info: PluginInfo) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:  # noqa: BLE001 - pluggy validation errors, duplicate names
            info.status = "failed"
            info.errors.append(f"{type(exc).__name__}: {exc}")
            return
        unknown = [c.name for c in self.pm.get_hookcallers(plugin) or [] if c.spec is None]
        if unknown:
            self.pm.unregister(plugin)
            info.status = "failed"
            for hook in unknown:
                close = closest_hook(hook)
                fix = f"did you mean {close!r}?" if close else "hooks are: " + ", ".join(HOOK_NAMES)
                info.errors.append(f"{hook!r} is not a lengen hook; {fix}")
            return
        info.hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])

    # -- registries ----------------------------------------------------------------------
    def registry(self, kinds: str) -> Registry:
        """The registry for ``architectures``, ``datasets``, ``metrics`` or ``benchmarks``."""
        if kinds not in KINDS:
            raise KeyError(kinds)
        if kinds not in self._registries:
            registry = Registry(KINDS[kinds])
            self._call_each(f"lengen_register_{kinds}", registry=registry)
            registry.failed_plugins = [i.name for i in self.infos.values() if i.status == "failed"]
            self._registries[kinds] = registry
        return self._registries[kinds]

    @property
    def architectures(self) -> Registry:
        return self.registry("architectures")

    @property
    def datasets(self) -> Registry:
        return self.registry("datasets")

    @property
    def metrics(self) -> Registry:
        return self.registry("metrics")

    @property
    def benchmarks(self) -> Registry:
        return self.registry("benchmarks")

    def load_all_registries(self) -> None:
        for kinds in KINDS:
            self.registry(kinds)

    def _call_each(self, hook_name: str, **kwargs) -> None:
        """Call each plugin's implementation on its own, so a failure is charged to the
        plugin that raised it and the others still run."""
        registry = kwargs.get("registry")
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():  # registration order
            info = self.infos.get(impl.plugin_name) or PluginInfo(impl.plugin_name)
            if registry is not None:
                registry._plugin = info
            try:
                impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - one plugin must not take down the rest
                info.errors.append(f"{hook_name} raised {type(exc).__name__}: {exc}")
                if hook_name.startswith("lengen_run") or hook_name.startswith("lengen_checkpoint"):
                    warnings.warn(f"plugin {impl.plugin_name!r}: {info.errors[-1]}", stacklevel=2)
            finally:
                if registry is not None:
                    registry._plugin = None

    def register_commands(self, cli) -> None:
        self._call_each("lengen_register_commands", cli=cli)

    def notify(self, hook_name: str, event) -> None:
        """Send a lifecycle event to every observer; an observer that raises is warned about."""
        self._call_each(hook_name, event=event)

    # -- reporting -----------------------------------------------------------------------
    def errors(self) -> list[tuple[str, str]]:
        return [(i.name, e) for i in self.infos.values() for e in i.errors]

    def warn_errors(self, file=None) -> None:
        """One line per plugin problem on stderr; commands keep going."""
        file = file or sys.stderr
        for name, err in self.errors():
            print(f"warning: plugin {name!r}: {err}", file=file)
