"""Lifecycle events passed to the ``lengen_run_*`` hooks (frozen: fields may be added)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunStart:
    run_dir: Path
    benchmark: str
    archs: tuple[str, ...]
    seeds: tuple[int, ...]
    suite: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointEvaluated:
    run_dir: Path
    benchmark: str
    arch: str
    seed: int
    step: int
    metrics: dict = field(default_factory=dict)
    model: Any = None


@dataclass(frozen=True)
class RunEnd:
    run_dir: Path
    benchmark: str
    status: str  # finished | failed | interrupted
    records: tuple[Path, ...] = ()
    error: str | None = None
