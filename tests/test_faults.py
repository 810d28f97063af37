"""Faults that could lose or falsify work, and bad input that must get one clear line."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from lengen.cli import make_cli
from lengen.results import atomic_write_json, run_state

FAST = ["--steps", "3", "--set", "eval.sequences=3", "--set", "eval.bootstrap=10", "--set", "data.train_tokens=8000",
        "--set", "eval.length=2", "--set", "eval.positions=[1, 2]", "--no-plot"]
SMALL_SW = ["--window", "16", "--set", "arch.sw.d_model=16", "--set", "arch.sw.n_heads=2", "--set", "arch.sw.n_layers=1",
            "--set", "train.batch_size=2", "--set", "eval.batch_size=3", "--set", "eval.bucket=8"]


def invoke(args, cli=None):
    return CliRunner().invoke(cli or make_cli(), args)


# ---------------------------------------------------------------------------------------
# the causality check is keyed on the plugin's code


def test_an_edited_model_file_is_checked_again(tmp_path, monkeypatch, fake_dist):
    monkeypatch.setenv("LENGEN_CACHE", str(tmp_path / "cache"))
    root = fake_dist("fakeplug-edit", {"fakeedit": "fakeplug_edit"}, {})
    pkg = root / "fakeplug_edit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from lengen import hookimpl

        @hookimpl
        def lengen_register_architectures(registry):
            registry.add("editable", "fakeplug_edit.model:Model")
    """))
    (pkg / "model.py").write_text("from lengen.testing import BigramLM as Model\n")
    args = ["run", "--arch", "editable", "--results", str(tmp_path / "r"), *FAST]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    (key,) = json.loads((tmp_path / "cache" / "checks.json").read_text())
    # the model file changes (it now peeks at the next token): the cached pass no longer vouches for it
    (pkg / "model.py").write_text("from lengen.testing import LeakyLM as Model  # now it cheats\n")
    for name in [m for m in sys.modules if m.startswith("fakeplug_edit")]:
        del sys.modules[name]
    res = invoke(args)
    assert res.exit_code == 2, res.output
    assert "architecture 'editable' (plugin 'fakeedit' from fakeplug-edit 0.1) failed the causality check" in res.output
    # a changed config is checked again too, and passes again once the file is honest
    (pkg / "model.py").write_text("from lengen.testing import BigramLM as Model  # honest again\n")
    for name in [m for m in sys.modules if m.startswith("fakeplug_edit")]:
        del sys.modules[name]
    res = invoke(args + ["--set", "arch.editable.d_model=8"])
    assert res.exit_code == 0, res.output
    keys = json.loads((tmp_path / "cache" / "checks.json").read_text())
    assert len(keys) == 2 and key in keys


# ---------------------------------------------------------------------------------------
# SIGTERM, a killed process, permissions


def _lengen(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "lengen.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(predicate, timeout=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _heartbeat(results):
    for p in results.glob("*/heartbeat.json"):
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None
    return None


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    results = tmp_path / "r"
    proc = _lengen(["run", "--arch", "sw", "--seed", "0", "--seed", "1", "--results", str(results), *FAST,
                    *SMALL_SW, "--steps", "150"])
    # wait until the first seed is recorded and the second is training, then terminate
    ok = _wait_for(lambda: (_heartbeat(results) or {}).get("job") == "sw seed 1"
                   and _heartbeat(results).get("phase") == "training")
    assert ok, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    assert "Terminated (SIGTERM): records already written are kept; continue with: lengen run --resume " in out
    assert "Traceback" not in out
    (run_dir,) = list(results.iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "interrupted" and run["error"] == "terminated (SIGTERM)"
    assert run["records"] == ["sw/seed0/record.json"]
    assert [j["status"] for j in run["jobs"]] == ["finished", "interrupted"]
    json.loads((run_dir / "sw" / "seed0" / "record.json").read_text())
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "heartbeat.json").exists()
    assert run_state(run_dir) == ("interrupted", "terminated (SIGTERM)")
    # the training loop stopped at the end of a step and saved a checkpoint: resume from it
    (ckpt,) = (run_dir / "sw" / "seed1" / "checkpoints").iterdir()
    stopped_at = int(ckpt.name.removeprefix("step-"))
    assert 0 < stopped_at < 150 and run["jobs"][1]["step"] == stopped_at
    res = invoke(["run", "--resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    rec = json.loads((run_dir / "sw" / "seed1" / "record.json").read_text())
    assert rec["train"]["resumed_from"] == [stopped_at] and rec["train"]["steps"] == 150
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_a_run_whose_process_is_gone_is_shown_terminated(tmp_path):
    results = tmp_path / "r"
    proc = _lengen(["run", "--arch", "sw", "--results", str(results), *FAST, *SMALL_SW, "--steps", "100000"])
    assert _wait_for(lambda: (_heartbeat(results) or {}).get("phase") in ("building", "training")), \
        proc.communicate()[0]
    (run_dir,) = list(results.iterdir())
    assert run_state(run_dir)[0] == "running"
    (row,) = json.loads(invoke(["status", str(results), "--json"]).output)  # the live run, as status sees it
    assert (row["state"], row["jobs_done"], row["jobs_to_do"]) == ("running", 0, 1)
    assert row["current"]["job"] == "sw seed 0" and row["current"]["steps"] == 100000
    assert row["current"]["heartbeat_age_s"] < 60
    proc.kill()  # SIGKILL: no chance to write anything
    proc.communicate(timeout=60)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # what the dead process left
    state, why = run_state(run_dir)
    assert state == "terminated" and f"its process {proc.pid} is gone" in why
    res = invoke(["status", "--results", str(results), "--json"])
    (row,) = json.loads(res.output)
    assert row["state"] == "terminated" and row["jobs_done"] == 0 and row["jobs"] == 1
    assert "terminated" in invoke(["status", "--results", str(results)]).output


def test_a_stale_heartbeat_from_another_host_is_terminated(tmp_path):
    run_dir = tmp_path / "run"
    atomic_write_json(run_dir / "run.json", {"status": "running", "started": 0, "pid": 1, "host": "elsewhere"})
    atomic_write_json(run_dir / "heartbeat.json", {"pid": 1, "host": "elsewhere", "time": time.time() - 3600})
    state, why = run_state(run_dir)
    assert state == "terminated" and "no heartbeat for 60 min" in why
    atomic_write_json(run_dir / "heartbeat.json", {"pid": 1, "host": "elsewhere", "time": time.time()})
    assert run_state(run_dir)[0] == "running"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_result_files_get_the_permissions_the_umask_allows(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


def test_a_real_run_writes_group_readable_records(tmp_path):
    old = os.umask(0o022)
    try:
        res = invoke(["run", "--arch", "sw", "--results", str(tmp_path), *FAST, *SMALL_SW])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "record.json", "model.safetensors", "scores-full.npz"}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in files), {p.name: oct(p.stat().st_mode) for p in files}


# ---------------------------------------------------------------------------------------
# bad input


def test_results_under_a_regular_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for target, expect in ((blocker / "sub", "is a file, so the folder cannot be created there"),
                           (blocker, "a file is in the way, not a folder")):
        res = invoke(["run", "--arch", "sw", "--results", str(target), *FAST])
        assert res.exit_code == 2, res.output
        assert f"Error: --results {target}: " in res.output and expect in res.output
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: an unwritable folder cannot be made")
def test_unwritable_results_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    res = invoke(["run", "--arch", "sw", "--results", str(locked / "r"), *FAST])
    assert res.exit_code == 2 and "is not writable" in res.output


def test_missing_data_dir_is_said_as_such(tmp_path):
    res = invoke(["run", "--arch", "sw", "--results", str(tmp_path), "--data-dir", str(tmp_path / "nope"), *FAST])
    assert res.exit_code == 2
    assert f"Error: --data-dir {tmp_path / 'nope'}: the folder does not exist" in res.output


def test_arch_config_errors_name_the_benchmarks_file_and_line(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text("[mine]\nwindow = 16\nseeds = [0]\n[mine.train]\nsteps = 2\n[mine.arch.sw]\nd_model = 16\n"
                 "d_modle = 3\n[mine.data]\ntrain_tokens = 5000\n")
    res = invoke(["run", "--arch", "sw", "-b", "mine", "--benchmarks-file", str(f), "--results", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert (f"Error: {f}:8: suite 'mine': unknown key 'd_modle' in [mine.arch.sw]; did you mean 'd_model'?"
            in res.output)
    f.write_text("[mine]\nwindow = 16\n[mine.train]\nsteps = 2\n[mine.data]\ntrain_tokens = 5000\nn_filler = 2\n"
                 "branching = 3\n")
    res = invoke(["run", "--arch", "sw", "-b", "mine", "--benchmarks-file", str(f), "--results", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert f"Error: {f}:5: suite 'mine': [mine.data]: branching cannot exceed n_filler" in res.output
    f.write_text("[mine]\nwindow = 16\nseeds = [0, -1]\n[mine.train]\nsteps = 2\n")
    res = invoke(["run", "--arch", "sw", "-b", "mine", "--benchmarks-file", str(f), "--results", str(tmp_path / "r")])
    assert res.exit_code == 2 and "seeds must be integers >= 0, got [0, -1]" in res.output


def test_set_null_resets_an_optional_key(tmp_path):
    from lengen.plan import resolve_suite
    from lengen.plugins import PluginHost

    f = tmp_path / "mine.toml"
    f.write_text("[mine]\nwindow = 16\n[mine.train]\nsteps = 20\nearly_stopping = {patience = 2, metric = \"ppl@1W\"}"
                 "\n[mine.eval]\ncheckpoints = 3\nchunk = 4\n")
    host = PluginHost()
    suite, _ = resolve_suite(host, "mine", [], f)
    assert suite.train.early_stopping.patience == 2 and suite.eval.chunk == 4
    suite, _ = resolve_suite(host, "mine", ["train.early_stopping=null", "eval.chunk=null"], f)
    assert suite.train.early_stopping is None and suite.eval.chunk is None


def test_leaderboard_skips_a_record_missing_a_section(tmp_path):
    good = tmp_path / "run" / "sw" / "seed0"
    bad = tmp_path / "run" / "ttt" / "seed0"
    record = {"schema": 1, "benchmark": "b", "arch": "sw", "seed": 0, "created": 1, "suite_hash": "s",
              "model": {"config_hash": "c", "arch_version": "1", "params": 1}, "dataset": {"fingerprint": "f"},
              "evaluations": {"full": {"metrics": {}, "eval": {}}}}
    atomic_write_json(good / "record.json", record)
    atomic_write_json(bad / "record.json", {**{k: v for k, v in record.items() if k != "model"}, "arch": "ttt"})
    res = invoke(["leaderboard", "--results", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert f"warning: skipping {bad / 'record.json'}: its model section is missing or malformed" in res.output
    assert [r["arch"] for r in json.loads(res.output[res.output.index("["):])] == ["sw"]
