"""``lengen run``: plan (:mod:`lengen.plan`), then execute every job of the plan.

A run folder holds ``run.json`` (what was asked, the resolved suite, provenance, the status
and every job's outcome) and, while the run lives, ``heartbeat.json`` (pid, host, time, the
current job and step). Each (architecture, seed) is a job (:mod:`lengen.job`); its record is
written as it finishes, so a later failure, Ctrl-C or SIGTERM loses nothing already done. A
job that diverges (non-finite loss) or fails is recorded as such, with its step and seed,
and the other jobs still run; the run's status then says so.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lengen import events
from lengen.api import Architecture, MetricContext
from lengen.errors import ConfigError, LengenError, Terminated, TrainingDivergedError
from lengen.plan import Plan, RunRequest, plan_run
from lengen.plugins import PluginHost
from lengen.results import (HEARTBEAT, RUN, atomic_write_json, host_name, new_run_dir, process_start,
                            record_dir)

#: seconds between heartbeat writes
BEAT_EVERY = 10.0


@dataclass
class RunOutcome:
    run_dir: Path
    status: str  # finished | diverged | failed | interrupted
    jobs: list[dict]

    def problems(self) -> list[dict]:
        return [j for j in self.jobs if j["status"] not in ("finished", "pending")]

    def summary(self) -> str:
        """One line naming every job that did not finish, for the end of the command."""
        bad = self.problems()
        what = "; ".join(f"{j['arch']} seed {j['seed']} {j['status']}"
                         + (f" at step {j['step']}" if j.get("step") else "")
                         + (f" ({j['error']})" if j.get("error") and j["status"] == "failed" else "") for j in bad)
        done = sum(j["status"] == "finished" for j in self.jobs)
        return (f"{len(bad)} of {len(self.jobs)} jobs did not finish: {what}; the {done} finished are recorded "
                f"in {self.run_dir}")


class Heartbeat:
    """``heartbeat.json``: pid, host and time, with the current job and step, rewritten
    atomically at most every ``BEAT_EVERY`` seconds; the source of truth for whether a run
    recorded as running still is."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / HEARTBEAT
        self.base = {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "host": host_name()}
        self.state: dict = {}
        self.last = 0.0

    def beat(self, force: bool = False, **state) -> None:
        force = force or ("phase" in state and state["phase"] != self.state.get("phase"))  # a new phase shows at once
        self.state.update(state)
        now = time.time()
        if self.enabled and (force or now - self.last >= BEAT_EVERY):
            self.last = now
            try:
                atomic_write_json(self.path, {**self.base, "time": now, **self.state})
            except OSError:
                pass  # a heartbeat that cannot be written must not stop the run

    def stop(self) -> None:
        if not self.enabled:
            return
        try:
            self.path.unlink()
        except OSError:
            pass


def execute(host: PluginHost, req: RunRequest, plan: Plan, console=None, resume: Path | None = None) -> RunOutcome:
    """Run every (architecture, seed) job of ``plan``; returns the run folder and each job's
    outcome. Ctrl-C and SIGTERM (raised as :class:`KeyboardInterrupt`) stop it, with the
    run's status ``interrupted`` and every record already written kept. ``resume``: an
    existing run folder whose unfinished jobs continue (from their checkpoints, if any).

    Under several processes (``torchrun``, ``accelerate launch``) every process runs this;
    only the main one writes ``run.json``, the heartbeat, records and plots, and prints."""
    from rich.console import Console
    from rich.markup import escape

    from lengen.dist import Dist
    from lengen.job import checkpoint_steps, run_job
    from lengen.provenance import provenance
    from lengen.results import read_record
    from lengen.trackers import Trackers, parse_log_with
    from lengen.train import make_accelerator

    suite = plan.suite
    log_with = parse_log_with(req.log_with)
    accelerator, precision = make_accelerator(req.device, suite.train.precision,
                                              find_unused=suite.train.state_passing,
                                              **Trackers.accelerator_kwargs(log_with, req.results_dir))
    dist = Dist.of(accelerator)
    if suite.train.batch_size % dist.world:
        raise ConfigError(f"train.batch_size = {suite.train.batch_size} must be divisible by the number of processes "
                          f"({dist.world}), so that each trains on as many rows; change it with --set "
                          "train.batch_size=N or the number of processes")
    console = console if console is not None and dist.main else Console(stderr=True, quiet=not dist.main)
    prov = {**provenance(accelerator.device, precision), "processes": dist.world}
    if resume is not None:
        run_dir = Path(resume)
        run_info = json.loads((run_dir / RUN).read_text())
        before = run_info.get("provenance", {}).get("processes", 1)
        if before != dist.world:
            raise ConfigError(f"--resume {run_dir}: the run was started with {before} process(es) and this one has "
                              f"{dist.world}; resume with {before} (its checkpoints hold one stream per process)")
        jobs = run_info["jobs"]
        run_info.setdefault("resumed", []).append({"time": time.time(), "provenance": prov})
        run_info.update(status="running", error=None)
    else:
        run_dir = Path(dist.broadcast(str(new_run_dir(req.results_dir, suite.name, [a.name for a in plan.archs]))
                                      if dist.main else None))
        jobs = [{"arch": a.name, "seed": s, "status": "pending", "step": None, "error": None, "record": None,
                 "records": []} for a in plan.archs for s in plan.seeds]
        run_info = {
            "run_id": run_dir.name, "status": "running", "benchmark": suite.name,
            "archs": [a.name for a in plan.archs], "seeds": plan.seeds, "started": time.time(),
            "suite": suite.model_dump(mode="json"), "suite_hash": suite.hash(), "request": request_dict(req),
            "provenance": prov, "jobs": jobs, "log_with": log_with,
            # what the metrics declared about their outputs, for `lengen status` before any record exists
            "metric_plugins": {m.name: {"outputs": [o.as_dict() for o in m.obj.outputs]} for m in plan.metrics},
        }
    trackers = Trackers(accelerator, log_with, run_dir, run_dir.name, suite,
                        say=lambda message: console.print(escape(message), soft_wrap=True))
    heartbeat = Heartbeat(run_dir, enabled=dist.main)
    run_info.update(heartbeat.base)
    save = (lambda: atomic_write_json(run_dir / RUN, run_info)) if dist.main else (lambda: None)
    notify = host.notify if dist.main else (lambda *a: None)
    save()
    heartbeat.beat(force=True, phase="starting")
    notify("lengen_run_start", events.RunStart(run_dir, suite.name, tuple(run_info["archs"]), tuple(plan.seeds),
                                               run_info["suite"]))
    status, error = "failed", None
    job = None
    try:
        ctx = _prepare(host, plan, console, accelerator, run_dir, run_info, prov)
        ctx.heartbeat, ctx.dist = heartbeat, dist
        ctx.watch = JobWatch(heartbeat, trackers)
        plotted = None  # the records the run's plots were last drawn from
        n_checkpoints = len(checkpoint_steps(suite.train.steps, suite.eval.checkpoints)) if (
            {"full", "window"} & set(suite.eval.modes)) else 0
        for comp in plan.archs:
            for seed in plan.seeds:
                job = next(j for j in jobs if j["arch"] == comp.name and j["seed"] == seed)
                if job["status"] == "finished":
                    continue  # resumed run: done before
                job.update(status="running", started=time.time(), error=None)
                save()
                heartbeat.beat(force=True, job=f"{comp.name} seed {seed}", phase="building", step=0,
                               steps=suite.train.steps, job_started=time.time(), loss=None, tokens_per_s=None,
                               checkpoints=n_checkpoints, checkpoints_done=0, metrics={})
                paths: list[Path] = []
                try:
                    trackers.start_job(comp.name, seed, comp.config.model_dump(mode="json"))
                    paths = run_job(ctx, comp, seed)
                    rel = [str(p.relative_to(run_dir)) for p in paths]
                    job.update(status="finished", record=rel[0], records=rel, step=heartbeat.state.get("step"))
                except TrainingDivergedError as exc:
                    job.update(status="diverged", step=exc.step, error=str(exc))
                    console.print(f"[red]diverged:[/red] {escape(str(exc))}")
                except LengenError as exc:
                    job.update(status="failed", step=heartbeat.state.get("step"), error=str(exc))
                    console.print(f"[red]failed:[/red] {comp.name} seed {seed}: {escape(str(exc))}")
                except Exception as exc:  # noqa: BLE001 - a plugin's bug fails its job, not the run
                    trace = record_dir(run_dir, comp.name, seed) / "error.txt"
                    if dist.main:
                        trace.parent.mkdir(parents=True, exist_ok=True)
                        trace.write_text(traceback.format_exc())
                    job.update(status="failed", step=heartbeat.state.get("step"),
                               error=f"{type(exc).__name__}: {exc} (traceback in {trace.relative_to(run_dir)})")
                    console.print(f"[red]failed:[/red] {comp.name} seed {seed}: {escape(job['error'])}")
                finally:
                    if trackers.job:  # the record and the plots so far go to the job's tracker run
                        record = read_record(paths[0]) if paths and dist.main else None
                        plots = []
                        if req.plot and record:
                            plotted = [run_dir / r for j in jobs if j["status"] == "finished" for r in j["records"]]
                            plots = _plots(console, [r for r in map(read_record, plotted) if r], run_dir)
                        trackers.end_job(record, paths[0] if paths else None, plots)
                job["wall_s"] = job.get("wall_s", 0.0) + time.time() - job["started"]
                save()
        job = None
        finished = [run_dir / r for j in jobs if j["status"] == "finished" for r in j["records"]]
        if req.plot and finished and finished != plotted and dist.main:
            _plots(console, [r for r in map(read_record, finished) if r], run_dir)
        states = {j["status"] for j in jobs}
        status = "failed" if "failed" in states else "diverged" if "diverged" in states else "finished"
    except KeyboardInterrupt as exc:
        exc.run_dir = run_dir  # the command line says how to resume it
        status = "interrupted"
        error = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted by the user (Ctrl-C)"
        if job is not None:
            job.update(status="interrupted", step=heartbeat.state.get("step"), error=error)
            job["wall_s"] = job.get("wall_s", 0.0) + time.time() - job["started"]
        raise
    except LengenError as exc:
        error = str(exc)
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        records = [r for j in jobs for r in j.get("records", [])]
        run_info.update(status=status, finished=time.time(), wall_s=time.time() - run_info["started"],
                        records=records, error=error)
        save()
        heartbeat.stop()
        notify("lengen_run_end", events.RunEnd(run_dir, suite.name, status, tuple(run_dir / r for r in records), error))
    return RunOutcome(run_dir, status, jobs)


def request_dict(req: RunRequest) -> dict:
    """What ``lengen run`` was asked (kept in run.json, so that ``--resume`` can ask it again)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in req.__dict__.items()}


def resume(host: PluginHost, run_dir: Path, console=None, device: str | None = None) -> RunOutcome:
    """Continue the unfinished jobs of the run in ``run_dir`` (``lengen run --resume``): the
    suite as it was resolved then, each job from its latest checkpoint (or from the start)."""
    from lengen.plan import plan_suite
    from lengen.results import run_state
    from lengen.suites import validate_suite

    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / RUN).read_text())
    except (OSError, ValueError) as exc:
        raise LengenError(f"--resume {run_dir}: no readable {RUN} there ({exc}); give a run folder under results/") \
            from None
    state, why = run_state(run_dir, info)
    if state == "running":
        raise LengenError(f"--resume {run_dir}: the run is still running (process {info.get('pid')} on "
                          f"{info.get('host')}); stop it first")
    if "request" not in info:
        raise LengenError(f"--resume {run_dir}: this run was recorded before runs could be resumed")
    req = RunRequest(**{k: (Path(v) if k.endswith(("_dir", "_file")) and v is not None else v)
                        for k, v in info["request"].items() if k in RunRequest.__dataclass_fields__})
    if device is not None:
        req.device = device
    todo = [j for j in info["jobs"] if j["status"] != "finished"]
    if not todo:
        raise LengenError(f"--resume {run_dir}: nothing to resume, every job finished")
    suite = validate_suite(info["benchmark"], {k: v for k, v in info["suite"].items() if k != "name"},
                           source=f"{run_dir / RUN}")
    plan = plan_suite(host, req, suite)
    return execute(host, req, plan, console, resume=run_dir)


def _prepare(host, plan: Plan, console, accelerator, run_dir, run_info, prov):
    """Load the dataset, cut the evaluation sequences, let metrics annotate them."""
    from lengen.evaluate import eval_sequences
    from lengen.job import RunContext
    from lengen.progress import phase

    suite = plan.suite
    t0 = time.perf_counter()
    with phase(console, f"loading dataset {suite.dataset!r}") as spinner:
        corpus = plan.dataset.obj.load(plan.dataset.config,
                                       replace(plan.data_ctx, progress=lambda message: spinner.update(message)))
    load_s = time.perf_counter() - t0
    seqs, ann = eval_sequences(corpus.eval, suite.eval_tokens, suite.eval.sequences, policy=suite.eval.doc_policy)
    ann = dict(ann)
    for m in plan.metrics:
        for key, value in m.obj.annotate(corpus, seqs, m.config).items():
            ann[key] = np.asarray(value)
    ds = plan.dataset
    dataset_record = {
        "name": suite.dataset, "config": ds.config.model_dump(mode="json"), "fingerprint": corpus.fingerprint,
        "tokenizer": corpus.tokenizer, "info": corpus.info, "plugin": ds.entry.plugin,
        "distribution": ds.entry.distribution, "version": ds.entry.version, "dataset_version": ds.obj.version,
        "train_tokens": len(corpus.train), "eval_sequences": len(seqs), "load_s": round(load_s, 3),
        "vocab_size": corpus.vocab_size,
    }
    W = suite.window
    mctx = MetricContext(window=W, positions=tuple(suite.eval.positions), bucket=suite.eval.bucket,
                         bootstrap=suite.eval.bootstrap, confidence=suite.eval.confidence, info=corpus.info,
                         lengths=tuple(suite.eval.tokens(suite.eval.lengths, W)),
                         contexts=tuple(suite.eval.tokens(suite.eval.contexts, W)))
    calibration = None
    if any(type(a.obj).calibrate is not Architecture.calibrate for a in plan.archs):
        calibration = calibration_sequences(corpus.train, suite)
    return RunContext(host=host, plan=plan, corpus=corpus, seqs=seqs, ann=ann, mctx=mctx, accelerator=accelerator,
                      console=console, run_dir=run_dir, run_info=run_info, dataset_record=dataset_record, prov=prov,
                      calibration=calibration)


def calibration_sequences(train, suite) -> np.ndarray:
    """``eval.calibration`` sequences of the evaluation length cut from the end of the training
    split (documents long enough, else packed slices): data the evaluation never sees."""
    import warnings

    from lengen.api import Split
    from lengen.evaluate import eval_sequences

    L, n = suite.eval_tokens, suite.eval.calibration
    tail = max(0, len(train) - 4 * n * (L + 1))  # enough tail for n sequences, whatever the documents
    starts = np.asarray(train.doc_starts)
    starts = starts[starts >= tail] - tail
    split = Split(np.asarray(train.tokens)[tail:], starts if len(starts) and starts[0] == 0 else np.r_[0, starts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            seqs, _ = eval_sequences(split, L, n, policy="documents", source="calibration")
        except LengenError:
            seqs, _ = eval_sequences(split, L, n, policy="packed", source="calibration")
    return seqs


def _plots(console, records: list[dict], run_dir: Path) -> list[Path]:
    from lengen.plots import write_run_plots
    from lengen.progress import phase

    with phase(console, "writing plots"):
        return write_run_plots(records, run_dir)


class JobWatch:
    """What a job reports as it goes (``RunContext.watch``): every optimizer step and every
    evaluated checkpoint, to the heartbeat (what ``lengen status`` shows) and the trackers."""

    def __init__(self, heartbeat: Heartbeat, trackers):
        self.heartbeat, self.trackers = heartbeat, trackers

    def step(self, step: int, info: dict) -> None:
        self.heartbeat.beat(tokens_per_s=info.get("tokens_per_s"))
        self.trackers.log_step(step, info)

    def checkpoint(self, step: int, metrics: dict) -> None:
        values = {k: v.get("value") for k, v in metrics.items() if isinstance(v, dict)}
        done = self.heartbeat.state.get("checkpoints_done", 0) + 1
        self.heartbeat.beat(force=True, checkpoints_done=done, metrics=values, metrics_step=step)
        self.trackers.log_checkpoint(step, metrics)


def run(host: PluginHost, req: RunRequest, console=None) -> RunOutcome:
    from rich.console import Console

    from lengen.progress import phase
    from lengen.trackers import parse_log_with

    console = console or Console(stderr=True)
    parse_log_with(req.log_with)  # a missing tracker package is said before any work
    with phase(console, f"checking suite {req.benchmark!r} and its components"):
        plan = plan_run(host, req)
    return execute(host, req, plan, console)
