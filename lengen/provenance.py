"""Where a result came from: versions, git commit, packages, device."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import lengen
from lengen import allocator

PACKAGES = ("torch", "numpy", "accelerate", "safetensors", "pydantic", "pluggy", "datasets",
            "huggingface_hub", "tokenizers", "pyarrow", "pandas", "matplotlib", "click", "rich")


@lru_cache(maxsize=1)
def git_info() -> dict:
    """Commit of the lengen source tree, if it is a git checkout (editable installs)."""
    root = Path(lengen.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device) -> dict:
    import torch

    info = {"type": str(getattr(device, "type", device)), "torch_threads": torch.get_num_threads(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if info["type"] == "cuda":
        idx = device.index or 0
        info["name"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info


def provenance(device, precision: str, argv=None) -> dict:
    return {
        "lengen_version": lengen.__version__,
        "git": git_info(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_info(device),
        "precision": precision,
        "malloc_tuned": allocator.tuned(),
        "command": list(argv if argv is not None else sys.argv),
    }
