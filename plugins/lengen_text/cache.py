"""The tokenized-corpus cache: one folder per corpus key under ``<cache_dir>/text/``.

A folder holds the token streams and document starts (``.npy``, in the narrowest integer
type), the tokenizer (``tokenizer.json``) and ``meta.json`` (the corpus's fingerprint,
tokenizer description and info). It is written under a temporary name and renamed into
place, so a reader sees a complete entry or none, and two runs racing to fill the same
entry both succeed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

#: bump when the folder layout changes
FORMAT = 1
ARRAYS = ("train_tokens", "train_doc_starts", "eval_tokens", "eval_doc_starts")


def entry_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / "text" / key


def load(cache_dir: Path, key: str) -> tuple[dict, dict[str, np.ndarray], Path] | None:
    """``(meta, arrays, tokenizer_path)`` of a complete entry, else ``None``."""
    d = entry_dir(cache_dir, key)
    try:
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            return None
        arrays = {name: np.load(d / f"{name}.npy").astype(np.int64) for name in ARRAYS}
    except (OSError, ValueError):
        return None
    return meta, arrays, d / "tokenizer.json"


def save(cache_dir: Path, key: str, meta: dict, arrays: dict[str, np.ndarray], tokenizer_json: str,
         vocab_size: int) -> Path:
    d = entry_dir(cache_dir, key)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        for name in ARRAYS:
            a = arrays[name]
            np.save(tmp / f"{name}.npy", a.astype(dtype if name.endswith("tokens") else np.int64))
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": FORMAT}, indent=1))
        if d.exists() and load(cache_dir, key) is None:  # stale or broken: replace it
            shutil.rmtree(d, ignore_errors=True)
        try:
            os.replace(tmp, d)
        except OSError:  # another process filled it first: keep theirs
            if load(cache_dir, key) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return d
