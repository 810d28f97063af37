"""docs/plugins stays true: every hook documented with its exact signature, the example
plugin installed and working through the CLI."""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lengen import hookspecs
from lengen.cli import make_cli
from lengen.plugins import HOOK_NAMES

ROOT = Path(__file__).resolve().parent.parent
HOOKS_MD = ROOT / "docs" / "plugins" / "hooks.md"


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_has_a_section_with_its_signature(hook):
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    heading = f"## `{hook}({params})`"
    text = HOOKS_MD.read_text()
    assert heading in text, f"docs/plugins/hooks.md lacks the section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    assert "```python" in section and f"def {hook}(" in section, f"{hook}: no runnable example"


def test_no_section_for_a_hook_that_does_not_exist():
    documented = re.findall(r"^## `(lengen_\w+)\(", HOOKS_MD.read_text(), flags=re.M)
    assert sorted(documented) == HOOK_NAMES


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_examples_run(hook, tmp_path):
    """Each example registers with a real plugin host and does what it says."""
    text = HOOKS_MD.read_text()
    section = text.split(f"## `{hook}(", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    module = type(sys)("doc_example_" + hook)
    exec(compile(code, f"hooks.md:{hook}", "exec"), module.__dict__)
    from lengen.plugins import PluginHost

    host = PluginHost(load_entry_points=False, plugins=[("docexample", module)])
    assert host.infos["docexample"].status == "loaded", host.infos["docexample"].errors
    assert hook in host.infos["docexample"].hooks


def example_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("lengen-example")
        return True
    except metadata.PackageNotFoundError:
        return False


EXAMPLE_MISSING = ("the example plugin is not installed in this environment; the README's test command "
                   "installs it: pip install -e docs/plugins/example")


def test_example_plugin_listed():
    assert example_installed(), EXAMPLE_MISSING
    res = CliRunner().invoke(make_cli(), ["plugins", "--json"])
    info = {i["name"]: i for i in json.loads(res.output)}["example"]
    assert (info["distribution"], info["version"], info["status"]) == ("lengen-example", "0.1.0", "loaded")
    assert info["components"] == {"architecture": ["gru"], "benchmark": ["gru-tiny"]}
    assert "lengen_run_end" in info["hooks"]


def test_example_plugin_checks_and_runs_beside_a_builtin(tmp_path, monkeypatch):
    assert example_installed(), EXAMPLE_MISSING
    res = CliRunner().invoke(make_cli(), ["check", "--arch", "gru", "-b", "gru-tiny"])
    assert res.exit_code == 0, res.output
    assert "all checks passed" in res.output
    log = tmp_path / "runs.jsonl"
    monkeypatch.setenv("LENGEN_EXAMPLE_LOG", str(log))
    res = CliRunner().invoke(make_cli(), ["run", "-b", "gru-tiny", "--arch", "gru", "--arch", "sw", "--steps", "5",
                                          "--set", "eval.sequences=4", "--set", "eval.bootstrap=20",
                                          "--results", str(tmp_path / "r"), "--no-plot"])
    assert res.exit_code == 0, res.output
    assert "paired: ppl gru / ppl sw" in res.output
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["status"] == "finished" and json.loads(line)["records"] == 2
