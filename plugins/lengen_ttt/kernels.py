"""The optional compiled CPU kernels for TTT's dual-form blocks (``blocks.cpp``) and the
layer's glue functions (``glue.cpp``), built as one extension.

On CPU the dual form done with batched torch ops spends most of its time between ops
(~100 per block, each touching every sequence x head before the next starts); the kernels
do each (sequence, head) problem start to end in cache, with the same BLAS for the matrix
products. They compute the same functions as ``model.LinearBlock`` and ``model.MLPBlock``'s
torch code (the tests compare them, forward and backward, and gradcheck them in float64).
``glue.cpp`` does ``model.QKV`` and ``model.Readout`` (elementwise work and LayerNorms) in
one pass over the rows each way, tested the same way.

They are compiled with the machine's C++ compiler the first time a TTT block runs on CPU
(about a minute, once; cached by torch under ``~/.cache/torch_extensions``).
``LENGEN_TTT_KERNEL`` chooses: ``auto`` (default: the kernel when it compiles, else the
torch code with one warning), ``cpp`` (the kernel or an error), ``torch`` (never compile).
GPUs always run the torch code.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

MODES = ("auto", "cpp", "torch")
_ext = None
_error: str | None = None


def mode() -> str:
    value = os.environ.get("LENGEN_TTT_KERNEL", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"LENGEN_TTT_KERNEL={value!r} is not one of {', '.join(MODES)}")
    return value


def cpu_kernels(like=None):
    """The compiled module, or None when the torch code is to run: mode ``torch``, mode
    ``auto`` and it did not compile, or ``like`` (a tensor) is not a float32/float64 CPU tensor."""
    global _ext, _error
    if like is not None and (like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64)):
        return None
    m = mode()
    if m == "torch":
        return None
    if _ext is None and _error is None:
        try:
            _ext = _build()
        except Exception as exc:  # no compiler, no headers, a build error: the torch code still works
            _error = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            if m == "auto":
                warnings.warn(f"TTT: the CPU kernels did not compile ({_error}); using the slower torch code. "
                              "Set LENGEN_TTT_KERNEL=torch to skip the attempt.", stacklevel=2)
    if _ext is None and m == "cpp":
        raise RuntimeError(f"LENGEN_TTT_KERNEL=cpp but the TTT CPU kernels did not compile: {_error}")
    return _ext


def _compiled_already(name: str) -> bool:
    try:  # torch's private helper, only to decide whether to announce a compile
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:
        return False


def _build():
    from torch.utils.cpp_extension import load

    name = "lengen_ttt_blocks_v2"
    here = Path(__file__).parent
    if not _compiled_already(name):
        print("lengen: compiling the TTT CPU kernels (once, about a minute) ...", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(here / "blocks.cpp"), str(here / "glue.cpp")],
                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
