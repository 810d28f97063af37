"""The command line end to end: a tiny run, the leaderboard contract, bad input."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lengen.cli import make_cli


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """One real (very short) `lengen run --arch sw`, shared by the tests below."""
    results = tmp_path_factory.mktemp("results")
    args = ["run", "--arch", "sw", "--results", str(results), "--steps", "4",
            "--set", "eval.sequences=6", "--set", "eval.bootstrap=50", "--set", "data.train_tokens=20000",
            "--set", "eval.batch_size=4"]
    res = CliRunner().invoke(make_cli(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return results, res


def test_run_writes_record_checkpoint_plot(tiny_results):
    results, res = tiny_results
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    rec = json.loads((run_dir / "sw" / "seed0" / "record.json").read_text())
    assert (run_dir / "sw" / "seed0" / "model.safetensors").stat().st_size > 0
    assert (run_dir / "ppl_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["records"] == ["sw/seed0/record.json"]
    # provenance
    prov = rec["provenance"]
    assert prov["lengen_version"] and prov["packages"]["torch"] and prov["device"]["type"] == "cpu"
    assert prov["precision"] == "fp32" and "git" in prov
    assert rec["dataset"]["fingerprint"] and rec["model"]["config_hash"] and rec["suite_hash"]
    assert rec["model"]["distribution"] == "lengen" and rec["model"]["plugin"] == "sw"
    assert rec["train"]["steps"] == 4 and rec["train"]["tokens"] == 4 * 32 * 64
    assert rec["protocol"] == {**rec["protocol"], "window": 64, "eval_length": 1280, "modes": ["full"]}
    # metrics with intervals
    ev = rec["evaluations"]["full"]
    for k in (1, 2, 5, 10, 20):
        v = ev["metrics"][f"ppl@{k}W"]
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
    assert {"recall@<=W", "recall@>W", "excess_nll@1W", "ppl_unigram@1W", "ppl_optimal@1W", "horizon",
            "ppl_len@10W"} <= set(ev["metrics"])
    assert len(ev["series"]["ppl_by_position"]["x"]) == 1280 // 16
    assert "results:" in res.output


def test_leaderboard_json_contract(tiny_results):
    results, _ = tiny_results
    res = CliRunner().invoke(make_cli(), ["leaderboard", "--results", str(results), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert (row["benchmark"], row["arch"], row["mode"], row["n_seeds"]) == ("tiny", "sw", "full", 1)
    for k in ("1W", "2W", "5W", "10W", "20W"):
        cell = row[f"ppl@{k}"]
        assert set(cell) == {"value", "ci_low", "ci_high"}
        assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]


def test_leaderboard_formats_show_the_json_values(tiny_results):
    import csv
    import io

    results, _ = tiny_results
    show = lambda fmt: CliRunner().invoke(make_cli(), ["leaderboard", "--results", str(results), "--format", fmt])  # noqa
    (row,) = json.loads(show("json").output)
    cell = row["ppl@20W"]
    (line,) = list(csv.DictReader(io.StringIO(show("csv").output)))
    assert line["arch"] == "sw" and float(line["ppl@20W"]) == pytest.approx(cell["value"])
    assert float(line["ppl@20W ci_low"]) == pytest.approx(cell["ci_low"])
    assert float(line["recall@>W"]) == pytest.approx(row["recall@>W"]["value"])
    md = show("markdown").output
    header = next(l for l in md.splitlines() if l.startswith("| benchmark"))
    values = next(l for l in md.splitlines() if l.startswith("| tiny"))
    cols = dict(zip(header.strip("| ").split(" | "), values.strip("| ").split(" | ")))
    assert cols["ppl@20W"] == f"{cell['value']:.2f} [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"
    assert cols["rec>W"].startswith(f"{100 * row['recall@>W']['value']:.1f} [")  # declared: a percentage
    assert cols["train tok/s"] == f"{round(row['train_tokens_per_s']):,}"
    table = show("table").output
    assert "tiny, W = 64, mode full" in table and f"{cell['value']:.1f}" in table and "train tok/s" in table


def test_leaderboard_sort_unknown_column(tiny_results):
    results, _ = tiny_results
    res = CliRunner().invoke(make_cli(), ["leaderboard", "--results", str(results), "--sort", "ppl@20"])
    assert res.exit_code != 0
    assert "Did you mean 'ppl@20W'" in res.output


def test_unknown_arch_did_you_mean(tmp_path):
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "nope", "--results", str(tmp_path)])
    assert res.exit_code == 2
    assert "Error: unknown architecture 'nope'." in res.output and "Available: " in res.output
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # nothing started


@pytest.mark.parametrize("args,expected", [
    (["--window", "0"], "window must be a positive number of tokens"),
    (["--set", "eval.length=0.5", "--set", "eval.positions=[0.5]"], "shorter than the training window"),
    (["--set", "train.lr=-1"], "lr: Input should be greater than 0"),
    (["--set", "arch.sw.d_modle=64"], "--set arch.sw.d_modle=64: suite 'tiny': unknown key 'd_modle' in "
                                      "[tiny.arch.sw]; did you mean 'd_model'?"),
    (["--set", "data.p_set=0.5", "--set", "data.p_get=0.5"],
     "benchmarks.toml: suite 'tiny': [tiny.data]: p_set + p_get must be < 1 (filler needs probability mass)"),
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0"),
    (["--set", "data.p_sett=0.1"], "unknown key 'p_sett'"),
    (["-b", "tinyy"], "Did you mean 'tiny'"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "--results", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert "Traceback" not in res.output and "?:" not in res.output
    errors = [line for line in res.output.strip().splitlines() if line.startswith("Error")]
    assert len(errors) == 1  # (click's own usage errors add a usage line above it)
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_malformed_benchmarks_file(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text("[mine]\nwindow = 64\ntrain = {steps = }\n")
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "-b", "mine", "--benchmarks-file", str(bad)])
    assert res.exit_code == 2
    assert f"Error: {bad}:3: malformed TOML" in res.output


def test_window_longer_than_data_is_refused(tmp_path):
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "--results", str(tmp_path), "--window", "64",
                                          "--set", "data.train_tokens=10", "--set", "data.doc_length=10",
                                          "--set", "eval.length=1", "--set", "eval.positions=[1]",
                                          "--set", "train.steps=1"])
    assert res.exit_code == 2, res.output
    assert "shorter than the evaluation length" in res.output or "fewer than one window" in res.output


def test_help_and_plugins_do_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lengen.cli import make_cli\n"
            "cli = make_cli()\n"
            "for args in (['--help'], ['plugins'], ['list', 'archs'], ['leaderboard', '--results', '/nonexistent'],\n"
            "             ['status', '/nonexistent'], ['status', '--json', '--results', '/nonexistent'],\n"
            "             ['generate', '--help'], ['report', '--help']):\n"
            "    r = CliRunner().invoke(cli, args)\n"
            "    assert r.exit_code == 0, (args, r.output)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugins_command_lists_builtins():
    res = CliRunner().invoke(make_cli(), ["plugins", "--json"])
    infos = {i["name"]: i for i in json.loads(res.output)}
    assert infos["sw"]["distribution"] == "lengen" and infos["sw"]["components"] == {"architecture": ["sw"]}
    assert "lengen_register_architectures" in infos["sw"]["hooks"]


def test_list_benchmarks():
    res = CliRunner().invoke(make_cli(), ["list", "benchmarks", "--json"])
    assert "tiny" in {i["name"] for i in json.loads(res.output)}


class _Plugins:
    """Registers the fake architectures of lengen.testing for one test."""

    from lengen import hookimpl

    @hookimpl
    def lengen_register_architectures(self, registry):
        registry.add("nan", "lengen.testing:NaNLM")
        registry.add("bigram", "lengen.testing:BigramLM")


FAST = ["--steps", "3", "--set", "eval.sequences=3", "--set", "eval.bootstrap=10", "--set", "data.train_tokens=8000",
        "--set", "eval.length=2", "--set", "eval.positions=[1, 2]", "--no-plot"]


def test_a_diverging_architecture_is_recorded_and_the_others_still_run(tmp_path):
    from lengen.plugins import PluginHost

    cli = make_cli(PluginHost(plugins=[("fakes", _Plugins())]))
    res = CliRunner().invoke(cli, ["run", "--arch", "nan", "--arch", "bigram", "--seed", "0", "--seed", "1",
                                   "--results", str(tmp_path), *FAST])
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    assert ("Error: 2 of 4 jobs did not finish: nan seed 0 diverged at step 1; nan seed 1 diverged at step 1; "
            "the 2 finished are recorded in ") in res.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "diverged"
    jobs = {(j["arch"], j["seed"]): j for j in run["jobs"]}
    for seed in (0, 1):
        assert jobs[("nan", seed)]["status"] == "diverged" and jobs[("nan", seed)]["step"] == 1
        assert "the loss became nan at step 1" in jobs[("nan", seed)]["error"]
        assert jobs[("bigram", seed)]["status"] == "finished"  # the architecture after it still trained
    assert run["records"] == ["bigram/seed0/record.json", "bigram/seed1/record.json"]
    assert not (run_dir / "nan").exists()
    rows = json.loads(CliRunner().invoke(make_cli(), ["leaderboard", "--results", str(tmp_path),
                                                      "--format", "json"]).output)
    assert [(r["arch"], r["n_seeds"]) for r in rows] == [("bigram", 2)]
    table = CliRunner().invoke(make_cli(), ["leaderboard", "--results", str(tmp_path)]).output
    assert "not on the leaderboard: nan seed 0 diverged at step 1" in table


def test_ctrl_c_keeps_finished_records(tmp_path):
    from lengen import hookimpl
    from lengen.plugins import PluginHost

    class Interrupter:
        @hookimpl
        def lengen_checkpoint_evaluated(self, event):
            if event.arch == "sw":
                raise KeyboardInterrupt

    cli = make_cli(PluginHost(plugins=[("fakes", _Plugins()), ("ctrlc", Interrupter())]))
    res = CliRunner().invoke(cli, ["run", "--arch", "bigram", "--arch", "sw", "--results", str(tmp_path), *FAST])
    assert res.exit_code == 130
    assert "Interrupted: records already written are kept; continue with: lengen run --resume " in res.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "interrupted" and run["records"] == ["bigram/seed0/record.json"]
    assert [j["status"] for j in run["jobs"]] == ["finished", "interrupted"]
    assert not list(run_dir.rglob("*.tmp"))  # nothing half-written
    assert not (run_dir / "heartbeat.json").exists()
    rows = json.loads(CliRunner().invoke(make_cli(), ["leaderboard", "--results", str(tmp_path),
                                                      "--format", "json"]).output)
    assert [r["arch"] for r in rows] == ["bigram"]


def test_broken_plugin_warns_and_run_goes_on(tmp_path, fake_dist):
    fake_dist("fakeplug-broken2", {"fakebroken2": "fakeplug_missing_module2"})
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "--results", str(tmp_path), *FAST])
    assert res.exit_code == 0, res.output
    assert "warning: plugin 'fakebroken2': import of 'fakeplug_missing_module2' failed" in res.output


def test_set_for_an_unknown_architecture_is_an_error(tmp_path):
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "--set", "arch.swx.d_model=32",
                                          "--results", str(tmp_path)])
    assert res.exit_code == 2
    assert "--set arch.swx...: unknown architecture 'swx'. Did you mean 'sw'?" in res.output


class ThirdPartyMetric:
    """A metric plugin of a third party: its declared outputs reach the leaderboard and its
    declared plot can be drawn, though the core has never heard of it."""

    from lengen import hookimpl

    @hookimpl
    def lengen_register_metrics(self, registry):
        registry.add("meannll", MeanNLL)


from lengen.api import Metric, OutputSpec, PlotSpec, Series, Value  # noqa: E402


class MeanNLL(Metric):
    outputs = (OutputSpec("nats@*W", better="lower", leaderboard=True, table="all", header="nats {x}",
                          note="nats kW: mean NLL at k x W."),
               OutputSpec("nats_hidden", leaderboard=False))
    plots = (PlotSpec("nats_by_position", kind="nats", filename="nats.png", ylabel="mean NLL"),)

    def compute(self, scores, config, ctx):
        out = {"nats_hidden": Value(0.0)}
        xs, vals = [], []
        for k in ctx.positions:
            end = int(k * ctx.window)
            v = Value(float(scores.nll[:, end - ctx.bucket:end].mean()))
            out[f"nats@{ctx.label(k)}"] = v
            xs.append(k)
            vals.append(v)
        out["nats_by_position"] = Series(xs, vals)
        return out


def test_a_third_party_metric_reaches_the_leaderboard_and_plots(tmp_path):
    from lengen.plugins import PluginHost

    cli = make_cli(PluginHost(plugins=[("fakes", _Plugins()), ("meannll", ThirdPartyMetric())]))
    res = CliRunner().invoke(cli, ["run", "--arch", "bigram", "--arch", "sw", "--results", str(tmp_path), *FAST])
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rec = json.loads((run_dir / "sw" / "seed0" / "record.json").read_text())
    assert rec["metric_plugins"]["meannll"]["outputs"][0]["key"] == "nats@*W"
    # read back without the plugin installed: the record carries what the leaderboard needs
    rows = {r["arch"]: r for r in json.loads(CliRunner().invoke(
        make_cli(), ["leaderboard", "--results", str(tmp_path), "--format", "json"]).output)}
    for arch in ("bigram", "sw"):
        assert rows[arch]["nats@1W"]["value"] == rec_value(run_dir, arch, "nats@1W")
        assert "nats_hidden" not in rows[arch]
    best = min(("bigram", "sw"), key=lambda a: rows[a]["nats@2W"]["value"])
    assert "nats@2W" in rows[best]["best"]  # its declared direction marks the best row
    md = CliRunner().invoke(make_cli(), ["leaderboard", "--results", str(tmp_path), "--format", "markdown"]).output
    assert "| nats 1W | nats 2W |" in md
    out = CliRunner().invoke(make_cli(), ["plot", str(run_dir), "--kind", "nats"])
    assert out.exit_code == 0, out.output
    assert (run_dir / "nats.png").read_bytes()[:4] == b"\x89PNG"
    wrong = CliRunner().invoke(make_cli(), ["plot", str(run_dir), "--kind", "nat"])
    assert wrong.exit_code == 2 and "Did you mean 'nats'?" in wrong.output


def rec_value(run_dir, arch, key):
    return json.loads((run_dir / arch / "seed0" / "record.json").read_text())["evaluations"]["full"]["metrics"][key]["value"]


def test_plot_and_compare_skip_a_corrupt_record_and_name_it(tiny_results, tmp_path):
    import shutil

    results, _ = tiny_results
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    shutil.copytree(copy / "sw", copy / "sw2")
    rec = json.loads((copy / "sw2" / "seed0" / "record.json").read_text())
    (copy / "sw2" / "seed0" / "record.json").write_text(json.dumps({**rec, "arch": "sw2"}))
    bad = copy / "broken" / "seed0" / "record.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": 1, "arch": ')
    for png in copy.glob("*.png"):
        png.unlink()
    import warnings

    for args in (["plot", str(copy)], ["compare", str(copy)]):
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # each command is its own process in real use
            res = CliRunner().invoke(make_cli(), args)
        assert res.exit_code == 0, res.output
        assert f"warning: skipping unreadable record {bad}" in res.output and "Traceback" not in res.output
    assert [p.name for p in copy.glob("*.png")] == ["ppl_by_position.png"]  # the primary plot by default
