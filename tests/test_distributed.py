"""Several processes and resumed runs: the same numbers as one uninterrupted process.

Each test starts real `lengen` processes (torchrun for two ranks, SIGKILL for a crash), with a
test plugin (the fake architectures of lengen.testing) installed through PYTHONPATH. The TTT
kernels' torch code is used, so that no test waits for a C++ build.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SUITE = """
[mini]
window = 16
seeds = [0]
[mini.data]
train_tokens = 20000
[mini.train]
steps = 12
batch_size = 4
lr = 3e-3
state_passing = true
doc_policy = "packed"
checkpoint_every = 3
[mini.eval]
length = 4
positions = [1, 2, 4]
lengths = [1, 2, 4]
sequences = 5
batch_size = 2
bootstrap = 20
bucket = 8
stride = 8
[mini.arch.sw]
d_model = 16
n_heads = 2
n_layers = 1
[mini.arch.ttt]
d_model = 16
n_heads = 2
n_layers = 1
[mini.arch.slowdecay]
d_model = 8
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A folder with the suite file and a test plugin registering SlowDecayLM (state passing and
    a parameter group updated every 4 steps) as `slowdecay`, and the environment to use it."""
    root = tmp_path_factory.mktemp("dist")
    info = root / "lengen_distplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lengen-distplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lengen]\ndistplug = lengen_distplug\n")
    (root / "lengen_distplug.py").write_text(
        "from lengen import hookimpl\n\n@hookimpl\ndef lengen_register_architectures(registry):\n"
        "    registry.add('slowdecay', 'lengen.testing:SlowDecayLM')\n")
    (root / "mini.toml").write_text(SUITE)
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
         "LENGEN_TTT_KERNEL": "torch", "LENGEN_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    e.pop("LENGEN_FAULT", None)
    return root, e


def lengen(env, *args, fault=None, torchrun=None):
    root, e = env
    cmd = [sys.executable, "-m", "lengen.cli", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun),
               "-m", "lengen.cli", *args]
    return subprocess.Popen(cmd, cwd=root, env={**e, **({"LENGEN_FAULT": fault} if fault else {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def in_process(env, monkeypatch, *args):
    """The same command in this process (while a subprocess runs: two runs at once)."""
    from click.testing import CliRunner

    from lengen import hookimpl
    from lengen.cli import make_cli
    from lengen.plugins import PluginHost

    class Plug:
        @hookimpl
        def lengen_register_architectures(self, registry):
            registry.add("slowdecay", "lengen.testing:SlowDecayLM")

    root, e = env
    monkeypatch.chdir(root)
    for k in ("LENGEN_TTT_KERNEL", "LENGEN_CACHE"):
        monkeypatch.setenv(k, e[k])
    res = CliRunner().invoke(make_cli(PluginHost(plugins=[("distplug", Plug())])), list(args))
    return res.exit_code, res.output


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def record(results: Path, arch: str) -> tuple[dict, np.ndarray]:
    (path,) = results.glob(f"*/{arch}/seed0/record.json")
    return json.loads(path.read_text()), np.load(path.parent / "scores-full.npz")["nll"]


RUN = ["run", "-b", "mini", "--benchmarks-file", "mini.toml", "--no-plot"]


def test_two_processes_give_the_numbers_of_one(env, monkeypatch):
    """Same global batch on 2 ranks and on 1 (sw; ttt with state passing; a slow parameter
    group with state passing): the same losses and metrics within float tolerance, and every
    evaluation sequence (5, an odd number) scored exactly once."""
    root, _ = env
    archs = ["--arch", "sw", "--arch", "ttt", "--arch", "slowdecay"]
    two = lengen(env, *RUN, *archs, "--results", "two", torchrun=2)
    rc1, out1 = in_process(env, monkeypatch, *RUN, *archs, "--results", "one")
    rc2, out2 = finish(two)
    assert rc1 == 0, out1[-3000:]
    assert rc2 == 0, out2[-3000:]
    for arch in ("sw", "ttt", "slowdecay"):
        a, nll_a = record(root / "one", arch)
        b, nll_b = record(root / "two", arch)
        assert (a["provenance"]["processes"], b["provenance"]["processes"]) == (1, 2)  # really two ranks
        assert b["train"]["processes"] == 2 and b["evaluations"]["full"]["eval"]["processes"] == 2
        assert b["train"]["state_passing"] == (arch != "sw")
        np.testing.assert_allclose([x["loss"] for x in b["train"]["losses"]],
                                   [x["loss"] for x in a["train"]["losses"]], rtol=1e-5)
        assert nll_b.shape == nll_a.shape == (5, 64)  # every sequence, once, in order
        np.testing.assert_allclose(nll_b, nll_a, rtol=1e-4, atol=1e-5)
        for key, cell in a["evaluations"]["full"]["metrics"].items():
            if cell.get("value") is not None:
                assert b["evaluations"]["full"]["metrics"][key]["value"] == pytest.approx(cell["value"], rel=1e-4), key
    # only the main process wrote: one run folder, one record per architecture
    assert len(list((root / "two").iterdir())) == 1


def test_a_killed_run_resumes_to_the_uninterrupted_numbers(env, monkeypatch):
    """Killed (SIGKILL) after step 7, which no update period (4) or checkpoint interval (3)
    divides, then killed again in the middle of writing the step-9 checkpoint: resumed twice,
    it ends with exactly the uninterrupted run's losses and metrics, and no file is left
    half-written."""
    root, _ = env
    crash = lengen(env, *RUN, "--arch", "slowdecay", "--results", "crash", fault="kill-at-step@7")
    rc_ref, out_ref = in_process(env, monkeypatch, *RUN, "--arch", "slowdecay", "--results", "ref")
    rc, out = finish(crash)
    assert rc_ref == 0, out_ref[-2000:]
    assert rc == -9, out[-2000:]
    (run_dir,) = list((root / "crash").iterdir())
    ckpts = run_dir / "slowdecay" / "seed0" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003", "step-00000006"]
    rc, out = finish(lengen(env, "run", "--resume", str(run_dir), fault="kill-in-checkpoint@9"))
    assert rc == -9, out[-2000:]
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-00000009.tmp", "step-00000003", "step-00000006"]
    rc, out = finish(lengen(env, "run", "--resume", str(run_dir)))
    assert rc == 0, out[-2000:]
    a, nll_a = record(root / "ref", "slowdecay")
    b, nll_b = record(root / "crash", "slowdecay")
    assert b["train"]["resumed_from"] == [6] and a["train"]["resumed_from"] == []
    assert b["train"]["losses"] == a["train"]["losses"]
    assert b["evaluations"]["full"]["metrics"] == a["evaluations"]["full"]["metrics"]
    np.testing.assert_array_equal(nll_b, nll_a)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and len(run["resumed"]) == 2
    assert not ckpts.exists()  # the record holds the trained model; its checkpoints are gone
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    rc, out = in_process(env, monkeypatch, "run", "--resume", str(run_dir))
    assert rc == 2 and "nothing to resume, every job finished" in out


def test_two_runs_writing_into_one_results_folder_at_once(env, monkeypatch):
    root, _ = env
    b = lengen(env, *RUN, "--arch", "slowdecay", "--results", "shared")
    rc_a, out_a = in_process(env, monkeypatch, *RUN, "--arch", "sw", "--results", "shared")
    rc_b, out_b = finish(b)
    assert rc_a == 0 and rc_b == 0, (out_a[-1000:], out_b[-1000:])
    assert len(list((root / "shared").iterdir())) == 2
    rc, out = in_process(env, monkeypatch, "leaderboard", "--results", "shared", "--format", "json")
    assert rc == 0
    rows = json.loads(out[out.index("["):])
    assert sorted(r["arch"] for r in rows) == ["slowdecay", "sw"]
