"""Training checkpoints: everything needed to continue a job exactly where it stopped.

A checkpoint is a folder ``<record dir>/checkpoints/step-<step>/`` holding

- ``model.safetensors``: the weights;
- ``train.safetensors`` and ``train.json``: every optimizer's state (one per update period:
  Adam's moments and step counts), the summed gradients of parameter groups that have not
  stepped yet, the training step (the learning-rate schedule is a function of it), and the
  job's progress (the loss log, the checkpoint evaluations so far, early stopping);
- ``rank<r>.safetensors`` and ``rank<r>.json``, one pair per process: its RNG states (torch,
  CUDA, numpy, Python), the position of each of its batch streams, and the recurrent state
  it carries across steps.

Tensors are stored with safetensors and everything else as JSON: resuming never unpickles
anything. The processes send their parts to the main process, which alone writes, under a
temporary name renamed when complete, so a kill during the write leaves the previous
checkpoint intact; the latest two are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from lengen.results import atomic_save, atomic_write_json

KEEP = 2


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (half-written ones are ignored)."""
    found = sorted(p for p in Path(root).glob("step-*") if p.is_dir() and (p / "train.json").is_file())
    return found[-1] if found else None


def save(trainer, root: Path, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write a checkpoint of ``trainer`` at its current step, with the job's ``meta`` (JSON)
    and ``arrays``; every process calls it."""
    from safetensors.torch import save_file, save_model

    dist = trainer.dist
    final = step_dir(root, trainer.done)
    tmp = final.with_name(f".{final.name}.tmp")
    ranks = dist.gather(_rank_state(trainer))  # only the main process writes
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for r, (tensors, rank_meta) in enumerate(ranks):
            atomic_save(tmp / f"rank{r}.safetensors", lambda p, t=tensors: save_file(t, str(p)))
            atomic_write_json(tmp / f"rank{r}.json", rank_meta)
        atomic_save(tmp / "model.safetensors", lambda p: save_model(trainer.module, str(p)))
        tensors, shared = _shared_state(trainer)
        tensors.update({f"job.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
        atomic_save(tmp / "train.safetensors", lambda p: save_file(tensors, str(p)))
        _fault("checkpoint", trainer.done)  # tests: a kill in the middle of the write
        atomic_write_json(tmp / "train.json", {**shared, "world": dist.world, "job": meta})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(p for p in Path(root).glob("step-*") if p.is_dir())[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in Path(root).glob(".step-*.tmp"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load(trainer, path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Restore ``trainer`` from the checkpoint at ``path``; returns the job's meta and arrays."""
    from safetensors.torch import load_file, load_model

    from lengen.errors import ConfigError

    dist = trainer.dist
    shared = json.loads((path / "train.json").read_text())
    if shared.get("world", 1) != dist.world:
        raise ConfigError(f"{path} was written by {shared.get('world', 1)} processes and this run has {dist.world}; "
                          "resume with the same number of processes")
    load_model(trainer.module, str(path / "model.safetensors"))
    tensors = load_file(str(path / "train.safetensors"))
    _load_shared(trainer, tensors, shared)
    _load_rank(trainer, load_file(str(path / f"rank{dist.rank}.safetensors")),
               json.loads((path / f"rank{dist.rank}.json").read_text()))
    arrays = {k[4:]: v.numpy() for k, v in tensors.items() if k.startswith("job.")}
    return shared["job"], arrays


# ---------------------------------------------------------------------------------------


def _shared_state(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizers and pending summed gradients: identical on every process."""
    tensors: dict[str, torch.Tensor] = {}
    opts = {}
    for period, opt in trainer.opts.items():
        every = _name(period)
        sd = opt.state_dict()
        values = {}
        for idx, st in sd["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt{every}.{idx}.{key}"] = v.detach().cpu().contiguous()
                else:
                    values[f"{idx}.{key}"] = v
        opts[str(every)] = {"param_groups": sd["param_groups"], "values": values, "indices": list(sd["state"])}
    for name, p in trainer.module.named_parameters():
        if p.grad is not None:
            tensors[f"grad.{name}"] = p.grad.detach().cpu().contiguous()
    return tensors, {"step": trainer.done, "optimizers": opts, "grad_norms": trainer.grad_norms}


def _load_shared(trainer, tensors: dict[str, torch.Tensor], shared: dict) -> None:
    for period, opt in trainer.opts.items():
        every = _name(period)
        saved = shared["optimizers"][str(every)]
        state: dict[int, dict[str, Any]] = {}
        for idx in saved["indices"]:
            state[int(idx)] = {}
        for key, v in tensors.items():
            if key.startswith(f"opt{every}."):
                _o, idx, name = key.split(".", 2)
                state[int(idx)][name] = v
        for key, v in saved["values"].items():
            idx, name = key.split(".", 1)
            state[int(idx)][name] = v
        opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    device = trainer.accelerator.device
    for name, p in trainer.module.named_parameters():
        g = tensors.get(f"grad.{name}")
        p.grad = None if g is None else g.to(device=device, dtype=p.dtype).clone()
    trainer.done = int(shared["step"])
    trainer.grad_norms = dict(shared.get("grad_norms", {}))


def _name(period) -> str:
    """An optimizer's key (its update period, and offset) as a name: ``(16, 0)`` -> ``16-0``."""
    return "-".join(map(str, period)) if isinstance(period, tuple) else str(period)


def _rank_state(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNGs, stream positions and carried states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    meta: dict[str, Any] = {"numpy": _np_state(), "python": _py_state(), "batches": [], "states": []}
    for i, b in enumerate(trainer.batches):
        st = b.state_dict()
        tensors[f"batches.{i}.generator"] = st["generator"]
        meta["batches"].append({"step": st["step"]})
    for i, state in enumerate(trainer.states):
        leaves, spec = pytree.tree_flatten(state)
        kinds = []
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                tensors[f"states.{i}.{j}"] = leaf.detach().cpu().contiguous()
                kinds.append({"tensor": True, "device": str(leaf.device), "dtype": str(leaf.dtype)})
            else:
                kinds.append({"tensor": False, "value": leaf})
        meta["states"].append({"spec": pytree.treespec_dumps(spec), "leaves": kinds})
    return tensors, meta


def _load_rank(trainer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    _set_np_state(meta["numpy"])
    _set_py_state(meta["python"])
    for i, (b, st) in enumerate(zip(trainer.batches, meta["batches"])):
        b.load_state_dict({"step": st["step"], "generator": tensors[f"batches.{i}.generator"]})
    states = []
    for i, st in enumerate(meta["states"]):
        spec = pytree.treespec_loads(st["spec"])
        leaves = [tensors[f"states.{i}.{j}"].to(k["device"]) if k["tensor"] else k["value"]
                  for j, k in enumerate(st["leaves"])]
        states.append(pytree.tree_unflatten(leaves, spec))
    trainer.states = states


def _np_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_np_state(s: dict) -> None:
    np.random.set_state((s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def _fault(where: str, step: int) -> None:
    """Fault injection for the resume tests: ``LENGEN_FAULT=kill-in-checkpoint@<step>`` kills
    the process (SIGKILL) in the middle of writing that step's checkpoint."""
    import os
    import signal

    if os.environ.get("LENGEN_FAULT") == f"kill-in-{where}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
