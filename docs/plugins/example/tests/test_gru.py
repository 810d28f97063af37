"""The example plugin's own tests: lengen's conformance kit as a contract class."""

from lengen.plugins import PluginHost
from lengen.testing import ArchitectureContract
from lengen_example.model import GRU


class TestGRUContract(ArchitectureContract):
    arch = GRU()
    config = {"d_model": 32}


def test_registered_through_the_entry_point():
    host = PluginHost()
    info = host.infos["example"]
    assert info.status == "loaded", info.errors
    assert info.distribution == "lengen-example"
    assert "gru" in host.architectures and "gru-tiny" in host.benchmarks
