"""Assembling one (architecture, seed)'s record and writing it with its files.

A record holds every mode's metrics with intervals, the checkpoints, what training did, the
cost, the model and dataset identity, the protocol, the suite and full provenance, and the
output specs of the metrics that produced it (so that the leaderboard and plots need no
metric plugin installed to read it). Files are written atomically, weights and per-token
scores first and ``record.json`` last: a record that exists is complete.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from lengen.api import jsonable
from lengen.evaluate import position_sums
from lengen.results import RECORD, SCHEMA, atomic_save, atomic_write_json


def build_record(ctx, comp, seed: int, *, label: str, config, params: int, result, evals: dict,
                 checkpoints: list[dict], checkpoint_steps: list[int], cost: dict, calibration: dict | None,
                 wall_s: float) -> dict:
    """The record of one finished job, or of one variant of it (``label``: the architecture's
    name, or ``<name>.<variant>`` with the variant's ``config``); ``ctx`` is the run's
    :class:`lengen.job.RunContext`."""
    suite, plan, mctx = ctx.suite, ctx.plan, ctx.mctx
    modes = list(evals)
    return {
        "schema": SCHEMA,
        "run_id": ctx.run_dir.name,
        "created": time.time(),
        "benchmark": suite.name,
        "arch": label,
        "seed": seed,
        "evaluations": {m: {"metrics": jsonable(e.metrics), "series": jsonable(e.series),
                            "metrics_skipped": e.skipped, "eval": jsonable(e.info)} for m, e in evals.items()},
        "checkpoints": checkpoints,
        "train": result.as_dict(),
        "cost": cost,
        "calibration": calibration,
        "model": {
            "name": comp.name, "variant": label.removeprefix(comp.name).removeprefix(".") or None,
            "params": params, "config": config.model_dump(mode="json"), "config_hash": config.hash(),
            "arch_version": comp.obj.version, "plugin": comp.entry.plugin, "distribution": comp.entry.distribution,
            "version": comp.entry.version, "stateful": comp.obj.stateful,
            "train_state_passing": comp.obj.train_state_passing,
        },
        "dataset": ctx.dataset_record,
        "protocol": {
            "window": suite.window, "eval_length": ctx.seqs.shape[1] - 1, "positions": list(suite.eval.positions),
            "bucket": suite.eval.bucket, "modes": modes, "stride": suite.eval.stride,
            "chunk": suite.eval.chunk or suite.window, "baseline": suite.eval.baseline,
            "state_passing": result.state_passing, "train_doc_policy": result.doc_policy,
            "doc_policy": suite.eval.doc_policy, "bootstrap": suite.eval.bootstrap,
            "confidence": suite.eval.confidence, "lengths": list(mctx.lengths), "contexts": list(mctx.contexts),
            "checkpoint_steps": checkpoint_steps,
        },
        "suite": ctx.run_info["suite"],
        "suite_hash": ctx.run_info["suite_hash"],
        "provenance": ctx.prov,
        "metric_plugins": {m.name: {"plugin": m.entry.plugin, "version": m.obj.version,
                                    "outputs": [o.as_dict() for o in m.obj.outputs],
                                    "plots": [p.as_dict() for p in m.obj.plots]} for m in plan.metrics},
        "wall_s": wall_s,
    }


def write_record(rec_dir: Path, record: dict, model, evals: dict, mctx, checkpoint_sums: list[np.ndarray],
                 weights: Path | None = None) -> Path:
    """Weights (unless ``weights`` names a file that already holds them: the variants of one
    training share it), per-token scores, checkpoint sums, then ``record.json``; returns its path."""
    from safetensors.torch import save_model

    if weights is None:
        weights = rec_dir / "model.safetensors"
        atomic_save(weights, lambda p: save_model(model, str(p)))
    record["weights"] = os.path.relpath(weights, rec_dir)
    for m, e in evals.items():
        if e.scores.nll is not None:
            stats = {f"stat_{k}": v.astype(np.float32) for k, v in e.token_stats.items()}
            atomic_save(rec_dir / f"scores-{m}.npz",
                        lambda p, sc=e.scores, st=stats: save_npz(p, nll=sc.nll.astype(np.float32), correct=sc.correct,
                                                                  position_sums=position_sums(sc, mctx), **st))
    if checkpoint_sums:
        atomic_save(rec_dir / "checkpoints.npz", lambda p: save_npz(
            p, steps=np.asarray([c["step"] for c in record["checkpoints"]]),
            position_sums=np.stack(checkpoint_sums), positions=np.asarray(mctx.positions, dtype=float),
            bucket=np.asarray(mctx.bucket)))
    path = rec_dir / RECORD
    atomic_write_json(path, record)
    return path


def save_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
