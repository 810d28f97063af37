"""Built-in plugin: the standard benchmark suites of lengen's ``benchmarks.toml``."""

from pathlib import Path

from lengen import hookimpl
from lengen.suites import load_suites_file

SUITES_FILE = Path(__file__).with_name("benchmarks.toml")


@hookimpl
def lengen_register_benchmarks(registry):
    for name, suite in load_suites_file(SUITES_FILE).items():
        registry.add(name, suite.model_dump(mode="json", exclude={"name"}), description=suite.description)
