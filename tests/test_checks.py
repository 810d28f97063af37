"""The conformance kit: correct components pass, each kind of broken one fails with the
right reason."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lengen import hookimpl
from lengen.checks import ArchSubject, check_architecture, check_dataset, check_metric
from lengen.cli import make_cli
from lengen.plugins import PluginHost
from lengen.testing import (ArchitectureContract, BigramLM, ContextLengthLM, DecayLM, ForgetfulLM, LeakyLM,
                            MetricContract, NoisyLM, TinyConfig, TwoSpeedLM)
from lengen_sw.model import SlidingWindow, SWConfig


def results(arch, config):
    return {r.name: r for r in check_architecture(ArchSubject(arch, config, window=8, vocab_size=32))}


def test_sliding_window_passes_everything():
    res = results(SlidingWindow(), SWConfig(d_model=16, n_heads=2))
    assert all(r.passed for r in res.values()), {k: r.reason for k, r in res.items()}


def test_stateless_architecture_skips_state_equivalence():
    res = results(BigramLM(), TinyConfig())
    assert res["state equivalence"].passed is None
    assert all(r.passed for k, r in res.items() if k != "state equivalence")


def test_leaky_architecture_fails_causality():
    res = results(LeakyLM(), TinyConfig())
    assert res["causality"].passed is False
    assert "sees the future" in res["causality"].reason and "changed the logits at index" in res["causality"].reason


def test_forgetful_state_fails_state_equivalence():
    res = results(ForgetfulLM(), TinyConfig())
    assert res["causality"].passed  # causal, just broken streaming
    assert res["state equivalence"].passed is False
    assert "streaming in chunks of 1 differs from one pass" in res["state equivalence"].reason


def test_state_in_a_buffer_fails():
    from lengen.testing import BufferedLM

    res = results(BufferedLM(), TinyConfig())
    assert res["state not in buffers"].passed is False
    assert "changed the registered buffer(s) h" in res["state not in buffers"].reason


def test_nondeterministic_architecture_fails_determinism():
    res = results(NoisyLM(), TinyConfig())
    assert res["determinism"].passed is False
    assert "non-deterministic" in res["determinism"].reason


def test_lax_config_fails():
    from pydantic import ConfigDict

    class Lax(TinyConfig):
        model_config = ConfigDict(extra="allow")

    res = results(BigramLM(), Lax())
    assert res["config rejects unknown keys"].passed is False
    assert "accepted the unknown key" in res["config rejects unknown keys"].reason


def test_crash_is_a_failure_with_its_reason():
    class Crashing(BigramLM):
        def build(self, config, ctx):
            raise RuntimeError("no such layer")

    res = results(Crashing(), TinyConfig())
    assert res["causality"].passed is False and "RuntimeError: no such layer" in res["causality"].reason


class TestDecayContract(ArchitectureContract):
    arch = DecayLM()
    config = {"d_model": 8}


class TestSlidingWindowContract(ArchitectureContract):
    arch = SlidingWindow
    config = {"d_model": 16, "n_heads": 2}
    window = 8


def test_metric_checks():
    from lengen_metrics.core import PositionPerplexity, RecallByDistance

    for m in (PositionPerplexity(), RecallByDistance()):
        assert all(r.passed for r in check_metric(m, m.Config())), m

    class Constant(PositionPerplexity):
        def compute(self, scores, config, ctx):
            out = super().compute(scores, config, ctx)
            out["ppl@1W"].value = 1.0  # claims perfection whatever the predictions
            return out

    best = check_metric(Constant(), Constant.Config())[1]
    assert best.passed is False and "uniform guessing too" in best.reason

    class Wrong(PositionPerplexity):
        perfect = {"ppl@1W": 0.0}

    best = check_metric(Wrong(), Wrong.Config())[1]
    assert best.passed is False and "on perfect predictions; the best value is 0.0" in best.reason


class TestRecallContract(MetricContract):
    from lengen_metrics.core import RecallByDistance as metric


def test_dataset_checks(tmp_path):
    from lengen.api import DataContext
    from lengen_synthetic.language import SyntheticConfig, SyntheticLanguage

    ctx = DataContext(seed=0, window=16, eval_length=64, eval_sequences=3, train_tokens=2000, cache_dir=tmp_path)
    assert all(r.passed for r in check_dataset(SyntheticLanguage(), SyntheticConfig(n_filler=8, branching=2), ctx))

    class Drifting(SyntheticLanguage):
        calls = 0

        def load(self, config, ctx):
            Drifting.calls += 1
            corpus = super().load(config, ctx)
            corpus.train.tokens = corpus.train.tokens.copy()
            corpus.train.tokens[0] = Drifting.calls % 3  # differs between loads
            return corpus

    res = check_dataset(Drifting(), SyntheticConfig(n_filler=8, branching=2), ctx)
    assert res[0].passed and res[1].passed is False and "different train tokens" in res[1].reason


class LeakyPlugin:
    @hookimpl
    def lengen_register_architectures(self, registry):
        registry.add("leaky", "lengen.testing:LeakyLM", description="peeks at t + 1")


RUN = ["run", "--steps", "2", "--set", "eval.sequences=2", "--set", "eval.bootstrap=10",
       "--set", "data.train_tokens=5000", "--set", "eval.length=2", "--set", "eval.positions=[1, 2]", "--no-plot"]


def test_run_refuses_a_leaky_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("LENGEN_CACHE", str(tmp_path / "cache"))
    cli = make_cli(PluginHost(plugins=[("leakyplug", LeakyPlugin())]))
    res = CliRunner().invoke(cli, RUN + ["--arch", "leaky", "--results", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "architecture 'leaky' (plugin 'leakyplug') failed the causality check" in res.output
    assert "--no-check" in res.output and not (tmp_path / "r").exists()
    cli = make_cli(PluginHost(plugins=[("leakyplug", LeakyPlugin())]))
    res = CliRunner().invoke(cli, RUN + ["--arch", "leaky", "--results", str(tmp_path / "r"), "--no-check"])
    assert res.exit_code == 0, res.output


def test_run_remembers_passed_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("LENGEN_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(make_cli(), RUN + ["--arch", "sw", "--results", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    keys = json.loads((tmp_path / "cache" / "checks.json").read_text())
    assert len(keys) == 1 and keys[0].startswith("sw|lengen|")


def test_check_command_table_and_exit_code():
    res = CliRunner().invoke(make_cli(), ["check", "--arch", "sw", "--window", "8", "--set", "arch.sw.d_model=16",
                                          "--metric", "ppl", "--dataset", "synthetic", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["component"] for r in rows} == {"arch sw", "metric ppl", "dataset synthetic"}
    cli = make_cli(PluginHost(plugins=[("leakyplug", LeakyPlugin())]))
    res = CliRunner().invoke(cli, ["check", "--arch", "leaky", "--window", "8"])
    assert res.exit_code == 1
    assert "FAIL" in res.output and "1 failed" in res.output


def test_check_needs_a_component():
    res = CliRunner().invoke(make_cli(), ["check"])
    assert res.exit_code == 2 and "name what to check" in res.output
