"""Typed registries that plugins fill through the ``lengen_register_*`` hooks.

A registry maps a name to an :class:`Entry`. The target of an entry is either the object
itself or a ``"module:attr"`` string that is imported only when the component is used, so
that listing plugins or printing the leaderboard never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from lengen.errors import DuplicateComponentError, LengenError, UnknownComponentError, did_you_mean

KINDS = {
    "architectures": "architecture",
    "datasets": "dataset",
    "metrics": "metric",
    "benchmarks": "benchmark",
}


@dataclass
class Entry:
    """One registered component and where it came from."""

    name: str
    kind: str
    target: Any
    description: str = ""
    defaults: dict = field(default_factory=dict)
    plugin: str = "?"
    distribution: str | None = None
    version: str | None = None
    _loaded: Any = field(default=None, repr=False)
    _info: Any = field(default=None, repr=False)  # the PluginInfo of the plugin that added it

    @property
    def origin(self) -> str:
        dist = f" from {self.distribution} {self.version}" if self.distribution else ""
        return f"plugin {self.plugin!r}{dist}"

    def load(self) -> Any:
        """The component object; a ``"module:attr"`` target is imported on first use."""
        if self._loaded is None:
            target = self.target
            if isinstance(target, str):
                module_name, _, attr = target.partition(":")
                try:
                    obj = importlib.import_module(module_name)
                    for part in attr.split(".") if attr else []:
                        obj = getattr(obj, part)
                except Exception as exc:  # noqa: BLE001 - report any import failure as one line
                    raise LengenError(
                        f"{self.kind} {self.name!r} ({self.origin}) failed to load {target!r}: "
                        f"{type(exc).__name__}: {exc}; check the \"module:attr\" target given to "
                        f"registry.add, reinstall the plugin, or disable it with "
                        f"LENGEN_DISABLE_PLUGINS={self.plugin}"
                    ) from exc
                target = obj
            expected = _expected_base(self.kind)
            if expected is not None and not (isinstance(target, expected) or
                                             (isinstance(target, type) and issubclass(target, expected))):
                raise LengenError(
                    f"{self.kind} {self.name!r} ({self.origin}) points at {_describe(self.target)}, which is not a "
                    f"lengen.api.{expected.__name__} subclass; give registry.add your {expected.__name__} class")
            if isinstance(target, type):
                try:
                    target = target()
                except Exception as exc:  # noqa: BLE001
                    raise LengenError(f"{self.kind} {self.name!r} ({self.origin}): {target.__name__}() failed: "
                                      f"{type(exc).__name__}: {exc}; it must be constructible without "
                                      "arguments") from exc
            self._loaded = target
        return self._loaded


class Registry:
    """Name -> :class:`Entry` for one kind of component.

    ``add`` is what plugins call. A second registration of a taken name is recorded as a
    conflict: it is reported against every plugin involved, and looking the name up raises an
    error naming them, so none silently wins.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._conflicts: dict[str, list[Entry]] = {}
        self._plugin: Any = None  # PluginInfo of the plugin whose hook is running
        self.failed_plugins: list[str] = []  # plugins that failed to load (named in lookup errors)
        self.disabled_plugins: list[str] = []  # plugins disabled by LENGEN_DISABLE_PLUGINS (likewise)

    def add(self, name: str, target: Any, *, description: str = "", defaults: dict | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise LengenError(f"{self.kind} names must be non-empty strings, got {name!r}")
        info = self._plugin
        entry = Entry(
            name=name,
            kind=self.kind,
            target=target,
            description=description or _doc_line(target),
            defaults=dict(defaults or {}),
            plugin=getattr(info, "name", "?"),
            distribution=getattr(info, "distribution", None),
            version=getattr(info, "version", None),
            _info=info,
        )
        if name in self._entries:
            first = self._entries[name]
            involved = self._conflicts.setdefault(name, [first])
            involved.append(entry)
            message = self._duplicate_message(name)
            charged = set()
            for e in involved:  # every plugin involved hears of it, each once
                if e._info is not None and id(e._info) not in charged:
                    charged.add(id(e._info))
                    e._info.errors[:] = [m for m in e._info.errors if not m.startswith(f"duplicate {self.kind} {name!r}:")]
                    e._info.errors.append(message)
            return
        self._entries[name] = entry
        if info is not None:
            info.components.setdefault(self.kind, []).append(name)

    def _duplicate_message(self, name: str) -> str:
        involved = self._conflicts[name]
        who = " and ".join(e.origin for e in involved)
        third = [e.plugin for e in involved if e.distribution != "lengen"] or [e.plugin for e in involved]
        disable = " or ".join(f"LENGEN_DISABLE_PLUGINS={p}" for p in dict.fromkeys(third))
        return f"duplicate {self.kind} {name!r}: registered by {who}; rename one, or disable one with {disable}"

    def get(self, name: str) -> Entry:
        if name in self._conflicts:
            raise DuplicateComponentError(self._duplicate_message(name))
        try:
            return self._entries[name]
        except KeyError:
            msg = did_you_mean(name, self._entries, kind=self.kind)
            if self.failed_plugins:
                msg += (f" Plugins that failed to load and may provide it: {', '.join(self.failed_plugins)} "
                        "(`lengen plugins` shows why).")
            if self.disabled_plugins:
                msg += (f" Disabled by LENGEN_DISABLE_PLUGINS and may provide it: {', '.join(self.disabled_plugins)} "
                        "(remove it from that variable to use it).")
            raise UnknownComponentError(msg) from None

    def load(self, name: str) -> Any:
        return self.get(name).load()

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _expected_base(kind: str):
    from lengen import api

    return {"architecture": api.Architecture, "dataset": api.Dataset, "metric": api.Metric}.get(kind)


def _describe(target: Any) -> str:
    return repr(target) if isinstance(target, str) else getattr(target, "__name__", type(target).__name__)


def _doc_line(target: Any) -> str:
    doc = getattr(target, "description", None) or getattr(target, "__doc__", None)
    if isinstance(doc, str) and doc.strip():
        return doc.strip().splitlines()[0]
    return ""
