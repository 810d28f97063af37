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
(about a minute, once, announced on stderr) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), in a folder named
``lengen_ttt_<hash>``: the hash covers everything the build depends on (the bytes of the C++
sources, the compiler command and flags, the torch version, the Python ABI), so every install
of the same code shares one build and a different version of the sources never overwrites
another's. The sources are copied into that folder and built from there, so the build does
not depend on where lengen is installed; once the library is there it is imported directly,
without calling the compiler or ninja.
``LENGEN_TTT_KERNEL`` chooses: ``auto`` (default: the kernel when it compiles, else the
torch code with one warning), ``cpp`` (the kernel or an error), ``torch`` (never compile).
GPUs always run the torch code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

import torch

MODES = ("auto", "cpp", "torch")
SOURCES = ("blocks.cpp", "glue.cpp")
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
_LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what torch's load() names the library
_ext = None
_error: str | None = None
_exception: BaseException | None = None


def mode() -> str:
    value = os.environ.get("LENGEN_TTT_KERNEL", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"LENGEN_TTT_KERNEL={value!r} is not one of {', '.join(MODES)}")
    return value


def compiler() -> str:
    """The C++ compiler command torch's build uses: ``$CXX``, else ``c++`` (``cl`` on Windows)."""
    return os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")


def compiler_path() -> str | None:
    """Where that compiler is, or None when it is not on PATH (the kernels cannot be built)."""
    import shutil

    words = shlex.split(compiler())  # CXX may carry a wrapper or flags: "ccache g++"
    return shutil.which(words[0]) if words else None


def cpu_kernels(like=None):
    """The compiled module, or None when the torch code is to run: mode ``torch``, mode
    ``auto`` and it did not compile, or ``like`` (a tensor) is not a float32/float64 CPU tensor."""
    global _ext, _error, _exception
    if like is not None and (like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64)):
        return None
    m = mode()
    if m == "torch":
        return None
    if _ext is None and _error is None:
        try:
            _ext = _build()
        except Exception as exc:  # no compiler, no headers, a build error: the torch code still works
            _exception = exc
            _error = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            if m == "auto":
                warnings.warn(f"TTT: the CPU kernels did not compile ({_error}); using the slower torch code. "
                              "Set LENGEN_TTT_KERNEL=torch to skip the attempt.", stacklevel=2)
    if _ext is None and m == "cpp":  # chained to the build's exception, which holds the compiler's output
        raise RuntimeError(f"LENGEN_TTT_KERNEL=cpp but the TTT CPU kernels did not compile: {_error}") from _exception
    return _ext


def extension_name(sources: dict[str, bytes]) -> str:
    """``lengen_ttt_`` and a hash of everything the build depends on: the sources' names and
    bytes, the compiler command, the flags, the torch version (which names its CUDA/ROCm/CPU
    variant) and the Python ABI and machine (torch's cache folder separates the Python version
    only when ``TORCH_EXTENSIONS_DIR`` is unset)."""
    recipe = {
        "sources": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(sources.items())},
        "cxx": compiler(), "cflags": list(CFLAGS), "ldflags": list(LDFLAGS),
        "torch": torch.__version__,
        "python": [sys.implementation.cache_tag, getattr(sys, "abiflags", ""), sys.platform, platform.machine()],
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"lengen_ttt_{digest[:16]}"


def build_directory(name: str) -> Path:
    """``$TORCH_EXTENSIONS_DIR/<name>``, else ``<torch's default extension root>/<name>``."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def _place(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` unless it is there already. The file is never rewritten when
    it holds those bytes (a newer modification time would make ninja compile again), and a
    concurrent first build sees either no file or the whole one."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        try:
            os.link(tmp, path)  # only if still absent: another process may have placed it meanwhile
        except FileExistsError:
            if path.read_bytes() != data:  # a damaged copy
                os.replace(tmp, path)
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _import(name: str, library: Path):
    """Load a built extension the way torch's load() does at its end."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, directory: Path, sources: list[Path]):
    """Build (or bring up to date) with torch's ninja-driven load() and import the result."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(s) for s in sources], extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)


def announce(message: str) -> None:
    """One line on stderr. Under a live rich display (lengen's progress bars) ``sys.stderr`` is
    rich's redirect, which prints the line above the bars instead of through them."""
    print(message, file=sys.stderr, flush=True)


def _build():
    here = Path(__file__).parent
    code = {n: (here / n).read_bytes() for n in SOURCES}
    name = extension_name(code)
    directory = build_directory(name)
    library = directory / f"{name}{_LIB_SUFFIX}"
    # A library in a folder named by this hash was built from these bytes with these flags.
    # torch's own "lock" file is there only while a build is under way: then load() waits for it.
    if library.exists() and not (directory / "lock").exists():
        try:
            return _import(name, library)
        except ImportError:  # a damaged file (a build killed while linking): build it again
            library.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    for n, data in code.items():  # built from these copies: the same paths, so the same commands, for every install
        _place(directory / n, data)
    if not library.exists():
        announce("lengen: compiling the TTT CPU kernels (once, about a minute) ...")
    return _compile(name, directory, [directory / n for n in SOURCES])
