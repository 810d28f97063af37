"""The optional compiled CPU kernel for TTT-Linear's dual-form block (``linear_block.cpp``).

On CPU the dual form done with batched torch ops spends most of its time between ops
(~100 per block, each touching every sequence x head before the next starts); the kernel
does each (sequence, head) problem start to end in cache, with the same BLAS for the
matrix products. It computes the same function as ``model.LinearBlock``'s torch code
(the tests compare them, forward and backward, and gradcheck the kernel in float64).

It is compiled with the machine's C++ compiler the first time a TTT-Linear model is built
on CPU (about a minute, once; cached by torch under ``~/.cache/torch_extensions``).
``LENGEN_TTT_KERNEL`` chooses: ``auto`` (default: the kernel when it compiles, else the
torch code with one warning), ``cpp`` (the kernel or an error), ``torch`` (never compile).
GPUs always run the torch code.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

MODES = ("auto", "cpp", "torch")
_ext = None
_error: str | None = None


def mode() -> str:
    value = os.environ.get("LENGEN_TTT_KERNEL", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"LENGEN_TTT_KERNEL={value!r} is not one of {', '.join(MODES)}")
    return value


def linear_kernel():
    """The compiled module, or None when the torch code is to run (mode ``torch``, or ``auto``
    and it did not compile)."""
    global _ext, _error
    m = mode()
    if m == "torch":
        return None
    if _ext is None and _error is None:
        try:
            _ext = _build()
        except Exception as exc:  # no compiler, no headers, a build error: the torch code still works
            _error = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            if m == "auto":
                warnings.warn(f"TTT-Linear: the CPU kernel did not compile ({_error}); using the slower torch code. "
                              "Set LENGEN_TTT_KERNEL=torch to skip the attempt.", stacklevel=2)
    if _ext is None and m == "cpp":
        raise RuntimeError(f"LENGEN_TTT_KERNEL=cpp but the TTT-Linear CPU kernel did not compile: {_error}")
    return _ext


def _build():
    from torch.utils.cpp_extension import load

    from torch.utils.cpp_extension import _get_build_directory

    name = "lengen_ttt_linear_block_v4"
    src = Path(__file__).with_name("linear_block.cpp")
    if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
        print("lengen: compiling the TTT-Linear CPU kernel (once, about a minute) ...", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(src)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                verbose=False)
