"""``lengen run``: resolve a suite, then train, evaluate and record each architecture.

Everything the user can get wrong is checked before the first training step: the suite and
its overrides, every architecture name and config, the dataset and its config, the metric
configs. Records are written as each (architecture, seed) finishes, so a later failure or
Ctrl-C loses nothing already done.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from lengen import events
from lengen.api import BuildContext, DataContext, MetricContext, jsonable
from lengen.errors import ConfigError, LengenError
from lengen.plugins import PluginHost
from lengen.results import RUN, atomic_save, atomic_write_json, new_run_dir, record_dir
from lengen.suites import Suite, apply_overrides, validate_suite


@dataclass
class RunRequest:
    benchmark: str = "tiny"
    archs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    results_dir: Path = Path("results")
    cache_dir: Path | None = None
    data_dir: Path | None = None
    benchmarks_file: Path | None = None
    device: str = "auto"
    plot: bool = True
    check: bool = True  # run the causality check on architectures not seen passing before


def resolve_suite(host: PluginHost, name: str, overrides: list[str], benchmarks_file: Path | None) -> Suite:
    """The named suite (a ``--benchmarks-file`` takes precedence over registered suites),
    with ``--set`` overrides applied, then validated."""
    from lengen.errors import UnknownComponentError, did_you_mean
    from lengen.suites import parse_tables, read_text

    text = None
    if benchmarks_file is not None:
        text = read_text(benchmarks_file)
        tables = parse_tables(text, str(benchmarks_file))
        if name in tables:
            table, source = tables[name], str(benchmarks_file)
        elif name in host.benchmarks:
            table, source, text = dict(host.benchmarks.load(name)), "benchmarks.toml", None
        else:
            raise UnknownComponentError(did_you_mean(name, set(tables) | set(host.benchmarks.names()),
                                                     kind="benchmark"))
    else:
        table, source = dict(host.benchmarks.load(name)), "benchmarks.toml"
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {name!r} is not a suite table; write suites as [name] tables")
    if not overrides:
        return validate_suite(name, table, source=source, text=text)
    return validate_suite(name, apply_overrides(table, overrides), source=f"{source} with the command-line overrides")


def _validate(config_cls, values: dict, where: str):
    try:
        return config_cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(key, list(config_cls.model_fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(config_cls.model_fields)
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}") from None
        got = err.get("input")
        got = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        raise ConfigError(f"{where}: {key}: {err['msg'].removeprefix('Value error, ')}{got}") from None


@dataclass
class Plan:
    """Everything resolved and validated, before any training."""

    suite: Suite
    archs: list[tuple[str, Any, Any, Any]]  # (name, entry, arch object, config)
    dataset: tuple[Any, Any, Any]  # (entry, dataset object, config)
    metrics: list[tuple[str, Any, Any, Any]]  # (name, entry, metric object, config)
    seeds: list[int]
    data_ctx: DataContext


def arch_config(entry, arch, suite: Suite, name: str, overrides: list[str]):
    """The validated config of architecture ``name``: its registered defaults, then the suite's
    table for it (with the command-line overrides already applied)."""
    from_cli = any(o.startswith((f"arch.{name}.", f"arch.{name.split('-', 1)[0]}.")) for o in overrides)
    return _validate(arch.Config, {**entry.defaults, **suite.arch_config(name)},
                     f"suite {suite.name!r} [arch.{name}]" + (" (with --set)" if from_cli else ""))


def data_context(suite: Suite, req: RunRequest) -> DataContext:
    W = suite.window
    return DataContext(
        seed=suite.data_seed, window=W, eval_length=suite.eval_tokens, eval_sequences=suite.eval.sequences,
        train_tokens=suite.train.steps * suite.train.batch_size * suite.train.grad_accum * W + W + 1,
        cache_dir=Path(req.cache_dir or default_cache_dir()), data_dir=req.data_dir, tokenizer=suite.tokenizer)


def plan_run(host: PluginHost, req: RunRequest) -> Plan:
    suite = resolve_suite(host, req.benchmark, req.overrides, req.benchmarks_file)
    names = list(dict.fromkeys(req.archs or suite.archs))
    if not names:
        raise ConfigError(
            f"no architecture named: give --arch NAME (available: {', '.join(host.architectures.names())})")
    entries = [(n, host.architectures.get(n)) for n in names]  # did-you-mean before any import
    _check_arch_tables(host, suite, req.overrides)
    archs = []
    for name, entry in entries:
        arch = entry.load()
        archs.append((name, entry, arch, arch_config(entry, arch, suite, name, req.overrides)))
    ds_entry = host.datasets.get(suite.dataset)
    ds = ds_entry.load()
    ds_cfg = _validate(ds.Config, suite.data, f"suite {suite.name!r} [data] ({suite.dataset})")
    metrics = []
    unknown = [m for m in suite.metrics if m not in host.metrics]
    if unknown:
        host.metrics.get(unknown[0])  # raises with did-you-mean
    for entry in host.metrics:
        metric = entry.load()
        cfg = _validate(metric.Config, suite.metrics.get(entry.name, {}), f"suite {suite.name!r} [metrics.{entry.name}]")
        metrics.append((entry.name, entry, metric, cfg))
    seeds = list(dict.fromkeys(req.seeds or suite.seeds))
    plan = Plan(suite, archs, (ds_entry, ds, ds_cfg), metrics, seeds, data_context(suite, req))
    ds.validate(ds_cfg, plan.data_ctx)  # missing files or an unreachable hub fail before any model is built
    if req.check:
        require_causal(plan, Path(req.cache_dir or default_cache_dir()))
    return plan


def check_components(host: PluginHost, *, archs: list[str], datasets: list[str], metrics: list[str],
                     benchmark: str, overrides: list[str], benchmarks_file: Path | None,
                     data_dir: Path | None, window: int | None = None) -> list[dict]:
    """Run the conformance kit on the named components with the suite's settings."""
    from lengen.checks import ArchSubject, check_architecture, check_dataset, check_metric

    suite = resolve_suite(host, benchmark, overrides, benchmarks_file)
    rows = []

    def add(component, results):
        rows.extend({"component": component, "check": r.name, "passed": r.passed, "reason": r.reason,
                     "seconds": r.seconds} for r in results)

    for name in archs:
        entry = host.architectures.get(name)
        arch = entry.load()
        cfg = arch_config(entry, arch, suite, name, overrides)
        add(f"arch {name}", check_architecture(ArchSubject(arch, cfg, window=window or suite.window)))
    for name in datasets:
        ds = host.datasets.load(name)
        cfg = _validate(ds.Config, suite.data if name == suite.dataset else {}, f"suite {suite.name!r} [data]")
        ctx = DataContext(seed=suite.data_seed, window=suite.window, eval_length=suite.eval_tokens,
                          eval_sequences=min(4, suite.eval.sequences), train_tokens=50 * suite.window,
                          cache_dir=default_cache_dir(), data_dir=data_dir, tokenizer=suite.tokenizer)
        add(f"dataset {name}", check_dataset(ds, cfg, ctx))
    for name in metrics:
        metric = host.metrics.load(name)
        cfg = _validate(metric.Config, suite.metrics.get(name, {}), f"suite {suite.name!r} [metrics.{name}]")
        add(f"metric {name}", check_metric(metric, cfg))
    return rows


def _check_arch_tables(host: PluginHost, suite: Suite, overrides: list[str]) -> None:
    """An ``arch.<name>`` table must name an installed architecture or family: a typo given
    with --set is an error, one in a suite file a warning (its plugin may not be installed)."""
    from lengen.errors import did_you_mean

    names = host.architectures.names()
    known = set(names) | {n.split("-", 1)[0] for n in names}
    for key in suite.arch:
        if key in known:
            continue
        if any(o.startswith(f"arch.{key}.") for o in overrides):
            raise ConfigError(f"--set arch.{key}...: " + did_you_mean(key, known, kind="architecture"))
        warnings.warn(f"suite {suite.name!r} configures architecture {key!r}, which no installed plugin provides",
                      stacklevel=2)


def _check_key(name: str, entry, arch, cfg, window: int) -> str:
    """Identifies what a passed check vouches for: the code, its version, the config, W."""
    import hashlib
    import inspect

    try:
        source = Path(inspect.getsourcefile(type(arch))).read_bytes()
    except (TypeError, OSError):
        source = b""
    code = hashlib.sha256(source).hexdigest()[:12]
    return f"{name}|{entry.distribution}|{entry.version}|{arch.version}|{code}|{cfg.hash()}|W{window}"


def require_causal(plan: Plan, cache_dir: Path) -> None:
    """Refuse to train an architecture that sees the future; remember the ones that passed."""
    import json

    from lengen.checks import ArchSubject, check_causality, _run

    path = cache_dir / "checks.json"
    try:
        passed = set(json.loads(path.read_text()))
    except (OSError, ValueError):
        passed = set()
    new = set()
    for name, entry, arch, cfg in plan.archs:
        key = _check_key(name, entry, arch, cfg, plan.suite.window)
        if key in passed:
            continue
        res = _run("causality", lambda: check_causality(ArchSubject(arch, cfg, window=plan.suite.window)))
        if res.passed is False:
            raise LengenError(f"architecture {name!r} ({entry.origin}) failed the causality check: {res.reason}. "
                              "Fix it, or run with --no-check to train it anyway")
        new.add(key)
    if new:
        try:
            atomic_write_json(path, sorted(passed | new))
        except OSError:
            pass  # an unwritable cache only means the check runs again next time


def default_cache_dir() -> Path:
    """``$LENGEN_CACHE`` or ``~/.cache/lengen``."""
    import os

    return Path(os.environ.get("LENGEN_CACHE") or Path.home() / ".cache" / "lengen")


def make_accelerator(device: str, precision: str):
    import torch
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "fp32"
    if use_cpu and precision in ("bf16", "fp16"):
        warnings.warn(f"train.precision = {precision} on CPU: training in fp32 instead", stacklevel=2)
        precision = "fp32"
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    return Accelerator(cpu=use_cpu, mixed_precision=mixed), precision


def unigram_nll(train_tokens: np.ndarray, targets: np.ndarray, vocab: int) -> np.ndarray:
    """Per-token NLL of an add-one unigram model fit on the training tokens."""
    counts = np.bincount(train_tokens, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return (-logp[targets]).astype(np.float32)


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n`` checkpoints spread evenly from initialisation (step 0) to the last step."""
    if n <= 0:
        return []
    if n == 1:
        return [steps]
    return sorted({int(round(i * steps / (n - 1))) for i in range(n)})


@dataclass
class ModeEval:
    scores: Any
    metrics: dict
    series: dict
    skipped: dict
    info: dict


def evaluate_model(model, arch, suite: Suite, seqs, ann, *, modes, metrics, mctx, device, autocast,
                   extras: bool = True, on_stage=None) -> dict[str, ModeEval]:
    """Score ``model`` in each of ``modes`` and compute every applicable metric."""
    from lengen.api import Scores
    from lengen.evaluate import (Scorer, lengths_from_prefix, score_context, score_full, score_nonoverlapping,
                                 score_window)

    W = suite.window
    L = seqs.shape[1] - 1
    lengths = suite.eval.tokens(suite.eval.lengths, W)
    out: dict[str, ModeEval] = {}
    for mode in modes:
        scorer = Scorer(model, arch, device=device, batch_tokens=suite.eval.batch_size * L, autocast=autocast)
        t0 = time.perf_counter()
        if mode == "full":
            scores = score_full(scorer, seqs, ann)
            scores.lengths = lengths_from_prefix(scores, lengths)
        elif mode == "window":
            scores = score_window(scorer, seqs, ann, window=W, stride=suite.eval.stride)
            scores.lengths = lengths_from_prefix(scores, lengths)
        else:
            scores = Scores(None, None, {}, mode="nonoverlapping",
                            lengths=score_nonoverlapping(scorer, seqs, lengths) if extras else {})
        wall = time.perf_counter() - t0
        scored = seqs.shape[0] * L if scores.nll is not None else sum(int(c.sum()) for _, c in scores.lengths.values())
        info = {"mode": mode, "length": L, "sequences": int(seqs.shape[0]), "wall_s": wall,
                "tokens_per_s": scored / wall if wall > 0 else None,
                "tokens_processed": scorer.tokens_processed, "stats": scorer.stats()}
        if mode == "window":
            info["stride"] = suite.eval.stride
        if mode == "full" and extras and suite.eval.contexts:
            scores.context = score_context(scorer, seqs, suite.eval.tokens(suite.eval.contexts, W), suite.eval.bucket)
        missing = [l for l in lengths if l not in scores.lengths]
        if missing and extras:
            warnings.warn(f"{mode} mode: lengths {', '.join(f'{l / W:g}W' for l in missing)} need more than the "
                          f"{L} tokens of each evaluation sequence; recorded as missing", stacklevel=2)
            info["missing_lengths"] = missing
        values, series, skipped = {}, {}, {}
        for mname, _entry, metric, mcfg in metrics:
            if mode not in metric.modes:
                continue
            lacking = [r for r in metric.requires if r not in scores.annotations]
            if lacking:
                skipped[mname] = f"needs annotations {lacking}"
                continue
            for key, val in metric.compute(scores, mcfg, mctx).items():
                (series if hasattr(val, "x") else values)[key] = val
        out[mode] = ModeEval(scores, values, series, skipped, info)
        if on_stage:
            on_stage(mode)
    return out


def add_baseline_ratios(evals: dict[str, ModeEval], baseline: str, mctx: MetricContext) -> None:
    """``ratio_<baseline>@kW``: the baseline mode's perplexity over this mode's, on the same
    tokens (paired bootstrap). Above 1: this mode predicts better (the seeds' SW / TTT)."""
    from lengen.stats import bootstrap_ppl_ratio

    base = evals.get(baseline)
    if base is None or base.scores.nll is None:
        return
    L = base.scores.length
    for mode, ev in evals.items():
        if mode == baseline or ev.scores.nll is None:
            continue
        for i, k in enumerate(mctx.positions):
            end = min(int(round(k * mctx.window)), L)
            c = slice(max(0, end - mctx.bucket), end)
            n = np.full(len(ev.scores.nll), c.stop - c.start)
            ev.metrics[f"ratio_{baseline}@{mctx.label(k)}"] = bootstrap_ppl_ratio(
                base.scores.nll[:, c].sum(1), n, ev.scores.nll[:, c].sum(1), n,
                samples=mctx.bootstrap, confidence=mctx.confidence, seed=mctx.seed + 700 + i)


def position_sums(scores, mctx: MetricContext) -> np.ndarray:
    """Per-sequence NLL sums of each position bucket, ``[sequences, positions]`` (for
    paired comparisons of checkpoints and architectures)."""
    L = scores.length
    cols = []
    for k in mctx.positions:
        end = min(int(round(k * mctx.window)), L)
        cols.append(scores.nll[:, max(0, end - mctx.bucket):end].sum(1))
    return np.stack(cols, 1)


def execute(host: PluginHost, req: RunRequest, plan: Plan, console=None) -> Path:
    """Train and evaluate every (architecture, seed) of ``plan``; returns the run folder."""
    from rich.console import Console

    from lengen import allocator
    from lengen.evaluate import eval_sequences
    from lengen.provenance import provenance

    console = console or Console(stderr=True)
    suite = plan.suite
    W = suite.window
    L = suite.eval_tokens
    malloc_tuned = allocator.tune()
    accelerator, precision = make_accelerator(req.device, suite.train.precision)
    prov = {**provenance(accelerator.device, precision), "malloc_tuned": malloc_tuned}
    run_dir = new_run_dir(req.results_dir, suite.name, [a[0] for a in plan.archs])
    started = time.time()
    run_info = {
        "run_id": run_dir.name, "status": "running", "benchmark": suite.name,
        "archs": [a[0] for a in plan.archs], "seeds": plan.seeds, "started": started,
        "suite": suite.model_dump(mode="json"), "suite_hash": suite.hash(), "provenance": prov,
    }
    atomic_write_json(run_dir / RUN, run_info)
    host.notify("lengen_run_start", events.RunStart(run_dir, suite.name, tuple(run_info["archs"]),
                                                    tuple(plan.seeds), run_info["suite"]))
    records: list[Path] = []
    status, error = "failed", None
    try:
        ds_entry, ds, ds_cfg = plan.dataset
        t0 = time.perf_counter()
        with console.status(f"loading dataset {suite.dataset!r}") as spinner:
            ctx = replace(plan.data_ctx, progress=lambda message: spinner.update(message))
            corpus = ds.load(ds_cfg, ctx)
        data_s = time.perf_counter() - t0
        seqs, ann = eval_sequences(corpus.eval, L, suite.eval.sequences, policy=suite.eval.doc_policy)
        ann = dict(ann)
        ann["unigram_nll"] = np.concatenate(
            [np.zeros((len(seqs), 1), np.float32), unigram_nll(corpus.train.tokens, seqs[:, 1:], corpus.vocab_size)], 1)
        dataset_record = {
            "name": suite.dataset, "config": ds_cfg.model_dump(mode="json"), "fingerprint": corpus.fingerprint,
            "tokenizer": corpus.tokenizer, "info": corpus.info, "plugin": ds_entry.plugin,
            "distribution": ds_entry.distribution, "version": ds_entry.version, "dataset_version": ds.version,
            "train_tokens": len(corpus.train), "eval_sequences": len(seqs), "load_s": round(data_s, 3),
            "vocab_size": corpus.vocab_size,
        }
        mctx = MetricContext(window=W, positions=tuple(suite.eval.positions), bucket=suite.eval.bucket,
                             bootstrap=suite.eval.bootstrap, confidence=suite.eval.confidence, info=corpus.info,
                             lengths=tuple(suite.eval.tokens(suite.eval.lengths, W)),
                             contexts=tuple(suite.eval.tokens(suite.eval.contexts, W)))
        shared = dict(host=host, suite=suite, plan=plan, corpus=corpus, seqs=seqs, ann=ann, mctx=mctx,
                      accelerator=accelerator, console=console, run_dir=run_dir, run_info=run_info,
                      dataset_record=dataset_record, prov=prov, started=started)
        for name, entry, arch, cfg in plan.archs:
            for seed in plan.seeds:
                records.append(_train_one(name, entry, arch, cfg, seed, **shared))
        if req.plot and records:
            from lengen.plots import write_run_plots

            write_run_plots([_load(p) for p in records], run_dir)
        status = "finished"
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by the user"
        raise
    except LengenError as exc:
        error = str(exc)
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        run_info.update(status=status, finished=time.time(), wall_s=time.time() - started,
                        records=[str(p.relative_to(run_dir)) for p in records], error=error)
        atomic_write_json(run_dir / RUN, run_info)
        host.notify("lengen_run_end", events.RunEnd(run_dir, suite.name, status, tuple(records), error))
    return run_dir


def _train_one(name, entry, arch, cfg, seed, *, host, suite, plan, corpus, seqs, ann, mctx, accelerator, console,
               run_dir, run_info, dataset_record, prov, started) -> Path:
    """Train one (architecture, seed), evaluate it in every mode, write its record."""
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import save_model

    from lengen import measure
    from lengen.evaluate import Scorer
    from lengen.progress import make_progress
    from lengen.train import train

    W = suite.window
    rec_dir = record_dir(run_dir, name, seed)
    set_seed(seed)
    model = arch.build(cfg, BuildContext(vocab_size=corpus.vocab_size, window=W))
    params = count_params(model)
    label = f"{name} seed {seed}"
    modes = suite.eval.modes
    ck_mode = "full" if "full" in modes else ("window" if "window" in modes else None)
    steps = checkpoint_steps(suite.train.steps, suite.eval.checkpoints) if ck_mode else []
    checkpoints: list[dict] = []
    ck_sums: list[np.ndarray] = []
    stopper = _EarlyStopper(suite.train.early_stopping) if suite.train.early_stopping else None
    stages = len(modes) + (1 if suite.eval.contexts and "full" in modes else 0)
    with make_progress(console) as progress:
        task = progress.add_task(f"train {label}", total=suite.train.steps, info="")
        ck_task = progress.add_task(f"ckpts {label}", total=len(steps), info="") if steps else None

        def on_checkpoint(step, m):
            evals = evaluate_model(m, arch, suite, seqs, ann, modes=[ck_mode], metrics=plan.metrics, mctx=mctx,
                                   device=accelerator.device, autocast=accelerator.autocast, extras=False)
            ev = evals[ck_mode]
            entry_ = {"step": step, "mode": ck_mode,
                      "metrics": jsonable({k: v for k, v in ev.metrics.items()
                                           if k.startswith(("ppl@", "ppl_ratio@", "recall", "excess_nll", "horizon"))
                                           or k == "ppl"}),
                      "series": jsonable({"ppl_by_position": ev.series["ppl_by_position"]})}
            checkpoints.append(entry_)
            ck_sums.append(position_sums(ev.scores, mctx))
            host.notify("lengen_checkpoint_evaluated", events.CheckpointEvaluated(
                run_dir, suite.name, name, seed, step, entry_["metrics"], m))
            progress.update(ck_task, advance=1)
            return stopper.update(step, entry_["metrics"]) if stopper else False

        result = train(model, arch, cfg, corpus.train.tokens, suite.train, window=W, seed=seed,
                       accelerator=accelerator, label=label, checkpoint_steps=set(steps),
                       doc_starts=corpus.train.doc_starts,
                       on_checkpoint=on_checkpoint if steps else None,
                       on_step=lambda s, info: progress.update(
                           task, completed=s, info=f"loss {info['loss']:.3f}  {info['tokens_per_s']:,.0f} tok/s"))
        model = accelerator.unwrap_model(model)
        etask = progress.add_task(f"eval  {label}", total=stages, info=", ".join(modes))
        evals = evaluate_model(model, arch, suite, seqs, ann, modes=modes, metrics=plan.metrics, mctx=mctx,
                               device=accelerator.device, autocast=accelerator.autocast,
                               on_stage=lambda _m: progress.update(etask, advance=1))
        progress.update(etask, completed=stages)
    if suite.eval.baseline:
        add_baseline_ratios(evals, suite.eval.baseline, mctx)
    if result.steps not in steps:  # observers hear of the final model too
        host.notify("lengen_checkpoint_evaluated", events.CheckpointEvaluated(
            run_dir, suite.name, name, seed, result.steps, jsonable(evals[modes[0]].metrics), model))
    # cost: FLOPs per token at L = W, peak evaluation memory of one sequence streamed in chunks of W
    flops = arch.flops_per_token(model, cfg, W)
    flops_method = "analytic" if flops is not None else "flop_counter"
    if flops is None:
        flops = measure.flops_per_token(model, arch, W, corpus.vocab_size, accelerator.device)
    one = seqs[:1]
    scorer = Scorer(model, arch, device=accelerator.device, chunk=W if arch.stateful else None)
    _, peak, mem_method = measure.peak_memory(lambda: scorer.score_rows(one, one.shape[1] - 1), accelerator.device)
    first = evals[modes[0]].info
    record = {
        "schema": 1,
        "run_id": run_dir.name,
        "created": time.time(),
        "benchmark": suite.name,
        "arch": name,
        "seed": seed,
        "evaluations": {m: {"metrics": jsonable(e.metrics), "series": jsonable(e.series),
                            "metrics_skipped": e.skipped, "eval": jsonable(e.info)} for m, e in evals.items()},
        "checkpoints": checkpoints,
        "train": result.as_dict(),
        "cost": {"params": params, "flops_per_token": flops, "flops_method": flops_method, "flops_length": W,
                 "peak_eval_memory_bytes": peak, "memory_method": mem_method,
                 "memory_setting": f"one sequence of {seqs.shape[1] - 1} tokens, chunks of {W}",
                 "train_tokens_per_s": result.tokens_per_s, "eval_tokens_per_s": first.get("tokens_per_s")},
        "model": {
            "params": params, "config": cfg.model_dump(mode="json"), "config_hash": cfg.hash(),
            "arch_version": arch.version, "plugin": entry.plugin, "distribution": entry.distribution,
            "version": entry.version, "stateful": arch.stateful, "train_state_passing": arch.train_state_passing,
        },
        "dataset": dataset_record,
        "protocol": {
            "window": W, "eval_length": seqs.shape[1] - 1, "positions": list(suite.eval.positions),
            "bucket": suite.eval.bucket, "modes": list(modes), "stride": suite.eval.stride,
            "baseline": suite.eval.baseline, "state_passing": result.state_passing,
            "train_doc_policy": result.doc_policy,
            "doc_policy": suite.eval.doc_policy, "bootstrap": suite.eval.bootstrap,
            "confidence": suite.eval.confidence, "lengths": list(mctx.lengths), "contexts": list(mctx.contexts),
            "checkpoint_steps": steps,
        },
        "suite": run_info["suite"],
        "suite_hash": run_info["suite_hash"],
        "provenance": prov,
        "metric_plugins": {m[0]: {"plugin": m[1].plugin, "version": m[2].version} for m in plan.metrics},
    }
    atomic_save(rec_dir / "model.safetensors", lambda p: save_model(model, str(p)))
    for m, e in evals.items():
        if e.scores.nll is not None:
            atomic_save(rec_dir / f"scores-{m}.npz", lambda p, sc=e.scores: _save_scores(p, sc, position_sums(sc, mctx)))
    if ck_sums:
        atomic_save(rec_dir / "checkpoints.npz", lambda p: _save_npz(
            p, steps=np.asarray([c["step"] for c in checkpoints]), position_sums=np.stack(ck_sums),
            positions=np.asarray(mctx.positions, dtype=float), bucket=np.asarray(mctx.bucket)))
    record["wall_s"] = time.time() - started
    path = rec_dir / "record.json"
    atomic_write_json(path, record)
    accelerator.free_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


class _EarlyStopper:
    def __init__(self, spec):
        self.spec = spec
        self.best = float("inf")
        self.bad = 0
        self.stopped_at: int | None = None

    def update(self, step: int, metrics: dict) -> bool:
        cell = metrics.get(self.spec.metric)
        value = cell.get("value") if isinstance(cell, dict) else None
        if value is None:
            from lengen.errors import ConfigError

            raise ConfigError(f"train.early_stopping.metric = {self.spec.metric!r} is not a checkpoint metric; "
                              f"use one of {', '.join(sorted(metrics))}")
        if value < self.best - self.spec.min_delta:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.bad >= self.spec.patience:
            self.stopped_at = step
            return True
        return False


def _save_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def _save_scores(path: Path, scores, sums: np.ndarray) -> None:
    _save_npz(path, nll=scores.nll.astype(np.float32), correct=scores.correct, position_sums=sums)


def _load(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def run(host: PluginHost, req: RunRequest, console=None) -> Path:
    plan = plan_run(host, req)
    return execute(host, req, plan, console)
