"""One job of a run: train one (architecture, seed), evaluate it in every mode, record it.

Read top to bottom: build the model under the seed, train it (evaluating checkpoints along
the way when the suite asks), evaluate the final model in each mode with every metric,
measure its cost, and write the record. What the jobs of a run share (the suite, the data,
the evaluation sequences, the accelerator, the run folder) is the :class:`RunContext`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lengen import events
from lengen.api import BuildContext, MetricContext, jsonable
from lengen.errors import ConfigError
from lengen.evaluate import ModeEval, add_baseline_ratios, evaluate_model, position_sums
from lengen.plan import Component, Plan, early_stopping_direction
from lengen.results import record_dir
from lengen.suites import Suite


@dataclass
class RunContext:
    """What every job of a run shares."""

    host: Any
    plan: Plan
    corpus: Any
    seqs: np.ndarray  # evaluation sequences [N, L + 1]
    ann: dict  # their annotations, same shape
    mctx: MetricContext
    accelerator: Any
    console: Any
    run_dir: Path
    run_info: dict
    dataset_record: dict
    prov: dict
    heartbeat: Any = None  # lengen.runner.Heartbeat
    watch: Any = None  # lengen.runner.JobWatch: every step and checkpoint, to the heartbeat and trackers

    @property
    def suite(self) -> Suite:
        return self.plan.suite


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n`` checkpoints spread evenly from initialisation (step 0) to the last step."""
    if n <= 0:
        return []
    if n == 1:
        return [steps]
    return sorted({int(round(i * steps / (n - 1))) for i in range(n)})


class Checkpoints:
    """Evaluates checkpoints during training in one mode (``full``, else ``window``), keeps
    the outputs the metrics declared ``checkpoint=True``, tells the observers, and decides
    early stopping."""

    def __init__(self, ctx: RunContext, comp: Component, seed: int):
        self.ctx, self.comp, self.seed = ctx, comp, seed
        modes = ctx.suite.eval.modes
        self.mode = "full" if "full" in modes else ("window" if "window" in modes else None)
        self.steps = checkpoint_steps(ctx.suite.train.steps, ctx.suite.eval.checkpoints) if self.mode else []
        self.entries: list[dict] = []
        self.sums: list[np.ndarray] = []
        self.specs = [s for m in ctx.plan.metrics for s in m.obj.outputs if s.checkpoint]
        spec = ctx.suite.train.early_stopping
        self.stopper = EarlyStopper(spec, early_stopping_direction(ctx.plan)) if spec else None

    def _tracked(self, name: str) -> bool:
        return any(s.matches(name) for s in self.specs)

    def evaluate(self, step: int, model) -> bool:
        """Evaluate the model at ``step``; True when early stopping says stop."""
        ctx = self.ctx
        ev = evaluate_model(model, self.comp.obj, ctx.suite, ctx.seqs, ctx.ann, modes=[self.mode],
                            metrics=ctx.plan.metrics, mctx=ctx.mctx, device=ctx.accelerator.device,
                            autocast=ctx.accelerator.autocast, extras=False)[self.mode]
        entry = {"step": step, "mode": self.mode,
                 "metrics": jsonable({k: v for k, v in ev.metrics.items() if self._tracked(k)}),
                 "series": jsonable({k: v for k, v in ev.series.items() if self._tracked(k)})}
        self.entries.append(entry)
        self.sums.append(position_sums(ev.scores, ctx.mctx))
        ctx.host.notify("lengen_checkpoint_evaluated", events.CheckpointEvaluated(
            ctx.run_dir, ctx.suite.name, self.comp.name, self.seed, step, entry["metrics"], model))
        if ctx.watch is not None:
            ctx.watch.checkpoint(step, entry["metrics"])
        return self.stopper.update(step, entry["metrics"]) if self.stopper else False


class EarlyStopper:
    def __init__(self, spec, better: str):
        self.spec, self.sign = spec, 1.0 if better == "lower" else -1.0
        self.best = float("inf")
        self.bad = 0

    def update(self, step: int, metrics: dict) -> bool:
        cell = metrics.get(self.spec.metric)
        value = cell.get("value") if isinstance(cell, dict) else None
        if value is None:
            raise ConfigError(f"train.early_stopping.metric = {self.spec.metric!r} was not measured at step {step}; "
                              f"the checkpoint metrics are {', '.join(sorted(metrics))}")
        if self.sign * value < self.best - self.spec.min_delta:
            self.best, self.bad = self.sign * value, 0
        else:
            self.bad += 1
        return self.bad >= self.spec.patience


def run_job(ctx: RunContext, comp: Component, seed: int) -> Path:
    """Train, evaluate and record one (architecture, seed); returns the record's path."""
    import torch
    from accelerate.utils import set_seed

    from lengen.progress import make_progress
    from lengen.record import build_record, write_record
    from lengen.train import count_params, train

    started = time.perf_counter()
    suite, arch, W = ctx.suite, comp.obj, ctx.suite.window
    set_seed(seed)
    model = arch.build(comp.config, BuildContext(vocab_size=ctx.corpus.vocab_size, window=W))
    params = count_params(model)
    label = f"{comp.name} seed {seed}"
    modes = suite.eval.modes
    ck = Checkpoints(ctx, comp, seed)
    beat = ctx.heartbeat.beat if ctx.heartbeat is not None else (lambda **kw: None)
    stages = len(modes) + (1 if suite.eval.contexts and "full" in modes else 0)
    with make_progress(ctx.console) as progress:
        task = progress.add_task(f"train {label}", total=suite.train.steps, info="")
        ck_task = progress.add_task(f"ckpts {label}", total=len(ck.steps), info="") if ck.steps else None

        def on_checkpoint(step, m):
            beat(phase=f"checkpoint at step {step}")
            stop = ck.evaluate(step, m)
            progress.update(ck_task, advance=1)
            return stop

        def on_step(step, info):
            progress.update(task, completed=step, info=f"loss {info['loss']:.3f}  {info['tokens_per_s']:,.0f} tok/s")
            beat(phase="training", step=step, steps=suite.train.steps, loss=info["loss"])
            if ctx.watch is not None:
                ctx.watch.step(step, info)

        result = train(model, arch, comp.config, ctx.corpus.train.tokens, suite.train, window=W, seed=seed,
                       accelerator=ctx.accelerator, label=label, checkpoint_steps=set(ck.steps),
                       doc_starts=ctx.corpus.train.doc_starts, on_step=on_step,
                       on_checkpoint=on_checkpoint if ck.steps else None)
        model = ctx.accelerator.unwrap_model(model)
        etask = progress.add_task(f"eval  {label}", total=stages, info=", ".join(modes))

        def on_stage(mode):
            progress.update(etask, advance=1)
            beat(phase=f"evaluated {mode} mode")

        beat(phase="evaluating")
        evals = evaluate_model(model, arch, suite, ctx.seqs, ctx.ann, modes=modes, metrics=ctx.plan.metrics,
                               mctx=ctx.mctx, device=ctx.accelerator.device, autocast=ctx.accelerator.autocast,
                               on_stage=on_stage, measure_memory=True)
        progress.update(etask, completed=stages)
    if suite.eval.baseline:
        add_baseline_ratios(evals, suite.eval.baseline, ctx.mctx)
    if result.steps not in ck.steps:  # observers hear of the final model too
        ctx.host.notify("lengen_checkpoint_evaluated", events.CheckpointEvaluated(
            ctx.run_dir, suite.name, comp.name, seed, result.steps, jsonable(evals[modes[0]].metrics), model))
    cost = job_cost(ctx, comp, model, params, result, evals)
    record = build_record(ctx, comp, seed, params=params, result=result, evals=evals, checkpoints=ck.entries,
                          checkpoint_steps=ck.steps, cost=cost, wall_s=time.perf_counter() - started)
    path = write_record(record_dir(ctx.run_dir, comp.name, seed), record, model, evals, ctx.mctx, ck.sums)
    ctx.accelerator.free_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def job_cost(ctx: RunContext, comp: Component, model, params: int, result, evals: dict[str, ModeEval]) -> dict:
    """FLOPs per token at L = W, the evaluation's measured peak memory, throughputs."""
    from lengen import measure

    W = ctx.suite.window
    flops = comp.obj.flops_per_token(model, comp.config, W)
    flops_method = "analytic" if flops is not None else "flop_counter"
    if flops is None:
        flops = measure.flops_per_token(model, comp.obj, W, ctx.corpus.vocab_size, ctx.accelerator.device)
    first = next(iter(evals.values())).info
    chunk = f", stateful models in chunks of {first['chunk']}" if first.get("chunk") else ""
    return {"params": params, "flops_per_token": flops, "flops_method": flops_method, "flops_length": W,
            "peak_eval_memory_bytes": first.get("peak_memory_bytes"), "memory_method": first.get("memory_method"),
            "memory_setting": f"{first['mode']}-mode evaluation: batches of {first['batch_sequences']} sequences of "
                              f"{first['length']} tokens{chunk}",
            "train_tokens_per_s": result.tokens_per_s, "eval_tokens_per_s": first.get("tokens_per_s")}
