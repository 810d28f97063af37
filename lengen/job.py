"""One job of a run: train one (architecture, seed), evaluate it in every mode, record it.

Read top to bottom: build the model under the seed, train it (evaluating checkpoints along
the way when the suite asks, saving training checkpoints for resuming), evaluate the final
model in each mode with every metric (once per variant, when the architecture declares
several evaluations of one training), measure its cost, and write the record. What the jobs of a run share (the suite, the data,
the evaluation sequences, the accelerator, the run folder) is the :class:`RunContext`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lengen import events
from lengen.api import Architecture, BuildContext, MetricContext, jsonable
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
    calibration: np.ndarray | None = None  # training-split sequences for Architecture.calibrate
    dist: Any = None  # lengen.dist.Dist: this process's rank among the run's processes
    watch: Any = None  # lengen.runner.JobWatch: every step and checkpoint, to the heartbeat and trackers

    def notify(self, hook: str, event) -> None:
        """Tell the observers (from the main process only)."""
        if self.dist is None or self.dist.main:
            self.host.notify(hook, event)

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
                            autocast=ctx.accelerator.autocast, extras=False, dist=ctx.dist)[self.mode]
        entry = {"step": step, "mode": self.mode,
                 "metrics": jsonable({k: v for k, v in ev.metrics.items() if self._tracked(k)}),
                 "series": jsonable({k: v for k, v in ev.series.items() if self._tracked(k)})}
        self.entries.append(entry)
        self.sums.append(position_sums(ev.scores, ctx.mctx))
        ctx.notify("lengen_checkpoint_evaluated", events.CheckpointEvaluated(
            ctx.run_dir, ctx.suite.name, self.comp.name, self.seed, step, entry["metrics"], model))
        if ctx.watch is not None:
            ctx.watch.checkpoint(step, entry["metrics"])
        return self.stopper.update(step, entry["metrics"]) if self.stopper else False

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What a training checkpoint keeps of the evaluations so far."""
        meta = {"entries": self.entries, "stopper": [self.stopper.best, self.stopper.bad] if self.stopper else None}
        return meta, ({"checkpoint_sums": np.stack(self.sums)} if self.sums else {})

    def load(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.entries = meta["entries"]
        self.sums = list(arrays["checkpoint_sums"]) if "checkpoint_sums" in arrays else []
        if self.stopper and meta["stopper"]:
            self.stopper.best, self.stopper.bad = meta["stopper"]


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


def run_job(ctx: RunContext, comp: Component, seed: int) -> list[Path]:
    """Train one (architecture, seed), then evaluate and record the trained weights once per
    variant (:meth:`lengen.api.Architecture.variants`; one without); returns the records' paths."""
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
    variants = variant_configs(comp)
    stages = len(variants) * (len(modes) + (1 if suite.eval.contexts and "full" in modes else 0))
    paths: list[Path] = []
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

        save_dir = record_dir(ctx.run_dir, comp.name, seed) / "checkpoints"
        result = train(model, arch, comp.config, ctx.corpus.train.tokens, suite.train, window=W, seed=seed,
                       accelerator=ctx.accelerator, label=label, checkpoint_steps=set(ck.steps),
                       doc_starts=ctx.corpus.train.doc_starts, on_step=on_step,
                       on_checkpoint=on_checkpoint if ck.steps else None, save_dir=save_dir, progress=ck)
        model = ctx.accelerator.unwrap_model(model)
        trained_s = time.perf_counter() - started
        etask = progress.add_task(f"eval  {label}", total=stages, info=", ".join(modes))

        def on_stage(mode):
            progress.update(etask, advance=1)
            beat(phase=f"evaluated {mode} mode")

        for name, config in variants.items():
            t0 = time.perf_counter()
            beat(phase=f"evaluating {name}")
            vmodel = model if config is comp.config else _with_weights(arch, config, model, ctx)
            calibration = None
            if ctx.calibration is not None and type(arch).calibrate is not Architecture.calibrate:
                calibration = arch.calibrate(vmodel, config, ctx.calibration, ctx.accelerator.device)
            evals = evaluate_model(vmodel, arch, suite, ctx.seqs, ctx.ann, modes=modes, metrics=ctx.plan.metrics,
                                   mctx=ctx.mctx, device=ctx.accelerator.device, autocast=ctx.accelerator.autocast,
                                   on_stage=on_stage, measure_memory=True, dist=ctx.dist)
            if suite.eval.baseline:
                add_baseline_ratios(evals, suite.eval.baseline, ctx.mctx)
            if result.steps not in ck.steps:  # observers hear of the final model too
                ctx.notify("lengen_checkpoint_evaluated", events.CheckpointEvaluated(
                    ctx.run_dir, suite.name, name, seed, result.steps, jsonable(evals[modes[0]].metrics), vmodel))
            cost = job_cost(ctx, arch, config, vmodel, params, result, evals)
            record = build_record(ctx, comp, seed, label=name, config=config, params=params, result=result,
                                  evals=evals, checkpoints=ck.entries, checkpoint_steps=ck.steps, cost=cost,
                                  calibration=calibration, wall_s=trained_s + time.perf_counter() - t0)
            rec_dir = record_dir(ctx.run_dir, name, seed)
            if ctx.dist is None or ctx.dist.main:
                write_record(rec_dir, record, vmodel, evals, ctx.mctx, ck.sums,
                             weights=paths[0].parent / "model.safetensors" if paths else None)
            paths.append(rec_dir / "record.json")
        progress.update(etask, completed=stages)
    if ctx.dist is not None:
        ctx.dist.barrier()
    if ctx.dist is None or ctx.dist.main:
        import shutil

        shutil.rmtree(save_dir, ignore_errors=True)  # the record holds the trained model now
    ctx.accelerator.free_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return paths


def variant_configs(comp: Component) -> dict:
    """``{record label: config}``: the architecture's own name and config, or one
    ``<name>.<variant>`` per variant it declares (each config validated)."""
    from pydantic import ValidationError

    declared = comp.obj.variants(comp.config)
    if not declared:
        return {comp.name: comp.config}
    out = {}
    for vname, changes in declared.items():
        try:
            out[f"{comp.name}.{vname}"] = type(comp.config)(**{**comp.config.model_dump(), **changes})
        except ValidationError as exc:
            raise ConfigError(f"architecture {comp.name!r}: variant {vname!r} sets an invalid config: "
                              f"{exc.errors()[0]['msg']}") from None
    return out


def _with_weights(arch, config, trained, ctx: RunContext):
    """A model built with ``config`` holding the trained weights (a variant)."""
    model = arch.build(config, BuildContext(vocab_size=ctx.corpus.vocab_size, window=ctx.suite.window))
    model.load_state_dict(trained.state_dict())
    return model.to(ctx.accelerator.device)


def job_cost(ctx: RunContext, arch, config, model, params: int, result, evals: dict[str, ModeEval]) -> dict:
    """FLOPs per token at W and at each reported position's length, the evaluation's measured
    peak memory, throughputs."""
    from lengen import measure

    W = ctx.suite.window
    chunk = ctx.suite.eval.chunk or W
    methods = set()

    def at(L: int) -> dict:
        """FLOPs per token at length L: the architecture's own count, else the FLOP counter's."""
        flops = arch.flops_per_token(model, config, L)
        if flops is None:
            methods.add("flop_counter")
            flops = measure.flops_per_token(model, arch, L, ctx.corpus.vocab_size, ctx.accelerator.device,
                                            chunk=chunk if arch.stateful else None)
        parts = dict(flops) if isinstance(flops, dict) else {}
        return {"length": L, "per_token": float(sum(parts.values()) if parts else flops),
                **({"parts": parts} if parts else {})}

    by_length = [{"multiple": k, **at(max(1, int(round(k * W))))} for k in ctx.suite.eval.positions]
    at_w = (next((f for f in by_length if f["length"] == W), None) or at(W))["per_token"]
    method = "flop_counter" if methods else "analytic"
    first = next(iter(evals.values())).info
    chunked = f", stateful models in chunks of {first['chunk']}" if first.get("chunk") else ""
    return {"params": params, "flops_per_token": at_w, "flops_method": method, "flops_length": W,
            "flops_convention": "forward matrix-multiply FLOPs (2 per multiply-add) per predicted token, the "
                                "sequence fed as evaluation feeds it",
            "flops_by_length": by_length,
            "peak_eval_memory_bytes": first.get("peak_memory_bytes"), "memory_method": first.get("memory_method"),
            "memory_setting": f"{first['mode']}-mode evaluation: batches of {first['batch_sequences']} sequences of "
                              f"{first['length']} tokens{chunked}",
            "train_tokens_per_s": result.tokens_per_s, "eval_tokens_per_s": first.get("tokens_per_s"),
            "eval_us_per_token": 1e6 / first["tokens_per_s"] if first.get("tokens_per_s") else None}
