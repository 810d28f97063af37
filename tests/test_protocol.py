"""Evaluation modes, the metrics of the full protocol, checkpoints and comparisons."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lengen.api import BuildContext, MetricContext, Scores
from lengen.cli import make_cli
from lengen.evaluate import (Scorer, lengths_from_prefix, score_context, score_full, score_nonoverlapping,
                             score_window, window_rows)
from lengen.testing import ContextLengthLM, DecayLM, TinyConfig, context_from_nll
from lengen_sw.model import SlidingWindow, SWConfig

V = 11


def ctx_model():
    arch = ContextLengthLM()
    return arch, arch.build(TinyConfig(), BuildContext(vocab_size=V, window=8))


def zeros(n, L):
    return np.zeros((n, L + 1), dtype=np.int64)


def test_full_mode_sees_whole_prefix():
    arch, m = ctx_model()
    s = score_full(Scorer(m, arch), zeros(2, 40), {})
    assert (context_from_nll(s.nll, V) == np.arange(1, 41)).all()


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_window_mode_sees_at_most_w(stride):
    arch, m = ctx_model()
    W = 8
    s = score_window(Scorer(m, arch), zeros(2, 45), {}, window=W, stride=stride)
    seen = context_from_nll(s.nll, V)
    assert (seen[:, :W] == np.arange(1, W + 1)).all()  # the first W: exactly full mode
    assert seen[:, W:].max() <= W and seen[:, W:].min() >= W - stride + 1
    if stride == 1:
        assert (seen[:, W:] == W).all()  # the exact limit


def test_window_rows_cover_every_column_once():
    seqs = np.arange(51)[None, :]
    cols = []
    for rows, last, col in window_rows(seqs, 8, 3):
        assert rows.shape[1] <= 9
        cols += list(range(col, col + last))
        assert rows[0, -1] == col + last  # the window ends at the last scored target
    assert cols == list(range(50))


def test_nonoverlapping_scores_pieces_from_scratch():
    arch, m = ctx_model()
    scorer = Scorer(m, arch)
    out = score_nonoverlapping(scorer, zeros(3, 40), [10, 16, 64])
    assert set(out) == {10, 16}  # 64 > 40: cannot be filled
    sums, counts = out[10]
    per_piece = np.log1p((V - 1) * np.exp(-0.01 * np.arange(1, 11))).sum()
    assert np.allclose(sums, 4 * per_piece) and (counts == 40).all()
    sums16, counts16 = out[16]
    assert (counts16 == 32).all()  # two pieces of 16; the rest of the sequence is unused


def test_context_curve_uses_the_same_targets():
    arch, m = ctx_model()
    out = score_context(Scorer(m, arch), zeros(2, 40), [2, 8, 100], bucket=4)
    for c, (sums, counts, avail) in out.items():
        assert avail == min(c, 37)
        expect = np.log1p((V - 1) * np.exp(-0.01 * (avail + np.arange(4)))).sum()
        assert np.allclose(sums, expect) and (counts == 4).all()


def sw_model(window=16):
    torch.manual_seed(0)
    arch = SlidingWindow()
    return arch, arch.build(SWConfig(d_model=32, n_heads=2), BuildContext(vocab_size=50, window=window))


def decay_model():
    torch.manual_seed(0)
    arch = DecayLM()
    return arch, arch.build(TinyConfig(), BuildContext(vocab_size=50, window=16))


@pytest.mark.parametrize("make", [sw_model, decay_model])
def test_window_equals_full_at_L_equals_W(make):
    arch, m = make()
    seqs = np.random.default_rng(0).integers(0, 50, size=(3, 17))
    full = score_full(Scorer(m, arch), seqs, {})
    win = score_window(Scorer(m, arch), seqs, {}, window=16, stride=4)
    np.testing.assert_array_equal(win.nll, full.nll)


@pytest.mark.parametrize("make", [sw_model, decay_model])
@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_streaming_in_chunks_equals_one_pass(make, chunk):
    arch, m = make()
    seqs = np.random.default_rng(1).integers(0, 50, size=(2, 161))
    one = score_full(Scorer(m, arch), seqs, {})
    streamed = score_full(Scorer(m, arch, chunk=chunk), seqs, {})
    np.testing.assert_allclose(streamed.nll, one.nll, rtol=1e-5, atol=1e-5)


def test_recurrent_window_mode_differs_beyond_w():
    arch, m = decay_model()
    seqs = np.random.default_rng(2).integers(0, 50, size=(2, 65))
    full = score_full(Scorer(m, arch), seqs, {})
    win = score_window(Scorer(m, arch), seqs, {}, window=16, stride=4)
    assert not np.allclose(win.nll[:, 16:], full.nll[:, 16:])


def test_lengths_from_prefix_and_missing():
    s = Scores(np.ones((2, 10)), np.zeros((2, 10), bool), {})
    out = lengths_from_prefix(s, [4, 10, 20])
    assert set(out) == {4, 10} and (out[4][0] == 4).all()
    from lengen_metrics.core import LengthPerplexity

    s.lengths = out
    res = LengthPerplexity().compute(s, LengthPerplexity.Config(),
                                     MetricContext(window=4, positions=(1,), bucket=2, lengths=(4, 10, 20), bootstrap=20))
    assert res["ppl_len@1W"].value == pytest.approx(np.e)
    assert res["ppl_len@5W"].n == 0 and np.isnan(res["ppl_len@5W"].value)  # recorded as missing


def test_horizon():
    from lengen_metrics.core import PositionPerplexity

    nll = np.full((30, 40), 1.0)
    nll[:, 20:] = 1.5  # degrades after position 20
    rng = np.random.default_rng(0)
    nll += rng.normal(0, 0.01, nll.shape)
    ctx = MetricContext(window=4, positions=(1, 2, 5, 10), bucket=4, bootstrap=100)
    out = PositionPerplexity().compute(Scores(nll, nll > 9, {}), PositionPerplexity.Config(horizon_eps=0.05), ctx)
    assert out["horizon"].value == 5.0
    assert out["ppl_ratio@10W"].value == pytest.approx(np.exp(0.5), rel=0.02)


def test_crossover_detection():
    from lengen.compare import crossovers

    rows = [
        {"step": 0, "position": "10W", "ratio": 1.0, "ci_low": 0.9, "ci_high": 1.1},
        {"step": 100, "position": "10W", "ratio": 0.8, "ci_low": 0.7, "ci_high": 0.9},
        {"step": 200, "position": "10W", "ratio": 1.2, "ci_low": 1.1, "ci_high": 1.3},
        {"step": 300, "position": "10W", "ratio": 0.95, "ci_low": 0.85, "ci_high": 1.05},
    ]
    found = crossovers(rows, "ttt", "sw")
    assert [(c["from_step"], c["to_step"], c["significant"], c["now_ahead"]) for c in found] == [
        (100, 200, True, "sw"), (200, 300, False, "ttt")]


RUN = ["run", "--arch", "sw", "--steps", "4", "--set", "eval.sequences=6", "--set", "eval.bootstrap=50",
       "--set", "data.train_tokens=20000", "--set", "eval.batch_size=6"]


def invoke(args):
    res = CliRunner().invoke(make_cli(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def records(results):
    return [json.loads(p.read_text()) for p in sorted(results.glob("*/*/*/record.json"))]


def test_same_seed_same_numbers(tmp_path):
    invoke(RUN + ["--results", str(tmp_path / "a"), "--no-plot"])
    invoke(RUN + ["--results", str(tmp_path / "b"), "--no-plot"])
    (a,), (b,) = records(tmp_path / "a"), records(tmp_path / "b")
    assert a["evaluations"]["full"]["metrics"] == b["evaluations"]["full"]["metrics"]
    assert a["train"]["losses"] == b["train"]["losses"]
    # one architecture compared across two runs (a suite and its ablation): A from the first run
    (run_a,), (run_b,) = (tmp_path / "a").glob("*/"), (tmp_path / "b").glob("*/")
    cmp = json.loads(invoke(["compare", str(run_a), str(run_b), "--arch", "sw", "--json"]).output)
    assert (cmp["a"], cmp["b"]) == (f"sw ({run_a.name})", f"sw ({run_b.name})")
    assert [r["ratio"] for r in cmp["final"]] == [1.0] * 5 and cmp["final"][0]["verdict"] == "inside the noise"
    res = CliRunner().invoke(make_cli(), ["compare", str(run_a), "--arch", "sw", "--arch", "sw"])
    assert res.exit_code != 0 and "give two runs (a suite and its ablation)" in res.output


def test_two_seeds_aggregate(tmp_path):
    invoke(RUN + ["--results", str(tmp_path), "--seed", "0", "--seed", "1", "--no-plot"])
    rows = json.loads(invoke(["leaderboard", "--results", str(tmp_path), "--format", "json"]).output)
    (row,) = rows
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1]
    recs = {r["seed"]: r for r in records(tmp_path)}
    values = [recs[s]["evaluations"]["full"]["metrics"]["ppl@1W"]["value"] for s in (0, 1)]
    assert values[0] != values[1]  # two seeds really trained two models
    cell = row["ppl@1W"]
    assert cell["value"] == pytest.approx(sum(values) / 2)  # the mean over seeds
    assert cell["sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    half = 12.706 * cell["sd"] / 2 ** 0.5  # Student t, 1 degree of freedom, 95%
    assert cell["ci_low"] == pytest.approx(max(1.0, cell["value"] - half), rel=1e-3)
    assert cell["ci_high"] == pytest.approx(cell["value"] + half, rel=1e-3)
    # each record's wall time is its own job's, not the time since the run started
    run = json.loads(next(tmp_path.glob("*/run.json")).read_text())
    jobs = {j["seed"]: j for j in run["jobs"]}
    for seed in (0, 1):
        assert 0 < recs[seed]["wall_s"] <= jobs[seed]["wall_s"]
    assert recs[0]["wall_s"] + recs[1]["wall_s"] <= run["wall_s"]


def test_modes_checkpoints_compare_and_plots(tmp_path):
    args = ["run", "--arch", "sw", "--arch", "sw2", "--steps", "6", "--results", str(tmp_path),
            "--benchmarks-file", str(tmp_path / "b.toml"), "-b", "mini", "--checkpoints", "5",
            "--mode", "full", "--mode", "window", "--mode", "nonoverlapping"]
    (tmp_path / "b.toml").write_text(
        '[mini]\nwindow = 16\n[mini.data]\ntrain_tokens = 20000\n[mini.train]\nsteps = 6\nbatch_size = 4\n'
        '[mini.eval]\nlength = 4\npositions = [1, 2, 4]\nsequences = 5\nbootstrap = 50\nbucket = 4\nstride = 8\n'
        'lengths = [1, 2, 8]\ncontexts = [0.5, 2]\nbaseline = "window"\n'
        '[mini.arch.sw]\nd_model = 16\nn_heads = 2\n[mini.arch.sw2]\nd_model = 32\nn_heads = 2\n')

    class Sw2:
        from lengen import hookimpl

        @hookimpl
        def lengen_register_architectures(self, registry):
            registry.add("sw2", "lengen_sw.model:SlidingWindow")

    from lengen.plugins import PluginHost

    host = PluginHost(plugins=[("sw2plug", Sw2())])
    res = CliRunner().invoke(make_cli(host), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "paired: ppl sw / ppl sw2" in res.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for png in ("ppl_by_position.png", "ppl_by_length.png", "ppl_by_context.png", "evolution.png",
                "recall_by_distance.png", "excess_nll_by_position.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    rec = json.loads((run_dir / "sw" / "seed0" / "record.json").read_text())
    assert [c["step"] for c in rec["checkpoints"]] == [0, 2, 3, 4, 6]
    assert set(rec["evaluations"]) == {"full", "window", "nonoverlapping"}
    full = rec["evaluations"]["full"]["metrics"]
    assert full["ratio_window@1W"]["value"] == pytest.approx(1.0)
    assert "ppl_ctx@2W" in full and "ppl_len@8W" in full and full["ppl_len@8W"]["value"] is None
    assert "ppl_len@2W" in rec["evaluations"]["nonoverlapping"]["metrics"]
    assert rec["cost"]["flops_per_token"] > 0 and rec["cost"]["peak_eval_memory_bytes"] > 0
    cmp = json.loads(invoke(["compare", str(run_dir), "--json"]).output)
    assert cmp["a"] == "sw" and len(cmp["final"]) == 3 and len(cmp["checkpoints"]) == 5 * 3
    by_pos = {}
    for r in cmp["checkpoints"]:
        by_pos.setdefault(r["position"], []).append(r)
    sign_changes = {(pos, a["step"], b["step"]) for pos, rs in by_pos.items()
                    for a, b in zip(rs, rs[1:]) if (a["ratio"] - 1) * (b["ratio"] - 1) < 0}
    assert {(c["position"], c["from_step"], c["to_step"]) for c in cmp["crossovers"]} == sign_changes
    out = invoke(["plot", str(run_dir), "--kind", "evolution", "--out", str(tmp_path / "e.png")])
    assert (tmp_path / "e.png").exists() and "e.png" in out.output
    # the leaderboard keeps modes apart
    rows = json.loads(invoke(["leaderboard", "--results", str(tmp_path), "--format", "json"]).output)
    assert {(r["arch"], r["mode"]) for r in rows} == {(a, m) for a in ("sw", "sw2")
                                                      for m in ("full", "window", "nonoverlapping")}
    assert all("ppl@1W" not in r for r in rows if r["mode"] == "nonoverlapping")


def test_early_stopping(tmp_path):
    (tmp_path / "b.toml").write_text(
        '[mini]\nwindow = 16\n[mini.data]\ntrain_tokens = 20000\n[mini.train]\nsteps = 40\nbatch_size = 2\n'
        'lr = 1e-9\nearly_stopping = {patience = 2, min_delta = 1.0, metric = "ppl@1W"}\n'
        '[mini.eval]\nlength = 2\npositions = [1, 2]\nsequences = 3\nbootstrap = 10\nbucket = 4\ncheckpoints = 9\n'
        '[mini.arch.sw]\nd_model = 16\nn_heads = 2\n')
    invoke(["run", "--arch", "sw", "-b", "mini", "--benchmarks-file", str(tmp_path / "b.toml"),
            "--results", str(tmp_path), "--no-plot"])
    (rec,) = records(tmp_path)
    assert rec["train"]["stopped_early_at"] == 10  # no improvement at checkpoints 5 and 10
    assert rec["train"]["steps"] == 10 and len(rec["checkpoints"]) == 3


def test_bench_eval_command():
    res = invoke(["bench", "eval", "--arch", "sw", "--lengths", "1,4", "--repeats", "1", "--json",
                  "--set", "data.train_tokens=2000", "--set", "eval.sequences=1"])
    out = json.loads(res.output)
    assert [r["multiple"] for r in out["rows"]] == [1.0, 4.0]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in out["rows"])


def test_live_tensor_memory_is_deterministic():
    from lengen.measure import LiveTensorMemory

    def work():
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(2000)  # 8000 bytes, both alive
        del a
        c = torch.ones(500)
        return b, c

    with LiveTensorMemory() as t:
        work()
    assert t.peak == 12000


def test_output_stats_are_averaged_over_evaluated_tokens():
    from lengen.testing import TwoSpeedLM

    arch = TwoSpeedLM()
    m = arch.build(TinyConfig(), BuildContext(vocab_size=V, window=8))
    scorer = Scorer(m, arch, batch_tokens=40)
    score_full(scorer, np.zeros((3, 21), dtype=np.int64), {})
    assert scorer.stats() == {"flops": 2.0} and scorer.stat_count == 3 * 20


class _Recording(DecayLM):
    """DecayLM that remembers how many tokens each forward was given."""

    seen = []

    def build(self, config, ctx):
        model = super().build(config, ctx)
        inner = model.forward

        def forward(input_ids, state=None):
            _Recording.seen.append(input_ids.shape[1])
            return inner(input_ids, state)

        model.forward = forward
        return model


def test_full_mode_streams_stateful_models_in_chunks_of_eval_chunk():
    from lengen.evaluate import evaluate_model
    from lengen.suites import validate_suite

    arch = _Recording()
    torch.manual_seed(0)
    model = arch.build(TinyConfig(), BuildContext(vocab_size=V, window=8))
    seqs = np.random.default_rng(0).integers(0, V, size=(4, 8 * 20 + 1))
    suite = validate_suite("s", {"window": 8, "train": {"steps": 1}, "eval": {"bucket": 4, "stride": 4}})
    mctx = MetricContext(window=8, positions=(1, 20), bucket=4, bootstrap=0)
    for chunk, expect in ((None, 8), (24, 24)):
        _Recording.seen = []
        s = suite.model_copy(update={"eval": suite.eval.model_copy(update={"chunk": chunk})})
        ev = evaluate_model(model, arch, s, seqs, {}, modes=["full"], metrics=[], mctx=mctx, device="cpu",
                            autocast=None, measure_memory=True)["full"]
        assert max(_Recording.seen) == expect and ev.info["chunk"] == expect
        assert ev.info["peak_memory_bytes"] > 0 and ev.info["memory_method"] == "live_tensors"
        one = score_full(Scorer(model, arch, chunk=10 ** 6), seqs, {})
        np.testing.assert_allclose(ev.scores.nll, one.nll, rtol=1e-5, atol=1e-6)  # equal to one pass


def test_variants_evaluate_one_training_under_several_configs_with_calibration(tmp_path):
    """One training, one record per variant (own leaderboard row, shared weights), calibrated
    on training-split sequences; per-token stats by position; FLOPs at each reported length."""
    from lengen import hookimpl
    from lengen.plugins import PluginHost

    class Plug:
        @hookimpl
        def lengen_register_architectures(self, registry):
            registry.add("sharp", "lengen.testing:SharpLM", defaults={"sharpnesses": [1.0, 2.0]})

    res = CliRunner().invoke(make_cli(PluginHost(plugins=[("sharpplug", Plug())])), RUN[:1] + [
        "--arch", "sharp", "--results", str(tmp_path), "--no-plot", *RUN[3:], "--set", "eval.calibration=3"])
    assert res.exit_code == 0, res.output
    recs = {r["arch"]: r for r in records(tmp_path)}
    assert set(recs) == {"sharp.x1", "sharp.x2"}
    a, b = recs["sharp.x1"], recs["sharp.x2"]
    assert a["model"]["name"] == "sharp" and (a["model"]["variant"], b["model"]["variant"]) == ("x1", "x2")
    assert a["model"]["config"]["sharpness"] == 1.0 and b["model"]["config"]["sharpness"] == 2.0
    assert a["calibration"] == {**a["calibration"], "sequences": 3, "length": 64 * 20 + 1}
    assert a["weights"] == "model.safetensors" and b["weights"] == "../../sharp.x1/seed0/model.safetensors"
    assert not list(tmp_path.glob("*/sharp.x2/seed0/model.safetensors"))
    ma, mb = a["evaluations"]["full"]["metrics"], b["evaluations"]["full"]["metrics"]
    assert ma["ppl@1W"]["value"] != mb["ppl@1W"]["value"]  # the same weights, evaluated differently
    assert ma["stat.sharpness@1W"]["value"] == 1.0 and mb["stat.sharpness@20W"]["value"] == 2.0
    assert len(a["evaluations"]["full"]["series"]["stat.sharpness_by_position"]["x"]) == 1280 // 16
    scores = np.load(next(tmp_path.glob("*/sharp.x2/seed0/scores-full.npz")))
    assert scores["stat_sharpness"].shape == scores["nll"].shape and (scores["stat_sharpness"] == 2.0).all()
    assert [f["multiple"] for f in a["cost"]["flops_by_length"]] == [1, 2, 5, 10, 20]
    assert all(f["per_token"] > 0 for f in a["cost"]["flops_by_length"])
    rows = json.loads(invoke(["leaderboard", "--results", str(tmp_path), "--format", "json"]).output)
    assert [(r["arch"], r["stat.sharpness"]["value"]) for r in rows] == [("sharp.x1", 1.0), ("sharp.x2", 2.0)]
