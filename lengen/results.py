"""The results store: one folder per run, one record per (architecture, seed).

Layout::

    results/<run id>/run.json                    what was asked, status, timings
    results/<run id>/<arch>/seed<k>/record.json  metrics with intervals + full provenance
    results/<run id>/<arch>/seed<k>/model.safetensors
    results/<run id>/<arch>/seed<k>/scores.npz   per-token NLL and correctness (paired tests)
    results/<run id>/ppl_by_position.png

Every file is written to a temporary name and renamed into place, so an interrupted run
leaves whole files or none. Reading never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

RECORD = "record.json"
RUN = "run.json"
SCHEMA = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_save(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` and rename the result into ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def new_run_dir(root: Path, benchmark: str, archs: list[str]) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{benchmark}-{'+'.join(archs)}")[:60]
    path = Path(root) / f"{stamp}-{slug}-{secrets.token_hex(2)}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def record_dir(run_dir: Path, arch: str, seed: int) -> Path:
    return Path(run_dir) / arch / f"seed{seed}"


def iter_records(root: Path) -> Iterator[dict]:
    """Every readable record under ``root``; unreadable ones are warned about and skipped."""
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.glob(f"*/*/*/{RECORD}")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable record {path}: {exc}", stacklevel=2)
            continue
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            warnings.warn(f"skipping {path}: not a lengen record of schema {SCHEMA}", stacklevel=2)
            continue
        rec["_path"] = str(path)
        yield rec
