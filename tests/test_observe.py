"""Watching, logging, generating and sharing runs: plain progress lines, `lengen status`,
trackers (tensorboard, read back), `lengen generate`, the training plot, `lengen report`."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from lengen.cli import make_cli
from lengen.results import atomic_write_json

from test_cli import _Plugins

FAST = ["--steps", "3", "--set", "eval.sequences=3", "--set", "eval.bootstrap=10", "--set", "data.train_tokens=8000",
        "--set", "eval.length=2", "--set", "eval.positions=[1, 2]"]
SMALL_SW = ["--window", "16", "--set", "arch.sw.d_model=16", "--set", "arch.sw.n_heads=2", "--set", "arch.sw.n_layers=1",
            "--set", "train.batch_size=2", "--set", "eval.batch_size=3", "--set", "eval.bucket=8"]


def fakes_cli():
    from lengen.plugins import PluginHost

    return make_cli(PluginHost(plugins=[("fakes", _Plugins())]))


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """One short run of sw (stateful) and a bigram model (stateless), with two checkpoints,
    tensorboard logging and plots, its output not a terminal: shared by the tests below."""
    pytest.importorskip("tensorboard", reason="the tensorboard tracker needs: pip install 'lengen[tensorboard]'")
    results = tmp_path_factory.mktemp("observed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENGEN_PROGRESS_EVERY", "0")  # a line at every step
        res = CliRunner().invoke(fakes_cli(), ["run", "--arch", "sw", "--arch", "bigram", "--results", str(results),
                                               *FAST, *SMALL_SW, "--checkpoints", "2", "--log-with", "tensorboard"])
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    rec = {a: json.loads((run_dir / a / "seed0" / "record.json").read_text()) for a in ("sw", "bigram")}
    return results, run_dir, res.output, rec


# ---------------------------------------------------------------------------------------
# progress without a terminal


def test_progress_lines_without_a_terminal(observed):
    _results, _run_dir, out, rec = observed
    stamp = r"^\d\d:\d\d:\d\d "
    assert re.search(stamp + r"loading dataset 'synthetic' \.\.\.$", out, re.M)
    assert re.search(stamp + r"train sw seed 0: start, 3 to do$", out, re.M)
    steps = re.findall(stamp + r"train sw seed 0  (\d)/3 \(\d+%\)  loss (\d+\.\d{3})  ([\d,]+) tok/s  "
                               r"elapsed \d+:\d\d  eta \d+:\d\d$", out, re.M)
    assert [s for s, _l, _t in steps] == ["1", "2"]  # step 3 is the "done" line
    assert float(steps[0][1]) == pytest.approx(rec["sw"]["train"]["losses"][0]["loss"], abs=5e-4)
    assert re.search(stamp + r"train sw seed 0: done, 3/3 in \d+:\d\d  loss \d+\.\d{3}", out, re.M)
    assert re.search(stamp + r"ckpts sw seed 0: done, 2/2 in", out, re.M)
    assert re.search(stamp + r"eval  bigram seed 0: done, 1/1 in \d+:\d\d  full$", out, re.M)
    assert re.search(stamp + r"writing plots: done in", out, re.M)


def test_plain_progress_prints_long_tasks_at_an_interval():
    from rich.console import Console

    from lengen.progress import PlainProgress, make_progress

    buf = io.StringIO()
    console = Console(file=buf, width=200)
    assert isinstance(make_progress(console), PlainProgress)  # a StringIO is not a terminal
    with PlainProgress(console, every=30) as p:
        long = p.add_task("train x", total=500, info="")
        for step in range(1, 501):
            p.update(long, completed=step, info=f"loss {1 / step:.3f}")
        short = p.add_task("eval x", total=3, info="full")
        for _ in range(3):
            p.update(short, advance=1)
    lines = [line.split(" ", 1)[1] for line in buf.getvalue().splitlines()]
    assert lines[0] == "train x: start, 500 to do"
    assert lines[1].startswith("train x  1/500 (0%)  loss 1.000  elapsed 0:00  eta ")
    assert lines[2].startswith("train x: done, 500/500 in 0:00  loss 0.002")
    assert lines[3:] == ["eval x: start, 3 to do (full)", "eval x  1/3 (33%)  full  elapsed 0:00  eta 0:00",
                         "eval x  2/3 (67%)  full  elapsed 0:00  eta 0:00"] + [lines[6]]
    assert lines[6].startswith("eval x: done, 3/3 in 0:00") and len(lines) == 7


# ---------------------------------------------------------------------------------------
# trackers


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_tensorboard_holds_the_steps_the_checkpoints_and_the_positions(observed):
    _results, run_dir, _out, rec = observed
    ea = _events(run_dir / "tensorboard" / "sw-seed0" / "lengen")
    r = rec["sw"]
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert loss[0].value == pytest.approx(r["train"]["losses"][0]["loss"], abs=1e-5)
    assert loss[2].value == pytest.approx(r["train"]["losses"][-1]["loss"], abs=1e-5)
    lr = {e.step: e.value for e in ea.Scalars("train/lr")}
    assert [x["step"] for x in r["train"]["losses"]] == [1, 3]  # the record keeps every 10th step and the last
    assert [lr[x["step"]] for x in r["train"]["losses"]] == pytest.approx([x["lr"] for x in r["train"]["losses"]],
                                                                          rel=1e-6)
    assert len(ea.Scalars("train/tokens_per_s")) == 3
    # every checkpoint, one scalar per position
    for key in ("ppl@1W", "ppl@2W"):
        got = ea.Scalars(f"eval/{key.replace('@', '_at_')}")
        assert [e.step for e in got] == [c["step"] for c in r["checkpoints"]] == [0, 3]
        assert [e.value for e in got] == pytest.approx([c["metrics"][key]["value"] for c in r["checkpoints"]],
                                                       rel=1e-6)
    final = ea.Scalars("final/full/ppl_at_2W")
    assert final[0].step == 3 and final[0].value == pytest.approx(
        r["evaluations"]["full"]["metrics"]["ppl@2W"]["value"], rel=1e-6)
    curve = ea.Scalars("curve/full/ppl_by_position")
    series = r["evaluations"]["full"]["series"]["ppl_by_position"]
    assert [e.step for e in curve] == [round(x * 16) for x in series["x"]] == [8, 16, 24, 32]
    assert [e.value for e in curve] == pytest.approx([v["value"] for v in series["values"]], rel=1e-6)
    images = ea.Tags()["images"]
    assert {"plots/ppl_by_position", "plots/training", "plots/evolution"} <= set(images)
    # the other job is its own tracker run
    other = _events(run_dir / "tensorboard" / "bigram-seed0" / "lengen")
    other_loss = {e.step: e.value for e in other.Scalars("train/loss")}
    assert [other_loss[x["step"]] for x in rec["bigram"]["train"]["losses"]] == pytest.approx(
        [x["loss"] for x in rec["bigram"]["train"]["losses"]], abs=1e-5)
    assert json.loads((run_dir / "run.json").read_text())["log_with"] == ["tensorboard"]


def test_a_tracker_that_is_missing_or_misspelt_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for value, expected in (("wandb", "Error: --log-with wandb needs the wandb package: pip install 'lengen[wandb]'"),
                            ("tensorbord", "Error: --log-with: unknown tracker 'tensorbord'. Did you mean "
                                           "'tensorboard'?")):
        res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "--results", str(tmp_path / "r"),
                                              "--log-with", value, *FAST])
        assert res.exit_code == 2, res.output
        assert res.output.strip().splitlines()[-1] == expected or expected in res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "r").exists()  # nothing started


def test_a_tracker_that_fails_while_logging_is_said_once_and_training_goes_on(tmp_path):
    from types import SimpleNamespace

    from lengen.suites import TrainSpec
    from lengen.trackers import Trackers

    class Accelerator:
        trackers, calls = [], 0

        def log(self, values, step=None):
            Accelerator.calls += 1
            raise OSError("No space left on device")

    said = []
    t = Trackers(Accelerator(), [], tmp_path, "run", SimpleNamespace(train=TrainSpec(steps=10)), say=said.append)
    t.job = "sw-seed0"
    for step in (1, 2, 3):
        t.log_step(step, {"loss": 2.0, "tokens_per_s": 100.0})
    t.log_checkpoint(3, {"ppl@1W": {"value": 9.0}})
    assert Accelerator.calls == 1 and said == [
        "warning: --log-with: OSError while logging sw-seed0 at step 1: No space left on device; this job logs no more"]


def test_wandb_without_network_runs_offline_and_says_so(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'lengen[wandb]')")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = CliRunner().invoke(make_cli(), ["run", "--arch", "sw", "--results", str(tmp_path), *FAST, *SMALL_SW,
                                          "--no-plot", "--log-with", "wandb"])
    assert res.exit_code == 0, res.output
    assert "wandb: no network (127.0.0.1:9 unreachable" in res.output and "(WANDB_MODE=offline)" in res.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert list((run_dir / "wandb").glob("offline-run-*")), sorted(p.name for p in (run_dir / "wandb").iterdir())
    assert os.environ["WANDB_MODE"] == "offline"


# ---------------------------------------------------------------------------------------
# lengen status


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


SPECS = [{"key": "ppl@*W", "better": "lower", "leaderboard": True, "table": "all", "status": ["1W", "10W"]},
         {"key": "recall@>W", "better": "higher", "leaderboard": True, "table": "all"}]


def _run(root, name, status, jobs, **extra):
    run_dir = root / name
    atomic_write_json(run_dir / "run.json", {"run_id": name, "status": status, "benchmark": "tiny", "archs": ["sw"],
                                             "seeds": [0], "started": time.time() - 600, "jobs": jobs,
                                             "metric_plugins": {"ppl": {"outputs": SPECS}}, **extra})
    return run_dir


def _record(run_dir, arch, values, specs=SPECS):
    metrics = {k: {"value": v} for k, v in values.items()}
    atomic_write_json(run_dir / arch / "seed0" / "record.json", {
        "schema": 1, "benchmark": "tiny", "arch": arch, "seed": 0, "model": {}, "dataset": {},
        "evaluations": {"full": {"metrics": metrics, "eval": {"mode": "full"}}},
        "metric_plugins": {"ppl": {"outputs": specs}}})
    return f"{arch}/seed0/record.json"


def test_status_names_every_state(tmp_path):
    import socket

    from lengen.results import process_start

    root = tmp_path / "results"
    job = lambda arch, status, **kw: {"arch": arch, "seed": 0, "status": status, "step": None,  # noqa: E731
                                      "error": None, "record": None, **kw}
    # finished, with a record
    fin = _run(root, "a-finished", "finished", [], wall_s=125.0)
    rel = _record(fin, "sw", {"ppl@1W": 9.25, "ppl@2W": 9.5, "ppl@10W": 9.75, "recall@>W": 0.5})
    atomic_write_json(fin / "run.json", {**json.loads((fin / "run.json").read_text()),
                                         "jobs": [job("sw", "finished", record=rel, wall_s=125.0)]})
    # running: this very process, 100 of 400 steps in 100 s, one job to go, a checkpoint evaluated
    now = time.time()
    run = _run(root, "b-running", "running", [job("sw", "finished", record=_record(root / "b-running", "sw",
                                                                                    {"ppl@1W": 8.0, "ppl@10W": 8.5}),
                                                   wall_s=500.0),
                                              job("ttt", "running"), job("ttt", "pending", seed=1)],
               pid=os.getpid(), host=socket.gethostname())
    atomic_write_json(run / "heartbeat.json", {
        "pid": os.getpid(), "pid_start": process_start(os.getpid()), "host": socket.gethostname(), "time": now,
        "job": "ttt seed 0", "phase": "training", "step": 100, "steps": 400, "loss": 2.5, "tokens_per_s": 1234.0,
        "job_started": now - 100, "checkpoints": 5, "checkpoints_done": 2, "metrics_step": 100,
        "metrics": {"ppl@1W": 11.0, "ppl@2W": 12.0, "ppl@10W": 13.0, "recall@>W": 0.1}})
    # killed with SIGKILL: still says running, its process is gone
    dead = _dead_pid()
    _run(root, "c-killed", "running", [job("sw", "running")], pid=dead, host=socket.gethostname())
    atomic_write_json(root / "c-killed" / "heartbeat.json", {"pid": dead, "host": socket.gethostname(), "time": now})
    _run(root, "d-diverged", "diverged", [job("sw", "diverged", step=7, error="sw seed 0: the loss became nan at "
                                                                               "step 7 (seed 0); lower train.lr")])
    _run(root, "e-failed", "failed", [job("sw", "failed", step=3, error="ValueError: bad shape (traceback in "
                                                                         "sw/seed0/error.txt)")])
    _run(root, "f-interrupted", "interrupted", [job("sw", "interrupted", step=2, error="terminated (SIGTERM)")],
         error="terminated (SIGTERM)")
    t0 = time.perf_counter()
    res = CliRunner().invoke(make_cli(), ["status", str(root), "--json"])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    rows = {r["run_id"]: r for r in json.loads(res.output)}
    assert {k: r["state"] for k, r in rows.items()} == {
        "a-finished": "finished", "b-running": "running", "c-killed": "terminated", "d-diverged": "diverged",
        "e-failed": "failed", "f-interrupted": "interrupted"}
    a = rows["a-finished"]
    assert (a["jobs_done"], a["jobs"], a["elapsed_s"]) == (1, 1, 125.0)
    assert a["latest"] == [{"arch": "sw", "source": "seed 0, full mode", "values": {"ppl@1W": 9.25, "ppl@10W": 9.75}}]
    b = rows["b-running"]
    assert (b["jobs_done"], b["jobs"], b["jobs_to_do"]) == (1, 3, 2)
    assert b["current"]["job"] == "ttt seed 0" and (b["current"]["step"], b["current"]["steps"]) == (100, 400)
    assert (b["current"]["checkpoints_done"], b["current"]["checkpoints"]) == (2, 5)
    # 300 steps left at 1 step/s, then one job like the finished one (500 s)
    assert b["eta_s"] == pytest.approx(300 + 500, abs=1)
    assert b["elapsed_s"] == pytest.approx(600, abs=30)
    assert {v["arch"]: v["values"] for v in b["latest"]} == {"ttt": {"ppl@1W": 11.0, "ppl@10W": 13.0},
                                                             "sw": {"ppl@1W": 8.0, "ppl@10W": 8.5}}
    assert f"its process {dead} is gone" in rows["c-killed"]["why"]
    assert rows["d-diverged"]["problems"] == ["sw seed 0: diverged at step 7: sw seed 0: the loss became nan at step 7 "
                                              "(seed 0); lower train.lr"]
    assert rows["e-failed"]["problems"] == ["sw seed 0: failed at step 3: ValueError: bad shape (traceback in "
                                            "sw/seed0/error.txt)"]
    assert seconds < 1.0, f"lengen status took {seconds:.2f} s"
    # the table says the same
    out = CliRunner(env={"COLUMNS": "250"}).invoke(make_cli(), ["status", "--results", str(root)]).output
    lines = {line.split()[1]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in (
        "finished", "running", "terminated", "diverged", "failed", "interrupted")}
    assert set(lines) == set(rows)
    assert "ttt seed 0: training step 100/400, loss 2.500, 1,234 tok/s" in lines["b-running"]
    assert re.search(r"\b2/5\b", lines["b-running"]) and re.search(r"\b13:20\b", lines["b-running"])  # ckpts, eta
    assert "ttt: ppl@1W 11, ppl@10W 13" in lines["b-running"]
    assert "sw: ppl@1W 9.25, ppl@10W 9.75" in lines["a-finished"]
    assert "e-failed: sw seed 0: failed at step 3: ValueError: bad shape" in out
    # a process of its own: status reads these runs (records included) without importing torch
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lengen.cli import make_cli\n"
            f"r = CliRunner().invoke(make_cli(), ['status', {str(root)!r}])\n"
            "assert r.exit_code == 0 and 'b-running' in r.output, r.output\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    # RESULTS and --results must agree
    both = CliRunner().invoke(make_cli(), ["status", str(root), "--results", str(tmp_path)])
    assert both.exit_code == 2 and "two results folders given" in both.output


def test_status_values_come_from_the_declared_specs():
    from lengen.api import OutputSpec
    from lengen.status import status_keys

    names = ["ppl@1W", "ppl@2W", "ppl@10W", "ppl@20W", "recall@>W", "ppl_ratio@20W"]
    specs = [OutputSpec("ppl@*W", better="lower", table="all", status=("1W", "10W")),
             OutputSpec("recall@>W", better="higher", table="all", status="all")]
    assert status_keys(specs, names) == ["ppl@1W", "ppl@10W", "recall@>W"]
    last = [OutputSpec("ppl@*W", better="lower", table="all", status="last")]
    assert status_keys(last, names) == ["ppl@20W"]
    # records written before specs had `status`: the 1W and 10W of the first better table family
    old = [OutputSpec("ppl_ratio@*W", table="last"), OutputSpec("ppl@*W", better="lower", table="all")]
    assert status_keys(old, names) == ["ppl@1W", "ppl@10W"]
    assert status_keys(old, ["ppl@2W", "ppl@5W", "ppl@20W"]) == ["ppl@2W", "ppl@20W"]
    assert OutputSpec.from_dict({"key": "x@*W", "status": ["1W"]}).status == ("1W",)


def test_status_of_the_observed_run(observed):
    results, run_dir, _out, rec = observed
    (row,) = json.loads(CliRunner().invoke(make_cli(), ["status", str(results), "--json"]).output)
    assert (row["state"], row["jobs_done"], row["jobs"], row["current"]) == ("finished", 2, 2, None)
    assert {v["arch"]: v["values"] for v in row["latest"]} == {
        a: {"ppl@1W": rec[a]["evaluations"]["full"]["metrics"]["ppl@1W"]["value"]} for a in ("sw", "bigram")}


# ---------------------------------------------------------------------------------------
# lengen generate


def _one_pass_argmax(host, run_dir, arch, prompt, ids):
    """What the model predicts at each position of prompt + ids in one pass, from scratch."""
    import torch

    from lengen.api import as_output
    from lengen.generate import find_record, load_model

    m = load_model(host, find_record(run_dir, arch))
    with torch.no_grad():
        logits = as_output(m.model(torch.tensor([prompt + ids[:-1]]), None)).logits[0]
    return logits[len(prompt) - 1:].argmax(-1).tolist()


@pytest.mark.parametrize("arch", ["sw", "bigram"])  # stateful (state carried) and stateless (window re-fed)
def test_greedy_generation_is_what_one_pass_predicts(observed, arch):
    _results, run_dir, _out, rec = observed
    res = CliRunner().invoke(fakes_cli(), ["generate", str(run_dir), "--arch", arch, "--prompt", "SET k3 v7 w1 GET k3",
                                   "--tokens", "12", "--temperature", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["prompt_ids"] == [1, 3 + 3, 3 + 16 + 7, 3 + 16 + 32 + 1, 2, 3 + 3] and len(out["ids"]) == 12
    from lengen.plugins import PluginHost

    host = PluginHost(plugins=[("fakes", _Plugins())])
    assert out["ids"] == _one_pass_argmax(host, run_dir, arch, out["prompt_ids"], out["ids"])
    from lengen_synthetic.language import SyntheticConfig, make_language

    assert out["text"] == " " + make_language(SyntheticConfig(**rec[arch]["dataset"]["config"]), 0).decode(out["ids"])


def test_generate_streams_text(observed):
    _results, run_dir, _out, _rec = observed
    args = ["generate", str(run_dir), "--arch", "sw", "--tokens", "8", "--sampling-seed", "3"]
    streamed = CliRunner().invoke(make_cli(), args + ["--stream"])
    whole = CliRunner().invoke(make_cli(), args)
    assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output + whole.output
    text, stats = streamed.output.splitlines()  # the text (stdout), then the speed (stderr)
    words = text.split()
    assert words[0] == "<bos>" and len(words) == 9 and all(re.fullmatch(r"<bos>|SET|GET|[kvw]\d+", w) for w in words)
    assert whole.output.splitlines()[0] == text  # the same seed gives the same text
    assert re.fullmatch(r"8 tokens in \d+\.\d\d s \([\d,]+ tokens/s\): sw seed 0 of " + run_dir.name, stats)


@pytest.mark.parametrize("args,expected", [
    (["--arch", "sw", "--prompt", "SET k99"], "Error: --prompt: 'k99' is not a word of this synthetic language; its words are <bos>, "
                              "SET, GET, k0..k15 (keys), v0..v31 (values), w0..w63 (filler)"),
    (["--arch", "ttt"], "has no record of 'ttt'; it has: bigram seed 0, sw seed 0"),
    ([], "holds several architectures (bigram, sw); pick one with --arch"),
    (["--arch", "sw", "--top-p", "1.5"], "Error: --top-p 1.5: use a probability mass in (0, 1]"),
    (["--arch", "sw", "--temperature", "-1"], "Error: --temperature -1.0: use 0 (greedy) or a positive number"),
])
def test_generate_bad_input_is_one_line(observed, args, expected):
    _results, run_dir, _out, _rec = observed
    res = CliRunner().invoke(make_cli(), ["generate", str(run_dir), *args])
    assert res.exit_code == 2, res.output
    assert expected in res.output and "Traceback" not in res.output


def test_sampling():
    import torch

    from lengen.generate import sample

    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, gen, temperature=0) == 1
    assert {sample(logits, gen, top_k=1) for _ in range(20)} == {1}
    assert {sample(logits, gen, top_p=0.01) for _ in range(20)} == {1}
    assert {sample(logits, gen, top_k=2) for _ in range(200)} == {1, 3}
    # top-p 0.93: the smallest set of the most likely tokens holding 93% (here 1, 3 and 2)
    p = torch.softmax(logits, -1)
    assert float(p[1] + p[3]) < 0.93 < float(p[1] + p[3] + p[2])
    assert {sample(logits, gen, top_p=0.93) for _ in range(400)} == {1, 2, 3}
    counts = np.bincount([sample(logits, gen, temperature=1.0) for _ in range(4000)], minlength=5) / 4000
    assert counts == pytest.approx(p.numpy(), abs=0.03)


def test_detokenizer_streams_pieces_that_add_up():
    from lengen.generate import Detokenizer

    words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731 - the synthetic language's way
    d = Detokenizer(words, [1, 2])
    assert [d.push(t) for t in (3, 4, 5)] == [" w3", " w4", " w5"]
    blob = "naïve café".encode()  # a byte tokenizer: multi-byte characters arrive in pieces
    as_bytes = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    d = Detokenizer(as_bytes, list(blob[:1]))
    pieces = [d.push(b) for b in blob[1:]]
    assert "".join(pieces) == blob[1:].decode() and "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "ï"  # the first byte of ï waits for the second


def test_synthetic_encode_is_the_inverse_of_decode():
    from lengen_synthetic.language import SyntheticConfig, make_language

    lang = make_language(SyntheticConfig(), 0)
    text = "<bos> SET k15 v31 w95 GET k0 v0"
    assert lang.decode(lang.encode(text)) == text
    with pytest.raises(ValueError, match="'v32' is not a word"):
        lang.encode("SET k1 v32")


# ---------------------------------------------------------------------------------------
# plots


def test_training_plot_is_written_with_the_run(observed):
    _results, run_dir, out, _rec = observed
    assert (run_dir / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot:    {run_dir / 'training.png'}" in out
    res = CliRunner().invoke(make_cli(), ["plot", str(run_dir), "--kind", "training", "--out",
                                          str(run_dir / "t2.png")])
    assert res.exit_code == 0 and (run_dir / "t2.png").stat().st_size > 10_000


def test_position_plot_is_scaled_to_the_curves_not_the_references(monkeypatch, tmp_path):
    from lengen import plots
    from lengen.api import PlotSpec

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    xs = [0.25 * i for i in range(1, 81)]
    curve = lambda base: {"x": xs, "x_unit": "W", "values": [  # noqa: E731
        {"value": base + 0.1 * np.sin(x), "ci_low": base - 0.3, "ci_high": base + 0.3} for x in xs]}
    specs = [{"key": "ppl_unigram@*W", "reference": "position", "label": "unigram"}]
    recs = [{"arch": a, "seed": 0, "benchmark": "tiny", "protocol": {"window": 64},
             "metric_plugins": {"m": {"outputs": specs}},
             "evaluations": {"full": {"series": {"ppl_by_position": curve(base)},
                                      "metrics": {f"ppl_unigram@{k}W": {"value": 57.0 + k} for k in (1, 2, 5)}}}}
            for a, base in (("sw", 9.0), ("ttt", 8.6))]
    plots.plot_curves(recs, tmp_path / "p.png", PlotSpec("ppl_by_position", kind="position", filename="p.png"))
    ax = figs[0].axes[0]
    lo, hi = ax.get_ylim()
    assert 8.0 < lo < 8.3 and 9.3 < hi < 9.6  # the curves and their bands fill the axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "unigram (at k x W); above the axes: 58, 59, 62" in labels
    assert plots.y_limits([[1.0, 10.0]], log=True) == pytest.approx((10 ** -0.06, 10 ** 1.06))


# ---------------------------------------------------------------------------------------
# lengen report


def test_report_is_one_self_contained_file(observed, tmp_path):
    from lengen.compare import paired_ratios
    from lengen.results import read_record

    results, run_dir, _out, _rec = observed
    out = tmp_path / "report.html"
    res = CliRunner().invoke(make_cli(), ["report", str(results), "-o", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert re.findall(r"(?:src|href)=\"(?!data:image/png;base64,|#)[^\"]*\"", page) == []  # nothing to fetch
    assert "<link" not in page and "@import" not in page and "url(" not in page
    imgs = re.findall(r'<img alt="(\w+) plot of', page)
    assert sorted(imgs) == sorted(["position", "length", "recall", "excess", "evolution", "training"])
    assert page.count('<table class="sortable">') == 1
    # the leaderboard row of sw, and the paired comparison sw / bigram with its interval
    sw = read_record(run_dir / "sw" / "seed0" / "record.json")
    bigram = read_record(run_dir / "bigram" / "seed0" / "record.json")
    assert f"{sw['evaluations']['full']['metrics']['ppl@2W']['value']:.2f}" in page
    ratio = paired_ratios(sw, bigram, "full")[1]
    assert (f"<tr><td class=\"text\">2W</td><td>{ratio['ratio']:.3f}</td><td>{ratio['ci_low']:.3f} – "
            f"{ratio['ci_high']:.3f}</td><td class=\"text\">{ratio['verdict']}</td></tr>") in page
    assert "@media (max-width: 640px)" in page and "@media print" in page
    assert sw["provenance"]["packages"]["torch"] in page and "tensorboard" in page  # provenance, trackers
    assert f"report: {out} (" in res.output
    bad = CliRunner().invoke(make_cli(), ["report", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such results folder" in bad.output


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless check needs Debian's chromium package (apt-get install chromium)")
def test_report_renders_in_headless_chromium(observed, tmp_path):
    results, _run_dir, _out, _rec = observed
    out = tmp_path / "report.html"
    assert CliRunner().invoke(make_cli(), ["report", str(results), "-o", str(out)]).exit_code == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=3000"]
    proc = subprocess.run([shutil.which("chromium"), *flags, "--dump-dom", out.as_uri()], capture_output=True,
                          text=True, timeout=120)
    dom = proc.stdout
    assert 'data-ready="1"' in dom, proc.stderr[-2000:]  # the inline script ran to its end
    assert dom.count('<table class="sortable">') == 1 and dom.count("data:image/png;base64,") == 6
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
