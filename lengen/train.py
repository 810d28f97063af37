"""The training loop: one recipe for every architecture, through accelerate.

Read top to bottom: batches of training windows, AdamW with the architecture's parameter
groups (and their update schedule), warmup + cosine learning rate, gradient accumulation
and clipping, optional state passing across consecutive windows, a progress callback.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
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
    """

    def __init__(self, tokens: np.ndarray, window: int, rows: int, seed: int, state_passing: bool,
                 doc_starts: np.ndarray | None = None, doc_policy: str = "auto"):
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
        return self.tokens[starts[:, None] + self._span], reset


def make_accelerator(device: str, precision: str, **accelerator_kwargs):
    """An ``accelerate.Accelerator`` for ``--device`` (auto, cpu, cuda) and ``train.precision``
    (auto: bf16 on a GPU that supports it, else fp32); returns it and the precision used.
    ``accelerator_kwargs`` go to ``Accelerator`` (the trackers: ``log_with``, ``project_config``)."""
    import warnings

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
    return Accelerator(cpu=use_cpu, mixed_precision=mixed, **accelerator_kwargs), precision


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
    losses: list[dict] = field(default_factory=list)  # every log_every steps: step, loss, aux...
    groups: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def train(model: torch.nn.Module, arch: Architecture, arch_config: ArchConfig, tokens: np.ndarray,
          spec: TrainSpec, *, window: int, seed: int, accelerator, label: str = "",
          doc_starts: np.ndarray | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
          checkpoint_steps: set[int] | None = None, log_every: int = 10) -> TrainResult:
    """Train ``model`` in place for ``spec.steps`` optimizer steps and return what happened.

    ``on_step(step, info)`` is called after every optimizer step (progress bars);
    ``on_checkpoint(step, model)`` at each step in ``checkpoint_steps`` (0 = before training);
    if it returns True after a step, training stops there (early stopping).
    """
    state_passing = bool(spec.state_passing and arch.train_state_passing)
    groups = arch.param_groups(model, arch_config) or default_param_groups(model)
    schedules = sorted({g.update_every for g in groups})
    optimizers = {}
    for every in schedules:
        pgs = [{"params": g.params, "lr": spec.lr * g.lr_scale, "lr_scale": g.lr_scale,
                "weight_decay": spec.weight_decay if g.weight_decay is None else g.weight_decay}
               for g in groups if g.update_every == every and g.params]
        optimizers[every] = adamw(pgs, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    prepared = accelerator.prepare(model, *optimizers.values())
    model, opts = prepared[0], dict(zip(optimizers, prepared[1:]))

    batches = [WindowBatches(tokens, window, spec.batch_size, seed * 1000 + i, state_passing,
                             doc_starts=doc_starts, doc_policy=spec.doc_policy)
               for i in range(spec.grad_accum)]
    states: list[Any] = [None] * spec.grad_accum
    tokens_per_step = spec.batch_size * spec.grad_accum * window
    checkpoint_steps = checkpoint_steps or set()
    losses, step_times = [], []
    model.train()
    if 0 in checkpoint_steps and on_checkpoint:
        on_checkpoint(0, accelerator.unwrap_model(model))
    start = time.perf_counter()
    loss_value = float("nan")
    stopped_at = None
    done = 0
    for step in range(spec.steps):
        t0 = time.perf_counter()
        factor = lr_factor(step, spec)
        lm_total, aux_totals = 0.0, {}
        for micro in range(spec.grad_accum):
            batch, reset = batches[micro].next()
            batch = batch.to(accelerator.device)
            state = None if reset else detach_state(states[micro])
            out = as_output(model(batch[:, :-1], state))
            lm = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss = lm + sum(out.aux_losses.values()) if out.aux_losses else lm
            accelerator.backward(loss / spec.grad_accum)
            states[micro] = out.state if state_passing else None
            lm_total += lm.item() / spec.grad_accum
            for k, v in out.aux_losses.items():
                aux_totals[k] = aux_totals.get(k, 0.0) + float(v.detach()) / spec.grad_accum
        if not math.isfinite(lm_total) or not all(math.isfinite(v) for v in aux_totals.values()):
            raise TrainingDivergedError(
                f"{label or 'training'}: the loss became {lm_total} at step {step + 1} (seed {seed}); "
                f"lower train.lr (now {spec.lr}) or keep train.clip > 0 (now {spec.clip})", step=step + 1)
        for every, opt in opts.items():
            if (step + 1) % every:
                continue  # this group keeps accumulating
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if every > 1:
                for p in params:
                    p.grad.div_(every)
            if spec.clip > 0:
                accelerator.clip_grad_norm_(params, spec.clip)
            for g in opt.param_groups:
                g["lr"] = spec.lr * g["lr_scale"] * factor
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss_value = lm_total
        dt = time.perf_counter() - t0
        step_times.append(dt)
        if step % log_every == 0 or step == spec.steps - 1:
            losses.append({"step": step + 1, "loss": round(lm_total, 5), "lr": spec.lr * factor,
                           **{k: round(v, 6) for k, v in aux_totals.items()}})
        if on_step:
            on_step(step + 1, {"loss": lm_total, "tokens_per_s": tokens_per_step / dt, **aux_totals})
        done = step + 1
        if done in checkpoint_steps and on_checkpoint:
            t_ck = time.perf_counter()
            stop = on_checkpoint(done, accelerator.unwrap_model(model))
            start += time.perf_counter() - t_ck  # evaluation time is not training time
            model.train()
            if stop:
                stopped_at = done
                break
    wall = time.perf_counter() - start
    steady = step_times[1:] or step_times
    return TrainResult(
        steps=done,
        tokens=tokens_per_step * done,
        wall_s=wall,
        tokens_per_s=tokens_per_step * done / wall,
        tokens_per_s_median=tokens_per_step / statistics.median(steady),
        final_loss=loss_value,
        state_passing=state_passing,
        stopped_early_at=stopped_at,
        doc_policy=batches[0].policy,
        losses=losses,
        groups=[{"name": g.name, "params": sum(p.numel() for p in g.params), "lr_scale": g.lr_scale,
                 "update_every": g.update_every} for g in groups],
    )
