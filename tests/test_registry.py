"""Plugin loading and the typed registries."""

import pytest

from lengen import hookimpl
from lengen.errors import DuplicateComponentError, UnknownComponentError
from lengen.plugins import PluginHost


class ArchPlugin:
    def __init__(self, *names):
        self.names = names

    @hookimpl
    def lengen_register_architectures(self, registry):
        for n in self.names:
            registry.add(n, "lengen_sw.model:SlidingWindow", description=f"fake {n}")


def test_builtins_are_entry_point_plugins():
    host = PluginHost()
    for name in ("sw", "synthetic", "metrics", "suites"):
        info = host.infos[name]
        assert info.status == "loaded", info.errors
        assert info.distribution == "lengen"
    assert "sw" in host.architectures
    assert "synthetic" in host.datasets
    assert {"ppl", "recall", "excess", "unigram"} <= set(host.metrics.names())
    assert "tiny" in host.benchmarks
    assert host.infos["sw"].components == {"architecture": ["sw"]}


def test_unknown_name_did_you_mean():
    host = PluginHost()
    with pytest.raises(UnknownComponentError) as exc:
        host.architectures.get("sww")
    msg = str(exc.value)
    assert "unknown architecture 'sww'" in msg
    assert "Did you mean 'sw'" in msg
    assert "Available: " in msg and "sw" in msg


def test_duplicate_name_is_an_error_naming_both_plugins():
    host = PluginHost(plugins=[("first", ArchPlugin("dup")), ("second", ArchPlugin("dup", "only2"))])
    with pytest.raises(DuplicateComponentError) as exc:
        host.architectures.get("dup")
    msg = str(exc.value)
    assert "plugin 'first'" in msg and "plugin 'second'" in msg
    assert "LENGEN_DISABLE_PLUGINS=second" in msg
    # the error is charged to the later plugin, whose other components still register
    assert any("duplicate architecture 'dup'" in e for e in host.infos["second"].errors)
    assert "only2" in host.architectures
    assert "sw" in host.architectures


def test_broken_entry_point_is_reported_and_others_work(fake_dist):
    fake_dist("fakeplug-broken", {"fakebroken": "fakeplug_missing_module"})
    host = PluginHost()
    info = host.infos["fakebroken"]
    assert info.status == "failed"
    assert "ModuleNotFoundError" in info.errors[0]
    assert "LENGEN_DISABLE_PLUGINS=fakebroken" in info.errors[0]
    assert info.distribution == "fakeplug-broken"
    assert "sw" in host.architectures  # built-ins unaffected


def test_plugin_raising_in_hook_is_contained(fake_dist):
    fake_dist("fakeplug-raises", {"fakeraises": "fakeplug_raises"}, {"fakeplug_raises.py": """
        from lengen import hookimpl

        @hookimpl
        def lengen_register_architectures(registry):
            raise RuntimeError("boom")
    """})
    host = PluginHost()
    assert "sw" in host.architectures
    assert any("RuntimeError: boom" in e for e in host.infos["fakeraises"].errors)


def test_misspelt_hook_is_an_error(fake_dist):
    fake_dist("fakeplug-typo", {"faketypo": "fakeplug_typo"}, {"fakeplug_typo.py": """
        def lengen_register_archs(registry):
            registry.add("typo-arch", "x:y")
    """})
    host = PluginHost()
    info = host.infos["faketypo"]
    assert info.status == "failed"
    assert "'lengen_register_archs' is not a lengen hook" in info.errors[0]
    assert "did you mean 'lengen_register_architectures'?" in info.errors[0]
    assert "typo-arch" not in host.architectures
    host.pm.check_pending()  # nothing unverified is left registered


def test_disabled_plugins(monkeypatch):
    monkeypatch.setenv("LENGEN_DISABLE_PLUGINS", "sw, metrics")
    host = PluginHost()
    assert host.infos["sw"].status == "disabled"
    assert host.infos["metrics"].status == "disabled"
    assert "sw" not in host.architectures
    assert "synthetic" in host.datasets


def test_lazy_target_import_error_is_one_line():
    class Bad:
        @hookimpl
        def lengen_register_architectures(self, registry):
            registry.add("bad", "no_such_module_xyz:Thing")

    host = PluginHost(plugins=[("badplug", Bad())])
    from lengen.errors import LengenError

    with pytest.raises(LengenError) as exc:
        host.architectures.load("bad")
    assert "architecture 'bad'" in str(exc.value) and "badplug" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_lifecycle_observer_failure_warns_not_raises():
    seen = []

    class Observer:
        @hookimpl
        def lengen_run_start(self, event):
            seen.append(event)
            raise ValueError("observer bug")

    host = PluginHost(load_entry_points=False, plugins=[("obs", Observer())])
    with pytest.warns(UserWarning, match="observer bug"):
        host.notify("lengen_run_start", "evt")
    assert seen == ["evt"]


def test_target_of_the_wrong_kind_is_one_clear_line():
    from lengen.errors import LengenError

    class Wrong:
        @hookimpl
        def lengen_register_architectures(self, registry):
            registry.add("module-not-arch", "torch.nn:Linear")
            registry.add("typo", "lengen.testing:BigramLMM")

    host = PluginHost(plugins=[("wrong", Wrong())])
    with pytest.raises(LengenError, match=r"points at 'torch.nn:Linear', which is not a lengen.api.Architecture subclass"):
        host.architectures.load("module-not-arch")
    with pytest.raises(LengenError, match=r"check the \"module:attr\" target given to registry.add"):
        host.architectures.load("typo")


def test_unknown_name_mentions_plugins_that_failed(fake_dist):
    fake_dist("fakeplug-broken3", {"fakebroken3": "fakeplug_missing_module3"})
    with pytest.raises(UnknownComponentError, match="Plugins that failed to load and may provide it: fakebroken3"):
        PluginHost().architectures.get("causalconv")


def test_hooks_run_in_pluggys_order_with_tryfirst_trylast_and_wrappers():
    """lengen calls hooks through pluggy: the plugin registered last runs first, tryfirst /
    trylast move an implementation, and a wrapper sees the others run inside it."""
    calls = []

    def observer(tag, **opts):
        class Obs:
            @hookimpl(**opts)
            def lengen_run_start(self, event):
                calls.append(tag)
        return Obs()

    class Wrapper:
        @hookimpl(wrapper=True)
        def lengen_run_start(self, event):
            calls.append("wrap-before")
            result = yield
            calls.append("wrap-after")
            return result

    host = PluginHost(load_entry_points=False, plugins=[
        ("a", observer("a")), ("late", observer("late", trylast=True)), ("b", observer("b")),
        ("early", observer("early", tryfirst=True)), ("w", Wrapper())])
    host.notify("lengen_run_start", "evt")
    assert calls == ["wrap-before", "early", "b", "a", "late", "wrap-after"]


def test_a_raising_implementation_does_not_stop_the_ones_after_it():
    calls = []

    class Raises:
        @hookimpl(tryfirst=True)
        def lengen_run_start(self, event):
            raise ValueError("first one broke")

    class After:
        @hookimpl
        def lengen_run_start(self, event):
            calls.append(event)

    host = PluginHost(load_entry_points=False, plugins=[("after", After()), ("raises", Raises())])
    with pytest.warns(UserWarning, match="plugin 'raises': lengen_run_start raised ValueError: first one broke"):
        host.notify("lengen_run_start", "evt")
    assert calls == ["evt"]
    assert host.infos["raises"].errors == ["lengen_run_start raised ValueError: first one broke"]


def test_entry_point_name_clashing_with_a_builtin_is_reported(fake_dist):
    fake_dist("fakeplug-clash", {"sw": "fakeplug_clash"}, {"fakeplug_clash.py": """
        from lengen import hookimpl

        @hookimpl
        def lengen_register_architectures(registry):
            registry.add("clash-arch", "lengen.testing:BigramLM")
    """})
    host = PluginHost()
    assert host.infos["sw"].distribution == "lengen" and host.infos["sw"].status == "loaded"
    clash = host.infos["sw (fakeplug-clash)"]
    assert clash.status == "failed"
    assert "entry-point name 'sw' is already taken by lengen" in clash.errors[0]
    assert "rename the entry point" in clash.errors[0]
    assert ("sw (fakeplug-clash)", clash.errors[0]) in host.errors()  # warned on every command
    assert "sw" in host.architectures and "clash-arch" not in host.architectures
    from click.testing import CliRunner

    from lengen.cli import make_cli

    out = " ".join(CliRunner().invoke(make_cli(), ["plugins"]).output.split())
    assert "sw (fakeplug-clash) (fakeplug-clash 0.1) failed" in out
    assert "rename the entry point in fakeplug-clash pyproject.toml ([project.entry-points.lengen])" in out


def test_asking_for_a_component_of_a_disabled_plugin_names_it(monkeypatch):
    monkeypatch.setenv("LENGEN_DISABLE_PLUGINS", "sw")
    with pytest.raises(UnknownComponentError, match="Disabled by LENGEN_DISABLE_PLUGINS and may provide it: sw"):
        PluginHost().architectures.get("sw")
