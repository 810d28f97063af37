"""``lengen run``: resolve a suite, then train, evaluate and record each architecture.

Everything the user can get wrong is checked before the first training step: the suite and
its overrides, every architecture name and config, the dataset and its config, the metric
configs. Records are written as each (architecture, seed) finishes, so a later failure or
Ctrl-C loses nothing already done.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from lengen import events
from lengen.api import BuildContext, DataContext, MetricContext, jsonable
from lengen.errors import ConfigError, LengenError
from lengen.plugins import PluginHost
from lengen.results import RUN, atomic_save, atomic_write_json, new_run_dir, record_dir
from lengen.suites import Suite, apply_overrides, load_suites_file, validate_suite


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


def resolve_suite(host: PluginHost, name: str, overrides: list[str], benchmarks_file: Path | None) -> Suite:
    """The named suite (a ``--benchmarks-file`` takes precedence over registered suites),
    with ``--set`` overrides applied and validated."""
    if benchmarks_file is not None:
        file_suites = load_suites_file(benchmarks_file)
        if name in file_suites:
            table = file_suites[name].model_dump(mode="json")
            source = str(benchmarks_file)
        elif name in host.benchmarks:
            table, source = dict(host.benchmarks.load(name)), "benchmarks.toml"
        else:
            from lengen.errors import UnknownComponentError, did_you_mean

            names = set(file_suites) | set(host.benchmarks.names())
            raise UnknownComponentError(did_you_mean(name, names, kind="benchmark"))
    else:
        table, source = dict(host.benchmarks.load(name)), "benchmarks.toml"
    if not overrides:
        return validate_suite(name, table, source=source)
    return validate_suite(name, apply_overrides(table, overrides), source=f"{source} with --set")


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


def plan_run(host: PluginHost, req: RunRequest) -> Plan:
    suite = resolve_suite(host, req.benchmark, req.overrides, req.benchmarks_file)
    names = list(dict.fromkeys(req.archs or suite.archs))
    if not names:
        raise ConfigError(
            f"no architecture named: give --arch NAME (available: {', '.join(host.architectures.names())})")
    entries = [(n, host.architectures.get(n)) for n in names]  # did-you-mean before any import
    archs = []
    for name, entry in entries:
        arch = entry.load()
        cfg = _validate(arch.Config, {**entry.defaults, **suite.arch_config(name)},
                        f"suite {suite.name!r} [arch.{name}]")
        archs.append((name, entry, arch, cfg))
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
    return Plan(suite, archs, (ds_entry, ds, ds_cfg), metrics, seeds)


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


def execute(host: PluginHost, req: RunRequest, plan: Plan, console=None) -> Path:
    """Train and evaluate every (architecture, seed) of ``plan``; returns the run folder."""
    import torch
    from accelerate.utils import set_seed
    from rich.console import Console
    from safetensors.torch import save_model

    from lengen.evaluate import eval_sequences, score
    from lengen.progress import make_progress
    from lengen.provenance import provenance
    from lengen.train import train

    console = console or Console(stderr=True)
    suite = plan.suite
    W = suite.window
    L = suite.eval_tokens
    accelerator, precision = make_accelerator(req.device, suite.train.precision)
    prov = provenance(accelerator.device, precision)
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
        cache_dir = Path(req.cache_dir or Path.home() / ".cache" / "lengen")
        ctx = DataContext(
            seed=suite.data_seed, window=W, eval_length=L, eval_sequences=suite.eval.sequences,
            train_tokens=suite.train.steps * suite.train.batch_size * suite.train.grad_accum * W + W + 1,
            cache_dir=cache_dir, data_dir=req.data_dir, tokenizer=suite.tokenizer)
        t0 = time.perf_counter()
        with console.status(f"loading dataset {suite.dataset!r}"):
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
        }
        mctx = MetricContext(window=W, positions=tuple(suite.eval.positions), bucket=suite.eval.bucket,
                             bootstrap=suite.eval.bootstrap, confidence=suite.eval.confidence, info=corpus.info)
        for name, entry, arch, cfg in plan.archs:
            for seed in plan.seeds:
                rec_dir = record_dir(run_dir, name, seed)
                set_seed(seed)
                model = arch.build(cfg, BuildContext(vocab_size=corpus.vocab_size, window=W))
                params = count_params(model)
                label = f"{name} seed {seed}"
                with make_progress(console) as progress:
                    task = progress.add_task(f"train {label}", total=suite.train.steps, loss=float("nan"), tps=0.0)
                    result = train(
                        model, arch, cfg, corpus.train.tokens, suite.train, window=W, seed=seed,
                        accelerator=accelerator, label=label,
                        on_step=lambda s, info: progress.update(task, completed=s, loss=info["loss"],
                                                                tps=info["tokens_per_s"]))
                    model = accelerator.unwrap_model(model)
                    etask = progress.add_task(f"eval  {label}", total=len(seqs), loss=float("nan"), tps=0.0)
                    ev = score(model, arch, seqs, ann, batch_size=suite.eval.batch_size, device=accelerator.device,
                               autocast=accelerator.autocast,
                               on_batch=lambda n: progress.update(etask, completed=n))
                metrics, series, skipped = {}, {}, {}
                for mname, _mentry, metric, mcfg in plan.metrics:
                    missing = [r for r in metric.requires if r not in ev.scores.annotations]
                    if missing:
                        skipped[mname] = f"needs annotations {missing}"
                        continue
                    for key, val in metric.compute(ev.scores, mcfg, mctx).items():
                        (series if hasattr(val, "x") else metrics)[key] = val
                record = {
                    "schema": 1,
                    "run_id": run_dir.name,
                    "created": time.time(),
                    "benchmark": suite.name,
                    "arch": name,
                    "mode": "full",
                    "seed": seed,
                    "metrics": jsonable(metrics),
                    "series": jsonable(series),
                    "metrics_skipped": skipped,
                    "train": result.as_dict(),
                    "eval": {"mode": "full", "length": L, "sequences": len(seqs), "wall_s": ev.wall_s,
                             "tokens_per_s": ev.tokens_per_s, "stats": ev.stats},
                    "model": {
                        "params": params, "config": cfg.model_dump(mode="json"), "config_hash": cfg.hash(),
                        "arch_version": arch.version, "plugin": entry.plugin, "distribution": entry.distribution,
                        "version": entry.version, "stateful": arch.stateful,
                        "train_state_passing": arch.train_state_passing,
                    },
                    "dataset": dataset_record,
                    "protocol": {
                        "window": W, "eval_length": L, "positions": list(suite.eval.positions),
                        "bucket": suite.eval.bucket, "mode": "full", "state_passing": result.state_passing,
                        "doc_policy": suite.eval.doc_policy, "bootstrap": suite.eval.bootstrap,
                        "confidence": suite.eval.confidence,
                    },
                    "suite": run_info["suite"],
                    "suite_hash": run_info["suite_hash"],
                    "provenance": prov,
                    "metric_plugins": {m[0]: {"plugin": m[1].plugin, "version": m[2].version} for m in plan.metrics},
                }
                atomic_save(rec_dir / "model.safetensors", lambda p, m=model: save_model(m, str(p)))
                atomic_save(rec_dir / "scores.npz", lambda p, s=ev.scores: _save_scores(p, s))
                record["wall_s"] = time.time() - started
                atomic_write_json(rec_dir / "record.json", record)
                records.append(rec_dir / "record.json")
                host.notify("lengen_checkpoint_evaluated", events.CheckpointEvaluated(
                    run_dir, suite.name, name, seed, suite.train.steps, record["metrics"], model))
                del model
                accelerator.free_memory()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if req.plot and records:
            from lengen.plots import plot_position

            plot_position([_load(p) for p in records], run_dir / "ppl_by_position.png")
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


def _save_scores(path: Path, scores) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, nll=scores.nll.astype(np.float32), correct=scores.correct)


def _load(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def run(host: PluginHost, req: RunRequest, console=None) -> Path:
    plan = plan_run(host, req)
    return execute(host, req, plan, console)
