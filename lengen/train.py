"""The training loop: one recipe for every architecture, through accelerate.

Read top to bottom: batches of training windows, AdamW with the architecture's parameter
groups (and their update schedule: a slow group sums its gradients between its updates),
warmup + cosine learning rate, gradient accumulation and clipping, optional state passing
across consecutive windows, auxiliary losses (from the forward, or from the architecture
given the targets), a progress callback.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from lengen.api import Architecture, ArchConfig, ParamGroup, as_output
from lengen.errors import ConfigError, TrainingDivergedError
from lengen.suites import TrainSpec


def detach_state(state: Any) -> Any:
    """Cut the graph at a window boundary (truncated backprop), keeping the values."""
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state)


class WindowBatches:
    """Deterministic training batches of ``window + 1`` tokens (inputs and shifted targets).

    Without state passing, each row starts at a uniformly random offset. With state passing,
    row ``r`` is a lane that walks its own text one window per step, so the state carried
    from the previous step belongs to the same text; ``reset`` says that every lane starts a
    new text and its state must start afresh. Two document policies:

    ``reset``: lanes walk whole documents (in a seeded order) and the state is reset at
    every document start, as evaluation starts every document afresh. This needs documents
    of equal length ``1 + k x window`` (the synthetic language's), so that all lanes start
    new documents on the same step.
    ``packed``: lanes walk contiguous stretches of the concatenated stream, carrying the
    state across document boundaries; it is reset only when a lane wraps around.
    ``auto`` picks ``reset`` when the documents allow it, else ``packed``; ``policy`` says
    which was used.

    With several processes every rank draws the same global batch of ``rows`` rows and keeps
    its block of them (``rank``, ``world``): the global batch is the one-process batch, and a
    lane (a stream) stays on one rank for the whole run, so its carried state stays its own.
    ``state_dict`` / ``load_state_dict`` save and restore the position in the stream.
    """

    def __init__(self, tokens: np.ndarray, window: int, rows: int, seed: int, state_passing: bool,
                 doc_starts: np.ndarray | None = None, doc_policy: str = "auto", rank: int = 0, world: int = 1):
        if rows % world:
            raise ConfigError(f"train.batch_size = {rows} must be divisible by the number of processes ({world}), "
                              "so that every process trains on the same number of rows")
        self.keep = slice(rank * rows // world, (rank + 1) * rows // world)
        n = len(tokens)
        if n < window + 1:
            raise ConfigError(
                f"the training split has {n} tokens, fewer than one window of {window} + 1; "
                "lower window or use more training data")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.window, self.rows, self.state_passing = window, rows, state_passing
        self.gen = torch.Generator().manual_seed(seed)
        self._span = torch.arange(window + 1)
        self.step = 0
        self.policy = "random windows"
        if not state_passing:
            return
        lengths = np.diff(np.append(np.asarray(doc_starts if doc_starts is not None else [0]), n))
        aligned = (len(lengths) >= rows and len(set(lengths.tolist())) == 1
                   and (lengths[0] - 1) % window == 0 and lengths[0] > window)
        if doc_policy == "reset" and not aligned:
            raise ConfigError(
                "train.doc_policy = 'reset' needs at least train.batch_size training documents, all of "
                f"length 1 + k x W (W = {window}); these have lengths {sorted(set(lengths.tolist()))[:5]}; "
                "use train.doc_policy = 'packed'")
        if doc_policy in ("reset", "auto") and aligned:
            self.policy = "reset"
            self.doc_len = int(lengths[0])
            self.windows_per_doc = (self.doc_len - 1) // window
            order = torch.randperm(len(lengths), generator=self.gen)
            self.lane_docs = [order[r::rows][: len(lengths) // rows] for r in range(rows)]
            return
        self.policy = "packed"
        self.lane_len = n // rows
        self.windows_per_lane = (self.lane_len - 1) // window
        if self.windows_per_lane < 1:
            raise ConfigError(
                f"state passing needs at least one window of {window} + 1 tokens per lane, but "
                f"{n} training tokens split into {rows} lanes give {self.lane_len}; "
                "lower train.batch_size or use more data")

    def next(self) -> tuple[torch.Tensor, bool]:
        W = self.window
        if self.policy == "reset":
            k = self.step % self.windows_per_doc
            doc = (self.step // self.windows_per_doc) % len(self.lane_docs[0])
            starts = torch.stack([docs[doc] for docs in self.lane_docs]) * self.doc_len + k * W
            reset = k == 0
        elif self.policy == "packed":
            k = self.step % self.windows_per_lane
            starts = torch.arange(self.rows) * self.lane_len + k * W
            reset = k == 0
        else:
            starts = torch.randint(0, len(self.tokens) - W, (self.rows,), generator=self.gen)
            reset = True
        self.step += 1
        return self.tokens[starts[self.keep, None] + self._span], reset

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.gen.set_state(state["generator"])


def make_accelerator(device: str, precision: str, find_unused: bool = False, **accelerator_kwargs):
    """An ``accelerate.Accelerator`` for ``--device`` (auto, cpu, cuda) and ``train.precision``
    (auto: bf16 on a GPU that supports it, else fp32); returns it and the precision used.

    ``find_unused``: under several processes, let DDP find parameters a forward did not use
    (with state passing, a model's initial state is used only on the steps that reset it).
    ``accelerator_kwargs`` go to ``Accelerator`` (the trackers: ``log_with``, ``project_config``)."""
    import warnings

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

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
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused else []
    return Accelerator(cpu=use_cpu, mixed_precision=mixed, kwargs_handlers=handlers, **accelerator_kwargs), precision


def count_params(model: torch.nn.Module) -> int:
    """Parameters of ``model``, each shared tensor once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def default_param_groups(model: torch.nn.Module) -> list[ParamGroup]:
    """Weight decay on matrices and embeddings, none on norms and biases (nanoGPT's rule)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [ParamGroup(decay, name="decay")]
    if no_decay:
        groups.append(ParamGroup(no_decay, name="no_decay", weight_decay=0.0))
    return groups


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with its fused kernel where this torch has one for these parameters (CPU since
    torch 2.4, CUDA): one pass over all tensors instead of a Python loop of ~10 ops per
    tensor (on CPU 4x faster at the sizes lengen trains; the same update to float rounding)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device/dtype without it
        return torch.optim.AdamW(params, **kwargs)


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio`` at the last step."""
    warm = spec.warmup_steps()
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, spec.steps - warm)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    tokens_per_s_median: float
    final_loss: float
    state_passing: bool
    stopped_early_at: int | None = None
    doc_policy: str = "random windows"  # how training windows were drawn (see WindowBatches)
    losses: list[dict] = field(default_factory=list)  # every log_every steps: step, loss, aux, logs, grad norms
    groups: list[dict] = field(default_factory=list)
    #: groups whose summed gradient of their last steps was never applied (training ended
    #: between two of their updates): name, update_every, pending_steps
    pending: list[dict] = field(default_factory=list)
    processes: int = 1  # data-parallel processes that trained it
    resumed_from: list[int] = field(default_factory=list)  # steps at which training was resumed

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_groups(model: torch.nn.Module, groups: list[ParamGroup], who: str) -> None:
    """Every trainable parameter in exactly one group (a clear error naming the others)."""
    names = {id(p): n for n, p in model.named_parameters()}
    count: dict[int, int] = {}
    for g in groups:
        for p in g.params:
            count[id(p)] = count.get(id(p), 0) + 1
    bad = [g.name for g in groups if int(g.update_every) != g.update_every or g.update_every < 1 or g.offset < 0]
    if bad:
        raise ConfigError(f"{who}: param group {bad[0]!r} needs an integer update_every >= 1 and an offset >= 0")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in count]
    twice = [names.get(i, "?") for i, c in count.items() if c > 1]
    foreign = [i for i in count if i not in names]
    if missing or twice or foreign:
        what = "; ".join(part for part in (
            f"leave out {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            if missing else "",
            f"list {', '.join(twice[:5])} more than once" if twice else "",
            f"hold {len(foreign)} tensors that are not the model's parameters" if foreign else "") if part)
        raise ConfigError(f"{who}: param_groups must hold every trainable parameter exactly once, but they {what}")


class Trainer:
    """One model's training state and its optimizer step, read top to bottom in :meth:`step`.

    Parameter groups (``Architecture.param_groups``, else weight decay on matrices only) get
    one AdamW per update period, so a group's Adam moments advance only on its own updates.
    A group with ``update_every = n`` **sums** its gradients over n steps and its optimizer
    steps on steps n, 2n, ... (1-based): the Nested Learning rule (``offset = k``: steps
    k + n, k + 2n, ...). Clipping (``train.clip``) applies to each optimizer's gradient when
    it steps."""

    def __init__(self, model, arch: Architecture, config: ArchConfig, tokens: np.ndarray, spec: TrainSpec, *,
                 window: int, seed: int, accelerator, doc_starts: np.ndarray | None = None, label: str = ""):
        from lengen.dist import Dist

        self.arch, self.config, self.spec, self.window, self.seed = arch, config, spec, window, seed
        self.accelerator, self.label = accelerator, label
        self.dist = Dist.of(accelerator)
        self.state_passing = bool(spec.state_passing and arch.train_state_passing)
        self.groups = arch.param_groups(model, config) or default_param_groups(model)
        check_groups(model, self.groups, f"architecture {label.split(' seed')[0] or type(arch).__name__!r}")
        optimizers = {}
        for period in sorted({(g.update_every, g.offset) for g in self.groups}):  # (every, offset)
            pgs = [{"params": g.params, "name": g.name, "lr": spec.lr * g.lr_scale, "lr_scale": g.lr_scale,
                    "weight_decay": spec.weight_decay if g.weight_decay is None else g.weight_decay}
                   for g in self.groups if (g.update_every, g.offset) == period and g.params]
            optimizers[period] = adamw(pgs, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
        if spec.compile:
            model = torch.compile(model)
        prepared = accelerator.prepare(model, *optimizers.values())
        self.model, self.opts = prepared[0], dict(zip(optimizers, prepared[1:]))
        self.batches = [WindowBatches(tokens, window, spec.batch_size, seed * 1000 + i, self.state_passing,
                                      doc_starts=doc_starts, doc_policy=spec.doc_policy, rank=self.dist.rank,
                                      world=self.dist.world)
                        for i in range(spec.grad_accum)]
        self.states: list[Any] = [None] * spec.grad_accum
        self.tokens_per_step = spec.batch_size * spec.grad_accum * window
        self.done = 0  # optimizer steps taken
        self.grad_norms: dict[str, float] = {}  # each group's gradient norm at its latest update

    @property
    def module(self) -> torch.nn.Module:
        """The model itself: without the DDP wrapper, and without torch.compile's."""
        m = self.accelerator.unwrap_model(self.model)
        return getattr(m, "_orig_mod", m)

    def step(self, measure_norms: bool = False, stop: bool = False) -> dict:
        """One optimizer step: the micro-batches' forward and backward (gradients synchronised
        across processes once, on the last), then every optimizer whose period ends here.
        Returns the step's mean LM loss, auxiliary losses and logs, averaged over processes,
        and ``stop``: whether any process asked to stop after this step."""
        import contextlib

        spec, step = self.spec, self.done
        lm_total, aux, logs = 0.0, {}, {}
        for micro in range(spec.grad_accum):
            batch, reset = self.batches[micro].next()
            batch = batch.to(self.accelerator.device)
            state = None if reset else detach_state(self.states[micro])
            last = micro == spec.grad_accum - 1
            with contextlib.nullcontext() if last or self.dist.world == 1 else self.accelerator.no_sync(self.model):
                out = as_output(self.model(batch[:, :-1], state))
                targets = batch[:, 1:]
                token_nll = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view(targets.shape)
                lm = token_nll.mean()
                aux_losses = {**out.aux_losses, **self.arch.training_losses(self.module, out, targets, token_nll)}
                loss = lm + sum(aux_losses.values()) if aux_losses else lm
                self.accelerator.backward(loss / spec.grad_accum)
            self.states[micro] = out.state if self.state_passing else None
            lm_total += lm.item() / spec.grad_accum
            for target, values in ((aux, aux_losses), (logs, out.logs)):
                for k, v in values.items():
                    target[k] = target.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) / spec.grad_accum
        if self.dist.world > 1:  # one collective: the losses to log, and whether anyone must stop
            keys = sorted(aux) + sorted(logs)
            reduced = self.dist.reduce_mean([lm_total, *[aux.get(k, logs.get(k)) for k in keys], float(stop)])
            lm_total = reduced[0]
            for k, v in zip(keys, reduced[1:-1]):
                (aux if k in aux else logs)[k] = v
            stop = reduced[-1] > 0
        if not math.isfinite(lm_total) or not all(math.isfinite(v) for v in aux.values()):
            raise TrainingDivergedError(
                f"{self.label or 'training'}: the loss became {lm_total} at step {step + 1} (seed {self.seed}); "
                f"lower train.lr (now {spec.lr}) or keep train.clip > 0 (now {spec.clip})", step=step + 1)
        factor = lr_factor(step, spec)
        for (every, offset), opt in self.opts.items():
            if step + 1 <= offset or (step + 1 - offset) % every:
                continue  # this period's groups keep summing their gradients
            if measure_norms or every > 1 or offset:
                for g in opt.param_groups:
                    grads = [p.grad.detach().float().norm() for p in g["params"] if p.grad is not None]
                    self.grad_norms[g["name"]] = float(torch.stack(grads).norm()) if grads else 0.0
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if spec.clip > 0:
                self.accelerator.clip_grad_norm_(params, spec.clip)
            for g in opt.param_groups:
                g["lr"] = spec.lr * g["lr_scale"] * factor
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.done += 1
        return {"loss": lm_total, "lr": spec.lr * factor, **aux, **logs, "stop": stop}

    def pending(self) -> list[dict]:
        """Groups holding summed gradients their optimizer has not applied yet."""
        out = []
        for (every, offset), opt in self.opts.items():
            since = self.done - offset
            k = since % every if since >= every else self.done  # steps since its last update (or all)
            if k:
                out += [{"group": g["name"], "update_every": every, "pending_steps": k} for g in opt.param_groups]
        return out


def train(model: torch.nn.Module, arch: Architecture, arch_config: ArchConfig, tokens: np.ndarray,
          spec: TrainSpec, *, window: int, seed: int, accelerator, label: str = "",
          doc_starts: np.ndarray | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
          checkpoint_steps: set[int] | None = None, log_every: int = 10,
          save_dir: Path | None = None, progress: Any = None) -> TrainResult:
    """Train ``model`` in place for ``spec.steps`` optimizer steps and return what happened.

    ``on_step(step, info)`` is called after every optimizer step (progress bars);
    ``on_checkpoint(step, model)`` at each step in ``checkpoint_steps`` (0 = before training);
    if it returns True after a step, training stops there (early stopping). Every
    ``log_every`` steps the record keeps the loss, lr, auxiliary losses, logged values and
    each group's gradient norm at its latest update (``grad_norm.<group>``).

    ``save_dir``: where training checkpoints go (:mod:`lengen.checkpoint`), every
    ``train.checkpoint_every`` steps, at the end of training, and when Ctrl-C or SIGTERM
    arrives (then the signal is raised after the checkpoint). If it already holds one,
    training continues from it exactly. ``progress``: the job's own state to keep in
    checkpoints (an object with ``state() -> (meta, arrays)`` and ``load(meta, arrays)``).
    """
    from lengen import checkpoint, interrupt

    trainer = Trainer(model, arch, arch_config, tokens, spec, window=window, seed=seed, accelerator=accelerator,
                      doc_starts=doc_starts, label=label)
    checkpoint_steps = checkpoint_steps or set()
    losses, step_times = [], []
    resumed_from: list[int] = []
    wall_before = 0.0  # training time of earlier segments (a resumed job)
    stopped_at = None
    found = checkpoint.latest(save_dir) if save_dir is not None else None
    if found is not None:
        meta, arrays = checkpoint.load(trainer, found)
        losses, wall_before = meta["losses"], meta["wall_s"]
        resumed_from, stopped_at = meta["resumed_from"] + [trainer.done], meta["stopped_at"]
        if progress is not None:
            progress.load(meta["progress"], arrays)

    def save():
        meta, arrays = progress.state() if progress is not None else ({}, {})
        checkpoint.save(trainer, save_dir, {"losses": losses, "wall_s": wall_before + time.perf_counter() - start,
                                            "resumed_from": resumed_from, "stopped_at": stopped_at,
                                            "progress": meta}, arrays)

    trainer.model.train()
    if 0 in checkpoint_steps and on_checkpoint and trainer.done == 0:
        on_checkpoint(0, trainer.module)
    start = time.perf_counter()
    info: dict = {"loss": losses[-1]["loss"] if losses else float("nan")}
    every = spec.checkpoint_every
    with interrupt.soft():
        while trainer.done < spec.steps and stopped_at is None:
            t0 = time.perf_counter()
            log = trainer.done % log_every == 0 or trainer.done == spec.steps - 1
            info = trainer.step(measure_norms=log, stop=interrupt.requested() is not None)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            done = trainer.done
            if log:
                losses.append({"step": done, **{k: v if k == "lr" else round(v, 6) for k, v in info.items()
                                                if k != "stop"},
                               **{f"grad_norm.{g}": round(v, 6) for g, v in trainer.grad_norms.items()}})
            if on_step:
                on_step(done, {**info, "tokens_per_s": trainer.tokens_per_step / dt})
            if done in checkpoint_steps and on_checkpoint:
                t_ck = time.perf_counter()
                stop = on_checkpoint(done, trainer.module)
                start += time.perf_counter() - t_ck  # evaluation time is not training time
                trainer.model.train()
                if stop:
                    stopped_at = done
            _fault_at_step(done)
            if save_dir is not None and (info["stop"] or (every and done % every == 0 and done < spec.steps)):
                save()
            if info["stop"]:
                interrupt.raise_for(interrupt.requested() or signal.SIGTERM)
    if save_dir is not None and every and resumed_from[-1:] != [trainer.done]:
        save()  # the trained model: a job interrupted during evaluation resumes from here
    wall = wall_before + time.perf_counter() - start
    steady = step_times[1:] or step_times
    pending = trainer.pending()
    if pending and trainer.dist.main:
        import warnings

        warnings.warn(f"{label or 'training'}: training ended with unapplied summed gradients of "
                      + ", ".join(f"{p['group']} ({p['pending_steps']} of {p['update_every']} steps)" for p in pending)
                      + "; recorded in train.pending (use a step count divisible by every update period to avoid it)",
                      stacklevel=2)
    done = trainer.done
    return TrainResult(
        steps=done,
        tokens=trainer.tokens_per_step * done,
        wall_s=wall,
        tokens_per_s=trainer.tokens_per_step * done / wall if wall > 0 else 0.0,
        tokens_per_s_median=trainer.tokens_per_step / statistics.median(steady) if steady else 0.0,
        final_loss=info["loss"],
        state_passing=trainer.state_passing,
        stopped_early_at=stopped_at,
        doc_policy=trainer.batches[0].policy,
        losses=losses,
        groups=[{"name": g.name, "params": sum(p.numel() for p in g.params), "lr_scale": g.lr_scale,
                 "update_every": g.update_every, "offset": g.offset} for g in trainer.groups],
        pending=pending,
        processes=trainer.dist.world,
        resumed_from=resumed_from,
    )


def _fault_at_step(step: int) -> None:
    """Fault injection for the resume tests: ``LENGEN_FAULT=kill-at-step@<n>`` kills the
    process (SIGKILL) right after optimizer step n."""
    if os.environ.get("LENGEN_FAULT") == f"kill-at-step@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
