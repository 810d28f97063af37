"""Cost measurements: FLOPs per token and peak evaluation memory.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications and
attention; attention is counted as the full score matrix, the counter's convention, also for
causal and windowed attention, whose useful work is smaller). Where a model's compute is
data-dependent, its architecture may report FLOPs itself (``Architecture.flops_per_token`` or
a ``flops`` per-token statistic), which takes precedence.

Peak memory: on a GPU, ``torch.cuda.max_memory_allocated``. On CPU, where torch keeps no such
counter, :class:`LiveTensorMemory` tracks the bytes of tensor storages created while it is
active and still alive, and their peak: deterministic, and it excludes the weights and the
inputs, so it measures what evaluation itself needs (activations, state, logits).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_REGISTERED = False


def _register_cpu_sdpa_flops() -> None:
    """The flop counter knows the CUDA attention kernels but not the CPU flash kernel."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return
    from torch.utils.flop_counter import register_flop_formula

    try:
        @register_flop_formula(op)
        def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            b, h, t, d = query_shape
            s = key_shape[-2]
            dv = value_shape[-1]
            return 2 * b * h * t * s * d + 2 * b * h * t * s * dv
    except Exception:  # noqa: BLE001 - already registered by torch or another caller
        pass


def flops_per_token(model: torch.nn.Module, arch, length: int, vocab_size: int, device="cpu",
                    chunk: int | None = None) -> float:
    """Forward FLOPs per token of one sequence of ``length`` tokens, fed as evaluation feeds it
    (a stateful model in chunks of ``chunk`` with its state carried)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lengen.api import as_output

    _register_cpu_sdpa_flops()
    x = torch.randint(0, vocab_size, (1, length), device=device)
    model.eval()
    grad = torch.enable_grad() if arch.grad_in_eval else torch.no_grad()
    step = chunk or length
    with grad, FlopCounterMode(display=False) as counter:
        if arch.stateful:
            state = None
            for a in range(0, length, step):
                state = as_output(model(x[:, a:a + step], state)).state
        else:
            model(x)
    return counter.get_total_flops() / length


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the ``with`` block and alive at once."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen.add(storage)
                    nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, nbytes)
        return out


def peak_memory(fn, device) -> tuple[object, int, str]:
    """Run ``fn()`` and return ``(result, peak bytes, how it was measured)``."""
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base, "cuda_max_allocated"
    with LiveTensorMemory() as tracker:
        result = fn()
    return result, tracker.peak, "live_tensors"
