"""Plugin discovery and the registries they fill.

Plugins are modules named by entry points in the ``lengen`` group; the built-ins under
``plugins/`` are declared in lengen's own ``pyproject.toml`` exactly like a third party's.
Entry points are loaded one by one, so a plugin that fails to import (or implements a
misspelt hook) is reported and the others keep working. Nothing here imports torch.

Hooks are called by pluggy itself, so they run in pluggy's order (the plugin registered last
is called first; ``tryfirst`` / ``trylast`` move an implementation; ``wrapper=True`` and
``hookwrapper=True`` implementations wrap the others). What lengen adds is containment: each
plugin's implementation is called through a guard, so an exception in one plugin is charged
to that plugin and the implementations after it still run.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from types import SimpleNamespace
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
            return (dist != "lengen", ep.name, dist)

        taken: dict[str, str | None] = {}  # entry-point name -> distribution that has it
        for ep in sorted(eps, key=key):
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            if ep.name in taken:
                if taken[ep.name] == dist:  # the same distribution found twice on sys.path
                    continue
                clash = PluginInfo(f"{ep.name} ({dist})", dist, version, ep.value, status="failed")
                clash.errors.append(
                    f"not loaded: its entry-point name {ep.name!r} is already taken by "
                    f"{taken[ep.name] or 'another plugin'}; rename the entry point in {dist or 'its'} "
                    f"pyproject.toml ([project.entry-points.lengen])")
                self.infos[clash.name] = clash
                continue
            taken[ep.name] = dist
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
        proxy = self._guarded(plugin, info)
        try:
            self.pm.register(proxy, name=info.name)
        except Exception as exc:  # noqa: BLE001 - pluggy validation errors, duplicate names
            info.status = "failed"
            info.errors.append(f"{type(exc).__name__}: {exc}")
            return
        unknown = [c.name for c in self.pm.get_hookcallers(proxy) or [] if c.spec is None]
        if unknown:
            self.pm.unregister(proxy)
            info.status = "failed"
            for hook in unknown:
                close = closest_hook(hook)
                fix = f"did you mean {close!r}?" if close else "hooks are: " + ", ".join(HOOK_NAMES)
                info.errors.append(f"{hook!r} is not a lengen hook; {fix}")
            return
        info.hooks = sorted(c.name for c in self.pm.get_hookcallers(proxy) or [])

    def _guarded(self, plugin: Any, info: PluginInfo) -> SimpleNamespace:
        """What pluggy registers for ``plugin``: its ``lengen_*`` functions, each wrapped so
        that an exception is charged to this plugin instead of stopping the hook call. Hook
        wrappers (generators around the others) are registered as they are."""
        proxy = SimpleNamespace(__name__=getattr(plugin, "__name__", type(plugin).__name__))
        for name in dir(plugin):
            if not name.startswith(PREFIX):
                continue
            fn = getattr(plugin, name, None)
            if not callable(fn):
                continue
            opts = getattr(fn, "lengen_impl", None) or {}
            if opts.get("wrapper") or opts.get("hookwrapper") or inspect.isgeneratorfunction(fn):
                setattr(proxy, name, fn)
            else:
                setattr(proxy, name, self._guard(fn, name, info))
        return proxy

    @staticmethod
    def _guard(fn, hook_name: str, info: PluginInfo):
        @functools.wraps(fn)  # keeps the argument names pluggy reads and the hookimpl options
        def guard(*args, **kwargs):
            registry = next((a for a in args if isinstance(a, Registry)), None)
            if registry is not None:
                registry._plugin = info
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - one plugin must not take down the rest
                info.errors.append(f"{hook_name} raised {type(exc).__name__}: {exc}")
                if not hook_name.startswith("lengen_register"):
                    warnings.warn(f"plugin {info.name!r}: {info.errors[-1]}", stacklevel=2)
                return None
            finally:
                if registry is not None:
                    registry._plugin = None

        return guard

    # -- registries ----------------------------------------------------------------------
    def registry(self, kinds: str) -> Registry:
        """The registry for ``architectures``, ``datasets``, ``metrics`` or ``benchmarks``."""
        if kinds not in KINDS:
            raise KeyError(kinds)
        if kinds not in self._registries:
            registry = Registry(KINDS[kinds])
            self._call(f"lengen_register_{kinds}", registry=registry)
            registry.failed_plugins = [i.name for i in self.infos.values() if i.status == "failed"]
            registry.disabled_plugins = [i.name for i in self.infos.values() if i.status == "disabled"]
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

    def _call(self, hook_name: str, **kwargs) -> list:
        """Call a hook the way pluggy does (order, tryfirst / trylast, wrappers); each
        plugin's implementation is guarded (see :meth:`_guarded`). An exception that escapes
        a hook wrapper is warned about, naming the hook."""
        try:
            return getattr(self.pm.hook, hook_name)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - raised by a hook wrapper
            warnings.warn(f"a wrapper of hook {hook_name!r} raised {type(exc).__name__}: {exc}", stacklevel=2)
            return []

    def register_commands(self, cli) -> None:
        self._call("lengen_register_commands", cli=cli)

    def notify(self, hook_name: str, event) -> None:
        """Send a lifecycle event to every observer; an observer that raises is warned about."""
        self._call(hook_name, event=event)

    # -- reporting -----------------------------------------------------------------------
    def errors(self) -> list[tuple[str, str]]:
        return [(i.name, e) for i in self.infos.values() for e in i.errors]

    def warn_errors(self, file=None) -> None:
        """One line per plugin problem on stderr; commands keep going."""
        file = file or sys.stderr
        for name, err in self.errors():
            print(f"warning: plugin {name!r}: {err}", file=file)
